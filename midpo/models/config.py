"""Model configuration: one frozen dataclass for the whole Llama family.

Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, OLMo 2, Phi-3, Gemma 2/3 and SmolLM-style models differ
only in the fields below (biases, q/k norms, norm placement, RoPE, sliding
window, tied embeddings). The dataclass is
frozen and hashable so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

# Names accepted for `param_dtype` and `dtype`.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# `remat` policies: what the backward pass keeps from the forward pass of a layer.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "jax", "cudnn")
ROPE_TYPES = ("default", "linear", "llama3")
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3", "gemma2", "gemma3_text")
ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
QK_NORMS = ("none", "head", "full")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (`rope_type` 'linear' or 'llama3', as in HF configs)."""

  rope_type: str
  factor: float
  # llama3 only.
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  original_max_position_embeddings: int | None = None

  def __post_init__(self):
    if self.rope_type not in ("linear", "llama3"):
      raise ValueError(
          f"RopeScaling.rope_type={self.rope_type!r}; supported: 'linear', 'llama3'."
      )
    if self.rope_type == "llama3":
      missing = [
          f for f in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
          if getattr(self, f) is None
      ]
      if missing:
        raise ValueError(f"llama3 RoPE scaling needs {missing}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only Llama-family transformer.

  Shapes: `vocab_size` V, `hidden_size` D, `num_layers` L, `num_heads` H,
  `num_kv_heads` K (grouped-query attention when K < H), `head_dim` Dh,
  `intermediate_size` F (SwiGLU width).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2 and Llama with attention_bias=True.
  o_bias: bool = False  # Llama with attention_bias=True.
  mlp_bias: bool = False  # Llama with mlp_bias=True.
  sliding_window: int | None = None  # Mistral; None = full causal attention.
  # RMSNorm of q and k before RoPE: 'head' over each head's head_dim (Qwen3), 'full' over
  # the whole projection, all heads at once (OLMo 2), 'none'.
  qk_norm: str = "none"
  # RMSNorm of each sublayer's input (Llama: pre_norms) and of its output before the residual
  # sum (OLMo 2: post_norms only).
  pre_norms: bool = True
  post_norms: bool = False
  # Gemma 2: norms scale by (1 + weight); embeddings times sqrt(hidden_size); GeGLU
  # ('gelu_tanh'); attention scale query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5);
  # tanh soft-capping of attention scores and of the final logits (None: off).
  norm_weight_offset: bool = False
  embed_scale: bool = False
  hidden_act: str = "silu"
  query_pre_attn_scalar: float | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  # Per-layer attention ('sliding_attention' layers use sliding_window); None: every layer
  # uses sliding_window when it is set (Mistral).
  layer_types: tuple[str, ...] | None = None
  # Gemma 3: the RoPE base of the sliding-window layers (unscaled); None: rope_theta.
  rope_local_theta: float | None = None
  max_position_embeddings: int = 2048  # Metadata; RoPE works at any position.
  initializer_range: float = 0.02
  # dtype policy: parameters are stored in `param_dtype`; matmuls run in
  # `dtype`; norms, softmax and the logits are float32.
  param_dtype: str = "float32"
  dtype: str = "float32"
  # Per-layer rematerialisation of the scanned layer body: 'none', 'full'
  # (keep only layer inputs), 'dots' / 'dots_no_batch' (keep matmul outputs).
  remat: str = "none"
  # Layers as one `jax.lax.scan` (compile time independent of depth) or
  # unrolled (False: on XLA:CPU the 2-layer `tiny`/`micro` step runs about
  # 15% faster; BENCHMARKS.md "Models").
  scan_layers: bool = True
  # 'xla': explicit masked attention (any padding, float32 softmax).
  # 'jax' / 'cudnn': jax.nn.dot_product_attention (implementation chosen by
  # XLA / cuDNN) with a causal mask and per-row key lengths, which is exact
  # for right-padded (or unpadded) batches only: the trainer's layout. cuDNN
  # needs a GPU and bf16/fp16 compute. The KV-cache path (generation) always
  # uses 'xla'.
  attention_impl: str = "xla"
  # Hugging Face metadata, used by export.
  model_type: str = "llama"
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None

  def __post_init__(self):
    def fail(key, value, allowed):
      raise ValueError(f"ModelConfig.{key}={value!r}; allowed: {allowed}.")

    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                "num_heads", "num_kv_heads", "head_dim"):
      if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
        fail(key, getattr(self, key), "a positive int")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}."
      )
    if self.head_dim % 2:
      fail("head_dim", self.head_dim, "an even int (RoPE rotates pairs)")
    if self.param_dtype not in DTYPES:
      fail("param_dtype", self.param_dtype, tuple(DTYPES))
    if self.dtype not in DTYPES:
      fail("dtype", self.dtype, tuple(DTYPES))
    if self.remat not in REMAT_POLICIES:
      fail("remat", self.remat, REMAT_POLICIES)
    if self.attention_impl not in ATTENTION_IMPLS:
      fail("attention_impl", self.attention_impl, ATTENTION_IMPLS)
    if self.attention_impl != "xla" and self.attn_logit_softcap is not None:
      fail("attention_impl", self.attention_impl, "'xla' with attn_logit_softcap")
    if self.model_type not in MODEL_TYPES:
      fail("model_type", self.model_type, MODEL_TYPES)
    if self.qk_norm not in QK_NORMS:
      fail("qk_norm", self.qk_norm, QK_NORMS)
    if self.hidden_act not in ACTIVATIONS:
      fail("hidden_act", self.hidden_act, ACTIVATIONS)
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(
          LAYER_TYPES):
        fail("layer_types", self.layer_types, f"{self.num_layers} of {LAYER_TYPES}")
      if self.attention_impl != "xla":
        fail("attention_impl", self.attention_impl, "'xla' with per-layer layer_types")
    if not (self.pre_norms or self.post_norms):
      fail("pre_norms", self.pre_norms, "True when post_norms is False")
    if self.sliding_window is not None and self.sliding_window <= 0:
      fail("sliding_window", self.sliding_window, "None or a positive int")
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if isinstance(self.layer_types, list):
      object.__setattr__(self, "layer_types", tuple(self.layer_types))

  @property
  def num_groups(self) -> int:
    """Query heads per KV head."""
    return self.num_heads // self.num_kv_heads

  @property
  def jnp_param_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def jnp_dtype(self):
    return DTYPES[self.dtype]

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self, *, include_embeddings: bool = True) -> int:
    """Number of parameters (the input embedding counts once when tied)."""
    d, f, h, k, dh = (self.hidden_size, self.intermediate_size, self.num_heads,
                      self.num_kv_heads, self.head_dim)
    attn = d * h * dh * 2 + d * k * dh * 2
    attn += (h + 2 * k) * dh * self.qkv_bias + d * self.o_bias
    mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
    per_layer = attn + mlp + 2 * d
    n = self.num_layers * per_layer + d
    if include_embeddings:
      n += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return n

  def flops_per_token(self, seq_len: int, *, training: bool = True) -> float:
    """Model FLOPs per token: 6N (2N forward only) plus causal attention.

    N is the matmul parameter count: every parameter except the input
    embedding lookup, with the LM head counted once whether or not it is tied
    to the embedding (it is a real V x D matmul either way). For a
    Llama-3.2-1B shape N is 1.236e9, the figure behind the TRL yardstick in
    BENCHMARKS.md. Causal attention adds 2 * 2 * L * H * Dh * T / 2 per token
    forward (scores and weighted sum over on average T/2 keys).
    """
    n = self.num_params(include_embeddings=False) + self.vocab_size * self.hidden_size
    attn = 2 * 2 * self.num_layers * self.num_heads * self.head_dim * seq_len / 2
    mult = 3 if training else 1
    return mult * (2 * n + attn)


