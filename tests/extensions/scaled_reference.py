"""A prior registered outside midpo, with a hyperparameter, and its config file.

``log zeta = scale * LR``: DPO's prior with the reference's log-probs scaled
(``scale = 1`` is DPO). Used as a config file::

    python -m midpo.main --config=tests/extensions/scaled_reference.py \
        --config.prior.name=scaled_reference --config.prior.scale=0.5 ...
"""

import dataclasses
from typing import ClassVar

from midpo import config_base
from midpo.core import priors


@priors.register_prior
@dataclasses.dataclass(frozen=True)
class ScaledReference(priors.Prior):
  name: ClassVar[str] = "scaled_reference"
  requires: ClassVar[tuple[str, ...]] = ("ref_logps",)
  scale: float = 1.0

  def validate(self):
    priors.require(priors.is_finite(self.scale) and self.scale > 0, self.name,
                   f"scale must be > 0; got {self.scale}")

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    return priors.PriorOutput(
        priors.masked_sum(stats.logps - self.scale * stats.ref_logps, stats.mask), {})


def get_config(arg: str = ""):
  return config_base.get_config(arg)
