"""Priors that are language models, and the mutual-information prior.

The paper's Lemma 1: the prior that minimises ``E_x KL(pi(.|x) || zeta)`` is the
policy's marginal over responses; ``MutualInformation`` learns it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from midpo.core.priors import Prior, PriorOutput, masked_sum, register_prior, require


@dataclasses.dataclass(frozen=True)
class ModelPrior(Prior):
  """Base of the priors that are language models: ``s = LP - log zeta_phi(y)``
  from the token log-probs ``prior_logps`` of the prior's network (the
  ``prior_logps`` input, computed with the prior's parameters by a
  ``ResponseModel``); its algorithm's update moves the parameters."""
  requires: ClassVar[tuple[str, ...]] = ("prior_logps",)

  @property
  def has_params(self) -> bool:
    return True

  @property
  def scores_with_params(self) -> bool:
    return False  # the parameters reach the loss through ``prior_logps``

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    return PriorOutput(masked_sum(stats.logps - stats.prior_logps, stats.mask), {})


@register_prior
@dataclasses.dataclass(frozen=True)
class MutualInformation(ModelPrior):
  """The mutual-information prior (the paper's Lemma 1): ``zeta_phi(y)``, a small
  language model over responses, tracks the policy's marginal
  ``sum_x p(x) pi(y|x)``, the prior that minimises ``E_x KL(pi(.|x) || zeta)``.

  ``s = LP - log zeta_phi(y)``. The trainer alternates policy steps on the
  MI-DPO loss (``zeta_phi`` frozen) with maximum-likelihood steps of
  ``zeta_phi`` on responses sampled from the current policy on held-out
  prompts (a Blahut-Arimoto step). ``network`` names the model configuration
  of ``zeta_phi`` (``midpo.models.config``); ``conditional`` makes it read the
  prompt too (then it tracks the policy itself rather than its marginal).
  """
  name: ClassVar[str] = "mi"
  network: str = "micro"
  conditional: bool = False

  def validate(self):
    require(bool(self.network), self.name, "network must name a model configuration")
