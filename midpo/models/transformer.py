"""A Flax NNX decoder-only transformer for the Llama family.

Layout (logical axis names in brackets, used by `midpo.models.sharding`):
  embed          [V, D]            ('vocab', 'embed')
  layers.*       stacked on a leading L axis ('layers', ...), run by `lax.scan`
    attn_norm    [L, D]            ('layers', 'norm')
    q            [L, D, H, Dh]     ('layers', 'embed', 'heads', 'head_dim')
    k, v         [L, D, K, Dh]     ('layers', 'embed', 'kv_heads', 'head_dim')
    o            [L, H, Dh, D]     ('layers', 'heads', 'head_dim', 'embed')
    q_bias       [L, H, Dh], k_bias/v_bias [L, K, Dh], o_bias [L, D] (optional)
    mlp_norm     [L, D]
    gate, up     [L, D, F]         ('layers', 'embed', 'mlp')
    down         [L, F, D]         ('layers', 'mlp', 'embed')
  final_norm     [D]               ('norm',)
  lm_head        [D, V]            ('embed', 'vocab'), absent when embeddings are tied

Conventions follow Hugging Face's Llama: RMSNorm computed in float32, rotary
embeddings on the two halves of each head (`rotate_half`), query head h uses KV
head h // (H / K), SwiGLU MLP. Inputs are int32 tokens [B, T] with an
`attention_mask` [B, T] (1 = real token); right padding (training) and left
padding (generation) both work because positions default to
`cumsum(mask) - 1`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from midpo.core import fused_head
from midpo.models import attention as attention_lib
from midpo.models import sharding
from midpo.models.attention import positions_from_mask
from midpo.models.config import ModelConfig

# Logical axis names of every parameter (without the leading 'layers' axis for
# the stacked per-layer parameters).
LAYER_PARAM_AXES: dict[str, tuple[str, ...]] = {
    "attn_norm": ("norm",),
    "q": ("embed", "heads", "head_dim"),
    "k": ("embed", "kv_heads", "head_dim"),
    "v": ("embed", "kv_heads", "head_dim"),
    "o": ("heads", "head_dim", "embed"),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "q_full_norm": ("heads", "head_dim"),
    "k_full_norm": ("kv_heads", "head_dim"),
    "attn_post_norm": ("norm",),
    "mlp_post_norm": ("norm",),
    "q_bias": ("heads", "head_dim"),
    "k_bias": ("kv_heads", "head_dim"),
    "v_bias": ("kv_heads", "head_dim"),
    "o_bias": ("norm",),
    "mlp_norm": ("norm",),
    "gate": ("embed", "mlp"),
    "up": ("embed", "mlp"),
    "down": ("mlp", "embed"),
    "gate_bias": ("mlp",),
    "up_bias": ("mlp",),
    "down_bias": ("norm",),
}

def layer_param_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Per-layer parameter shapes (without the 'layers' axis) for this config."""
  d, f, h, k, dh = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
  shapes = {
      "attn_norm": (d,), "q": (d, h, dh), "k": (d, k, dh), "v": (d, k, dh),
      "o": (h, dh, d), "mlp_norm": (d,), "gate": (d, f), "up": (d, f), "down": (f, d),
  }
  if not c.pre_norms:
    del shapes["attn_norm"], shapes["mlp_norm"]
  if c.post_norms:
    shapes.update(attn_post_norm=(d,), mlp_post_norm=(d,))
  if c.qkv_bias:
    shapes.update(q_bias=(h, dh), k_bias=(k, dh), v_bias=(k, dh))
  if c.qk_norm == "head":
    shapes.update(q_norm=(dh,), k_norm=(dh,))
  elif c.qk_norm == "full":
    shapes.update(q_full_norm=(h, dh), k_full_norm=(k, dh))
  if c.o_bias:
    shapes.update(o_bias=(d,))
  if c.mlp_bias:
    shapes.update(gate_bias=(f,), up_bias=(f,), down_bias=(d,))
  return shapes


