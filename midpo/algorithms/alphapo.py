"""AlphaPO: SimPO with a reward of another shape.

"AlphaPO: Reward Shape Matters for LLM Alignment" (2025); TRL's
``CPOTrainer`` with ``loss_type="alphapo"`` (``simpo`` with ``cpo_alpha=0``
and its ``alpha`` set).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from midpo.algorithms.cpo import alphapo_reward
from midpo.algorithms.simpo import SimPO
from midpo.core.priors import PriorOutput, is_finite, lengths, masked_sum, register_prior, require


@register_prior
@dataclasses.dataclass(frozen=True)
class AlphaPO(SimPO):
  """AlphaPO (2025): SimPO's length-normalised, reference-free score through
  AlphaPO's reward ``r(p) = (1 - p^(-a)) / a`` of the per-token-mean
  probability ``p = exp(LP/|y|)``, with SimPO's target margin (and SimPO's
  ``gamma``, split margin and validation).

  Role-dependent as SimPO: ``s = r(exp(LP/|y|)) -+ gamma/(2 alpha)`` (plus for
  the chosen response), so the logit is ``alpha (r_w - r_l) - gamma``, and
  ``log zeta = LP - s``. ``reward_alpha`` is TRL's ``CPOConfig.alpha`` (TRL's
  default 0 is SimPO, which is midpo's 'simpo' prior; the default 0.25 here
  is midpo's choice, not a published one: tune it); ``gamma`` is TRL's
  ``simpo_gamma``.
  """
  name: ClassVar[str] = "alphapo"
  reward_alpha: float = 0.25

  def validate(self):
    super().validate()
    require(is_finite(self.reward_alpha), self.name,
            f"reward_alpha must be finite; got {self.reward_alpha}")

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    n = jnp.maximum(lengths(stats), 1.0)  # empty responses are reported by the loss
    sign = 1.0 if role == "chosen" else -1.0
    r = alphapo_reward(masked_sum(stats.logps, stats.mask) / n, self.reward_alpha)
    return PriorOutput(r - sign * self.gamma / (2 * alpha), {})
