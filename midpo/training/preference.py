"""The preference stage: the generic round runner, baselines and restore.

``run_preference(env, ref_params, pairs)`` runs the prior's procedure
(``midpo.training.recipes``): its auxiliary models, then each round, a loop
of steps whose prior parameters move as the prior's update says. Policy and
prior parameters are separate pytrees with separate optax states and
separately jitted steps, each donating only what it updates.

``pairs`` is the run's pair source: overrides of ``config.data.synthetic``
(``{}`` for the dataset's own pairs; ``samples_path`` for pairs sampled from
the reference).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
from absl import logging

from midpo import files
from midpo.core import losses, priors
from midpo.training import checkpoint as ckpt_lib
from midpo.training import config as config_lib
from midpo.training import env as env_lib
from midpo.training import inputs
from midpo.training import loop, optim
from midpo.training import pairs as pairs_lib
from midpo.training import recipes
from midpo.training.reference_cache import ReferenceCache

PyTree = Any


def preference_dir(env: env_lib.Env, round_index: Optional[int] = None) -> str:
  """``<workdir>/checkpoints`` (one round) or ``<workdir>/checkpoints/round<r>``
  (the last round when ``round_index`` is None)."""
  n = num_rounds(env)
  if round_index is None:
    round_index = n - 1
  base = os.path.join(env.workdir, "checkpoints")
  return base if n == 1 else os.path.join(base, f"round{round_index}")


def num_rounds(env: env_lib.Env) -> int:
  """The number of rounds of the run's prior's procedure."""
  prior = config_lib.make_prior(env.config)
  return recipes.recipe_for(prior).procedure.num_rounds(env.config)


def baseline_dir(env: env_lib.Env, name: str) -> str:
  """Checkpoints of the baseline ``name``."""
  return os.path.join(env.workdir, "baselines", name)


def run_preference_round(env: env_lib.Env, prior: priors.Prior, frozen: dict,
                         init_policy: PyTree, round_index: int, *, pairs: dict, stage: str,
                         directory: str, swap_roles: bool = False,
                         loss_config: Optional[losses.LossConfig] = None
                         ) -> tuple[PyTree, PyTree]:
  """One round of preference training of ``init_policy`` under ``prior``.

  ``frozen`` holds the frozen models' parameters (``reference`` and what the
  prior's inputs read); ``pairs`` the round's pair source; ``swap_roles``
  trains on the reversed preferences; ``stage`` and ``directory`` name its
  logs and checkpoints. Returns the policy and the prior's parameters.
  """
  config = env.config
  ref_params = frozen["reference"]
  t = config.train
  loss_config = loss_config or config_lib.make_loss_config(config)
  it = env.batches(env.data_config(**pairs), "train", mode="pairs")
  logging.info("%s: reference %s, padding_free=%s, fused_lm_head=%s, attention %s, "
               "compute %s over %s parameters, remat %s", stage, t.reference,
               bool(t.padding_free), bool(t.fused_lm_head), env.model_config.attention_impl,
               env.model_config.dtype, env.model_config.param_dtype, env.model_config.remat)
  if t.padding_free and env.model_config.attention_impl != "xla":
    logging.warning("train.padding_free: packed rows take XLA's masked attention (a [rows, W, W] "
                    "score array, W = data.max_length = %d), not model.attention_impl=%r",
                    config.data.max_length, env.model_config.attention_impl)
  # Token log-probs of frozen models computed once: the reference's (ref_logps), and any other
  # frozen model's that a prior's inputs read as <name>_logps (TIS-DPO's cached weights).
  fields = pairs_lib.pair_fields(env, prior)
  fields += inputs.cacheable_fields(inputs.providers_for(env, prior, prior.required_fields()))
  caches = {}
  for field, name in [("ref_logps", "reference")] + [(f"{n}_logps", n) for n in frozen
                                                       if n != "reference"]:
    if field in fields:
      t0 = time.perf_counter()
      caches[field] = ReferenceCache(env, it, frozen[name])
      logging.info("cached the %s model's log-probs of %d pairs in %.1f s", name,
                   len(caches[field]), time.perf_counter() - t0)

  update = recipes.recipe_for(prior).make_update(prior)
  policy = jax.tree.map(jnp.copy, init_policy)
  policy_tx = optim.adamw(t.learning_rate, t.warmup_steps, t.steps, t.weight_decay, t.grad_clip)
  prior_tx = update.optimizer(env)
  policy_opt = optim.init_opt(policy_tx, policy, env.mesh)
  prior_params = update.init_params(env, prior, ref_params, it)
  prior_opt = optim.init_opt(prior_tx, prior_params, env.mesh) if prior_tx is not None else None
  shard = {"policy": env_lib.shardings_of(policy),
           "policy_opt": env_lib.shardings_of(policy_opt),
           "prior": env_lib.shardings_of(prior_params) if prior_params is not None else None,
           "prior_opt": env_lib.shardings_of(prior_opt) if prior_opt is not None else None}
  steps = pairs_lib.make_preference_steps(env, prior, loss_config, policy_tx, prior_tx, shard,
                                          prior_on_loss=update.on_loss)
  run = recipes.RoundRun(env, prior, loss_config, frozen, steps, shard, prior_tx, round_index,
                         t.steps)
  update.start(run)
  base_key = jax.random.fold_in(jax.random.key(config.seed), 100 + round_index)

  def step(state, local, step_index):
    for field, cache in caches.items():
      local = cache.add_to(local, field)
    if swap_roles:  # after the cache, so that the reference's log-probs swap too
      local = pairs_lib.swap_roles(local)
    host = pairs_lib.select(local, fields)
    if config.train.padding_free:
      host.update(pairs_lib.packed_rows(env, local))
    batch = env.global_batch(host)
    rng = jax.random.fold_in(base_key, step_index)
    state = update.before_step(run, state, step_index)
    return update.step(run, state, batch, rng, step_index)

  # The frozen models are never updated and never checkpointed: the reference
  # is the SFT checkpoint, the others are their own stages' checkpoints.
  state = {"policy": policy, "policy_opt": policy_opt, "prior": prior_params,
           "prior_opt": prior_opt}
  spec = loop.LoopSpec(stage, directory, t.steps, it, loop.count_tokens, step,
                       keep_every=config.eval.every)
  state = loop.run_loop(env, spec, state)
  update.finish(run, state)
  return state["policy"], state["prior"]


def run_preference(env: env_lib.Env, ref_params: PyTree,
                   pairs: dict) -> tuple[PyTree, PyTree, dict]:
  """Every round of the run's prior's procedure, from the reference.

  Returns the final policy, its prior's parameters and the frozen models of
  the last round (what its prior reads).
  """
  config = env.config
  prior = config_lib.make_prior(config)
  procedure = recipes.recipe_for(prior).procedure
  n = procedure.num_rounds(config)
  auxiliary = procedure.auxiliary_models(env, ref_params, pairs)
  policy, prior_params = ref_params, None
  policies: list[PyTree] = []  # the last rounds' policies the procedure reads
  frozen = {"reference": ref_params}
  for r in range(n):
    frozen = dict({"reference": ref_params}, **procedure.frozen_models(r, ref_params, policies),
                  **auxiliary)
    round_pairs = procedure.round_pairs(env, r, pairs, ref_params, policies)
    policy, prior_params = run_preference_round(
        env, prior, frozen, policy, r, pairs=round_pairs,
        stage="preference" if n == 1 else f"preference/round{r}",
        directory=preference_dir(env, r))
    if procedure.history:
      policies = (policies + [policy])[-procedure.history:]
  return policy, prior_params, frozen


def run_baselines(env: env_lib.Env, ref_params: PyTree, pairs: dict) -> dict[str, PyTree]:
  """The policies of ``config.baselines``: each prior (at its default
  hyperparameters) trained from the reference on the run's pairs, with the
  same steps, optimiser, data order and seed as the run's own policy."""
  out = {}
  for name in env.config.baselines:
    out[name], _ = run_preference_round(
        env, priors.make_prior(name), {"reference": ref_params}, ref_params, 0, pairs=pairs,
        stage=f"baseline/{name}", directory=baseline_dir(env, name))
  return out


