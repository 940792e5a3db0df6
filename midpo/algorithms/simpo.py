"""SimPO: length-normalised, reference-free, with a target margin.

"SimPO: Simple Preference Optimization with a Reference-Free Reward" (2024); the official ``princeton-nlp/SimPO`` trainer and TRL's
``CPOTrainer`` with ``loss_type="simpo"``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from midpo.core.priors import Prior, PriorOutput, is_finite, lengths, masked_sum, register_prior, require


@register_prior
@dataclasses.dataclass(frozen=True)
class SimPO(Prior):
  """SimPO ("Simple Preference Optimization with a Reference-Free Reward", 2024): length-normalised, reference-free, with a margin.

  Role-dependent: ``log zeta = (1 - 1/|y|) LP + b``, ``b = +gamma/(2 alpha)``
  for the chosen and ``-gamma/(2 alpha)`` for the rejected response, so
  ``s = LP/|y| -+ gamma/(2 alpha)`` and the logit is
  ``alpha (LP_w/|y_w| - LP_l/|y_l|) - gamma``. ``gamma = gamma_beta_ratio *
  beta`` of the official code; TRL's ``simpo_gamma``.
  """
  name: ClassVar[str] = "simpo"
  length_normalised: ClassVar[bool] = True
  gamma: float = 0.5

  def validate(self):
    require(is_finite(self.gamma), self.name, f"gamma must be finite; got {self.gamma}")

  @property
  def splits_pair_term(self) -> bool:
    return self.gamma != 0

  @property
  def split_term_description(self) -> str:
    return (f"the target margin gamma={self.gamma}, gamma/(2 alpha) on each side; "
            "prior.gamma=0 removes it")

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    n = jnp.maximum(lengths(stats), 1.0)  # empty responses are reported by the loss
    sign = 1.0 if role == "chosen" else -1.0
    return PriorOutput(masked_sum(stats.logps, stats.mask) / n - sign * self.gamma / (2 * alpha),
                       {})
