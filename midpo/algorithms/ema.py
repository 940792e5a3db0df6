"""The EMA prior: the cheap proxy of the mutual-information prior.

``zeta`` is the policy's own architecture with weights that follow the
policy's as an exponential moving average, starting from the reference (as
TR-DPO, "Learn Your Reference Model for Real Good Alignment" (2024), moves the
reference). Scored by the 'mi' prior's ``ResponseModel`` (the ``prior_logps``
input), with the learned-prior diagnostics.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp

from midpo.algorithms import diagnostics
from midpo.algorithms.mi.prior import ModelPrior
from midpo.core.priors import register_prior, require
from midpo.training import checkpoint as ckpt_lib
from midpo.training import recipes


@register_prior
@dataclasses.dataclass(frozen=True)
class EMA(ModelPrior):
  """The cheap proxy of the mutual-information prior: ``zeta`` is the policy's
  own architecture with weights that are an exponential moving average of the
  policy's (as TR-DPO does for the reference), ``phi <- decay phi + (1 - decay)
  theta`` after every policy step, starting from the reference.

  ``s = LP - log pi_phi(y|x)``. ``decay = 1`` is DPO; ``decay = 0`` compares
  the policy with its own previous step.
  """
  name: ClassVar[str] = "ema"
  decay: float = 0.99

  def validate(self):
    require(0.0 <= self.decay <= 1.0, self.name, f"decay must be in [0, 1]; got {self.decay}")

  @property
  def conditional(self) -> bool:
    return True



def ema_update(decay: float) -> Callable:
  """``update(prior, policy) -> decay * prior + (1 - decay) * policy``, jitted,
  donating the prior."""

  def update(prior, policy):
    return jax.tree.map(lambda a, b: (decay * a + (1.0 - decay) * b).astype(a.dtype), prior,
                        policy)

  return jax.jit(update, donate_argnums=(0,))


class MovingAverage(recipes.PriorUpdate):
  """The prior's weights start as the reference's and move towards the policy's
  after every policy step: ``phi <- decay phi + (1 - decay) theta``."""

  def __init__(self, decay: float):
    super().__init__(monitor=diagnostics.make_monitor)
    self.update = ema_update(decay)

  def init_params(self, env, prior, ref_params, batches):
    del env, prior, batches
    return jax.tree.map(jnp.copy, ref_params)

  def restore_target(self, env, prior, ref_params):
    del env, prior
    return ckpt_lib.abstract_like(ref_params)

  def step(self, run, state, batch, rng, step_index):
    state, metrics = run.policy_step(state, batch, rng)
    return dict(state, prior=self.update(state["prior"], state["policy"])), metrics


recipes.register_recipe("ema", recipes.Recipe(update=lambda prior: MovingAverage(prior.decay)))
