"""The generic step loop: resume, periodic and SIGTERM checkpoints, metrics.

``run_loop(env, spec, state)`` runs ``spec.step`` from the latest checkpoint
in ``spec.directory`` (or step 0) to ``spec.total_steps``. Every stage of a
run (SFT, each preference round, baselines, an algorithm's auxiliary models)
is one ``LoopSpec``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from midpo.training import checkpoint as ckpt_lib
from midpo.training import config as config_lib
from midpo.training import env as env_lib
from midpo.training import run_identity


class Preempted(SystemExit):
  """Raised after a stop signal once what resumes exactly is on disk (exit
  code 143 after SIGTERM, 130 after SIGINT). ``step``: the step of the
  checkpoint saved (None when the interrupted stage saves nothing)."""

  def __init__(self, step: Optional[int], code: int = 143):
    super().__init__(code)
    self.step = step


class Diverged(FloatingPointError):
  """The divergence guard stopped a stage (non-finite loss or parameters, a
  loss above ``divergence.max_loss``, a spike, a zero gradient norm)."""


@dataclasses.dataclass
class DivergenceGuard:
  """When a stage's step counts as diverged (``config.divergence``).

  Attributes:
    max_loss: a loss above this (0: no bound).
    spike_factor: a loss above this many times the median of the previous
      ``spike_window`` steps' losses (0: off; checked once the window is full).
    spike_window: steps in that running median.
    zero_grad_norm: a policy gradient norm (``grad_norm``,
      ``grad_norm/policy``) of exactly 0 while the loss is not 0: the model
      no longer learns (saturated). A loss of exactly 0 with no gradient, as
      the hinge link gives when every pair clears its margin, is not counted.
  A non-finite loss always counts. The squared links start at a large loss
  for a small alpha (IPO's ``1/(4 alpha^2)``, SPPO's ``1/(2 alpha^2)``):
  ``validate_divergence_config`` asks for a larger bound then.
  """
  max_loss: float = 1e4
  spike_factor: float = 0.0
  spike_window: int = 50
  zero_grad_norm: bool = True

  @classmethod
  def from_config(cls, config) -> "DivergenceGuard":
    block = config.get("divergence") if hasattr(config, "get") else None
    return cls(**dict(block)) if block is not None else cls()

  def check(self, values: dict[str, float], recent: list[float]) -> Optional[str]:
    """Why the step with metrics ``values`` diverged, after ``recent``
    losses (None: it did not)."""
    loss = values.get("loss")
    if loss is not None:
      if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
      if self.max_loss and loss > self.max_loss:
        return f"loss {loss:.6g} above divergence.max_loss={self.max_loss:g}"
      if self.spike_factor and len(recent) >= self.spike_window:
        median = float(np.median(recent[-self.spike_window:]))
        if loss > self.spike_factor * median:
          return (f"loss {loss:.6g} above divergence.spike_factor={self.spike_factor:g} x the "
                  f"median {median:.6g} of the last {self.spike_window} steps")
    if self.zero_grad_norm and loss != 0.0:
      for key in ("grad_norm", "grad_norm/policy"):
        if values.get(key) == 0.0:
          return f"{key} is exactly 0 (the model no longer learns; divergence.zero_grad_norm)"
    return None


def default_divergence_config() -> ml_collections.ConfigDict:
  """``config.divergence``: the guard's defaults (``DivergenceGuard``)."""
  return ml_collections.ConfigDict(dataclasses.asdict(DivergenceGuard()))


def validate_divergence_config(config) -> None:
  """Raises ``ConfigError`` naming a wrong ``config.divergence`` key."""
  d = config.divergence
  for key in ("max_loss", "spike_factor"):
    value = d[key]
    if not config_lib.is_number(value) or not math.isfinite(value) or value < 0:
      config_lib.fail(f"divergence.{key}", f"must be a finite number >= 0 (0: off); got {value!r}")
  if isinstance(d.spike_window, bool) or not isinstance(d.spike_window, int) or d.spike_window < 1:
    config_lib.fail("divergence.spike_window", f"must be a positive int; got {d.spike_window!r}")
  if not isinstance(d.zero_grad_norm, bool):
    config_lib.fail("divergence.zero_grad_norm", f"must be a bool; got {d.zero_grad_norm!r}")
  # The squared links start far from 0 at a small alpha (policy = reference).
  alpha = config.loss.alpha
  links = [part.strip() for part in str(config.loss.link).split(",")]
  weights = list(config.loss.get("loss_weights") or ()) or [1.0] * len(links)
  for link, weight in zip(links, weights):
    start = {"ipo": ("1/(4 alpha^2)", 0.25), "sppo_hard": ("1/(2 alpha^2)", 0.5)}.get(link)
    if not (d.max_loss and start and config_lib.is_number(alpha) and alpha > 0
            and config_lib.is_number(weight)):
      continue
    value = abs(weight) * start[1] / alpha**2
    if value >= d.max_loss / 10:
      config_lib.fail("divergence.max_loss", f"{d.max_loss:g} is within 10x of the {link} "
                      f"link's starting loss {start[0]} = {value:g} at loss.alpha={alpha:g}"
                      f"{f' (weight {weight:g})' if weight != 1 else ''}: raise it (or 0: no "
                      "bound)")


