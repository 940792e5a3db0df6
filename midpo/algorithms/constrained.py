"""A prior learned jointly with the policy within a bounded family: the
paper's constrained joint minimisation (section 5 of "Many of Your DPOs are
Secretly One").

Its four coefficients take projected gradient steps on the MI-DPO loss
(``LossGradient``), with the learned-prior diagnostics and collapse alarm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from midpo.core.priors import Prior, PriorOutput, lengths, masked_sum, register_prior, require


COEFFICIENTS = ("ref", "pol", "len", "kl")


def _bounds(value, name) -> tuple[float, float]:
  lo, hi = (float(v) for v in value)
  if not (lo <= hi) or math.isnan(lo) or math.isnan(hi):
    raise ValueError(f"prior 'constrained': {name}_bounds must be (low, high) with low <= high; "
                     f"got {value}")
  return lo, hi


@register_prior
@dataclasses.dataclass(frozen=True)
class Constrained(Prior):
  """A prior learned jointly with the policy, within a box.

  ``log zeta = c_ref LR + c_pol sg(LP) + c_len |y| + c_kl sum m KL(ref||policy)``
  with each coefficient in ``[low, high]`` (``<name>_bounds``), so
  ``s = LP - log zeta``. Its four coefficients are the prior's parameters,
  trained on the MI-DPO loss by their own optimiser (projected back into the
  box after every update, ``project``), jointly with the policy or in alternation
  (``train.prior_update``). The
  family holds DPO (1, 0, 0, 0), R-DPO (1, 0, -lam, 0) and TDPO1 (1, 0, 0, -1)
  when the box allows, and an H-DPO-like (1, 1 - eta, 0, 0), which differs
  from H-DPO in that no gradient flows through the prior's LP. Unbounded coefficients let the prior drive the loss to zero
  by itself (putting prior mass on rejected responses): the
  ``prior/log_zeta_gap`` metric shows that collapse.
  """
  name: ClassVar[str] = "constrained"
  ref_bounds: tuple = (0.0, 1.0)
  pol_bounds: tuple = (0.0, 0.5)
  len_bounds: tuple = (-0.5, 0.5)
  kl_bounds: tuple = (0.0, 0.0)
  init: tuple = (1.0, 0.0, 0.0, 0.0)

  def validate(self):
    bounds = [_bounds(getattr(self, f"{c}_bounds"), c) for c in COEFFICIENTS]
    require(len(self.init) == 4, self.name, f"init must hold 4 coefficients {COEFFICIENTS}")
    for c, (lo, hi), v in zip(COEFFICIENTS, bounds, self.init):
      require(lo <= v <= hi, self.name, f"init {c}={v} is outside {c}_bounds ({lo}, {hi})")

  def required_fields(self):
    req = []
    if self.ref_bounds != (0.0, 0.0) or self.init[0] != 0.0:
      req.append("ref_logps")
    if tuple(self.kl_bounds) != (0.0, 0.0):
      req.append("kl_ref_policy")
    return tuple(req)

  @property
  def has_params(self) -> bool:
    return True

  @property
  def low(self):
    return jnp.array([_bounds(getattr(self, f"{c}_bounds"), c)[0] for c in COEFFICIENTS])

  @property
  def high(self):
    return jnp.array([_bounds(getattr(self, f"{c}_bounds"), c)[1] for c in COEFFICIENTS])

  def init_params(self, rng, example):
    del rng, example
    return {"coefficients": jnp.asarray(self.init, jnp.float32)}

  def project(self, params):
    c = params["coefficients"]
    return {"coefficients": jnp.clip(c, self.low.astype(c.dtype), self.high.astype(c.dtype))}

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    if params is None:
      raise ValueError("prior 'constrained' needs its params (prior.init_params)")
    c = params["coefficients"].astype(stats.logps.dtype)
    lp = masked_sum(stats.logps, stats.mask)
    log_zeta = c[1] * jax.lax.stop_gradient(lp) + c[2] * lengths(stats)
    if stats.ref_logps is not None:
      log_zeta = log_zeta + c[0] * masked_sum(stats.ref_logps, stats.mask)
    aux = {}
    if "kl_ref_policy" in self.required_fields():
      d = masked_sum(stats.kl_ref_policy, stats.mask)
      log_zeta = log_zeta + c[3] * d
      aux["kl"] = d
    for name, value in zip(COEFFICIENTS, c):
      aux[f"c_{name}"] = jnp.broadcast_to(value, lp.shape)
    return PriorOutput(lp - log_zeta, aux)

