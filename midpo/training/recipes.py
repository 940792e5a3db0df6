"""What an algorithm adds to the generic trainer, each part with a default.

A prior (``midpo.core.priors``) is the loss's side of an algorithm. Its
trainer's side is a ``Recipe``, registered under the prior's name next to
it (``midpo.algorithms``):

* ``update(prior) -> PriorUpdate``: how the prior's own parameters move. The
  default: a prior without parameters never moves (``PriorUpdate``), one with
  parameters takes gradient steps on the MI-DPO loss (``LossGradient``),
  jointly with the policy or alternating (``config.train.prior_update``).
  Algorithms supply others (maximum likelihood on policy samples, a moving
  average of the policy).
* ``procedure``: rounds, auxiliary models and each round's pairs
  (``Procedure``; the default is one round on the run's pairs).
* ``validate(config, prior, batch_shards, process_count)``: the algorithm's
  own config rules when its prior is the run's, raising ``ConfigError``.

The per-token inputs a prior reads come from ``midpo.training.inputs``. An
algorithm that fits none of these gets its own trainer module in its package.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from midpo.core import losses, priors, stats
from midpo.training import checkpoint as ckpt_lib
from midpo.training import config as config_lib
from midpo.training import env as env_lib
from midpo.training import inputs, optim
from midpo.training import pairs as pairs_lib

PyTree = Any


@dataclasses.dataclass
class RoundRun:
  """One preference round as an update sees it.

  Attributes:
    env: the run's environment.
    prior: the round's prior.
    loss_config: the MI-DPO loss's options.
    frozen: the frozen models' parameters by name.
    steps: the jitted preference steps.
    shard: output shardings of ``policy``, ``policy_opt``, ``prior``, ``prior_opt``.
    prior_tx: the prior's optimiser (None without one).
    round_index: the round (0 for the first).
    total_steps: the round's policy-loop length.
  """
  env: env_lib.Env
  prior: priors.Prior
  loss_config: losses.LossConfig
  frozen: dict
  steps: pairs_lib.PreferenceSteps
  shard: dict
  prior_tx: Optional[optax.GradientTransformation]
  round_index: int
  total_steps: int

  def policy_step(self, state: dict, batch: dict, rng) -> tuple[dict, dict]:
    """One step of the policy with the prior's parameters fixed."""
    p, o, m = self.steps.policy(state["policy"], state["policy_opt"], state["prior"],
                                self.frozen, batch, rng)
    return dict(state, policy=p, policy_opt=o), m


class Monitor:
  """Per-round checks of a learned prior (``check`` before a step, ``finish`` after the round)."""

  def check(self, state: dict, step_index: int) -> None:
    """Called before step ``step_index`` with the training state."""
    del state, step_index

  def finish(self, state: dict, step_index: int) -> None:
    """Called after the round's last step (``step_index`` = the round's length)."""
    del state, step_index


class PriorUpdate:
  """How a prior's own parameters move. This base: they do not (a prior
  without parameters, or one whose parameters are fixed); every step is a
  policy step.

  One instance serves one round. ``monitor``, when given, is called with the
  ``RoundRun`` at the round's start and returns a ``Monitor`` (or None).
  """
  # Gradient steps of the prior's parameters on the MI-DPO loss (the trainer
  # then builds the prior's and the joint jitted steps).
  on_loss = False

  def __init__(self, monitor: Optional[Callable[[RoundRun], Optional[Monitor]]] = None):
    self._monitor_factory = monitor
    self.monitor: Optional[Monitor] = None

  def optimizer(self, env: env_lib.Env) -> Optional[optax.GradientTransformation]:
    """The prior's optimiser (None: no optimiser state)."""
    del env
    return None

  def init_params(self, env: env_lib.Env, prior: priors.Prior, ref_params: PyTree,
                  batches) -> PyTree:
    """The prior's initial parameters (None without any); ``batches`` is the
    round's iterator, for shapes."""
    del env, prior, ref_params, batches
    return None

  def restore_target(self, env: env_lib.Env, prior: priors.Prior,
                     ref_params: PyTree) -> Optional[PyTree]:
    """Abstract targets of the parameters in a checkpoint (None without any)."""
    del env, prior, ref_params
    return None

  def start(self, run: RoundRun) -> None:
    """Called once per round, before its first step."""
    if self._monitor_factory is not None:
      self.monitor = self._monitor_factory(run)

  def before_step(self, run: RoundRun, state: dict, step_index: int) -> dict:
    """Called before every step; may change the state (a prior's refit)."""
    del run
    if self.monitor is not None:
      self.monitor.check(state, step_index)
    return state

  def step(self, run: RoundRun, state: dict, batch: dict, rng,
           step_index: int) -> tuple[dict, dict]:
    """One training step: ``(state, metrics)``."""
    del step_index
    return run.policy_step(state, batch, rng)

  def finish(self, run: RoundRun, state: dict) -> None:
    """Called once after the round's last step."""
    if self.monitor is not None:
      self.monitor.finish(state, run.total_steps)


