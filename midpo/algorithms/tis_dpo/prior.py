"""TIS-DPO's prior: DPO with per-token importance weights (and an optional weighted KL).

"Token-level Importance Sampling for DPO With Estimated Weights" (2024).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from midpo.core.priors import Prior, PriorOutput, is_finite, masked_sum, register_prior, require


@register_prior
@dataclasses.dataclass(frozen=True)
class TISDPO(Prior):
  """TIS-DPO ("Token-level Importance Sampling for DPO", 2024).

  ``log zeta = LP - sum m w (lp - lr) + c sum m w KLp`` with ``c = kl_coef``
  when ``token_level`` (official default off) and 0 otherwise; so
  ``s = sum m w (lp - lr) - c sum m w KL(policy||ref)`` (no stop-gradient).
  All weights 1 and ``token_level=False`` is DPO. Weights come from
  ``midpo.algorithms.tis_dpo.weights``.
  """
  name: ClassVar[str] = "tis_dpo"
  requires: ClassVar[tuple[str, ...]] = ("ref_logps", "token_weights")
  kl_coef: float = 0.5
  token_level: bool = False

  def validate(self):
    require(is_finite(self.kl_coef) and self.kl_coef >= 0, self.name,
             f"kl_coef must be >= 0; got {self.kl_coef}")
    require(isinstance(self.token_level, bool), self.name, "token_level must be a bool")

  def required_fields(self):
    return self.requires + (("kl_policy_ref",) if self.token_level else ())

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    w = stats.token_weights
    s = masked_sum(w * (stats.logps - stats.ref_logps), stats.mask)
    aux = {}
    if self.token_level:
      wkl = masked_sum(w * stats.kl_policy_ref, stats.mask)
      s = s - self.kl_coef * wkl
      aux["kl"] = wkl
    return PriorOutput(s, aux)
