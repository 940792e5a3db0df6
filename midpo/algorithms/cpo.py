"""CPO: the reference-free sigmoid loss plus behaviour cloning, as a flat prior
under a constraint.

"Contrastive Preference Optimization: Pushing the Boundaries of LLM
Performance in Machine Translation" (2024); TRL's ``CPOTrainer``
(``trl.experimental.cpo``) with ``loss_type="sigmoid"``, and its ``alpha``
(AlphaPO's reward shape, "AlphaPO: Reward Shape Matters for LLM Alignment",
2025).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from midpo.core.priors import Prior, PriorOutput, is_finite, masked_sum, register_prior, require


def alphapo_reward(logp, reward_alpha: float):
  """AlphaPO's reward of a (sequence or per-token-mean) log-prob ``logp``:
  ``(1 - p^(-a)) / a`` with ``p = exp(logp)``, and ``logp`` itself at ``a = 0``
  (TRL ``CPOTrainer.cpo_loss``, its ``alpha``)."""
  if reward_alpha == 0:
    return logp
  return -jnp.expm1(-reward_alpha * logp) / reward_alpha


@register_prior
@dataclasses.dataclass(frozen=True)
class CPO(Prior):
  """CPO (2024): ``log zeta = 0``, so ``s = LP``: no reference.

  In the framework (paper section 5.1) CPO is the MI-DPO objective under a
  flat prior with the constraint ``g(pi) = E[-log pi(y_w|x)] <= eps``, its
  Lagrange multiplier ``cpo_alpha`` (CPO's behaviour-cloning weight, 1 in the
  paper and TRL): the loss is ``-log s(alpha (LP_w - LP_l)) + cpo_alpha *
  NLL(y_w)``, the NLL averaged over the batch's chosen tokens. That term is
  ``config.loss.nll_weight`` (``configs/cpo.py``), not part of the prior.

  ``reward_alpha`` (TRL ``CPOConfig.alpha``, default 0) replaces ``LP`` by
  AlphaPO's reward ``(1 - exp(-a LP)) / a``; then ``log zeta = LP - s``. (With
  the ``ipo`` link TRL applies that reward to the per-token mean ``LP/|y|``;
  midpo's ``ipo`` divides ``r(LP)`` by ``|y|``, which is not the same.)
  """
  name: ClassVar[str] = "cpo"
  reward_alpha: float = 0.0

  def validate(self):
    require(is_finite(self.reward_alpha), self.name,
            f"reward_alpha must be finite; got {self.reward_alpha}")

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    return PriorOutput(alphapo_reward(masked_sum(stats.logps, stats.mask), self.reward_alpha),
                       {})