def example_stats(env: env_lib.Env, num_pairs: int, length: int):
  """A ``SequenceStats`` of the shapes a prior's parameters are built from
  (``ref_hidden`` abstract: ``[B, T, L, D]`` of the policy's model)."""
  mc = env.model_config
  return stats.SequenceStats(
      logps=jnp.zeros((num_pairs, length)), mask=jnp.zeros((num_pairs, length)),
      ref_hidden=jax.ShapeDtypeStruct((num_pairs, length, mc.num_layers, mc.hidden_size),
                                      jnp.float32))


class LossGradient(PriorUpdate):
  """The prior's parameters take gradient steps on the MI-DPO loss with their
  own AdamW (``train.prior_learning_rate``, ``train.prior_weight_decay``),
  projected by ``prior.project`` after each: on every batch together with the
  policy (``train.prior_update='joint'``) or in alternation,
  ``train.policy_steps_per_round`` policy steps then
  ``train.prior_steps_per_round`` prior steps ('alternate')."""
  on_loss = True

  def optimizer(self, env):
    t = env.config.train
    return optim.adamw(t.prior_learning_rate, t.warmup_steps, t.steps, t.prior_weight_decay,
                       t.grad_clip)

  def init_params(self, env, prior, ref_params, batches):
    del ref_params
    tokens = batches.first_batches(1)[0]["tokens"]  # [B, 2, T]
    return self._init(env, prior, tokens.shape[0], tokens.shape[-1] - 1)

  def restore_target(self, env, prior, ref_params):
    del ref_params
    return ckpt_lib.abstract_like(self._init(env, prior, 1, 1))  # shapes do not depend on B, T

  def _init(self, env, prior, num_pairs, length):
    key = jax.random.fold_in(jax.random.key(env.config.seed), 1)
    params = prior.init_params(key, example_stats(env, num_pairs, length))
    return env_lib.replicated(env, params)

  def step(self, run, state, batch, rng, step_index):
    t = run.env.config.train
    if t.prior_update == "joint":
      p, o, q, qo, m = run.steps.joint(state["policy"], state["policy_opt"], state["prior"],
                                       state["prior_opt"], run.frozen, batch, rng)
      return dict(state, policy=p, policy_opt=o, prior=q, prior_opt=qo), m
    k_pol, k_pri = t.policy_steps_per_round, t.prior_steps_per_round
    if step_index % (k_pol + k_pri) < k_pol:
      return run.policy_step(state, batch, rng)
    q, qo, m = run.steps.prior(state["prior"], state["prior_opt"], state["policy"], run.frozen,
                               batch, rng)
    return dict(state, prior=q, prior_opt=qo), m


