"""ORPO: the odds ratio of the chosen over the rejected response, plus the NLL,
as a prior under a constraint.

"ORPO: Monolithic Preference Optimization without Reference Model" (2024);
TRL's ``ORPOTrainer`` (``trl.experimental.orpo``, ``odds_ratio_loss``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax.numpy as jnp

from midpo.core.priors import Prior, PriorOutput, lengths, masked_sum, register_prior


def log_odds(logp):
  """``log(p / (1 - p))`` of ``p = exp(logp)``, ``logp < 0``: ``logp -
  log(1 - exp(logp))``, with ``log(1 - exp(x))`` computed stably (``log(-expm1(x))``
  near 0, ``log1p(-exp(x))`` below ``-log 2``)."""
  cut = -math.log(2.0)
  # Each branch's input is kept inside its own region: the branch not taken
  # must not be -inf there either, or its gradient (inf * 0) is NaN.
  near = jnp.log(-jnp.expm1(jnp.maximum(logp, cut)))
  far = jnp.log1p(-jnp.exp(jnp.minimum(logp, cut)))
  log1mexp = jnp.where(logp > cut, near, far)
  return logp - log1mexp


@register_prior
@dataclasses.dataclass(frozen=True)
class ORPO(Prior):
  """ORPO (2024): ``s`` is the log odds of the per-token-mean probability,
  ``s = log(p / (1 - p))`` with ``p = exp(LP/|y|)`` (ORPO eqs. 4 and 7), so
  ``log zeta = LP - s`` and, at ``alpha = 1``, ``z = s_w - s_l`` is ORPO's log
  odds ratio. No reference.

  ORPO's loss is ``NLL(y_w) + lambda * (-log s(z))``. In the framework (paper
  section 5.1) that is the MI-DPO objective under this prior with the
  constraint ``g(pi) = E[-log pi(y_w|x)] <= eps`` and Lagrange multiplier
  ``1/lambda``, scaled by ``lambda``; ``configs/orpo.py`` writes it as
  ``loss.alpha=1``, ``loss.loss_weights=(lambda,)`` and ``loss.nll_weight=1``
  (the NLL averaged over the batch's chosen response tokens). ``lambda`` is
  TRL's ``ORPOConfig.beta`` (default 0.1). The odds-ratio term is TRL's
  exactly; its NLL differs: TRL (like the ORPO authors' code) averages it
  over the prompt's tokens as well as the response's, midpo over the
  response's, as for CPO and SimPO.
  """
  name: ClassVar[str] = "orpo"
  length_normalised: ClassVar[bool] = True

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    n = jnp.maximum(lengths(stats), 1.0)  # empty responses are reported by the loss
    return PriorOutput(log_odds(masked_sum(stats.logps, stats.mask) / n), {})
