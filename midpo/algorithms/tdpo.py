"""TDPO: token-level DPO with the sequential KL ``KL(ref || policy)`` (versions 1 and 2).

"Token-level Direct Preference Optimization" (2024), and the
authors' ``tdpo_loss`` in their released trainer.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax

from midpo.core.priors import Prior, PriorOutput, is_finite, masked_sum, register_prior, require


@register_prior
@dataclasses.dataclass(frozen=True)
class TDPO(Prior):
  """TDPO ("Token-level Direct Preference Optimization", 2024) with the sequential KL.

  ``log zeta = LR - c d`` with ``d = sum m KL(ref||policy)``:

  * ``version=1``: ``c = 1`` on both sides; logit
    ``beta [(LP_w-LR_w) - (LP_l-LR_l) - (d_l - d_w)]``.
  * ``version=2``: ``c = kl_coef`` and the chosen side's ``d`` under
    stop-gradient; logit ``beta [... - kl_coef (d_l - sg(d_w))]``.

  Official defaults: ``beta = 0.1``, ``kl_coef (alpha) = 0.5``; the function
  defaults to TDPO2, the released yaml runs TDPO1.
  """
  name: ClassVar[str] = "tdpo"
  requires: ClassVar[tuple[str, ...]] = ("ref_logps", "kl_ref_policy")
  version: int = 2
  kl_coef: Optional[float] = None  # TDPO2 only; None means the official 0.5

  def validate(self):
    require(self.version in (1, 2), self.name, f"version must be 1 or 2; got {self.version}")
    if self.kl_coef is not None:
      require(self.version == 2, self.name,
               "kl_coef only applies to version=2 (TDPO1 weighs the KL by 1)")
      require(is_finite(self.kl_coef) and self.kl_coef >= 0, self.name,
               f"kl_coef must be >= 0; got {self.kl_coef}")

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    margin = masked_sum(stats.logps - stats.ref_logps, stats.mask)
    d = masked_sum(stats.kl_ref_policy, stats.mask)
    if self.version == 1:
      kl_term = d
    else:
      coef = 0.5 if self.kl_coef is None else self.kl_coef
      kl_term = coef * (jax.lax.stop_gradient(d) if role == "chosen" else d)
    return PriorOutput(margin + kl_term, {"kl": d})
