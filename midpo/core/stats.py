"""Per-token statistics from logits: label log-probs and per-position KLs.

Everything here is computed in (at least) float32, whatever the dtype of the
logits, and never materialises more than one ``[B, T, chunk]`` float32 block of
the vocabulary at a time: the vocabulary axis is reduced chunk by chunk inside
``lax.scan``, and the backward pass is written by hand (a ``custom_vjp``) so
that it also works block by block, writing each block of the gradient into one
buffer. Peak temporary memory grows with ``B * T * chunk``, not ``B * T * V``
(the gradient itself, an output, is of course ``[B, T, V]``, in the dtype of
the logits).

Shapes are named in the arguments: ``B`` batch, ``T`` positions, ``V``
vocabulary. Positions are already aligned with their targets: ``logits[b, t]``
is the distribution that predicts ``targets[b, t]``. ``mask[b, t]`` is 1 on
positions that count (response tokens) and 0 on prompt and padding; every
output is exactly 0 where the mask is 0, whatever the logits or targets hold
there (padding targets may be any integer, e.g. ``-100`` or the pad id).

Definitions (``p`` policy, ``r`` reference, over the whole vocabulary):

* ``logps[b, t] = log p(targets[b, t])``
* ``ref_logps[b, t] = log r(targets[b, t])``
* ``kl_ref_policy[b, t] = KL(r || p) = sum_v r(v) (log r(v) - log p(v))``
  (TDPO, SparsePO)
* ``kl_policy_ref[b, t] = KL(p || r) = sum_v p(v) (log p(v) - log r(v))``
  (TIS-DPO)

The reference is frozen: no gradient flows into the reference logits.
"""

from __future__ import annotations

import functools
import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array

DEFAULT_VOCAB_CHUNK = 4096


def compute_dtype(dtype) -> jnp.dtype:
  """float32, or float64 when the inputs already are (parity tests use it)."""
  return jnp.promote_types(dtype, jnp.float32)


@struct.dataclass
class TokenStats:
  """Per-token statistics of one batch of sequences, each ``[B, T]``."""
  logps: Array
  ref_logps: Optional[Array] = None
  kl_ref_policy: Optional[Array] = None
  kl_policy_ref: Optional[Array] = None
  log_sum_sq_probs: Optional[Array] = None


def _check_shapes(logits_BxTxV, targets_BxT, mask_BxT, ref_logits_BxTxV=None) -> None:
  if logits_BxTxV.ndim != 3:
    raise ValueError(f"logits must be [B, T, V]; got shape {logits_BxTxV.shape}")
  if targets_BxT.shape != logits_BxTxV.shape[:2]:
    raise ValueError(f"targets shape {targets_BxT.shape} does not match logits [B, T] = "
                     f"{logits_BxTxV.shape[:2]}")
  if mask_BxT.shape != logits_BxTxV.shape[:2]:
    raise ValueError(f"mask shape {mask_BxT.shape} does not match logits [B, T] = "
                     f"{logits_BxTxV.shape[:2]}")
  if not jnp.issubdtype(targets_BxT.dtype, jnp.integer):
    raise ValueError(f"targets must be integers; got dtype {targets_BxT.dtype}")
  if not jnp.issubdtype(logits_BxTxV.dtype, jnp.floating):
    raise ValueError(f"logits must be floating point; got dtype {logits_BxTxV.dtype}")
  if ref_logits_BxTxV is not None and ref_logits_BxTxV.shape != logits_BxTxV.shape:
    raise ValueError(f"ref_logits shape {ref_logits_BxTxV.shape} != policy logits shape "
                     f"{logits_BxTxV.shape}")


class VocabChunks(NamedTuple):
  """How the vocabulary axis is cut: ``n_full`` chunks of ``size``, then one of ``rem``."""
  size: int     # c
  n_full: int   # number of full chunks of size c
  rem: int      # size of the final partial chunk (0 if none)