def _restore_round(env: env_lib.Env, prior: priors.Prior, directory: str, step: int,
                   ref_params: PyTree) -> tuple[PyTree, PyTree]:
  """The policy (and prior) of the checkpoint ``step`` in ``directory``."""
  ckpt = ckpt_lib.Checkpointer(directory)
  target = {"policy": ckpt_lib.abstract_like(ref_params)}
  prior_target = recipes.recipe_for(prior).make_update(prior).restore_target(env, prior,
                                                                             ref_params)
  if prior_target is not None:
    target["prior"] = prior_target
  trees, _ = ckpt.restore(step, target)
  ckpt.close()
  return trees["policy"], trees.get("prior")


def restore_preference(env: env_lib.Env, ref_params: PyTree) -> tuple[PyTree, PyTree]:
  """The policy (and prior) of the latest preference checkpoint of this workdir.

  Raises:
    FileNotFoundError: the workdir has no preference checkpoint.
  """
  directory = preference_dir(env)
  step = None
  if files.isdir(directory):
    ckpt = ckpt_lib.Checkpointer(directory)
    step = ckpt.latest_step()
    ckpt.close()
  if step is None:
    raise FileNotFoundError(f"no preference checkpoint in {directory}; run the "
                            "'preference' stage first")
  return _restore_round(env, config_lib.make_prior(env.config), directory, step, ref_params)


