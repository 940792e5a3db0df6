"""TIS-DPO: token-level importance sampling for DPO.

- ``prior``: the prior (``TISDPO``).
- ``weights``: the raw contrastive scores and the weight transforms.
- ``contrastive``: the two contrastive models, the ``token_weights`` input
  and the ``tis`` config block.
"""

from midpo.algorithms.tis_dpo import contrastive, prior, weights
from midpo.algorithms.tis_dpo.prior import TISDPO

__all__ = ["TISDPO", "contrastive", "prior", "weights"]
