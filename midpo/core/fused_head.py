"""Token statistics straight from the final hidden states and the LM head.

``token_stats_from_hidden`` gives what ``stats.token_stats`` gives (label log-probs of policy and
reference, the per-position KLs, WPO's ``log sum_v p_v^2``) without ever materialising the
``[B, T, V]`` logits, forward or backward: the LM head is applied one vocabulary chunk at a time
(``[B, T, chunk]``), inside ``lax.scan``, and the backward pass (a ``custom_vjp``) recomputes
each chunk's logits and turns their gradient straight into the gradients of the hidden states
``[B, T, D]`` and of the head's weights. It is the fused linear + cross-entropy of Liger's
kernels and of Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models" (2024),
written for the statistics MI-DPO's priors read. Peak temporary memory grows with
``B * T * chunk``; the logits cost one extra LM-head matmul (the recomputation in the backward
pass) over the plain path.

Logits of a chunk are ``einsum(h, w_chunk)`` in the model's compute dtype with float32
accumulation, then Gemma 2's soft-capping ``cap * tanh(x / cap)`` when ``softcap`` is set:
``models.transformer.Transformer.logits_from_hidden``, chunk by chunk. Results equal
``stats.token_stats`` on those logits to float32 rounding (``tests/test_fused_head.py``).

Shapes: ``h_BxTxD`` hidden states, ``w`` the head, ``[V, D]`` (``layout='vd'``, tied embeddings)
or ``[D, V]`` (``layout='dv'``, an ``lm_head``); ``targets_BxT`` and ``mask_BxT`` as in
``stats.token_stats``. The reference's hidden states and head are frozen (no gradient).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from midpo.core import stats

Array = jax.Array


class Head(NamedTuple):
  """How a model turns hidden states into logits (static: part of the compiled program).

  Attributes:
    layout: ``'vd'`` (the head is ``[V, D]``, tied embeddings) or ``'dv'`` (``[D, V]``).
    dtype: the compute dtype of the matmul (its accumulation is float32).
    softcap: Gemma 2's final-logit soft-capping, or None.
  """
  layout: str
  dtype: jnp.dtype
  softcap: Optional[float] = None


def _weight_block(w, start, size, head: Head):
  return jax.lax.dynamic_slice_in_dim(w, start, size, axis=0 if head.layout == "vd" else 1)


def _logits(h, w, start, size, head: Head):
  """The float32 logits ``[B, T, size]`` of vocabulary ids ``[start, start + size)``."""
  wb = _weight_block(w, start, size, head).astype(head.dtype)
  spec = "btd,vd->btv" if head.layout == "vd" else "btd,dv->btv"
  x = jnp.einsum(spec, h.astype(head.dtype), wb, preferred_element_type=jnp.float32)
  if head.softcap is not None:
    x = head.softcap * jnp.tanh(x / head.softcap)
  return x


def _online_lse(h, w, targets, chunks, head: Head, *, sum_sq: bool = False):
  """One pass: ``(logsumexp, target logit)`` per position (and ``log sum_v p_v^2``)."""
  shape = targets.shape

  def block_fn(carry, start, size):
    m, s1, s2, picked = carry
    x = _logits(h, w, start, size, head)
    m_new = jnp.maximum(m, jnp.max(x, -1))
    e = jnp.exp(x - m_new[..., None])
    scale = jnp.exp(m - m_new)
    s1 = s1 * scale + jnp.sum(e, -1)
    if sum_sq:
      s2 = s2 * scale * scale + jnp.sum(e * e, -1)
    ids = start + jax.lax.broadcasted_iota(jnp.int32, x.shape, 2)
    picked = picked + jnp.sum(jnp.where(ids == targets[..., None], x, 0.0), -1)
    return m_new, s1, s2, picked

  zeros = jnp.zeros(shape, jnp.float32)
  init = (jnp.full(shape, -jnp.inf, jnp.float32), zeros, zeros, zeros)
  m, s1, s2, picked = stats.reduce_chunks(block_fn, init, chunks)
  lse = m + jnp.log(s1)
  return lse, picked, (jnp.log(s2) - 2.0 * jnp.log(s1) if sum_sq else None)


def _forward(h_p, w_p, h_r, w_r, targets, want_klr, want_klp, chunks, head):
  lse_p, picked_p, _ = _online_lse(h_p, w_p, targets, chunks, head)
  out = {"logps": picked_p - lse_p}
  lse_r = None
  if h_r is not None:
    lse_r, picked_r, _ = _online_lse(h_r, w_r, targets, chunks, head)
    out["ref_logps"] = picked_r - lse_r
  if want_klr or want_klp:

    def block_fn(carry, start, size):
      return stats.kl_block(carry, _logits(h_p, w_p, start, size, head),
                            _logits(h_r, w_r, start, size, head), lse_p, lse_r, want_klr,
                            want_klp)

    zeros = jnp.zeros(lse_p.shape, jnp.float32)
    cr, cp = stats.reduce_chunks(block_fn, (zeros, zeros), chunks)
    if want_klr:
      out["kl_ref_policy"] = cr - lse_r + lse_p
    if want_klp:
      out["kl_policy_ref"] = cp - lse_p + lse_r
  return out, (lse_p, lse_r)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _fused(h_p, w_p, h_r, w_r, targets, want_klr, want_klp, chunks, head):
  return _forward(h_p, w_p, h_r, w_r, targets, want_klr, want_klp, chunks, head)[0]


def _fused_fwd(h_p, w_p, h_r, w_r, targets, want_klr, want_klp, chunks, head):
  out, (lse_p, lse_r) = _forward(h_p, w_p, h_r, w_r, targets, want_klr, want_klp, chunks, head)
  return out, (h_p, w_p, h_r, w_r, targets, lse_p, lse_r, out.get("kl_policy_ref"))


def _fused_bwd(want_klr, want_klp, chunks, head, residuals, cts):
  """The logits' gradient block by block (``stats.logits_grad_block``, times ``1 - tanh^2``
  under soft-capping), turned at once into the gradients of ``h`` and ``w``:
  ``dh += g w_chunk``, ``dw_chunk = g^T h``."""
  h_p, w_p, h_r, w_r, targets, lse_p, lse_r, klp = residuals
  g_lp = cts["logps"].astype(jnp.float32)
  g_klr = cts["kl_ref_policy"].astype(jnp.float32) if want_klr else None
  g_klp = cts["kl_policy_ref"].astype(jnp.float32) if want_klp else None
  spec_h = "btv,vd->btd" if head.layout == "vd" else "btv,dv->btd"
  spec_w = "btv,btd->vd" if head.layout == "vd" else "btv,btd->dv"
  axis = 0 if head.layout == "vd" else 1

  def block_fn(carry, start, size):
    dh, dw = carry
    x = _logits(h_p, w_p, start, size, head)
    r = _logits(h_r, w_r, start, size, head) if (want_klr or want_klp) else None
    g = stats.logits_grad_block(x, r, start, targets, lse_p, lse_r, g_lp, g_klr, g_klp, klp)
    if head.softcap is not None:
      g = g * (1.0 - jnp.square(x / head.softcap))
    g = g.astype(head.dtype)
    wb = _weight_block(w_p, start, size, head).astype(head.dtype)
    dh = dh + jnp.einsum(spec_h, g, wb, preferred_element_type=jnp.float32)
    dwb = jnp.einsum(spec_w, g, h_p.astype(head.dtype), preferred_element_type=jnp.float32)
    dw = jax.lax.dynamic_update_slice_in_dim(dw, dwb, start, axis=axis)
    return dh, dw

  init = (jnp.zeros(h_p.shape, jnp.float32), jnp.zeros(w_p.shape, jnp.float32))
  dh, dw = stats.reduce_chunks(block_fn, init, chunks)
  zero = lambda x: None if x is None else jnp.zeros_like(x)
  return (dh.astype(h_p.dtype), dw.astype(w_p.dtype), zero(h_r), zero(w_r),
          np.zeros(targets.shape, dtype=jax.dtypes.float0))


_fused.defvjp(_fused_fwd, _fused_bwd)


def token_stats_from_hidden(
    h_BxTxD: Array, w: Array, head: Head, targets_BxT: Array, mask_BxT: Array,
    ref_h_BxTxD: Optional[Array] = None, ref_w: Optional[Array] = None, *,
    kl_ref_policy: bool = False, kl_policy_ref: bool = False, log_sum_sq_probs: bool = False,
    vocab_chunk: Optional[int] = stats.DEFAULT_VOCAB_CHUNK) -> stats.TokenStats:
  """``stats.token_stats`` of the logits ``head`` gives from ``h_BxTxD`` and ``w`` (policy) and
  ``ref_h_BxTxD`` and ``ref_w`` (reference), computed chunk by chunk (module docstring).

  Raises:
    ValueError: shapes that do not fit (``[B, T, D]`` hidden states, a ``[V, D]`` or ``[D, V]``
      head, ``[B, T]`` targets and mask), a KL without the reference, a bad ``vocab_chunk``.
  """
  if h_BxTxD.ndim != 3 or w.ndim != 2:
    raise ValueError(f"hidden states must be [B, T, D] and the head 2-D; got {h_BxTxD.shape} "
                     f"and {w.shape}")
  if head.layout not in ("vd", "dv"):
    raise ValueError(f"head.layout must be 'vd' or 'dv'; got {head.layout!r}")
  vocab, d = w.shape if head.layout == "vd" else w.shape[::-1]
  if d != h_BxTxD.shape[-1]:
    raise ValueError(f"head {w.shape} ({head.layout}) does not fit hidden size "
                     f"{h_BxTxD.shape[-1]}")
  if targets_BxT.shape != h_BxTxD.shape[:2] or mask_BxT.shape != h_BxTxD.shape[:2]:
    raise ValueError(f"targets {targets_BxT.shape} and mask {mask_BxT.shape} must be [B, T] = "
                     f"{h_BxTxD.shape[:2]}")
  if (ref_h_BxTxD is None) != (ref_w is None):
    raise ValueError("the reference needs both its hidden states and its head")
  if ref_h_BxTxD is not None and (ref_h_BxTxD.shape != h_BxTxD.shape or ref_w.shape != w.shape):
    raise ValueError(f"reference shapes {ref_h_BxTxD.shape}, {ref_w.shape} differ from the "
                     f"policy's {h_BxTxD.shape}, {w.shape}")
  if (kl_ref_policy or kl_policy_ref) and ref_h_BxTxD is None:
    raise ValueError("a KL between policy and reference needs the reference")
  real = mask_BxT > 0
  safe = jnp.clip(jnp.where(real, targets_BxT, 0), 0, vocab - 1).astype(jnp.int32)
  chunks = stats.vocab_chunks(vocab, vocab_chunk)
  ref_h = None if ref_h_BxTxD is None else jax.lax.stop_gradient(ref_h_BxTxD)
  ref_w_ = None if ref_w is None else jax.lax.stop_gradient(ref_w)
  out = _fused(h_BxTxD, w, ref_h, ref_w_, safe, bool(kl_ref_policy), bool(kl_policy_ref),
               chunks, head)
  if log_sum_sq_probs:
    frozen_h, frozen_w = jax.lax.stop_gradient(h_BxTxD), jax.lax.stop_gradient(w)
    out["log_sum_sq_probs"] = _online_lse(frozen_h, frozen_w, safe, chunks, head,
                                          sum_sq=True)[2]
  return stats.TokenStats(**{k: jnp.where(real, v, 0.0) for k, v in out.items()})


__all__ = ["Head", "token_stats_from_hidden"]