def restore_baselines(env: env_lib.Env) -> dict[str, PyTree]:
  """The policies of ``config.baselines`` from their checkpoints."""
  return {name: env_lib.restore_params(env, baseline_dir(env, name), item="policy")
          for name in env.config.baselines}


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """A preference checkpoint kept for evaluation along training.

  Attributes:
    model: the run's prior's name, or a baseline's.
    step: policy updates since the reference (earlier rounds' included).
    round_index: the round of the procedure it belongs to (0 for baselines).
    round_step: the step within its round (the checkpoint's own step).
    directory: the round's checkpoint directory.
    baseline: whether it is a baseline's.
  """
  model: str
  step: int
  round_index: int
  round_step: int
  directory: str
  baseline: bool = False


def snapshots(env: env_lib.Env, every: int) -> list[Snapshot]:
  """The run's kept preference checkpoints at multiples of ``every`` steps of
  each round and at the end of each round, the policy's then each baseline's,
  in step order (the step-0 reference excluded).

  Raises:
    FileNotFoundError: a round's or baseline's checkpoints are missing.
  """
  total = env.config.train.steps

  def kept(directory):
    if not files.isdir(directory):
      raise FileNotFoundError(f"no preference checkpoints in {directory}")
    ckpt = ckpt_lib.Checkpointer(directory)
    steps = [s for s in ckpt.all_steps() if s > 0 and (s % every == 0 or s == total)]
    ckpt.close()
    if total not in steps:
      raise FileNotFoundError(f"{directory} has no checkpoint of its last step {total}")
    return sorted(steps)

  name = env.config.prior.name
  out = [Snapshot(name, r * total + s, r, s, preference_dir(env, r))
         for r in range(num_rounds(env)) for s in kept(preference_dir(env, r))]
  for b in env.config.baselines:
    out += [Snapshot(b, s, 0, s, baseline_dir(env, b), baseline=True)
            for s in kept(baseline_dir(env, b))]
  return out


class SnapshotLoader:
  """Restores snapshots with the frozen models their prior reads (the
  procedure's auxiliary models and earlier rounds' policies, each loaded once)."""

  def __init__(self, env: env_lib.Env, ref_params: PyTree, pairs: dict):
    self.env, self.ref_params, self.pairs = env, ref_params, pairs
    self.prior = config_lib.make_prior(env.config)
    self.procedure = recipes.recipe_for(self.prior).procedure
    self._auxiliary: Optional[dict] = None
    self._finals: dict[int, PyTree] = {}

  def _final_policy(self, r: int) -> PyTree:
    if r not in self._finals:
      directory = preference_dir(self.env, r)
      self._finals[r], _ = _restore_round(self.env, self.prior, directory,
                                          self.env.config.train.steps, self.ref_params)
    return self._finals[r]

  def training_pairs(self, round_index: int) -> dict:
    """The pair source round ``round_index`` of the run's procedure trained on
    (DICE's later rounds: their own samples)."""
    h = self.procedure.history
    policies = [self._final_policy(r) for r in range(max(0, round_index - h), round_index)]
    return self.procedure.round_pairs(self.env, round_index, self.pairs, self.ref_params,
                                      policies)

  def frozen(self, round_index: int) -> dict:
    """The frozen models of the run's round ``round_index`` (reference included)."""
    if self._auxiliary is None:
      self._auxiliary = self.procedure.auxiliary_models(self.env, self.ref_params, self.pairs)
    h = self.procedure.history
    policies = [self._final_policy(r) for r in range(max(0, round_index - h), round_index)]
    return dict({"reference": self.ref_params},
                **self.procedure.frozen_models(round_index, self.ref_params, policies),
                **self._auxiliary)

  def load(self, snap: Snapshot) -> tuple[PyTree, PyTree, dict, priors.Prior]:
    """``(policy, prior parameters, frozen models, prior)`` of ``snap``."""
    if snap.baseline:
      prior = priors.make_prior(snap.model)
      policy, _ = _restore_round(self.env, prior, snap.directory, snap.round_step,
                                 self.ref_params)
      return policy, None, {"reference": self.ref_params}, prior
    policy, prior_params = _restore_round(self.env, self.prior, snap.directory, snap.round_step,
                                          self.ref_params)
    return policy, prior_params, self.frozen(snap.round_index), self.prior
