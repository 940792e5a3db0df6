"""Logits parity with transformers (PyTorch, CPU, float32) and HF export.

Tiny random checkpoints are built offline from configs with `save_pretrained`;
every parameter (biases and norm weights included) is randomised first so
that no term of the forward pass hides behind a zero or a one.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from midpo.models import hf_checkpoint

TOL = 1e-4
B, T = 3, 11

_BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8}

CASES = {
    # GQA with 4 query heads per KV head, tied embeddings, llama3 RoPE scaling.
    "llama_tied_llama3rope_gqa4": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                                   dict(_BASE, tie_word_embeddings=True,
                                        rope_parameters=_LLAMA3_ROPE)),
    # Untied, attention and MLP biases, plain RoPE.
    "llama_untied_bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                          dict(_BASE, num_key_value_heads=4, tie_word_embeddings=False,
                               attention_bias=True, mlp_bias=True)),
    # Sliding window shorter than the sequence, so the window matters.
    "mistral_window": (transformers.MistralConfig, transformers.MistralForCausalLM,
                       dict(_BASE, sliding_window=4, tie_word_embeddings=False)),
    # q/k/v biases.
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(_BASE, tie_word_embeddings=False)),
    # Per-head q/k RMSNorm; head_dim set apart from hidden_size / num_heads (as Qwen3 does).
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(_BASE, head_dim=16, tie_word_embeddings=True)),
    "qwen3_bias": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                   dict(_BASE, head_dim=16, attention_bias=True, tie_word_embeddings=False)),
    # Norms of the whole q/k projections and of each sublayer's output; no input norms.
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM,
              dict(_BASE, tie_word_embeddings=False, pad_token_id=0)),
    # Fused qkv and gate-up projections (split on import, fused on export), sliding window.
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
             dict(_BASE, sliding_window=6, tie_word_embeddings=False, pad_token_id=0)),
    # (1 + w) norms before and after each sublayer, sqrt(D) embeddings, GeGLU, soft-capped
    # attention scores (small caps so that tanh bends) and logits, sliding window on
    # alternate layers, query_pre_attn_scalar apart from head_dim.
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(_BASE, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                    attn_implementation="eager", pad_token_id=0)),
    # Gemma 2's layout with per-head (1 + w) q/k norms, no soft-capping, a local RoPE base
    # on the sliding layers and linear scaling on the global ones.
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                    dict(_BASE, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                         layer_types=["sliding_attention", "full_attention"],
                         rope_parameters={
                             "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                "rope_theta": 1000000.0},
                             "sliding_attention": {"rope_type": "default",
                                                   "rope_theta": 100.0}},
                         attn_implementation="eager", pad_token_id=0)),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
  config_cls, model_cls, kwargs = CASES[request.param]
  torch_model = model_cls(config_cls(**kwargs)).eval()
  _randomise(torch_model, seed=len(request.param))
  path = str(tmp_path_factory.mktemp(request.param))
  torch_model.save_pretrained(path, safe_serialization=True)
  return request.param, path, torch_model


def _batch(vocab_size, seed=0):
  """Random tokens; row 1 right-padded (training), row 2 left-padded (generation)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab_size, (B, T))
  mask = np.ones((B, T), np.int64)
  mask[1, 7:] = 0
  mask[2, :4] = 0
  return tokens, mask


def _torch_logits(model, tokens, mask, hidden=False):
  # transformers does not derive positions from the mask in a plain forward.
  positions = np.maximum(mask.cumsum(-1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions), output_hidden_states=hidden)
  return out


