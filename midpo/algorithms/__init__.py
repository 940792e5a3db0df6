"""Every published algorithm of the family, one module (or package) each.

An algorithm is a prior (``midpo.core.priors.Prior``: the loss's side) and,
where it needs more than the reference, its trainer's side next to it: an
input provider (``midpo.training.inputs``), how its prior's parameters move
and its procedure (``midpo.training.recipes``), its config block and rules.
Importing this package registers them all; ``README.md`` here says how to
add your own.

    from midpo import algorithms
    prior = algorithms.make_prior("tdpo", version=2, kl_coef=0.5)
"""

# Import order is registration order (and the order of the input providers
# in a step).
from midpo.algorithms import dpo, hdpo, rdpo, simpo, tdpo  # noqa: I001
from midpo.algorithms import dice, tis_dpo
from midpo.algorithms import diagnostics, sparsepo, constrained
from midpo.algorithms import mi, ema
from midpo.algorithms import cpo, alphapo, orpo
from midpo.algorithms.alphapo import AlphaPO
from midpo.algorithms.constrained import COEFFICIENTS, Constrained
from midpo.algorithms.cpo import CPO
from midpo.algorithms.dice import DICE
from midpo.algorithms.dpo import DPO
from midpo.algorithms.ema import EMA
from midpo.algorithms.hdpo import HDPO
from midpo.algorithms.mi import ModelPrior, MutualInformation
from midpo.algorithms.orpo import ORPO
from midpo.algorithms.rdpo import RDPO
from midpo.algorithms.simpo import SimPO
from midpo.algorithms.sparsepo import SparsePO, apply_mask_head, init_mask_head
from midpo.algorithms.tdpo import TDPO
from midpo.algorithms.tis_dpo import TISDPO
from midpo.core.priors import (Prior, PriorOutput, lengths, make_prior, masked_sum, prior_class,
                               register_prior, registered_priors)

__all__ = [
    "AlphaPO", "COEFFICIENTS", "CPO", "Constrained", "DICE", "DPO", "EMA", "HDPO", "ModelPrior",
    "MutualInformation", "ORPO", "Prior", "PriorOutput", "RDPO", "SimPO", "SparsePO", "TDPO", "TISDPO",
    "alphapo", "apply_mask_head", "constrained", "cpo", "diagnostics", "dice", "dpo", "ema", "hdpo",
    "init_mask_head", "lengths", "make_prior", "masked_sum", "mi", "orpo", "prior_class", "rdpo",
    "register_prior", "registered_priors", "simpo", "sparsepo", "tdpo", "tis_dpo",
]
