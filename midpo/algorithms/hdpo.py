"""H-DPO: entropy-controllable DPO (``s = eta LP - LR``).

"Entropy Controllable Direct Preference Optimization" (2024).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from midpo.core.priors import Prior, PriorOutput, is_finite, masked_sum, register_prior, require


@register_prior
@dataclasses.dataclass(frozen=True)
class HDPO(Prior):
  """H-DPO ("Entropy Controllable Direct Preference Optimization", 2024).

  ``log zeta = LR + (1 - eta) LP`` with the gradient flowing through ``LP``;
  ``s = eta LP - LR``. ``eta < 1`` sharpens the policy; ``eta = 1`` is DPO.
  """
  name: ClassVar[str] = "hdpo"
  requires: ClassVar[tuple[str, ...]] = ("ref_logps",)
  eta: float = 1.0

  def validate(self):
    require(is_finite(self.eta) and self.eta > 0, self.name, f"eta must be > 0; got {self.eta}")

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    return PriorOutput(masked_sum(self.eta * stats.logps - stats.ref_logps, stats.mask), {})