class Procedure:
  """An algorithm's preference stage. This base: one round on the run's pairs,
  against the reference alone.

  ``history`` is how many of the latest rounds' policies the procedure reads
  (``policies``, oldest first, passed to ``frozen_models`` and ``round_pairs``).
  """
  history = 0

  def num_rounds(self, config) -> int:
    """Rounds of preference training (each a loop of ``train.steps`` steps)."""
    del config
    return 1

  def auxiliary_models(self, env: env_lib.Env, ref_params: PyTree, pairs: dict) -> dict:
    """Frozen models trained or loaded before the rounds, by name (``pairs``:
    the run's pair source, ``synthetic`` overrides of the data config)."""
    del env, ref_params, pairs
    return {}

  def frozen_models(self, round_index: int, ref_params: PyTree,
                    policies: list[PyTree]) -> dict:
    """Frozen models of round ``round_index`` besides the reference
    (``policies``: the last ``history`` rounds' final policies, oldest first)."""
    del round_index, ref_params, policies
    return {}

  def round_pairs(self, env: env_lib.Env, round_index: int, pairs: dict, ref_params: PyTree,
                  policies: list[PyTree]) -> dict:
    """The pair source of round ``round_index`` (``pairs``: the run's)."""
    del env, round_index, ref_params, policies
    return pairs


@dataclasses.dataclass(frozen=True)
class Recipe:
  """An algorithm's parts of the trainer (see the module docstring)."""
  update: Optional[Callable[[priors.Prior], PriorUpdate]] = None
  procedure: Procedure = dataclasses.field(default_factory=Procedure)
  validate: Optional[Callable[[Any, priors.Prior, int, int], None]] = None

  def make_update(self, prior: priors.Prior) -> PriorUpdate:
    """A fresh ``PriorUpdate`` for one round of ``prior``."""
    if self.update is not None:
      return self.update(prior)
    if not prior.has_params:
      return PriorUpdate()
    return LossGradient(monitor=_DEFAULT_MONITOR[0] if _DEFAULT_MONITOR else None)

  @property
  def custom_procedure(self) -> bool:
    """Whether the algorithm has a procedure of its own (rounds, auxiliary models)."""
    return type(self.procedure) is not Procedure


_RECIPES: dict[str, Recipe] = {}
# The monitor of a learned prior whose recipe does not choose its update
# (``set_default_monitor``; midpo.algorithms sets its held-out diagnostics).
_DEFAULT_MONITOR: list[Callable[[RoundRun], Optional[Monitor]]] = []


def set_default_monitor(monitor: Callable[[RoundRun], Optional[Monitor]]) -> None:
  """The monitor every prior with parameters gets under the default update."""
  _DEFAULT_MONITOR[:] = [monitor]


def register_recipe(prior_name: str, recipe: Recipe) -> Recipe:
  """Registers the trainer's side of the prior ``prior_name``.

  Raises:
    ValueError: ``prior_name`` already has a recipe.
  """
  if prior_name in _RECIPES:
    raise ValueError(f"prior {prior_name!r} already has a recipe")
  _RECIPES[prior_name] = recipe
  return recipe


def recipe_for(prior: priors.Prior) -> Recipe:
  """The prior's recipe, or the default one."""
  return _RECIPES.get(prior.name, Recipe())


def _check_recipes(config, prior: priors.Prior, batch_shards: int, process_count: int) -> None:
  """Config rules of the run's algorithm, and baselines that need nothing of their own."""
  for name in config.baselines:
    baseline = priors.make_prior(name)
    if baseline.has_params or recipe_for(baseline).custom_procedure:
      config_lib.fail("baselines", f"prior {name!r} needs parameters or models of its own; "
                      "baselines are fixed priors that train on the run's pairs alone (such as "
                      "'dpo')")
  missing = [f for f in prior.required_fields()
             if f not in inputs.BUILT_IN and f not in inputs.registered_inputs()]
  if missing:
    config_lib.fail("prior", f"prior {prior.name!r} reads {missing}, which no input provider "
                    "fills (midpo.training.inputs.register_input)")
  recipe = recipe_for(prior)
  if recipe.validate is not None:
    recipe.validate(config, prior, batch_shards, process_count)


config_lib.register_rule(_check_recipes)
