"""``config.json`` of Hugging Face checkpoints <-> ``ModelConfig``, per family.

Supported ``model_type``s: 'llama' (Llama 2/3/3.x, SmolLM), 'mistral', 'qwen2'
(Qwen2/2.5), 'qwen3' (Qwen3 dense: per-head RMSNorm of q and k before RoPE),
'olmo2' (OLMo 2: RMSNorm of the whole q and k projections, and of each
sublayer's output instead of its input), 'phi3' (Phi-3 with its fused qkv and
gate-up projections, split on import and fused on export by ``hf_checkpoint``;
long-RoPE variants are refused by their RoPE type), 'gemma2' (Gemma 2: (1 + w)
norms before and after each sublayer, sqrt(D)-scaled embeddings, GeGLU,
``query_pre_attn_scalar``, soft-capped attention scores and logits, a sliding
window on alternate layers), 'gemma3_text' (Gemma 3 text models: Gemma 2's
layout without soft-capping, with per-head (1 + w) q/k norms and a RoPE base of
its own on the sliding-window layers).
Anything else is refused by name (``CheckpointError``).
"""

from __future__ import annotations

from typing import Any

from midpo.models.config import MODEL_TYPES, ModelConfig, RopeScaling

ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
}
# What each family's architecture fixes: (qk_norm, pre_norms, post_norms).
NORMS = {"llama": ("none", True, False), "mistral": ("none", True, False),
         "qwen2": ("none", True, False), "qwen3": ("head", True, False),
         "olmo2": ("full", False, True), "phi3": ("none", True, False),
         "gemma2": ("none", True, True), "gemma3_text": ("head", True, True)}
# Hugging Face's activation names -> ModelConfig.hidden_act.
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be read into the model."""


# ---------------------------------------------------------------------------
# config.json <-> ModelConfig
# ---------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
  """ModelConfig from a `config.json` dict; `overrides` set e.g. dtypes."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise CheckpointError(
        f"Unsupported model_type {model_type!r} in config.json; supported: {MODEL_TYPES} "
        "(Llama 2/3/3.x, SmolLM, Mistral, Qwen2/2.5, Qwen3, OLMo 2, Phi-3, Gemma 2, Gemma 3 "
        "text 'gemma3_text').")

  def need(key):
    if hf.get(key) is None:
      raise CheckpointError(f"config.json ({model_type}) lacks the required key {key!r}.")
    return hf[key]

  act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
  if act not in _ACTIVATIONS or model_type.startswith("gemma") != (act == "gelu_pytorch_tanh"):
    raise CheckpointError(f"Unsupported hidden_act {act!r} for {model_type!r}; 'silu' "
                          "(SwiGLU), or 'gelu_pytorch_tanh' (GeGLU) for Gemma 2.")
  hidden, heads = need("hidden_size"), need("num_attention_heads")
  kv_heads = hf.get("num_key_value_heads") or heads
  head_dim = hf.get("head_dim") or hidden // heads

  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  local_theta = None
  if rope and all(isinstance(v, dict) for v in rope.values()):
    local = rope.get("sliding_attention") or {}
    if model_type != "gemma3_text" or local.get("rope_type", "default") != "default":
      raise CheckpointError("Per-layer-type RoPE parameters are not supported (but Gemma 3's "
                            "default-type local RoPE).")
    local_theta = float(local.get("rope_theta", 10000.0))
    rope = rope.get("full_attention") or {}
  elif model_type == "gemma3_text":  # the older config.json spelling
    local_theta = float(hf.get("rope_local_base_freq", 10000.0))
  theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise CheckpointError(f"partial_rotary_factor={partial} is not supported (only 1.0).")
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    scaling = None
  elif rope_type == "linear":
    scaling = RopeScaling("linear", float(rope["factor"]))
  elif rope_type == "llama3":
    scaling = RopeScaling(
        "llama3", float(rope["factor"]), float(rope["low_freq_factor"]),
        float(rope["high_freq_factor"]),
        int(rope.get("original_max_position_embeddings") or need("max_position_embeddings")))
  else:
    raise CheckpointError(
        f"Unsupported RoPE type {rope_type!r}; supported: 'default', 'linear', 'llama3'.")

  qkv_bias = o_bias = mlp_bias = False
  sliding_window = None
  qk_norm, pre_norms, post_norms = NORMS[model_type]
  if model_type in ("llama", "olmo2"):
    qkv_bias = o_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
  elif model_type in ("qwen2", "qwen3"):
    if model_type == "qwen2":
      qkv_bias = True
    else:  # q/k/v/o biases all or none
      qkv_bias = o_bias = bool(hf.get("attention_bias", False))
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if hf.get("use_sliding_window", False) or layer_types != {"full_attention"}:
      raise CheckpointError(
          f"{model_type} with use_sliding_window=true (sliding window on some layers only) "
          "is not supported.")
  elif model_type in ("mistral", "phi3"):
    sliding_window = hf.get("sliding_window")
  gemma = {}
  if model_type in ("gemma2", "gemma3_text"):
    qkv_bias = o_bias = bool(hf.get("attention_bias", False))
    sliding_window = need("sliding_window")
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                      for i in range(need("num_hidden_layers"))]
    gemma = dict(norm_weight_offset=True, embed_scale=True, layer_types=tuple(types),
                 query_pre_attn_scalar=need("query_pre_attn_scalar"),
                 attn_logit_softcap=hf.get("attn_logit_softcapping"),
                 final_logit_softcap=hf.get("final_logit_softcapping"),
                 rope_local_theta=local_theta)

  eos = hf.get("eos_token_id")
  kwargs = dict(
      vocab_size=need("vocab_size"), hidden_size=hidden,
      intermediate_size=need("intermediate_size"), num_layers=need("num_hidden_layers"),
      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
      rope_scaling=scaling, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, sliding_window=sliding_window,
      qk_norm=qk_norm, pre_norms=pre_norms, post_norms=post_norms,
      hidden_act=_ACTIVATIONS[act], **gemma,
      max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
      initializer_range=float(hf.get("initializer_range", 0.02)),
      model_type=model_type, bos_token_id=hf.get("bos_token_id"),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=hf.get("pad_token_id"),
  )
  kwargs.update(overrides)
  return ModelConfig(**kwargs)


