"""SparsePO: learned token masks on the reward and the KL terms.

"SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks"
(2024) and its released code (``SimpleMaskAllLayers``). The mask head's
parameters are the prior's own: they take gradient steps on the MI-DPO loss
with the policy (``LossGradient``), with the learned-prior diagnostics.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from midpo.core.priors import (Prior, PriorOutput, is_finite, masked_sum, register_prior,
                               require)

Array = jax.Array


def init_mask_head(rng: Array, num_layers: int, hidden_dim: int) -> dict:
  """One mask head, as in the released SparsePO code (``SimpleMaskAllLayers``).

  A LayerNorm shared by all layers, then per layer Linear(D, 1) -> ReLU ->
  dropout, then a bias-free Linear(L, 1) mixer -> ReLU -> dropout. Initialised
  like PyTorch's ``nn.Linear`` (uniform in +-1/sqrt(fan_in)) and
  ``nn.LayerNorm`` (scale 1, bias 0). As there, a mixer whose weights start
  all negative gives an all-zero mask; ``prior/mask_*_zero_frac`` shows it.
  """
  k_w, k_b, k_mix = jax.random.split(rng, 3)
  bound_d = 1.0 / math.sqrt(hidden_dim)
  bound_l = 1.0 / math.sqrt(num_layers)
  return {
      "ln_scale": jnp.ones((hidden_dim,), jnp.float32),
      "ln_bias": jnp.zeros((hidden_dim,), jnp.float32),
      "w": jax.random.uniform(k_w, (num_layers, hidden_dim), jnp.float32, -bound_d, bound_d),
      "b": jax.random.uniform(k_b, (num_layers,), jnp.float32, -bound_d, bound_d),
      "mix": jax.random.uniform(k_mix, (num_layers,), jnp.float32, -bound_l, bound_l),
  }


def _dropout(x, rate, rng):
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def apply_mask_head(params: dict, hidden_BxTxLxD: Array, *, dropout: float = 0.0,
                    rng: Optional[Array] = None, train: bool = False,
                    eps: float = 1e-5) -> Array:
  """Non-negative, unbounded token mask ``[B, T]`` from every layer's hidden state."""
  h = hidden_BxTxLxD.astype(jnp.promote_types(hidden_BxTxLxD.dtype, jnp.float32))
  mean = jnp.mean(h, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
  scale_D, bias_D = params["ln_scale"][None, None, None, :], params["ln_bias"][None, None, None, :]
  h = (h - mean) * jax.lax.rsqrt(var + eps) * scale_D + bias_D
  per_layer_BxTxL = jax.nn.relu(jnp.einsum("btld,ld->btl", h, params["w"])
                                + params["b"][None, None, :])
  drop = train and dropout > 0
  if drop:
    if rng is None:
      raise ValueError("SparsePO mask dropout in training needs an rng")
    rng_layer, rng_mix = jax.random.split(rng)
    per_layer_BxTxL = _dropout(per_layer_BxTxL, dropout, rng_layer)
  mask_BxT = jax.nn.relu(jnp.einsum("btl,l->bt", per_layer_BxTxL, params["mix"]))
  if drop:
    mask_BxT = _dropout(mask_BxT, dropout, rng_mix)
  return mask_BxT


@register_prior
@dataclasses.dataclass(frozen=True)
class SparsePO(Prior):
  """SparsePO ("Controlling Preference Alignment of LLMs via Sparse Token Masks", 2024): learned token masks on reward and KL.

  ``log zeta = LP - sum m mu_r (lp - lr) - kl_coef sum m mu_k KL(ref||policy)``,
  so ``s = U + kl_coef K`` with ``U = sum m mu_r (lp - lr)`` and
  ``K = sum m mu_k KLr``; the logit is ``beta [U_w - U_l + K_w - K_l]`` and each
  pair adds ``l1_reward |mu_r|_1 + l1_kl |mu_k|_1`` over both responses. A mask
  that is off (``mask_on_reward`` / ``mask_on_kl`` false) is 1 on every token.
  ``kl_coef`` is ours (the released code always has the KL term, i.e. 1.0).

  ``mask_source="head"``: the masks come from the prior's own parameters, a
  head over the reference's hidden states of every layer (``ref_hidden``); one
  head for both masks (``shared_head``) or one each. ``mask_source="given"``:
  fixed masks read from ``SequenceStats.mask_reward`` / ``mask_kl``.
  """
  name: ClassVar[str] = "sparsepo"
  mask_source: str = "head"
  mask_on_reward: bool = True
  mask_on_kl: bool = True
  shared_head: bool = True
  l1_reward: float = 0.0
  l1_kl: float = 0.0
  kl_coef: float = 1.0
  mask_dropout: float = 0.01

  def validate(self):
    require(self.mask_source in ("head", "given"), self.name,
             f"mask_source must be 'head' or 'given'; got {self.mask_source!r}")
    for key in ("l1_reward", "l1_kl", "kl_coef"):
      v = getattr(self, key)
      require(is_finite(v) and v >= 0, self.name, f"{key} must be >= 0; got {v}")
    require(is_finite(self.mask_dropout) and 0 <= self.mask_dropout < 1, self.name,
             f"mask_dropout must be in [0, 1); got {self.mask_dropout}")

  def required_fields(self):
    req = ["ref_logps"]
    if self.kl_coef > 0:
      req.append("kl_ref_policy")
    if self.mask_source == "head" and (self.mask_on_reward or self.mask_on_kl):
      req.append("ref_hidden")
    if self.mask_source == "given":
      if self.mask_on_reward:
        req.append("mask_reward")
      if self.mask_on_kl:
        req.append("mask_kl")
    return tuple(req)

  @property
  def has_params(self) -> bool:
    return self.mask_source == "head" and (self.mask_on_reward or self.mask_on_kl)

  def init_params(self, rng, example):
    if not self.has_params:
      return None
    if example.ref_hidden is None or example.ref_hidden.ndim != 4:
      raise ValueError("prior 'sparsepo': init_params needs ref_hidden of shape [B, T, L, D]")
    _, _, num_layers, hidden_dim = example.ref_hidden.shape
    k_r, k_k = jax.random.split(rng)
    if self.shared_head:
      return {"shared": init_mask_head(k_r, num_layers, hidden_dim)}
    return {"reward": init_mask_head(k_r, num_layers, hidden_dim),
            "kl": init_mask_head(k_k, num_layers, hidden_dim)}

  def masks(self, stats, params, rng=None, train=False) -> tuple[Array, Array]:
    ones = jnp.ones_like(stats.logps)
    if self.mask_source == "given":
      mu_r = stats.mask_reward if self.mask_on_reward else ones
      mu_k = stats.mask_kl if self.mask_on_kl else ones
      return mu_r.astype(stats.logps.dtype), mu_k.astype(stats.logps.dtype)
    if params is None:
      raise ValueError("prior 'sparsepo' with mask_source='head' needs its params "
                       "(prior.init_params)")
    rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
    head = lambda key, r: apply_mask_head(params[key], stats.ref_hidden,
                                          dropout=self.mask_dropout, rng=r, train=train)
    if self.shared_head:
      mu = head("shared", rngs[0])
      mu_r, mu_k = mu, mu
    else:
      mu_r = head("reward", rngs[0]) if self.mask_on_reward else None
      mu_k = head("kl", rngs[1]) if self.mask_on_kl else None
    mu_r = mu_r if self.mask_on_reward else ones
    mu_k = mu_k if self.mask_on_kl else ones
    return mu_r.astype(stats.logps.dtype), mu_k.astype(stats.logps.dtype)

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    mu_r, mu_k = self.masks(stats, params, rng, train)
    real = stats.mask > 0
    u = masked_sum(mu_r * (stats.logps - stats.ref_logps), stats.mask)
    s = u
    aux = {}
    if self.kl_coef > 0:
      k = masked_sum(mu_k * stats.kl_ref_policy, stats.mask)
      s = s + self.kl_coef * k
      aux["kl"] = k
    penalty = jnp.zeros_like(u)
    if self.mask_on_reward and self.l1_reward:
      penalty = penalty + self.l1_reward * masked_sum(jnp.abs(mu_r), stats.mask)
    if self.mask_on_kl and self.l1_kl:
      penalty = penalty + self.l1_kl * masked_sum(jnp.abs(mu_k), stats.mask)
    aux["penalty"] = penalty
    n = jnp.maximum(jnp.sum(real, axis=-1), 1)
    if self.mask_on_reward:
      aux["mask_reward_zero_frac"] = jnp.sum(real & (mu_r == 0), axis=-1) / n
    if self.mask_on_kl:
      aux["mask_kl_zero_frac"] = jnp.sum(real & (mu_k == 0), axis=-1) / n
    return PriorOutput(s, aux)