def _param(value, names: tuple[str, ...]) -> nnx.Param:
  # `eager_sharding=False`: the names are logical, mapped to mesh axes by
  # `midpo.models.sharding`, not mesh axes to shard on at creation.
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class DecoderLayers(nnx.Module):
  """All L decoder layers, parameters stacked on a leading 'layers' axis."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    dtype = c.jnp_param_dtype
    init = jax.nn.initializers.normal(c.initializer_range)
    for name, shape in layer_param_shapes(c).items():
      shape = (c.num_layers, *shape)
      if name.endswith("norm"):  # the identity: 1, or 0 where norms scale by (1 + w)
        value = (jnp.zeros if c.norm_weight_offset else jnp.ones)(shape, dtype)
      elif name.endswith("bias"):
        value = jnp.zeros(shape, dtype)
      else:
        value = init(rngs.params(), shape, dtype)
      setattr(self, name, _param(value, ("layers", *LAYER_PARAM_AXES[name])))

  def arrays(self) -> dict[str, jax.Array]:
    """The stacked parameter arrays by name ([L, ...] each)."""
    return {n: getattr(self, n)[...] for n in LAYER_PARAM_AXES if hasattr(self, n)}


class KVCache(NamedTuple):
  """Key/value cache for all layers.

  k, v: [L, B, S, K, Dh] in the compute dtype; mask: [B, S] int32, 1 where the
  slot holds a real token; index: int32 scalar, the next slot to write. All
  rows write the same slot, so prompts are left-padded for generation.
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array