def config_to_hf(c: ModelConfig, *, dtype: str | None = None) -> dict[str, Any]:
  """A `config.json` dict that transformers (4.x and 5.x) and vLLM load."""
  if (c.qk_norm, c.pre_norms, c.post_norms) != NORMS[c.model_type]:
    raise CheckpointError(
        f"model_type {c.model_type!r} fixes (qk_norm, pre_norms, post_norms) = "
        f"{NORMS[c.model_type]}; this config has {(c.qk_norm, c.pre_norms, c.post_norms)}.")
  gemma = c.model_type in ("gemma2", "gemma3_text")
  if gemma != (c.norm_weight_offset and c.embed_scale and c.hidden_act == "gelu_tanh"
               and c.layer_types is not None and c.query_pre_attn_scalar is not None) or (
                   not gemma and (c.attn_logit_softcap or c.final_logit_softcap
                                  or c.rope_local_theta is not None)):
    raise CheckpointError("Gemma 2's norms, embedding scale, GeGLU, per-layer attention and "
                          "soft-capping are model_type 'gemma2''s and only its.")
  if c.model_type in ("qwen3", "olmo2") and (c.qkv_bias != c.o_bias or c.mlp_bias
                                              or c.sliding_window):
    raise CheckpointError(f"model_type {c.model_type!r} has q/k/v/o biases all or none, no "
                          "MLP bias and no sliding window.")
  if c.model_type == "qwen2" and (not c.qkv_bias or c.o_bias or c.mlp_bias):
    raise CheckpointError("model_type 'qwen2' means q/k/v biases only; change model_type.")
  if c.model_type in ("mistral", "phi3") and (c.qkv_bias or c.o_bias or c.mlp_bias):
    raise CheckpointError(f"model_type {c.model_type!r} has no biases; use model_type 'llama'.")
  if c.model_type == "llama" and (c.qkv_bias != c.o_bias or c.sliding_window is not None):
    raise CheckpointError(
        "model_type 'llama' has q/k/v/o biases all or none and no sliding window; "
        "use 'qwen2' (q/k/v biases) or 'mistral' (sliding window).")
  if c.rope_scaling is None:
    rope_scaling = None
  elif c.rope_scaling.rope_type == "linear":
    rope_scaling = {"rope_type": "linear", "factor": c.rope_scaling.factor}
  else:
    s = c.rope_scaling
    rope_scaling = {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_max_position_embeddings,
    }
  eos = list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id
  hf = {
      "architectures": [ARCHITECTURES[c.model_type]],
      "model_type": c.model_type,
      "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim,
      "hidden_act": {v: k for k, v in _ACTIVATIONS.items()}[c.hidden_act],
      "rms_norm_eps": c.rms_norm_eps,
      "rope_theta": c.rope_theta,
      "rope_scaling": rope_scaling,
      "max_position_embeddings": c.max_position_embeddings,
      "initializer_range": c.initializer_range,
      "tie_word_embeddings": c.tie_word_embeddings,
      "bos_token_id": c.bos_token_id,
      "eos_token_id": eos,
      "pad_token_id": c.pad_token_id,
      "attention_dropout": 0.0,
      "use_cache": True,
      "torch_dtype": dtype or c.param_dtype,
  }
  if c.model_type == "llama":
    hf.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
  elif c.model_type == "olmo2":
    hf.update(attention_bias=c.qkv_bias)
  elif gemma:
    hf.update(attention_bias=c.qkv_bias, sliding_window=c.sliding_window,
              layer_types=list(c.layer_types), hidden_activation="gelu_pytorch_tanh",
              query_pre_attn_scalar=(int(c.query_pre_attn_scalar)  # transformers wants an int
                                     if float(c.query_pre_attn_scalar).is_integer()
                                     else c.query_pre_attn_scalar),
              attn_logit_softcapping=c.attn_logit_softcap,
              final_logit_softcapping=c.final_logit_softcap)
    if c.model_type == "gemma3_text":
      hf["rope_parameters"] = {
          "full_attention": dict(rope_scaling or {"rope_type": "default"},
                                 rope_theta=c.rope_theta),
          "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_theta}}
      del hf["rope_scaling"], hf["rope_theta"]
  elif c.model_type in ("mistral", "phi3"):
    hf.update(sliding_window=c.sliding_window)
  else:
    hf.update(use_sliding_window=False, sliding_window=None)
    if c.model_type == "qwen3":
      hf.update(attention_bias=c.qkv_bias)
  return hf