def vocab_chunks(vocab: int, chunk: Optional[int]) -> VocabChunks:
  """Chunks of ``chunk`` ids over a vocabulary of ``vocab`` (None: the whole of it at once).

  Raises:
    ValueError: ``chunk`` is not positive.
  """
  if chunk is None or chunk >= vocab:
    return VocabChunks(vocab, 1, 0)
  if chunk <= 0:
    raise ValueError(f"vocab_chunk must be positive; got {chunk}")
  return VocabChunks(chunk, vocab // chunk, vocab % chunk)


def reduce_chunks(block_fn, init, chunks: VocabChunks):
  """``carry = block_fn(carry, start, size)`` over every vocabulary chunk."""
  c, n_full, rem = chunks
  if n_full == 1:
    carry = block_fn(init, 0, c)
  else:
    carry, _ = jax.lax.scan(lambda carry, i: (block_fn(carry, i * c, c), None),
                            init, jnp.arange(n_full))
  if rem:
    carry = block_fn(carry, n_full * c, rem)
  return carry


def _block(x_BxTxV, start, size, dtype):
  return jax.lax.dynamic_slice_in_dim(x_BxTxV, start, size, axis=-1).astype(dtype)


def _logsumexp(x_BxTxV, chunks: VocabChunks, dtype):
  # The max is an exact reduction in the input dtype: no float32 copy.
  m_BxT = jnp.max(x_BxTxV, axis=-1).astype(dtype)

  def block_fn(s, start, size):
    return s + jnp.sum(jnp.exp(_block(x_BxTxV, start, size, dtype) - m_BxT[..., None]), -1)

  s_BxT = reduce_chunks(block_fn, jnp.zeros(m_BxT.shape, dtype), chunks)
  return m_BxT + jnp.log(s_BxT)


def _log_sum_sq_probs(x_BxTxV, chunks: VocabChunks, dtype):
  """``log sum_v softmax(x)_v^2 = logsumexp(2x) - 2 logsumexp(x)``, chunked."""
  m_BxT = jnp.max(x_BxTxV, axis=-1).astype(dtype)

  def block_fn(carry, start, size):
    s1, s2 = carry
    e = jnp.exp(_block(x_BxTxV, start, size, dtype) - m_BxT[..., None])
    return s1 + jnp.sum(e, -1), s2 + jnp.sum(e * e, -1)

  zeros = jnp.zeros(m_BxT.shape, dtype)
  s1, s2 = reduce_chunks(block_fn, (zeros, zeros), chunks)
  return jnp.log(s2) - 2.0 * jnp.log(s1)


def _gather(x_BxTxV, targets_BxT, dtype):
  picked = jnp.take_along_axis(x_BxTxV, targets_BxT[..., None], axis=-1)
  return picked[..., 0].astype(dtype)


def _forward(policy, ref, targets, want_klr, want_klp, chunks):
  """Unmasked statistics plus the residuals the backward pass needs."""
  dtype = compute_dtype(policy.dtype)
  lse_p = _logsumexp(policy, chunks, dtype)
  out = {"logps": _gather(policy, targets, dtype) - lse_p}
  lse_r = None
  if ref is not None:
    lse_r = _logsumexp(ref, chunks, dtype)
    out["ref_logps"] = _gather(ref, targets, dtype) - lse_r
  if want_klr or want_klp:

    def block_fn(carry, start, size):
      return kl_block(carry, _block(policy, start, size, dtype), _block(ref, start, size, dtype),
                      lse_p, lse_r, want_klr, want_klp)

    zeros = jnp.zeros(lse_p.shape, dtype)
    cr, cp = reduce_chunks(block_fn, (zeros, zeros), chunks)
    if want_klr:
      out["kl_ref_policy"] = cr - lse_r + lse_p
    if want_klp:
      out["kl_policy_ref"] = cp - lse_p + lse_r
  return out, (lse_p, lse_r)


def kl_block(carry, p, r, lse_p, lse_r, want_klr: bool, want_klp: bool):
  """One vocabulary block's share of both KL sums: ``carry = (cr, cp)`` ``[B, T]`` plus
  ``sum_v R_v (r_v - p_v)`` (for ``KL(R||P)``) and ``sum_v P_v (p_v - r_v)`` (for ``KL(P||R)``)
  over the block's logits ``p``, ``r`` ``[B, T, c]``; the KLs are ``cr - lse_r + lse_p`` and
  ``cp - lse_p + lse_r`` once every block is in."""
  cr, cp = carry
  if want_klr:
    cr = cr + jnp.sum(jnp.exp(r - lse_r[..., None]) * (r - p), -1)
  if want_klp:
    cp = cp + jnp.sum(jnp.exp(p - lse_p[..., None]) * (p - r), -1)
  return cr, cp


def logits_grad_block(p, r, start, targets, lse_p, lse_r, g_lp, g_klr=None, g_klp=None,
                      klp=None):
  """The gradient of ``g_lp . logps + g_klr . KL(R||P) + g_klp . KL(P||R)`` with respect to one
  vocabulary block of the policy's logits ``p`` ``[B, T, c]`` (ids ``start ..``; ``r`` the
  reference's block, needed only with a KL term). With ``P = softmax(p)``, ``R = softmax(r)``
  and the one-hot label ``e_y``: ``d logps / dp = e_y - P``, ``d KL(R||P) / dp = P - R`` and
  ``d KL(P||R) / dp = P * (log P - log R - KL(P||R))``."""
  lp = p - lse_p[..., None]
  P = jnp.exp(lp)
  ids = start + jax.lax.broadcasted_iota(jnp.int32, p.shape, 2)
  g = g_lp[..., None] * ((ids == targets[..., None]).astype(p.dtype) - P)
  if g_klr is not None or g_klp is not None:
    lr = r - lse_r[..., None]
    if g_klr is not None:
      g = g + g_klr[..., None] * (P - jnp.exp(lr))
    if g_klp is not None:
      g = g + g_klp[..., None] * P * (lp - lr - klp[..., None])
  return g


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _stats(policy, ref, targets, want_klr, want_klp, chunks):
  return _forward(policy, ref, targets, want_klr, want_klp, chunks)[0]


def _stats_fwd(policy, ref, targets, want_klr, want_klp, chunks):
  out, (lse_p, lse_r) = _forward(policy, ref, targets, want_klr, want_klp, chunks)
  return out, (policy, ref, targets, lse_p, lse_r, out.get("kl_policy_ref"))


def _stats_bwd(want_klr, want_klp, chunks, residuals, cts):
  """Gradient w.r.t. the policy logits, one vocabulary block at a time
  (``logits_grad_block``)."""
  policy, ref, targets, lse_p, lse_r, klp = residuals
  dtype = lse_p.dtype
  g_lp = cts["logps"].astype(dtype)
  g_klr = cts["kl_ref_policy"].astype(dtype) if want_klr else None
  g_klp = cts["kl_policy_ref"].astype(dtype) if want_klp else None

  def block_fn(grad, start, size):
    r = _block(ref, start, size, dtype) if (want_klr or want_klp) else None
    g = logits_grad_block(_block(policy, start, size, dtype), r, start, targets, lse_p, lse_r,
                          g_lp, g_klr, g_klp, klp)
    return jax.lax.dynamic_update_slice_in_dim(grad, g.astype(grad.dtype), start, axis=-1)

  grad = reduce_chunks(block_fn, jnp.zeros_like(policy), chunks)
  ref_ct = None if ref is None else jnp.zeros_like(ref)
  targets_ct = np.zeros(targets.shape, dtype=jax.dtypes.float0)
  return grad, ref_ct, targets_ct


_stats.defvjp(_stats_fwd, _stats_bwd)


def token_stats(policy_logits_BxTxV: Array, targets_BxT: Array, mask_BxT: Array,
                ref_logits_BxTxV: Optional[Array] = None, *,
                kl_ref_policy: bool = False, kl_policy_ref: bool = False,
                log_sum_sq_probs: bool = False,
                vocab_chunk: Optional[int] = DEFAULT_VOCAB_CHUNK) -> TokenStats:
  """Label log-probs of the policy (and reference) and the requested KLs.

  KLs are only computed when asked for: each costs another pass over the
  vocabulary. ``log_sum_sq_probs`` (``log sum_v p_v^2`` of the policy, WPO's
  alignment term) is computed without gradient, also in a pass of its own.
  ``vocab_chunk=None`` reduces the whole vocabulary at once.
  """
  _check_shapes(policy_logits_BxTxV, targets_BxT, mask_BxT, ref_logits_BxTxV)
  if (kl_ref_policy or kl_policy_ref) and ref_logits_BxTxV is None:
    raise ValueError("a KL between policy and reference needs ref_logits")
  vocab = policy_logits_BxTxV.shape[-1]
  real = mask_BxT > 0
  # Padding targets may hold anything (-100, pad ids); out-of-vocabulary ids on
  # real tokens are a data error that `validate_targets` reports on the host.
  safe = jnp.clip(jnp.where(real, targets_BxT, 0), 0, vocab - 1).astype(jnp.int32)
  ref = None if ref_logits_BxTxV is None else jax.lax.stop_gradient(ref_logits_BxTxV)
  chunks = vocab_chunks(vocab, vocab_chunk)
  out = _stats(policy_logits_BxTxV, ref, safe, bool(kl_ref_policy), bool(kl_policy_ref), chunks)
  if log_sum_sq_probs:
    frozen = jax.lax.stop_gradient(policy_logits_BxTxV)
    out["log_sum_sq_probs"] = _log_sum_sq_probs(frozen, chunks,
                                                compute_dtype(frozen.dtype))
  return TokenStats(**{k: jnp.where(real, v, 0.0) for k, v in out.items()})


def token_logprobs(logits_BxTxV: Array, targets_BxT: Array, mask_BxT: Array, *,
                   vocab_chunk: Optional[int] = DEFAULT_VOCAB_CHUNK) -> Array:
  """``log p(targets)`` per position, 0 where ``mask`` is 0. Shape ``[B, T]``."""
  return token_stats(logits_BxTxV, targets_BxT, mask_BxT, vocab_chunk=vocab_chunk).logps


def validate_targets(targets_BxT, mask_BxT, vocab_size: int) -> None:
  """Host-side check that every real target is a vocabulary id.

  Call it on concrete (numpy) batches before they enter a jitted step: inside
  jit an out-of-range id cannot raise (it would be clipped).
  """
  targets = np.asarray(targets_BxT)
  real = np.asarray(mask_BxT) > 0
  bad = real & ((targets < 0) | (targets >= vocab_size))
  if bad.any():
    b, t = map(int, np.argwhere(bad)[0])
    raise ValueError(
        f"{int(bad.sum())} real target token(s) outside the vocabulary [0, {vocab_size}); "
        f"first at row {b}, position {t}: {int(targets[b, t])}")


__all__ = [
    "DEFAULT_VOCAB_CHUNK", "TokenStats", "VocabChunks", "compute_dtype", "kl_block",
    "logits_grad_block", "reduce_chunks", "token_logprobs", "token_stats", "validate_targets",
    "vocab_chunks",
]


@struct.dataclass
class SequenceStats:
  """Everything a prior may read about one side (chosen or rejected) of a batch of pairs.

  Per-token arrays are ``[B, T]`` and are 0 where ``mask`` is 0. Only ``logps``
  and ``mask`` are always required; a prior names the other fields it reads
  (``Prior.requires``) and the loss raises a clear error if one is missing.

  Attributes:
    logps: policy token log-probs (gradients flow through them).
    mask: 1 on response tokens, 0 on prompt and padding.
    ref_logps: frozen reference token log-probs.
    kl_ref_policy: per-position ``KL(ref || policy)`` (TDPO, SparsePO).
    kl_policy_ref: per-position ``KL(policy || ref)`` (TIS-DPO).
    prev_logps: token log-probs of the previous round's policy, frozen (DICE).
    token_weights: per-token importance weights (TIS-DPO).
    mask_reward, mask_kl: fixed per-token masks (SparsePO with given masks).
    ref_hidden: ``[B, T, L, D]`` reference hidden states of every layer, the
      input of SparsePO's learned mask head.
    prior_logps: token log-probs of a prior that is a model (``zeta_phi`` of
      the 'mi' and 'ema' priors), frozen in the policy's steps.
    log_sum_sq_probs: ``log sum_v p(v)^2`` of the policy at each position,
      without gradient (WPO's weights, ``LossConfig.use_weighting``).
    extras: any other per-token ``[B, T]`` input by name, for priors
      registered outside midpo (filled by the trainer's input providers,
      ``midpo.training.inputs``); read with ``get(name)``.
  """
  logps: Array
  mask: Array
  ref_logps: Optional[Array] = None
  kl_ref_policy: Optional[Array] = None
  kl_policy_ref: Optional[Array] = None
  prev_logps: Optional[Array] = None
  token_weights: Optional[Array] = None
  mask_reward: Optional[Array] = None
  mask_kl: Optional[Array] = None
  ref_hidden: Optional[Array] = None
  prior_logps: Optional[Array] = None
  log_sum_sq_probs: Optional[Array] = None
  extras: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def from_token_stats(cls, ts: TokenStats, mask: Array, **extra) -> "SequenceStats":
    """Statistics of ``ts``; ``extra`` fields that are not attributes of this
    class go to ``extras``."""
    known = {f.name for f in dataclasses.fields(cls)}
    named = {k: v for k, v in extra.items() if k in known}
    others = {k: v for k, v in extra.items() if k not in known}
    return cls(logps=ts.logps, mask=mask, ref_logps=ts.ref_logps,
               kl_ref_policy=ts.kl_ref_policy, kl_policy_ref=ts.kl_policy_ref,
               log_sum_sq_probs=ts.log_sum_sq_probs, extras=others, **named)

  def get(self, name: str) -> Optional[Array]:
    """The field ``name``: an attribute, else an entry of ``extras`` (None if absent)."""
    if name != "extras" and name in self.__dataclass_fields__:
      return getattr(self, name)
    return self.extras.get(name)

  def fields(self) -> dict[str, Array]:
    """Every field that is set (attributes and ``extras``), by name."""
    out = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "extras"}
    out.update(self.extras)
    return {k: v for k, v in out.items() if v is not None}

  @property
  def batch_size(self) -> int:
    return self.logps.shape[0]


__all__.append("SequenceStats")
