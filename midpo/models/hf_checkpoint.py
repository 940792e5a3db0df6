"""Hugging Face checkpoints on local disk: import and export without torch.

A checkpoint directory holds `config.json` and either `model.safetensors` or
shards listed in `model.safetensors.index.json`. Supported `model_type`s:
`midpo.models.hf_config` (Llama 2/3/3.x, SmolLM, Mistral, Qwen2/2.5, Qwen3).

    model = load_hf_checkpoint("/path/to/ckpt")                 # one device
    model = load_hf_checkpoint(path, mesh=mesh)                 # sharded by rules
    save_hf_checkpoint(model, "/path/to/out", max_shard_bytes=2**30)

Weights go through transposes and reshapes only, so import followed by export
reproduces every tensor bit for bit (in the same dtype).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from midpo import files
from midpo.models import sharding as sharding_lib
from midpo.models.config import ModelConfig
from midpo.models.hf_config import CheckpointError, config_from_hf, config_to_hf
from midpo.models.transformer import Transformer, layer_param_shapes

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that hold nothing the model needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


# ---------------------------------------------------------------------------
# Name and layout mapping
# ---------------------------------------------------------------------------


def _layer_mapping(c: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
  """Our per-layer name -> (HF suffix, HF->ours, ours->HF)."""
  d, h, k, dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
  t = lambda w: w.T
  heads_in = lambda n: (lambda w: w.T.reshape(d, n, dh), lambda x: x.reshape(d, n * dh).T)
  bias_in = lambda n: (lambda w: w.reshape(n, dh), lambda x: x.reshape(n * dh))
  ident = (lambda w: w, lambda x: x)
  table = {
      "attn_norm": ("input_layernorm.weight", *ident),
      "q": ("self_attn.q_proj.weight", *heads_in(h)),
      "k": ("self_attn.k_proj.weight", *heads_in(k)),
      "v": ("self_attn.v_proj.weight", *heads_in(k)),
      "o": ("self_attn.o_proj.weight",
            lambda w: w.T.reshape(h, dh, d), lambda x: x.reshape(h * dh, d).T),
      "q_norm": ("self_attn.q_norm.weight", *ident),
      "k_norm": ("self_attn.k_norm.weight", *ident),
      "q_full_norm": ("self_attn.q_norm.weight", *bias_in(h)),
      "k_full_norm": ("self_attn.k_norm.weight", *bias_in(k)),
      # OLMo 2 names its sublayers' output norms so (Llama's post_attention_layernorm is the
      # MLP's input norm, mlp_norm).
      "attn_post_norm": ("post_attention_layernorm.weight", *ident),
      "mlp_post_norm": ("post_feedforward_layernorm.weight", *ident),
      "q_bias": ("self_attn.q_proj.bias", *bias_in(h)),
      "k_bias": ("self_attn.k_proj.bias", *bias_in(k)),
      "v_bias": ("self_attn.v_proj.bias", *bias_in(k)),
      "o_bias": ("self_attn.o_proj.bias", *ident),
      "mlp_norm": ("post_attention_layernorm.weight", *ident),
      "gate": ("mlp.gate_proj.weight", t, t),
      "up": ("mlp.up_proj.weight", t, t),
      "down": ("mlp.down_proj.weight", t, t),
      "gate_bias": ("mlp.gate_proj.bias", *ident),
      "up_bias": ("mlp.up_proj.bias", *ident),
      "down_bias": ("mlp.down_proj.bias", *ident),
  }
  if c.pre_norms and c.post_norms:  # Gemma 2: the MLP's input norm has a name of its own
    table["mlp_norm"] = ("pre_feedforward_layernorm.weight", *ident)
  return {name: table[name] for name in layer_param_shapes(c)}


def fused_tensors(c: ModelConfig) -> dict[str, tuple[tuple[str, int], ...]]:
  """Per-layer HF tensors that hold several of the mapping's tensors stacked on axis 0
  (Phi-3's ``qkv_proj`` and ``gate_up_proj``): fused suffix -> ((suffix, rows), ...)."""
  if c.model_type != "phi3":
    return {}
  q, kv, f = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
  return {"self_attn.qkv_proj.weight": (("self_attn.q_proj.weight", q),
                                        ("self_attn.k_proj.weight", kv),
                                        ("self_attn.v_proj.weight", kv)),
          "mlp.gate_up_proj.weight": (("mlp.gate_proj.weight", f), ("mlp.up_proj.weight", f))}


class _UnfusedReader:
  """A tensor reader that shows a fused checkpoint's tensors split (``fused_tensors``)."""

  def __init__(self, reader, c: ModelConfig):
    self._reader, self._parts = reader, {}
    for i in range(c.num_layers):
      for fused, parts in fused_tensors(c).items():
        start = 0
        for suffix, rows in parts:
          self._parts[f"model.layers.{i}.{suffix}"] = (f"model.layers.{i}.{fused}", start, rows)
          start += rows
    self._fused = {v[0] for v in self._parts.values()}

  def names(self) -> set[str]:
    present = self._reader.names()
    split = {n for n, (fused, _, _) in self._parts.items() if fused in present}
    return (present - self._fused) | split

  def shape(self, name: str) -> tuple[int, ...]:
    if name not in self._parts:
      return self._reader.shape(name)
    fused, _, rows = self._parts[name]
    return (rows, *self._reader.shape(fused)[1:])

  def get(self, name: str) -> np.ndarray:
    if name not in self._parts:
      return self._reader.get(name)
    fused, start, rows = self._parts[name]
    full = self._reader.get(fused)
    if full.shape[0] != sum(r for f, _, r in self._parts.values() if f == fused):
      raise CheckpointError(f"Tensor {fused!r} has {full.shape[0]} rows; config.json implies "
                            f"{sum(r for f, _, r in self._parts.values() if f == fused)}.")
    return full[start:start + rows]


def _fuse(tensors: dict[str, np.ndarray], c: ModelConfig) -> dict[str, np.ndarray]:
  """``hf_tensors``' split per-layer tensors fused as the family stores them."""
  fused = fused_tensors(c)
  if not fused:
    return tensors
  out = {}
  for name, arr in tensors.items():
    suffix = name.rpartition(".layers.")[2].partition(".")[2]
    for f, parts in fused.items():
      if suffix == parts[0][0]:  # the first part: write the fused tensor in its place
        prefix = name[: -len(suffix)]
        out[prefix + f] = np.concatenate([tensors[prefix + p] for p, _ in parts], axis=0)
    if not any(suffix in [p for p, _ in parts] for parts in fused.values()):
      out[name] = arr
  return out


def _hf_shape(ours: tuple[int, ...], to_hf: Callable) -> tuple[int, ...]:
  return to_hf(np.empty(ours, np.int8)).shape


def expected_hf_tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor name a checkpoint of this config holds, with its HF shape."""
  out = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size)}
  shapes = layer_param_shapes(c)
  for i in range(c.num_layers):
    for name, (suffix, _, to_hf) in _layer_mapping(c).items():
      out[f"model.layers.{i}.{suffix}"] = _hf_shape(shapes[name], to_hf)
  out["model.norm.weight"] = (c.hidden_size,)
  if not c.tie_word_embeddings:
    out["lm_head.weight"] = (c.vocab_size, c.hidden_size)
  return out


# ---------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------


class _TensorReader:
  """Reads named tensors from one or many safetensors files, lazily."""

  def __init__(self, path: str):
    index_path = os.path.join(path, INDEX_FILE)
    single_path = os.path.join(path, SINGLE_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path} has no 'weight_map'.")
      files = sorted(set(weight_map.values()))
      for name in files:
        if not os.path.exists(os.path.join(path, name)):
          raise CheckpointError(f"{index_path} lists shard {name!r}, which is not in {path}.")
    elif os.path.exists(single_path):
      weight_map = None
      files = [SINGLE_FILE]
    else:
      raise CheckpointError(
          f"No {SINGLE_FILE} or {INDEX_FILE} in {path} (only safetensors checkpoints are read).")
    self._handles = {f: safe_open(os.path.join(path, f), framework="numpy") for f in files}
    if weight_map is None:
      weight_map = {k: SINGLE_FILE for k in self._handles[SINGLE_FILE].keys()}
    else:
      for f, handle in self._handles.items():
        listed = {k for k, v in weight_map.items() if v == f}
        absent = listed - set(handle.keys())
        if absent:
          raise CheckpointError(
              f"{INDEX_FILE} says shard {f!r} holds {sorted(absent)[:5]}, but it does not.")
    self.weight_map = weight_map

  def names(self) -> set[str]:
    return set(self.weight_map)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self.weight_map[name]].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    return self._handles[self.weight_map[name]].get_tensor(name)


def read_hf_config(path: str, **overrides: Any) -> ModelConfig:
  """The ``ModelConfig`` of a local HF checkpoint directory's config.json; raises
  ``CheckpointError``."""
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise CheckpointError(f"No {CONFIG_FILE} in {path}.")
  with open(config_path) as f:
    return config_from_hf(json.load(f), **overrides)


def load_hf_checkpoint(path: str, *, mesh: jax.sharding.Mesh | None = None,
                       rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
                       **config_overrides: Any) -> Transformer:
  """Builds a Transformer from a local HF checkpoint directory.

  `config_overrides` change ModelConfig fields that are not in config.json,
  e.g. `param_dtype='bfloat16', dtype='bfloat16', remat='full'`. With `mesh`,
  every parameter is placed directly with its sharding from `rules`.
  Raises CheckpointError for an unsupported architecture, a missing or
  unexpected tensor, or a shape that does not match config.json.
  """
  c = read_hf_config(path, **config_overrides)
  reader = _UnfusedReader(_TensorReader(path), c)
  expected = expected_hf_tensors(c)
  present = reader.names()
  missing = sorted(set(expected) - present)
  if missing:
    raise CheckpointError(
        f"Checkpoint {path} is missing {len(missing)} tensor(s) that config.json implies: "
        f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
  unexpected = sorted(
      n for n in present - set(expected)
      if not n.endswith(_IGNORED_SUFFIXES) and not (c.tie_word_embeddings and n == "lm_head.weight"))
  if unexpected:
    raise CheckpointError(
        f"Checkpoint {path} has tensor(s) this {c.model_type} config does not use: "
        f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} (check config.json: biases, "
        "tie_word_embeddings, num_hidden_layers).")
  for name, shape in expected.items():
    got = reader.shape(name)
    if got != shape:
      raise CheckpointError(
          f"Tensor {name!r} in {path} has shape {got}, but config.json implies {shape}.")
  if c.tie_word_embeddings and "lm_head.weight" in present:
    if not np.array_equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
      raise CheckpointError(
          "config.json says tie_word_embeddings=true but lm_head.weight differs from "
          "model.embed_tokens.weight.")

  dtype = _NP_DTYPES[c.param_dtype]
  mapping = _layer_mapping(c)

  def ours(name: str) -> np.ndarray:
    if name == "embed":
      return reader.get("model.embed_tokens.weight")
    if name == "final_norm":
      return reader.get("model.norm.weight")
    if name == "lm_head":
      return reader.get("lm_head.weight").T
    suffix, to_ours, _ = mapping[name]
    return np.stack([to_ours(reader.get(f"model.layers.{i}.{suffix}"))
                     for i in range(c.num_layers)])

  abstract = nnx.eval_shape(lambda: Transformer(c, rngs=nnx.Rngs(0)))
  graphdef, abs_state = nnx.split(abstract)
  if mesh is not None:
    shardings = sharding_lib.state_shardings(abs_state, mesh, rules)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abs_state)

  def load(path_keys, abs_leaf, sharding):
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path_keys]
    name = keys[1] if keys[0] == "layers" else keys[0]
    value = np.ascontiguousarray(ours(name).astype(dtype))
    if value.shape != abs_leaf.shape:
      raise CheckpointError(f"Internal layout error for {name}: {value.shape} vs {abs_leaf.shape}")
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

  state = jax.tree.map_with_path(load, abs_state, shardings)
  model = nnx.merge(graphdef, state)
  if mesh is not None:
    model.activation_sharding = (mesh, tuple(rules))
  return model


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


def _to_numpy(x: jax.Array) -> np.ndarray:
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def hf_tensors(model: Transformer, *, dtype: str | None = None) -> dict[str, np.ndarray]:
  """The model's weights as HF-named, HF-laid-out numpy arrays (in order)."""
  c = model.config
  np_dtype = _NP_DTYPES[dtype or c.param_dtype]
  cast = lambda a: np.ascontiguousarray(a.astype(np_dtype))
  out = {"model.embed_tokens.weight": cast(_to_numpy(model.embed[...]))}
  stacked = {name: _to_numpy(a) for name, a in model.layers.arrays().items()}
  mapping = _layer_mapping(c)
  for i in range(c.num_layers):
    for name, (suffix, _, to_hf) in mapping.items():
      out[f"model.layers.{i}.{suffix}"] = cast(to_hf(stacked[name][i]))
  out["model.norm.weight"] = cast(_to_numpy(model.final_norm[...]))
  if model.lm_head is not None:
    out["lm_head.weight"] = cast(_to_numpy(model.lm_head[...]).T)
  return _fuse(out, c)


def save_hf_checkpoint(model: Transformer, path: str, *, dtype: str | None = None,
                       max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes config.json and safetensors (sharded with an index when the
  weights exceed `max_shard_bytes`). `dtype` (e.g. 'bfloat16') casts on
  export; by default the parameter dtype is kept. Returns the files written.
  Only process 0 writes in a multi-process run."""
  if dtype is not None and dtype not in _NP_DTYPES:
    raise ValueError(f"dtype={dtype!r}; allowed: {tuple(_NP_DTYPES)}.")
  hf_config = config_to_hf(model.config, dtype=dtype)
  tensors = hf_tensors(model, dtype=dtype)
  if jax.process_index() != 0:
    return []
  files.makedirs(path)
  # Weights of an earlier export in the same directory would be read instead
  # of (or mixed with) these: remove them.
  for name in (files.listdir(path) if files.isdir(path) else []):
    if name in (SINGLE_FILE, INDEX_FILE) or (
        name.startswith("model-") and name.endswith(".safetensors")):
      files.remove(os.path.join(path, name))
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, arr in tensors.items():
    if shards[-1] and size + arr.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = arr
    size += arr.nbytes
  # Every file is written whole or not at all (a temporary name, then a rename).
  written = [CONFIG_FILE]
  files.write_json(os.path.join(path, CONFIG_FILE), hf_config, indent=2, sort_keys=True)
  metadata = {"format": "pt"}  # transformers expects it.

  def save(shard, fname):
    with files.atomic_path(os.path.join(path, fname)) as tmp:
      save_file(shard, tmp, metadata=metadata)

  if len(shards) == 1:
    save(shards[0], SINGLE_FILE)
    return written + [SINGLE_FILE]
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save(shard, fname)
    weight_map.update({name: fname for name in shard})
    written.append(fname)
  index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
           "weight_map": weight_map}
  files.write_json(os.path.join(path, INDEX_FILE), index, indent=2, sort_keys=True)
  return written + [INDEX_FILE]
