"""Batched sampling with a KV cache, compiled once per shape and setting.

    out = generate(model, prompt_tokens, prompt_mask, rng=jax.random.key(0),
                   max_new_tokens=64, temperature=1.0, top_p=0.95, eos_id=tok.eos_id,
                   pad_id=tok.pad_id)
    out.tokens     # [B, N] int32, pad_id after a row has finished
    out.logprobs   # [B, N] float32, log pi(token | prefix) of the unmodified model
    out.mask       # [B, N] int32, 1 for generated tokens (the final EOS included)
    out.done       # [B] bool, the row emitted EOS

Prompts may be padded on either side (any `prompt_mask`); they are
left-aligned inside, and `out.prompt_tokens`/`out.prompt_mask` return that
layout, so `concat([out.prompt_tokens, out.tokens], 1)` with
`concat([out.prompt_mask, out.mask], 1)` is the full sequence for a
teacher-forced forward pass. The log-probs are those of the model itself
(temperature 1, no top-k/top-p filtering), which is what preference and
policy-gradient losses need; sampling uses the filtered distribution.

On a mesh, pass a sharded model (`midpo.models.sharding`) and prompts sharded
over the batch: the same jitted function runs with GSPMD.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from midpo.models.attention import positions_from_mask
from midpo.models.transformer import Transformer


class SampleOutput(NamedTuple):
  """What ``generate`` returns: ``tokens``, ``logprobs``, ``mask``, ``done`` of
  the new tokens ``[B, N]`` (``done`` ``[B]``: EOS reached), and the prompts
  left-aligned, padding first (``prompt_tokens``, ``prompt_mask`` ``[B, P]``)."""
  tokens: jax.Array
  logprobs: jax.Array
  mask: jax.Array
  done: jax.Array
  prompt_tokens: jax.Array
  prompt_mask: jax.Array


def sample_logits(rng: jax.Array, logits: jax.Array, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Samples token ids [B] from float32 logits [B, V].

  temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The smallest set whose mass reaches top_p: keep while the mass before < top_p.
    keep = mass_before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                     "eos_ids", "pad_id", "cache_dtype"))
def _generate(graphdef, state, prompt_tokens, prompt_mask, rng, *, max_new_tokens,
              temperature, top_k, top_p, eos_ids, pad_id, cache_dtype):
  model: Transformer = nnx.merge(graphdef, state)
  b, p = prompt_tokens.shape
  n = max_new_tokens
  mask = prompt_mask.astype(jnp.int32)
  # Left-align: padding first, real tokens (in their order) last.
  order = jnp.argsort(mask, axis=1, stable=True)
  tokens = jnp.take_along_axis(prompt_tokens.astype(jnp.int32), order, axis=1)
  mask = jnp.take_along_axis(mask, order, axis=1)
  tokens = jnp.where(mask > 0, tokens, pad_id)
  positions = positions_from_mask(mask)

  cache = model.init_cache(b, p + n, dtype=cache_dtype)
  h, cache = model.forward_with_cache(tokens, mask, positions, cache)
  logits = model.logits_from_hidden(h[:, -1])
  eos = jnp.asarray(eos_ids, jnp.int32)

  def cond(carry):
    step, done = carry[0], carry[4]
    return (step < n) & ~jnp.all(done)

  def body(carry):
    step, rng, logits, cache, done, pos, out_tok, out_lp, out_mask = carry
    rng, sub = jax.random.split(rng)
    token = sample_logits(sub, logits, temperature=temperature, top_k=top_k, top_p=top_p)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], 1)[:, 0]
    active = ~done
    token = jnp.where(active, token, pad_id)
    out_tok = out_tok.at[:, step].set(token)
    out_lp = out_lp.at[:, step].set(jnp.where(active, logprob, 0.0))
    out_mask = out_mask.at[:, step].set(active.astype(jnp.int32))
    if eos_ids:
      done = done | (active & jnp.isin(token, eos))
    h, cache = model.forward_with_cache(
        token[:, None], active[:, None].astype(jnp.int32), pos[:, None], cache)
    logits = model.logits_from_hidden(h[:, 0])
    pos = pos + active.astype(jnp.int32)
    return step + 1, rng, logits, cache, done, pos, out_tok, out_lp, out_mask

  carry = (
      jnp.zeros((), jnp.int32), rng, logits, cache, jnp.zeros((b,), bool),
      mask.sum(axis=1).astype(jnp.int32),
      jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
      jnp.zeros((b, n), jnp.int32),
  )
  carry = jax.lax.while_loop(cond, body, carry)
  _, _, _, _, done, _, out_tok, out_lp, out_mask = carry
  return SampleOutput(out_tok, out_lp, out_mask, done, tokens, mask)


def generate(model: Transformer, prompt_tokens, prompt_mask, *, rng: jax.Array,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | Sequence[int] | None = None,
             pad_id: int = 0, cache_dtype: str | None = None) -> SampleOutput:
  """Samples up to `max_new_tokens` per row; see the module docstring.

  prompt_tokens, prompt_mask: [B, P] (1 = real token; every row needs at
  least one). A row stops after emitting any of `eos_id`; rows without EOS
  run to `max_new_tokens`. Compiled once per (shapes, sampling settings).
  """
  if max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens={max_new_tokens}; must be positive.")
  if temperature < 0:
    raise ValueError(f"temperature={temperature}; must be >= 0 (0 = greedy).")
  if top_k < 0 or top_k > model.config.vocab_size:
    raise ValueError(f"top_k={top_k}; must be in [0, vocab_size] (0 = off).")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p}; must be in (0, 1] (1 = off).")
  if np.shape(prompt_tokens) != np.shape(prompt_mask) or len(np.shape(prompt_tokens)) != 2:
    raise ValueError(
        f"prompt_tokens {np.shape(prompt_tokens)} and prompt_mask {np.shape(prompt_mask)} "
        "must both be [batch, length].")
  # On several processes each holds only its rows: the empty-prompt check then
  # runs on the caller's host data, not here.
  if not isinstance(prompt_mask, jax.core.Tracer) and getattr(prompt_mask,
                                                              "is_fully_addressable", True):
    lengths = np.asarray(jax.device_get(prompt_mask)).sum(axis=1)
    if (lengths == 0).any():
      raise ValueError(f"Rows {np.flatnonzero(lengths == 0).tolist()} have empty prompts.")
  if pad_id is None or not isinstance(pad_id, (int, np.integer)):
    raise ValueError(f"pad_id={pad_id!r}; must be an int (for a tokenizer without a pad "
                     "token, pass its eos_id).")
  if eos_id is None:
    eos_ids = ()
  elif isinstance(eos_id, (int, np.integer)):
    eos_ids = (int(eos_id),)
  else:
    eos_ids = tuple(int(e) for e in eos_id)
  vocab = model.config.vocab_size
  if not 0 <= pad_id < vocab or any(not 0 <= e < vocab for e in eos_ids):
    raise ValueError(f"pad_id={pad_id} / eos_id={eos_ids} outside the vocabulary [0, {vocab}).")
  cache_dtype = cache_dtype or model.config.dtype
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask), rng,
                   max_new_tokens=max_new_tokens, temperature=float(temperature),
                   top_k=int(top_k), top_p=float(top_p), eos_ids=eos_ids, pad_id=int(pad_id),
                   cache_dtype=cache_dtype)