config_lib.register_config_block("divergence", default_divergence_config,
                                 validate_divergence_config)


@dataclasses.dataclass
class LoopSpec:
  """One stage's loop.

  Attributes:
    stage: the name its metrics and logs carry.
    directory: its checkpoints.
    total_steps: steps to run in all (a resumed stage runs the rest).
    iterator: the batches; ``next``, ``get_state`` and ``set_state``.
    tokens_per_step: real tokens of a host batch (for tokens/s).
    step: ``(state, host batch, step index) -> (state, metrics)``. It may
      raise ``env.StopRequested`` (a stop signal seen inside a long step,
      e.g. a learned prior's round) before it changes ``state``; the loop
      then checkpoints the state before the step.
    keep_every: also checkpoint every this many steps and keep those
      checkpoints (0: only the latest ``max_checkpoints``), for evaluation
      along training.
  """
  stage: str
  directory: str
  total_steps: int
  iterator: Any
  tokens_per_step: Callable[[dict], int]
  step: Callable[[dict, dict, int], tuple[dict, dict]]
  keep_every: int = 0


def count_tokens(batch: dict) -> int:
  """Real tokens of a host batch (the sum of its attention mask)."""
  return int(np.asarray(batch["attention_mask"]).sum())


def run_loop(env, spec: LoopSpec, state: dict) -> dict:
  """Runs ``spec.step`` to ``spec.total_steps``: resume, checkpoints, logs, SIGTERM.

  ``state`` is a dict of pytrees (every one is checkpointed). Metrics of step
  ``n`` are fetched after step ``n + 1`` is dispatched. A checkpoint holds the
  state, the data position, the run's config (a resume with another config is
  refused, naming the keys) and the logging window's running values (a
  resumed run logs the same rows as an uninterrupted one). A damaged latest
  checkpoint is set aside and the stage resumes from the latest intact one.

  Raises:
    Preempted: after SIGTERM or SIGINT, once the checkpoint is saved.
    Diverged: the divergence guard (``config.divergence``) stopped the stage;
      the message names the last good checkpoint (checkpoints are written
      only from finite parameters, and one whose parameters' loss failed the
      guard is deleted).
    ConfigError: the latest checkpoint was saved with another config.
    CheckpointError: no checkpoint of the directory can be read.
  """
  config = env.config
  guard = DivergenceGuard.from_config(config)
  ckpt = ckpt_lib.Checkpointer(spec.directory, max_to_keep=config.max_checkpoints,
                               keep_period=spec.keep_every or None)
  config_json = run_identity.config_json(config)
  start = 0
  window: dict[str, list[float]] = {}
  tokens = 0
  recent: list[float] = []
  found = ckpt.restore_latest_intact(
      ckpt_lib.abstract_like(state),
      check_meta=lambda meta, where: run_identity.check_checkpoint(
          meta.get("config"), config_json, where))
  latest = None
  if found is not None:
    latest, state, meta = found
    try:
      spec.iterator.set_state(_own_data_state(meta["data"], env))
    except ValueError as e:
      raise config_lib.ConfigError(
          f"checkpoint {os.path.join(spec.directory, str(latest))} was saved with other data "
          f"(config.data.* and the config are the same, so the data files' content, "
          f"data.num_shards or the process count changed): {e}. Resume with the data it was "
          "saved with, or use another --workdir") from None
    start = int(meta["step"])
    log_window = meta.get("log_window") or {}
    window = {k: list(v) for k, v in log_window.get("values", {}).items()}
    tokens = int(log_window.get("tokens", 0))
    recent = list(log_window.get("recent_losses", []))
    logging.info("%s: resumed from step %d (%s)", spec.stage, start, spec.directory)
  if start > spec.total_steps:
    ckpt.close()
    raise config_lib.ConfigError(
        f"{spec.stage}: its latest checkpoint is at step {start} in {spec.directory}, past the "
        f"{spec.total_steps} steps the config asks for: a run cannot be shortened after it "
        f"trained; ask for at least {start} steps, or use another --workdir")
  if start == spec.total_steps:
    ckpt.close()
    logging.info("%s: already complete at step %d (%s)", spec.stage, start, spec.directory)
    return state

  def save(step, force=False):
    # Only finite parameters are kept: the loss checked at step k was computed
    # before update k, so the update itself could have diverged.
    if not bool(_all_finite(state)):
      ckpt.wait()
      raise Diverged(
          f"{spec.stage}: non-finite parameters (not saved) at step {step}; the last good "
          f"checkpoint is {_named(last_good, spec.directory)}")
    # Every process's data position (the meta item is written by process 0).
    data = env_lib.gather_json(env, spec.iterator.get_state())
    ckpt.save(step, state, {"step": step, "stage": spec.stage, "data": data,
                            "config": config_json,
                            "log_window": {"values": window, "tokens": tokens,
                                           "recent_losses": recent[-guard.spike_window:]}},
              force=force)
    env.writer.flush()  # a remote workdir's metrics.jsonl keeps up with its checkpoints

  pending = None
  t0 = time.perf_counter()
  last_good = latest

  def drain(item):
    nonlocal tokens, t0, last_good
    step, metrics, ntok = item
    ckpt.check_for_errors()  # a failed asynchronous save stops the run now
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    reason = guard.check(values, recent)
    if reason is not None:
      ckpt.wait()
      if last_good is not None and last_good >= step:
        # That checkpoint holds the parameters whose loss just failed.
        ckpt.delete(last_good)
        last_good = max([s for s in ckpt.all_steps() if s < step], default=None)
      # Step numbers count steps done, as the log's: the loss of step step + 1 is
      # computed on the parameters after ``step`` updates (checkpoint ``step``).
      raise Diverged(f"{spec.stage}: {reason} at step {step + 1}; the last good checkpoint is "
                     f"{_named(last_good, spec.directory)}")
    if "loss" in values:
      recent.append(values["loss"])
      del recent[:-guard.spike_window]
    for k, v in values.items():
      window.setdefault(k, []).append(v)
    tokens += ntok
    done = step + 1
    if done % config.log_every == 0 or done == spec.total_steps:
      means = {k: float(np.mean(v)) for k, v in window.items()}
      elapsed = time.perf_counter() - t0
      n = len(window.get("loss", [1]))
      rate = n / max(elapsed, 1e-9)
      means["perf/steps_per_sec"] = rate
      means["perf/tokens_per_sec"] = tokens / max(elapsed, 1e-9)
      env.writer.write(spec.stage, done, means)
      eta = (spec.total_steps - done) / max(rate, 1e-9)
      logging.info("%s step %d/%d  loss %.4f  %.2f steps/s  %.0f tokens/s  ETA %s",
                   spec.stage, done, spec.total_steps, means.get("loss", float("nan")), rate,
                   means["perf/tokens_per_sec"], _fmt_eta(eta))
      window.clear()
      tokens = 0
      t0 = time.perf_counter()

  def stop(step, during=None):
    if last_good != step:  # not already saved by the periodic checkpoint
      save(step, force=True)
    ckpt.wait()
    what = f" during {during}" if during else ""
    logging.warning("%s: %s received%s; checkpoint at step %d saved (the run resumes from "
                    "it exactly); exiting.", spec.stage, env.sigterm.signal_name, what, step)
    raise Preempted(step, env.sigterm.exit_code)

  env.sigterm.install()
  try:
    for step in range(start, spec.total_steps):
      if env_lib.stop_requested(env):
        if pending is not None:
          drain(pending)
          pending = None
        stop(step)
      position = spec.iterator.get_state()
      local = next(spec.iterator)
      try:
        state, metrics = spec.step(state, local, step)
      except env_lib.StopRequested as e:
        spec.iterator.set_state(position)  # the step is redone whole on resume
        if pending is not None:
          drain(pending)
          pending = None
        stop(step, during=f"step {step + 1}'s {e.what}")
      if pending is not None:
        drain(pending)
      pending = (step, metrics, spec.tokens_per_step(local))
      if _periodic(step + 1, config.checkpoint_every, spec.keep_every, spec.total_steps):
        drain(pending)
        pending = None
        save(step + 1)
        last_good = step + 1
    if pending is not None:
      drain(pending)
    save(spec.total_steps, force=True)
    ckpt.close()
  finally:
    env.sigterm.uninstall()
    env.writer.flush()
  return state


def _own_data_state(saved, env) -> dict:
  """This process's data position from a checkpoint's ``data`` (one per
  process; a single dict in checkpoints written before positions were
  gathered, which hold process 0's only)."""
  if isinstance(saved, dict):
    if env.process_count > 1:
      raise ValueError("the checkpoint holds one process's data position; this run has "
                       f"{env.process_count} processes")
    return saved
  if len(saved) != env.process_count:
    raise ValueError(f"the checkpoint was saved by {len(saved)} processes; this run has "
                     f"{env.process_count} (keep the process count)")
  return saved[env.process_index]


def _named(step: Optional[int], directory: str) -> str:
  if step is None:
    return f"none (no checkpoint in {directory}: the stage starts over)"
  return f"step {step} in {directory}"


@jax.jit
def _all_finite(tree) -> jax.Array:
  """Whether every floating-point leaf of ``tree`` is finite everywhere."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def _periodic(done: int, every: int, keep_every: int, total: int) -> bool:
  """Whether the checkpoint after ``done`` steps is a periodic one (the last
  step's is always saved)."""
  if done >= total:
    return False
  return done % every == 0 or bool(keep_every and done % keep_every == 0)


def _fmt_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
