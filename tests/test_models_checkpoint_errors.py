"""Bad checkpoints fail with messages that say what is wrong.

The checkpoints are written by our own exporter (no torch needed) and then
damaged one way each.
"""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from midpo.models import get_config, hf_checkpoint
from midpo.models.hf_checkpoint import CheckpointError
from midpo.models.transformer import create_model

CONFIG = get_config("tiny", vocab_size=64, hidden_size=32, intermediate_size=64,
                    num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture()
def ckpt(tmp_path):
  path = str(tmp_path / "ckpt")
  hf_checkpoint.save_hf_checkpoint(create_model(CONFIG), path)
  return path


def _edit_tensors(path, fn):
  f = os.path.join(path, "model.safetensors")
  tensors = load_file(f)
  fn(tensors)
  save_file(tensors, f, metadata={"format": "pt"})


def _edit_config(path, **changes):
  f = os.path.join(path, "config.json")
  with open(f) as fh:
    cfg = json.load(fh)
  cfg.update(changes)
  with open(f, "w") as fh:
    json.dump(cfg, fh)


def test_clean_checkpoint_loads(ckpt):
  model = hf_checkpoint.load_hf_checkpoint(ckpt)
  # How the layers run is not stored in config.json: a checkpoint scans them.
  assert model.config.scan_layers
  assert model.config.replace(scan_layers=CONFIG.scan_layers) == CONFIG
  assert hf_checkpoint.load_hf_checkpoint(ckpt, remat="full").config.remat == "full"


def test_export_over_an_earlier_export(tmp_path):
  path = str(tmp_path / "out")
  first = hf_checkpoint.save_hf_checkpoint(create_model(CONFIG, seed=1), path, max_shard_bytes=20_000)
  assert "model.safetensors.index.json" in first
  second = create_model(CONFIG, seed=2)
  hf_checkpoint.save_hf_checkpoint(second, path)  # one file: the old shards must go
  assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
  loaded = hf_checkpoint.hf_tensors(hf_checkpoint.load_hf_checkpoint(path))
  for key, value in hf_checkpoint.hf_tensors(second).items():
    assert loaded[key].tobytes() == value.tobytes(), key


def test_missing_tensor(ckpt):
  _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(CheckpointError, match=r"missing 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
    hf_checkpoint.load_hf_checkpoint(ckpt)


def test_shape_mismatch(ckpt):
  def damage(t):
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
  _edit_tensors(ckpt, damage)
  with pytest.raises(CheckpointError,
                     match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*shape \(8, 32\).*\(16, 32\)"):
    hf_checkpoint.load_hf_checkpoint(ckpt)


def test_config_disagrees_with_tensors(ckpt):
  _edit_config(ckpt, num_hidden_layers=3)
  with pytest.raises(CheckpointError, match=r"missing .*model\.layers\.2\."):
    hf_checkpoint.load_hf_checkpoint(ckpt)


def test_unexpected_tensor(ckpt):
  _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}))
  with pytest.raises(CheckpointError, match=r"does not use.*q_proj\.bias"):
    hf_checkpoint.load_hf_checkpoint(ckpt)


def test_unknown_model_type(ckpt):
  _edit_config(ckpt, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
  with pytest.raises(CheckpointError, match=r"Unsupported model_type 'gpt_neox'"):
    hf_checkpoint.load_hf_checkpoint(ckpt)


def test_unsupported_rope_type(ckpt):
  _edit_config(ckpt, rope_scaling={"rope_type": "yarn", "factor": 4.0})
  with pytest.raises(CheckpointError, match=r"Unsupported RoPE type 'yarn'"):
    hf_checkpoint.load_hf_checkpoint(ckpt)


def test_no_weights_and_missing_shard(tmp_path, ckpt):
  os.remove(os.path.join(ckpt, "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"No model\.safetensors or model\.safetensors\.index\.json"):
    hf_checkpoint.load_hf_checkpoint(ckpt)
  sharded = str(tmp_path / "sharded")
  files = hf_checkpoint.save_hf_checkpoint(create_model(CONFIG), sharded, max_shard_bytes=20_000)
  shards = [f for f in files if f.startswith("model-")]
  assert len(shards) > 2, files
  os.remove(os.path.join(sharded, shards[1]))
  with pytest.raises(CheckpointError, match=rf"lists shard '{shards[1]}'"):
    hf_checkpoint.load_hf_checkpoint(sharded)


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
  model = create_model(CONFIG, seed=4)
  hf_checkpoint.save_hf_checkpoint(model, str(tmp_path / "a"))
  files = hf_checkpoint.save_hf_checkpoint(model, str(tmp_path / "b"), max_shard_bytes=20_000)
  assert "model.safetensors.index.json" in files
  a = hf_checkpoint.load_hf_checkpoint(str(tmp_path / "a"))
  b = hf_checkpoint.load_hf_checkpoint(str(tmp_path / "b"))
  for x, y in zip(hf_checkpoint.hf_tensors(a).values(), hf_checkpoint.hf_tensors(b).values()):
    assert x.tobytes() == y.tobytes()
  original = hf_checkpoint.hf_tensors(model)
  for key, value in hf_checkpoint.hf_tensors(b).items():
    assert value.tobytes() == original[key].tobytes(), key
