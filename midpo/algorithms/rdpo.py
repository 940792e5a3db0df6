"""R-DPO: DPO with a length regulariser (``log zeta = LR - (length_coef/alpha) |y|``).

"Disentangling Length from Quality in Direct Preference Optimization" (2024).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from midpo.core.priors import Prior, PriorOutput, is_finite, lengths, masked_sum, register_prior, require


@register_prior
@dataclasses.dataclass(frozen=True)
class RDPO(Prior):
  """R-DPO ("Disentangling Length from Quality in DPO", 2024): DPO with a length regulariser.

  ``log zeta = LR - lam |y|`` with ``lam = length_coef / alpha``, so the logit
  is DPO's plus ``length_coef * (|y_w| - |y_l|)``; ``length_coef`` is the
  R-DPO paper's ``alpha`` (grid 0.05 to 1.0).
  """
  name: ClassVar[str] = "rdpo"
  requires: ClassVar[tuple[str, ...]] = ("ref_logps",)
  length_coef: float = 0.0

  def validate(self):
    require(is_finite(self.length_coef), self.name,
             f"length_coef must be finite; got {self.length_coef}")

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    s = masked_sum(stats.logps - stats.ref_logps, stats.mask)
    return PriorOutput(s + (self.length_coef / alpha) * lengths(stats), {})