def test_logits_match_transformers(checkpoint):
  name, path, torch_model = checkpoint
  model = hf_checkpoint.load_hf_checkpoint(path)
  tokens, mask = _batch(model.config.vocab_size)
  ref = _torch_logits(torch_model, tokens, mask, hidden=True)
  logits, layers = model(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32),
                         return_hidden_states=True)
  real = mask.astype(bool)
  diff = np.abs(np.asarray(logits)[real] - ref.logits.numpy()[real]).max()
  assert diff < TOL, f"{name}: max |logits - transformers| = {diff}"
  # Per-layer hidden states: HF's hidden_states[i + 1] is layer i's output
  # (its last entry is normed, so compare the layers before it).
  layers = np.asarray(layers)
  assert layers.shape == (B, T, model.config.num_layers, model.config.hidden_size)
  for i in range(model.config.num_layers - 1):
    d = np.abs(layers[:, :, i][real] - ref.hidden_states[i + 1].numpy()[real]).max()
    assert d < TOL, f"{name}: layer {i} hidden states differ by {d}"
  # The two-part forward gives the same logits.
  h = model.hidden_states(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))
  np.testing.assert_allclose(np.asarray(model.logits_from_hidden(h)), np.asarray(logits),
                             rtol=0, atol=1e-6)
  # The last normed hidden state is HF's last hidden state.
  d = np.abs(np.asarray(h)[real] - ref.hidden_states[-1].numpy()[real]).max()
  assert d < TOL


def test_export_round_trip_and_transformers_load(checkpoint, tmp_path):
  name, path, torch_model = checkpoint
  model = hf_checkpoint.load_hf_checkpoint(path)
  out = str(tmp_path / "export")
  # A small shard limit forces several shards and an index.
  files = hf_checkpoint.save_hf_checkpoint(model, out, max_shard_bytes=40_000)
  assert hf_checkpoint.INDEX_FILE in files and len(files) > 3, files
  with open(os.path.join(out, hf_checkpoint.INDEX_FILE)) as f:
    weight_map = json.load(f)["weight_map"]

  # Bit-for-bit: every exported tensor equals the original checkpoint's.
  original = load_file(os.path.join(path, "model.safetensors"))
  exported = {}
  for fname in set(weight_map.values()):
    exported.update(load_file(os.path.join(out, fname)))
  assert set(exported) == set(original)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
    assert exported[key].tobytes() == value.tobytes(), f"{name}: {key} changed in the round trip"

  # transformers loads the export and computes the same logits.
  # (With the source model's attention implementation: eager and SDPA differ by rounding.)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation=torch_model.config._attn_implementation).eval()
  assert type(reloaded) is type(torch_model)
  tokens, mask = _batch(model.config.vocab_size, seed=1)
  a = _torch_logits(reloaded, tokens, mask).logits.numpy()
  b = _torch_logits(torch_model, tokens, mask).logits.numpy()
  real = mask.astype(bool)
  assert np.abs(a[real] - b[real]).max() == 0.0
  # And our reload of our export is the same model.
  again = hf_checkpoint.load_hf_checkpoint(out)
  ours = np.asarray(again(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)))
  assert np.abs(ours[real] - a[real]).max() < TOL


def test_bfloat16_round_trip_is_bit_exact(tmp_path):
  config = transformers.LlamaConfig(**_BASE, tie_word_embeddings=True)
  torch_model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
  _randomise(torch_model, seed=3)
  src = str(tmp_path / "src")
  torch_model.save_pretrained(src, safe_serialization=True)
  # float32 parameters (exact upcast), exported back as bfloat16.
  model = hf_checkpoint.load_hf_checkpoint(src)
  assert model.embed[...].dtype == jnp.float32
  hf_checkpoint.save_hf_checkpoint(model, str(tmp_path / "out"), dtype="bfloat16")
  a = load_file(os.path.join(src, "model.safetensors"))
  b = load_file(str(tmp_path / "out" / "model.safetensors"))
  assert set(a) == set(b)
  for key in a:
    assert str(b[key].dtype) == "bfloat16" and a[key].tobytes() == b[key].tobytes(), key
  # Loading straight into bfloat16 parameters keeps them bfloat16.
  bf16 = hf_checkpoint.load_hf_checkpoint(src, param_dtype="bfloat16", dtype="bfloat16")
  assert bf16.layers.q[...].dtype == jnp.bfloat16
  logits = bf16(jnp.ones((1, 4), jnp.int32))
  assert logits.dtype == jnp.float32  # log-softmax in float32 is the caller's.
