"""A prior that needs a new per-token input, added with one provider and one prior.

``ref_entropy_weight``: ``exp(-H_t)``, with ``H_t`` the reference's entropy
(nats) at each response position, computed from the frozen reference in the
step. The prior weighs DPO's per-token log-ratios by it:
``s = sum_t m_t w_t (lp_t - lr_t)``. Nothing in ``midpo/training`` knows of either.
Also a config file (``--config=tests/extensions/entropy_weighted.py``).
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from midpo import config_base
from midpo.core import priors
from midpo.training import inputs


@inputs.register_input("ref_entropy_weight")
def ref_entropy_weight(env, prior) -> inputs.Provider:
  del env, prior

  def compute(ctx: inputs.InputContext):
    logits = nnx.merge(ctx.graphdef, ctx.frozen["reference"])(ctx.inputs_BxT,
                                                              ctx.input_mask_BxT)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jax.lax.stop_gradient(jnp.exp(-entropy) * ctx.mask_BxT)

  return inputs.Provider(compute, frozen=("reference",))


@priors.register_prior
@dataclasses.dataclass(frozen=True)
class EntropyWeighted(priors.Prior):
  name: ClassVar[str] = "entropy_weighted"
  requires: ClassVar[tuple[str, ...]] = ("ref_logps", "ref_entropy_weight")

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    w = stats.get("ref_entropy_weight")
    s = priors.masked_sum(w * (stats.logps - stats.ref_logps), stats.mask)
    return priors.PriorOutput(s, {"mean_weight": priors.masked_sum(w, stats.mask)
                                  / jnp.maximum(priors.lengths(stats), 1.0)})


def get_config(arg: str = ""):
  return config_base.get_config(arg)