def _lead(w: jax.Array, ndim: int) -> jax.Array:
  """``w`` with leading unit axes up to ``ndim`` (explicit broadcasting)."""
  return w.reshape((1,) * (ndim - w.ndim) + w.shape)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm of ``x`` over its trailing ``weight.ndim`` axes (in float32) times ``weight``
  (``[D]``, or ``[H, Dh]`` for OLMo 2's norm over all heads), in ``x``'s dtype."""
  x32 = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - weight.ndim, x.ndim))
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axes, keepdims=True) + eps)
  return y.astype(x.dtype) * _lead(weight.astype(x.dtype), x.ndim)


def norm_weight(c: ModelConfig, weight: jax.Array) -> jax.Array:
  """The factor a norm multiplies by: ``weight``, or ``1 + weight`` (Gemma, in float32)."""
  return weight.astype(jnp.float32) + 1.0 if c.norm_weight_offset else weight


def _dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
  """``x [..., C...]`` times ``w [C..., O...]`` over the last ``contract`` axes
  of ``x`` and the first of ``w``, as one 2-D matmul ``[N, C] @ [C, O]``.

  The same product as ``einsum('btd,dhk->bthk')`` and friends; written 2-D
  because XLA:CPU fuses the 3-D einsums' backward into slow transposing
  loops (the MLP's backward ran 3x slower; ``benchmarks/bench_model.py``, BENCHMARKS.md).
  """
  lead, inner = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
  out = w.shape[contract:]
  c, o = int(np.prod(inner)), int(np.prod(out))
  return (x.reshape(-1, c) @ w.reshape(c, o)).reshape(lead + out)


def _no_constraint(x, names):
  del names
  return x


def _layer(c: ModelConfig, p: dict, x, cos, sin, mask, cache, layer_idx, cache_index,
           key_lengths, constrain=_no_constraint):
  """One decoder layer. x: [B, T, D] compute dtype. Returns (x, cache)."""
  dt = c.jnp_dtype
  w = lambda name: p[name].astype(dt)
  norm = lambda y, name: rms_norm(y, norm_weight(c, p[name]), c.rms_norm_eps)
  h = norm(x, "attn_norm") if c.pre_norms else x
  q, k, v = _dense(h, w("q")), _dense(h, w("k")), _dense(h, w("v"))
  if c.qkv_bias:
    q, k, v = (q + _lead(w("q_bias"), 4), k + _lead(w("k_bias"), 4),
               v + _lead(w("v_bias"), 4))
  if c.qk_norm != "none":
    names = ("q_norm", "k_norm") if c.qk_norm == "head" else ("q_full_norm", "k_full_norm")
    q, k = norm(q, names[0]), norm(k, names[1])
  q, k = attention_lib.apply_rope(q, cos, sin), attention_lib.apply_rope(k, cos, sin)
  q = constrain(q, ("batch", "length", "act_heads", None))
  k = constrain(k, ("batch", "length", "act_kv_heads", None))
  v = constrain(v, ("batch", "length", "act_kv_heads", None))
  if cache is not None:
    ck, cv = cache
    start = (layer_idx, 0, cache_index, 0, 0)
    ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None], start)
    cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None], start)
    k = jax.lax.dynamic_index_in_dim(ck, layer_idx, 0, keepdims=False).astype(dt)
    v = jax.lax.dynamic_index_in_dim(cv, layer_idx, 0, keepdims=False).astype(dt)
    cache = (ck, cv)
  attn = attention_lib.attention(c, q, k, v, mask, key_lengths)
  out = _dense(attn, w("o"), contract=2)
  if c.o_bias:
    out = out + _lead(w("o_bias"), 3)
  if c.post_norms:
    out = norm(out, "attn_post_norm")
  x = x + out
  h = norm(x, "mlp_norm") if c.pre_norms else x
  gate, up = _dense(h, w("gate")), _dense(h, w("up"))
  if c.mlp_bias:
    gate, up = gate + _lead(w("gate_bias"), 3), up + _lead(w("up_bias"), 3)
  gated = jax.nn.silu(gate) if c.hidden_act == "silu" else jax.nn.gelu(gate, approximate=True)
  act = constrain(gated * up, ("batch", "length", "act_mlp"))
  down = _dense(act, w("down"))
  if c.mlp_bias:
    down = down + _lead(w("down_bias"), 3)
  if c.post_norms:
    down = norm(down, "mlp_post_norm")
  return constrain(x + down, ("batch", "length", "act_embed")), cache


def _remat_policy(name: str):
  return {
      "full": None,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[name]


class Transformer(nnx.Module):
  """Decoder-only Llama-family language model.

  `model(tokens, attention_mask=None, positions=None)` returns float32 logits
  [B, T, V]. The forward also comes in two parts, so a trainer can avoid
  materialising [B, T, V] at once: `model.hidden_states(...)` returns the final
  normed hidden states [B, T, D] and `model.logits_from_hidden(h)` applies the
  LM head (tied embedding or `lm_head`) to any [..., D] slice of them.

  Packed rows (several sequences in one row, no padding between them) pass
  `segment_ids` [B, T] (1, 2, ... per sequence, 0 = padding; MaxText's
  `decoder_segment_ids`): a token attends only to earlier tokens of its own
  segment, positions restart at 0 in each, and the attention mask defaults to
  `segment_ids > 0`. Packed rows always take the explicit masked attention.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    dtype = c.jnp_param_dtype
    init = jax.nn.initializers.normal(c.initializer_range)
    self.embed = _param(init(rngs.params(), (c.vocab_size, c.hidden_size), dtype),
                        ("vocab", "embed"))
    self.layers = DecoderLayers(c, rngs=rngs)
    self.final_norm = _param((jnp.zeros if c.norm_weight_offset else jnp.ones)(
        (c.hidden_size,), dtype), ("norm",))
    # (mesh, rules) once the model is placed on a mesh (midpo.models.sharding):
    # activations are then constrained to the rules' activation axes.
    self.activation_sharding = None
    if c.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = _param(init(rngs.params(), (c.hidden_size, c.vocab_size), dtype),
                            ("embed", "vocab"))

  # -- public API -------------------------------------------------------------

  def __call__(self, tokens, attention_mask=None, positions=None, *,
               segment_ids=None, return_hidden_states: bool = False):
    """Logits [B, T, V] float32; with `return_hidden_states`, also every
    layer's output (the residual stream after each block) [B, T, L, D]."""
    h, all_h, _ = self._forward(tokens, attention_mask, positions, None, return_hidden_states,
                                segment_ids)
    logits = self.logits_from_hidden(h)
    return (logits, all_h) if return_hidden_states else logits

  def hidden_states(self, tokens, attention_mask=None, positions=None, *,
                    segment_ids=None, return_all_layers: bool = False):
    """Final normed hidden states [B, T, D] (compute dtype); with
    `return_all_layers`, also every layer's output [B, T, L, D]."""
    h, all_h, _ = self._forward(tokens, attention_mask, positions, None, return_all_layers,
                                segment_ids)
    return (h, all_h) if return_all_layers else h

  def logits_from_hidden(self, h: jax.Array) -> jax.Array:
    """LM head: [..., D] hidden states -> [..., V] float32 logits."""
    dt = self.config.jnp_dtype
    if self.lm_head is None:
      logits = jnp.einsum("...d,vd->...v", h.astype(dt), self.embed[...].astype(dt),
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("...d,dv->...v", h.astype(dt), self.lm_head[...].astype(dt),
                          preferred_element_type=jnp.float32)
    if self.config.final_logit_softcap is not None:  # Gemma 2
      cap = self.config.final_logit_softcap
      logits = cap * jnp.tanh(logits / cap)
    names = ("batch",) + (None,) * (logits.ndim - 2) + ("act_vocab",)
    return self._constrain(logits, names) if logits.ndim >= 2 else logits

  def lm_head_weights(self) -> tuple[jax.Array, fused_head.Head]:
    """The LM head's weights and how `logits_from_hidden` applies them, for
    `midpo.core.fused_head`: the tied embedding [V, D] ('vd') or `lm_head`
    [D, V] ('dv'), the compute dtype and Gemma 2's soft-capping."""
    c = self.config
    if self.lm_head is None:
      return self.embed[...], fused_head.Head("vd", c.jnp_dtype, c.final_logit_softcap)
    return self.lm_head[...], fused_head.Head("dv", c.jnp_dtype, c.final_logit_softcap)

  def _constrain(self, x, names):
    """Sharding constraint by logical names, when the model is on a mesh."""
    if self.activation_sharding is None:
      return x
    mesh, rules = self.activation_sharding
    spec = sharding.logical_to_mesh(names, rules, mesh, what="activation")
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """An empty KV cache for `max_length` slots (prompt + new tokens)."""
    c = self.config
    dtype = dtype or c.jnp_dtype
    shape = (c.num_layers, batch_size, max_length, c.num_kv_heads, c.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch_size, max_length), jnp.int32), jnp.zeros((), jnp.int32))

  def forward_with_cache(self, tokens, attention_mask, positions, cache: KVCache):
    """Runs T new tokens against the cache. Returns (final normed hidden
    [B, T, D], updated cache). The tokens occupy slots [index, index + T)."""
    h, _, cache = self._forward(tokens, attention_mask, positions, cache, False)
    return h, cache

  # -- implementation ---------------------------------------------------------

  def _forward(self, tokens, attention_mask, positions, cache, return_all, segment_ids=None):
    c = self.config
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}.")
    b, t = tokens.shape
    if segment_ids is not None:
      segment_ids = jnp.asarray(segment_ids).astype(jnp.int32)
      if segment_ids.shape != tokens.shape or cache is not None:
        raise ValueError(f"segment_ids {segment_ids.shape} must match tokens {tokens.shape} "
                         "(and packed rows take no KV cache).")
      if attention_mask is None:
        attention_mask = segment_ids > 0
      if positions is None:
        positions = attention_lib.positions_from_segments(segment_ids)
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    attention_mask = jnp.asarray(attention_mask).astype(jnp.int32)
    if attention_mask.shape != tokens.shape:
      raise ValueError(
          f"attention_mask shape {attention_mask.shape} != tokens shape {tokens.shape}.")
    if positions is None:
      if cache is not None:
        raise ValueError("forward_with_cache needs explicit positions.")
      positions = positions_from_mask(attention_mask)

    # On a mesh, gather the table over FSDP first (vocab stays split over
    # 'tensor'): GSPMD then partitions the lookup without replicating it.
    table = self._constrain(self.embed[...], ("vocab", None))
    x = jnp.take(table, tokens, axis=0).astype(c.jnp_dtype)
    if c.embed_scale:  # Gemma: times sqrt(D), the factor rounded to the compute dtype
      x = x * jnp.asarray(c.hidden_size ** 0.5, c.jnp_dtype)
    x = self._constrain(x, ("batch", "length", "act_embed"))
    cos, sin = attention_lib.rope_tables(c, positions)
    local_rope = None
    if c.rope_local_theta is not None:  # Gemma 3: the sliding layers' own base, unscaled
      local_rope = attention_lib.rope_tables(
          dataclasses.replace(c, rope_theta=c.rope_local_theta, rope_scaling=None), positions)

    if cache is None:
      key_mask = attention_mask
      q_slots = k_slots = jnp.arange(t)
      cache_index = None
      key_lengths = (attention_mask.sum(-1) if c.attention_impl != "xla" and segment_ids is None
                     else None)
    else:
      key_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache.index))
      q_slots = cache.index + jnp.arange(t)
      k_slots = jnp.arange(cache.mask.shape[1])
      cache_index = cache.index
      key_lengths = None  # The cache path always uses the explicit mask.
    allowed = k_slots[None, :] <= q_slots[:, None]
    key_ok = key_mask[:, None, :] > 0
    if segment_ids is not None:
      key_ok &= segment_ids[:, :, None] == segment_ids[:, None, :]
    full_mask = key_ok & allowed[None]  # [B, T, S]
    if c.sliding_window is not None:
      allowed &= (q_slots[:, None] - k_slots[None, :]) < c.sliding_window
    mask = key_ok & allowed[None]  # [B, T, S]
    # Per layer: whether it attends through the sliding window (all layers or none, unless
    # layer_types says which).
    sliding = np.array([t == "sliding_attention" for t in c.layer_types] if c.layer_types
                       else [c.sliding_window is not None] * c.num_layers)

    params = self.layers.arrays()

    def body(carry, xs):
      x, kv = carry
      p, i, slide = xs
      m = mask if c.layer_types is None else jnp.where(slide, mask, full_mask)
      cs, sn = cos, sin
      if local_rope is not None:
        cs, sn = jnp.where(slide, local_rope[0], cos), jnp.where(slide, local_rope[1], sin)
      x, kv = _layer(c, p, x, cs, sn, m, kv, i, cache_index, key_lengths, self._constrain)
      if kv is not None:
        kv = tuple(self._constrain(a, ("layers", "batch", None, "act_kv_heads", None)) for a in kv)
      return (x, kv), (x if return_all else None)

    if c.remat != "none":
      body = jax.checkpoint(body, policy=_remat_policy(c.remat), prevent_cse=False)
    kv = None if cache is None else (cache.k, cache.v)
    (x, kv), all_h = jax.lax.scan(body, (x, kv),
                                  (params, jnp.arange(c.num_layers), jnp.asarray(sliding)),
                                  unroll=not c.scan_layers)
    h = rms_norm(x, norm_weight(c, self.final_norm[...]), c.rms_norm_eps)
    if return_all:
      all_h = jnp.moveaxis(all_h, 0, 2)  # [L, B, T, D] -> [B, T, L, D]
    if cache is not None:
      cache = KVCache(kv[0], kv[1], key_mask, cache.index + t)
    return h, all_h, cache


def create_model(config: ModelConfig, *, seed: int = 0) -> Transformer:
  """A randomly initialised model on the default device (see
  `create_sharded_model` for a mesh)."""
  return Transformer(config, rngs=nnx.Rngs(params=seed))


def create_sharded_model(config: ModelConfig, mesh: jax.sharding.Mesh, *,
                         rules: sharding.Rules = sharding.DEFAULT_RULES,
                         seed: int = 0) -> Transformer:
  """A randomly initialised Transformer created directly sharded: shapes from
  `nnx.eval_shape`, shardings from the rules, then a jitted init with those
  output shardings, so the full model never sits on one device."""
  make = lambda: Transformer(config, rngs=nnx.Rngs(params=seed))
  graphdef, abs_state = nnx.split(nnx.eval_shape(make))
  shardings = sharding.state_shardings(abs_state, mesh, rules)
  init = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)
  model = nnx.merge(graphdef, init())
  model.activation_sharding = (mesh, tuple(rules))
  return model
