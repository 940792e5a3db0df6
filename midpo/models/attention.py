"""Rotary position embeddings and attention of the Llama-family decoder.

Conventions follow Hugging Face's Llama: rotary embeddings on the two halves of
each head (``rotate_half``), inverse frequencies with linear or llama3 scaling,
query head h attends with KV head h // (H / K), softmax in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from midpo.models.config import ModelConfig

MASK_VALUE = -1e30  # Finite, so fully masked (padding) query rows give no NaN.


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """RoPE positions: 0, 1, ... over the real tokens of each row ([B, T] int32)."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """RoPE positions of packed rows: 0, 1, ... within each segment ([B, T] int32).

  ``segment_ids`` [B, T]: the sequence each token belongs to (1, 2, ... in the
  row, each a contiguous span), 0 for padding (position 0).
  """
  seg = segment_ids.astype(jnp.int32)
  index = jnp.broadcast_to(jnp.arange(seg.shape[-1], dtype=jnp.int32), seg.shape)
  starts = jnp.concatenate([jnp.ones_like(seg[..., :1], bool), seg[..., 1:] != seg[..., :-1]],
                           axis=-1)
  first = jax.lax.cummax(jnp.where(starts, index, 0), axis=seg.ndim - 1)
  return jnp.where(seg > 0, index - first, 0)


def rope_inv_freq(c: ModelConfig) -> np.ndarray:
  """Inverse frequencies [Dh/2] (float32), with linear or llama3 scaling."""
  dim = c.head_dim
  exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  inv_freq = (np.float32(1.0) / np.power(np.float32(c.rope_theta), exponent)).astype(np.float32)
  s = c.rope_scaling
  if s is None:
    return inv_freq
  if s.rope_type == "linear":
    return (inv_freq / np.float32(s.factor)).astype(np.float32)
  # llama3: keep high frequencies, divide low ones by `factor`, interpolate between.
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = np.float32(2 * math.pi) / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(s.factor), inv_freq)
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(c: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(cos, sin)`` [B, T, Dh/2] float32 of ``positions`` [B, T]."""
  inv_freq = jnp.asarray(rope_inv_freq(c)).reshape((1,) * positions.ndim + (-1,))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(freqs), jnp.sin(freqs)  # [B, T, Dh/2] float32


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [B, T, N, Dh]; rotates (first half, second half) pairs, in float32."""
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention(c: ModelConfig, q, k, v, mask, key_lengths=None):
  """q [B,T,H,Dh], k/v [B,S,K,Dh], mask [B,T,S] bool -> [B,T,H,Dh]."""
  b, t, h, dh = q.shape
  scale = (c.query_pre_attn_scalar or dh) ** -0.5
  if c.attention_impl != "xla" and key_lengths is not None:
    # Causal + key lengths: exact for right-padded batches (see ModelConfig).
    window = None if c.sliding_window is None else (c.sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, key_value_seq_lengths=key_lengths,
        local_window_size=window,
        implementation="cudnn" if c.attention_impl == "cudnn" else None)
  qg = q.reshape(b, t, c.num_kv_heads, c.num_groups, dh)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  if c.attn_logit_softcap is not None:  # Gemma 2: cap * tanh(scores / cap), before the mask
    scores = c.attn_logit_softcap * jnp.tanh(scores / c.attn_logit_softcap)
  scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, dh)