# Named configurations. `tiny` trains on a CPU in seconds and matches the
# built-in byte tokenizer (vocab 259, padded to 320).
_CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=320, hidden_size=128, intermediate_size=384, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=1024,
        bos_token_id=257, eos_token_id=258, pad_token_id=256, scan_layers=False,
    ),
    # Half of tiny: the default prior network zeta_phi of the 'mi' prior.
    "micro": ModelConfig(
        vocab_size=320, hidden_size=64, intermediate_size=192, num_layers=2,
        num_heads=2, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=1024,
        bos_token_id=257, eos_token_id=258, pad_token_id=256, scan_layers=False,
    ),
    # SmolLM2-135M-shaped.
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192,
        bos_token_id=1, eos_token_id=2,
    ),
    # Llama-3.2-1B-shaped (1.24B parameters), the benchmark model.
    "llama3.2-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
        tie_word_embeddings=True, max_position_embeddings=131072,
        bos_token_id=128000, eos_token_id=128001,
    ),
}


def config_names() -> tuple[str, ...]:
  """The names of the built-in model configurations."""
  return tuple(_CONFIGS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
  """Named configuration, e.g. `get_config('tiny', dtype='bfloat16')`."""
  if name not in _CONFIGS:
    raise ValueError(f"Unknown model config {name!r}; known: {config_names()}.")
  return _CONFIGS[name].replace(**overrides)


def resolve_attention_impl(name: str, config: ModelConfig, platform: str) -> str:
  """The attention implementation a run's ``model.attention_impl`` means on
  ``platform`` (``jax.default_backend()``: 'cpu', 'gpu', 'tpu').

  'auto' is cuDNN's fused attention on a GPU where it applies (bfloat16 or
  float16 compute, ``head_dim`` a multiple of 8 up to 128, no per-layer
  ``layer_types``, no score soft-capping), and
  XLA's explicit masked attention everywhere else; any other name is returned
  as it is.

  Raises:
    ValueError: ``name`` is not 'auto' or one of ``ATTENTION_IMPLS``, or it is
      'cudnn' where cuDNN's attention does not apply.
  """
  if name not in ("auto",) + ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={name!r}; supported: {('auto',) + ATTENTION_IMPLS}")
  fits = (config.dtype in ("bfloat16", "float16") and config.layer_types is None
          and config.attn_logit_softcap is None and config.head_dim % 8 == 0
          and config.head_dim <= 128)
  if name == "cudnn" and (platform != "gpu" or not fits):
    raise ValueError(f"attention_impl='cudnn' needs a GPU (this backend is {platform!r}), "
                     "bf16 or fp16 compute, head_dim a multiple of 8 up to 128, no "
                     "layer_types and no soft-capping; 'auto' takes it where it applies")
  if name != "auto":
    return name
  return "cudnn" if platform == "gpu" and fits else "xla"
