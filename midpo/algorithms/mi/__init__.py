"""The mutual-information prior ('mi'): ``zeta_phi``, a small language model
over responses, refit to the policy's samples in alternation with the policy.

- ``prior``: ``ModelPrior`` (priors that are language models) and ``MutualInformation``.
- ``response_model``: ``ResponseModel`` (scores the responses of preference
  rows), its NLL and its jitted maximum-likelihood step.
- ``rounds``: the ``prior_logps`` input, the refits (``MaximumLikelihood``)
  and the config rules.
- ``estimate``: the post-hoc mutual-information estimate of any policy (an
  evaluation column).
"""

from midpo.algorithms.mi import estimate, prior, response_model, rounds
from midpo.algorithms.mi.prior import ModelPrior, MutualInformation

__all__ = ["ModelPrior", "MutualInformation", "estimate", "prior", "response_model", "rounds"]
