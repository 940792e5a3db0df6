"""TIS-DPO token weights from two contrastive models.

``pi_plus`` is DPO-trained on the preference data and ``pi_minus`` on the
reversed pairs. The raw score of a token is ``log pi_plus(y_t) - log
pi_minus(y_t)`` on chosen responses and its negative on rejected responses
(``contrastive_scores``). A transform maps raw scores to weights
(``tis_weights``); the weights are 0 on tokens outside the mask.

Transforms (``[a, b]`` is the output range):

* ``rank_based`` (default ``[0.7, 1.3]``): within each response, tokens ranked
  by raw score (ties broken by position) are spaced evenly from ``a`` (lowest)
  to ``b`` (highest); a one-token response gets ``(a + b) / 2``.
* ``threshold_and_scale``: clamp to ``[-1.5, 1.5]``, map linearly to
  ``[0.7, 1.3]``.
* ``aggressive``: clamp to ``[-2, 2]``, map linearly to ``[0.5, 1.5]``.
* ``binary``: ``b`` where the raw score is positive, ``a`` elsewhere (default
  ``[0.7, 1.3]``). The released code's exact binary rule was not available to
  us; this is our reading of its name.
* ``exponential``: the TIS-DPO paper's ``k * exp(mu * clamp(raw, L, U))``.

The range/clamp defaults of the first three are the released code's; every
bound can be overridden.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

TRANSFORMS = ("rank_based", "threshold_and_scale", "aggressive", "binary", "exponential")

_LINEAR_DEFAULTS = {
    "threshold_and_scale": dict(clamp=1.5, low=0.7, high=1.3),
    "aggressive": dict(clamp=2.0, low=0.5, high=1.5),
}


def contrastive_scores(lp_plus_BxT: Array, lp_minus_BxT: Array, mask_BxT: Array,
                       role: str) -> Array:
  """Raw TIS-DPO scores; ``role`` is ``"chosen"`` or ``"rejected"``."""
  if role not in ("chosen", "rejected"):
    raise ValueError(f"role must be 'chosen' or 'rejected'; got {role!r}")
  raw = lp_plus_BxT - lp_minus_BxT
  if role == "rejected":
    raw = -raw
  return jnp.where(mask_BxT > 0, raw, 0.0)


def _rank_based(raw, real, low, high):
  big = jnp.finfo(raw.dtype).max
  keyed = jnp.where(real, raw, big)  # padding ranks last
  order = jnp.argsort(keyed, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1, stable=True).astype(raw.dtype)
  n = jnp.sum(real, axis=-1, keepdims=True).astype(raw.dtype)
  frac = jnp.where(n > 1, ranks / jnp.maximum(n - 1, 1), 0.5)
  return low + (high - low) * frac


def tis_weights(raw_BxT: Array, mask_BxT: Array, transform: str = "rank_based", *,
                low: Optional[float] = None, high: Optional[float] = None,
                clamp: Optional[float] = None, k: float = 1.0, mu: float = 1.0,
                lower: float = -1.0, upper: float = 1.0) -> Array:
  """Token weights ``[B, T]`` from raw contrastive scores; 0 off the mask.

  ``low``/``high`` set the output range of the rank, linear and binary
  transforms, ``clamp`` the symmetric input clamp of the linear ones; ``k``,
  ``mu``, ``lower`` and ``upper`` parameterise ``exponential``.
  """
  if transform not in TRANSFORMS:
    raise ValueError(f"unknown TIS-DPO weight transform {transform!r}; one of {TRANSFORMS}")
  if raw_BxT.shape != mask_BxT.shape:
    raise ValueError(f"raw scores {raw_BxT.shape} and mask {mask_BxT.shape} differ in shape")
  real = mask_BxT > 0
  raw = raw_BxT.astype(jnp.promote_types(raw_BxT.dtype, jnp.float32))
  if transform in _LINEAR_DEFAULTS:
    d = _LINEAR_DEFAULTS[transform]
    c = d["clamp"] if clamp is None else clamp
    lo = d["low"] if low is None else low
    hi = d["high"] if high is None else high
    if not c > 0:
      raise ValueError(f"clamp must be > 0; got {c}")
    w = lo + (jnp.clip(raw, -c, c) + c) / (2 * c) * (hi - lo)
  elif transform == "rank_based":
    w = _rank_based(raw, real, 0.7 if low is None else low, 1.3 if high is None else high)
  elif transform == "binary":
    w = jnp.where(raw > 0, 1.3 if high is None else high, 0.7 if low is None else low)
  else:
    if not lower <= upper:
      raise ValueError(f"exponential transform needs lower <= upper; got {lower} > {upper}")
    w = k * jnp.exp(mu * jnp.clip(raw, lower, upper))
  return jnp.where(real, w, 0.0)


__all__ = ["TRANSFORMS", "contrastive_scores", "tis_weights"]
