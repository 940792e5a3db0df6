"""Held-out diagnostics of every learned prior, and its collapse alarm.

Every ``train.diagnostics_every`` policy steps (and after the round), on
``train.prior_eval_pairs`` held-out pairs: the current policy's MI-DPO loss,
accuracy and ``log zeta(y_w) - log zeta(y_l)`` under the learned prior and
under each fixed prior of ``FIXED_PRIORS`` (the paper's inequality, measured
on the learned prior's policy), logged as stage ``prior/diagnostics``; and the
collapse alarm (``collapse_alarm``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from midpo.core import losses, priors
from midpo.training import config as config_lib
from midpo.training import pairs as pairs_lib
from midpo.training import recipes

# The fixed priors whose held-out MI-DPO loss is logged beside a learned
# prior's: those that need no model or data beyond the reference, at their
# default hyperparameters.
FIXED_PRIORS = ("dpo", "rdpo", "hdpo", "simpo", "tdpo")


def collapse_alarm(learned_gap: float, reference_gap: float, margin: float = 1.0) -> bool:
  """The collapse alarm of a learned prior.

  ``learned_gap`` is the mean over held-out pairs of
  ``log zeta(y_w) - log zeta(y_l)`` (nats) under the learned prior,
  ``reference_gap`` the same under the reference (DPO's prior, which knows
  nothing of the labels). A prior that lowers the loss by moving its mass to
  the rejected responses drives the first below the second: the alarm fires
  when it is more than ``margin`` nats below.
  """
  return bool(learned_gap - reference_gap < -margin)


class HeldOutDiagnostics(recipes.Monitor):
  """The learned prior's held-out losses under itself and the fixed priors,
  and the collapse alarm, every ``train.diagnostics_every`` steps."""

  def __init__(self, run: recipes.RoundRun):
    env, prior = run.env, run.prior
    config = env.config
    t = config.train
    self.env, self.prior, self.frozen = env, prior, run.frozen
    self.every = t.diagnostics_every
    self.collapse_margin = t.collapse_margin
    loss_config = run.loss_config
    fixed = {}
    for n in FIXED_PRIORS:
      p = priors.make_prior(n)
      try:
        losses.check_compatible(loss_config, p)
      except ValueError as e:
        logging.warning("held-out diagnostics: no loss under the fixed prior %r with this "
                        "run's loss (%s)", n, e)
        continue
      fixed[n] = p
    # Named in the log above; their heldout/* keys are absent from the metrics.
    self.skipped = tuple(n for n in FIXED_PRIORS if n not in fixed)
    fields = set(prior.required_fields()) | set(loss_config.required_fields())
    for p in fixed.values():
      fields |= set(p.required_fields())
    stats_fn = pairs_lib.make_pair_stats(env, fields, prior=prior, reference="online")

    def heldout(policy, prior_params, frozen, batch):
      chosen, rejected = stats_fn(policy, prior_params, frozen, batch)
      out = {}
      learned = losses.mi_dpo_loss(chosen, rejected, prior, loss_config,
                                   prior_params=prior_params)
      for name, o in [(prior.name, learned)] + [
          (n, losses.mi_dpo_loss(chosen, rejected, p, loss_config)) for n, p in fixed.items()]:
        out[f"heldout/loss/{name}"] = o.loss
        out[f"heldout/accuracy/{name}"] = jnp.mean((o.logits > 0).astype(jnp.float32))
        out[f"heldout/log_zeta_gap/{name}"] = o.metrics["prior/log_zeta_gap"]
      return out

    self.heldout = jax.jit(heldout)
    self.batches = []
    if config.data.source == "files" and not list(config.data.files.test_files):
      logging.warning("no test files (config.data.files.test_files): the learned prior's "
                      "held-out diagnostics are skipped")
      return
    data_config = env.data_config()
    data_config.shuffle = False
    it = env.batches(data_config, "test", mode="pairs")
    per_step = config.data.batch_size * env.process_count
    n = min(it.num_epoch_batches(), max(1, -(-t.prior_eval_pairs // per_step)))
    n = env.min_over_processes(n)
    self.batches = [env.global_batch(pairs_lib.select(local, pairs_lib.ROW_FIELDS))
                    for local in it.first_batches(n)]

  def check(self, state, step_index):
    if step_index % self.every == 0:
      self.diagnose(state, step_index)

  def finish(self, state, step_index):
    self.diagnose(state, step_index)

  def diagnose(self, state: dict, step_index: int) -> dict:
    """Logs (and returns) the diagnostics of the current policy and prior."""
    if not self.batches:
      return {}
    sums: dict[str, float] = {}
    for batch in self.batches:
      for k, v in jax.device_get(self.heldout(state["policy"], state["prior"], self.frozen,
                                              batch)).items():
        sums[k] = sums.get(k, 0.0) + float(v)
    m = {k: v / len(self.batches) for k, v in sums.items()}
    name = self.prior.name
    gap = m[f"heldout/log_zeta_gap/{name}"] - m["heldout/log_zeta_gap/dpo"]
    alarm = collapse_alarm(m[f"heldout/log_zeta_gap/{name}"], m["heldout/log_zeta_gap/dpo"],
                           self.collapse_margin)
    m["collapse/gap_vs_reference"] = gap
    m["collapse/alarm"] = float(alarm)
    self.env.writer.write("prior/diagnostics", step_index, m)
    fixed = "  ".join(f"{n} {m[f'heldout/loss/{n}']:.4f}" for n in FIXED_PRIORS
                      if n not in self.skipped)
    logging.info("held-out MI-DPO loss at step %d: %s %.4f | fixed priors: %s", step_index,
                 name, m[f"heldout/loss/{name}"], fixed)
    if alarm:
      logging.warning(
          "collapse alarm at step %d: the learned prior's log zeta(y_w) - log zeta(y_l) on "
          "held-out pairs is %.2f nats below the reference's (margin %.2f): prior mass is "
          "moving to the rejected responses.", step_index, -gap, self.collapse_margin)
    return m


def make_monitor(run: recipes.RoundRun) -> Optional[HeldOutDiagnostics]:
  """The diagnostics of the round's learned prior (None when
  ``train.diagnostics_every`` is 0)."""
  return HeldOutDiagnostics(run) if run.env.config.train.diagnostics_every else None


def default_config() -> ml_collections.ConfigDict:
  """The diagnostics' keys of ``config.train``: every ``diagnostics_every``
  policy steps (0: off), on ``prior_eval_pairs`` test pairs; the collapse
  alarm fires when the prior's ``log zeta(y_w) - log zeta(y_l)`` falls
  ``collapse_margin`` nats below the reference's."""
  return ml_collections.ConfigDict({
      "diagnostics_every": 25, "prior_eval_pairs": 128, "collapse_margin": 1.0})


def validate_config(config) -> None:
  """The diagnostics' keys (checked on every run)."""
  t = config.train
  if not isinstance(t.diagnostics_every, int) or t.diagnostics_every < 0:
    config_lib.fail("train.diagnostics_every",
                    f"must be a non-negative int; got {t.diagnostics_every!r}")
  if not isinstance(t.prior_eval_pairs, int) or t.prior_eval_pairs < 1:
    config_lib.fail("train.prior_eval_pairs",
                    f"must be a positive int; got {t.prior_eval_pairs!r}")
  if t.collapse_margin < 0:
    config_lib.fail("train.collapse_margin", f"must be >= 0; got {t.collapse_margin}")


config_lib.register_config_block("train", default_config, validate_config)
recipes.set_default_monitor(make_monitor)
