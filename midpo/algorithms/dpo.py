"""DPO: the reference is the prior (``log zeta = LR``).

"Direct Preference Optimization: Your Language Model is Secretly a Reward
Model" (2023); TRL's ``DPOTrainer`` with ``loss_type="sigmoid"``.
The trainer needs nothing beyond the reference, so this module is the prior alone.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from midpo.core.priors import Prior, PriorOutput, masked_sum, register_prior


@register_prior
@dataclasses.dataclass(frozen=True)
class DPO(Prior):
  """DPO ("Direct Preference Optimization", 2023): ``log zeta = LR``; ``s = LP - LR``."""
  name: ClassVar[str] = "dpo"
  requires: ClassVar[tuple[str, ...]] = ("ref_logps",)

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    return PriorOutput(masked_sum(stats.logps - stats.ref_logps, stats.mask), {})
