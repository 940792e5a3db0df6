"""The generic step loop: resume, periodic and SIGTERM checkpoints, metrics.

``run_loop(env, spec, state)`` runs ``spec.step`` from the latest checkpoint
in ``spec.directory`` (or step 0) to ``spec.total_steps``. Every stage of a
run (SFT, each preference round, baselines, an algorithm's auxiliary models)
is one ``LoopSpec``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from midpo.training import checkpoint as ckpt_lib


class Preempted(SystemExit):
  """Raised after the checkpoint taken on SIGTERM is on disk (exit code 143)."""

  def __init__(self, step: int):
    super().__init__(143)
    self.step = step


@dataclasses.dataclass
class LoopSpec:
  """One stage's loop.

  Attributes:
    stage: the name its metrics and logs carry.
    directory: its checkpoints.
    total_steps: steps to run in all (a resumed stage runs the rest).
    iterator: the batches; ``next``, ``get_state`` and ``set_state``.
    tokens_per_step: real tokens of a host batch (for tokens/s).
    step: ``(state, host batch, step index) -> (state, metrics)``.
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
  ``n`` are fetched after step ``n + 1`` is dispatched.

  Raises:
    Preempted: after SIGTERM, once the checkpoint is saved.
    FloatingPointError: the loss of a step, or the parameters about to be
      checkpointed, are not finite (names the last good checkpoint; a
      checkpoint is only written from finite parameters).
  """
  config = env.config
  ckpt = ckpt_lib.Checkpointer(spec.directory, max_to_keep=config.max_checkpoints,
                               keep_period=spec.keep_every or None)
  start = 0
  latest = ckpt.latest_step()
  if latest is not None:
    state, meta = ckpt.restore(latest, ckpt_lib.abstract_like(state))
    spec.iterator.set_state(meta["data"])
    start = int(meta["step"])
    logging.info("%s: resumed from step %d (%s)", spec.stage, start, spec.directory)
  if start >= spec.total_steps:
    ckpt.close()
    return state

  def save(step, force=False):
    # Only finite parameters are kept: the loss checked at step k was computed
    # before update k, so the update itself could have diverged.
    if not bool(_all_finite(state)):
      ckpt.wait()
      raise FloatingPointError(
          f"{spec.stage}: non-finite parameters after step {step}; not saved. The last good "
          f"checkpoint is step {last_good} in {spec.directory}")
    ckpt.save(step, state, {"step": step, "stage": spec.stage,
                            "data": spec.iterator.get_state()}, force=force)

  pending = None
  window: dict[str, list[float]] = {}
  tokens = 0
  t0 = time.perf_counter()
  last_good = latest

  def drain(item):
    nonlocal tokens, t0
    step, metrics, ntok = item
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    loss = values.get("loss", 0.0)
    if not math.isfinite(loss):
      ckpt.wait()
      raise FloatingPointError(
          f"{spec.stage}: non-finite loss ({loss}) at step {step}; the last good checkpoint "
          f"is step {last_good} in {spec.directory}")
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

  env.sigterm.install()
  try:
    for step in range(start, spec.total_steps):
      if _should_stop(env):
        if pending is not None:
          drain(pending)
          pending = None
        if last_good != step:  # not already saved by the periodic checkpoint
          save(step, force=True)
        ckpt.wait()
        logging.warning("%s: checkpoint at step %d saved after SIGTERM; exiting.", spec.stage,
                        step)
        raise Preempted(step)
      local = next(spec.iterator)
      state, metrics = spec.step(state, local, step)
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


def _should_stop(env) -> bool:
  """SIGTERM on any process stops every process at the same step."""
  if env.process_count > 1:
    return bool(env.max_over_processes(int(env.sigterm.received)))
  return env.sigterm.received


def _fmt_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
