"""Training from a Hugging Face checkpoint, and the final policy exported back
in that format: transformers loads the export and gives the trained policy's
logits. The checkpoint and the workdir are in a Cloud Storage bucket (the
local emulator, ``tests/gcs_emulator.py``): the checkpoint is copied to the
local cache, the datasets are built there, and the run's checkpoints, metrics
and export are written to the bucket."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from midpo import files, train  # noqa: E402
from midpo.models import hub  # noqa: E402
from midpo.training import env as env_lib  # noqa: E402
from midpo.training import preference, sft  # noqa: E402
from tests import train_utils as tu  # noqa: E402


def test_train_from_hf_checkpoint_and_export(tmp_path, gcs, monkeypatch):
  monkeypatch.setenv("MIDPO_CACHE", str(tmp_path / "cache"))
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=144, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
  source = tmp_path / "source"
  transformers.LlamaForCausalLM(hf_config).save_pretrained(source, safe_serialization=True)
  bucket_source = f"gs://{gcs}/hf/source"
  for name in sorted(os.listdir(source)):
    files.copy(str(source / name), f"{bucket_source}/{name}")

  config = tu.tiny_config("dpo", **{
      "model.hf_path": bucket_source, "stages": ("preference",), "train.steps": 4,
      "train.warmup_steps": 0, "train.learning_rate": 1e-3})
  workdir = f"gs://{gcs}/hf/run"
  train.train_and_evaluate(config, workdir)
  assert sorted(files.listdir(workdir)) == [
      "checkpoints", "config.json", "data_report.json", "hf_export", "hparams.json",
      "metrics.jsonl", "resolved.json", "tensorboard"]
  assert [r["step"] for r in map(json.loads, files.read_text(f"{workdir}/metrics.jsonl")
                                 .splitlines()) if r["stage"] == "preference"] == [1, 2, 3, 4]
  (data_dir,) = os.listdir(tmp_path / "cache" / "tfds")  # built locally, per workdir
  assert os.listdir(tmp_path / "cache" / "tfds" / data_dir / "process-0")
  assert not os.path.exists("gs:")  # nothing went to a local look-alike of the bucket
  monkeypatch.setattr(hub, "_resolved", {})
  export = hub.local_dir(f"{workdir}/hf_export")  # a local copy of the bucket's export
  assert os.path.exists(os.path.join(export, "config.json"))

  env = env_lib.make_env(config, workdir)
  reference = sft.run_sft(env)  # = the HF checkpoint
  policy, _ = preference.restore_preference(env, reference)
  tokens = np.random.default_rng(0).integers(3, 144, (2, 11)).astype(np.int32)
  mask = np.ones_like(tokens)
  ours = np.asarray(env.model(policy)(jnp.asarray(tokens), jnp.asarray(mask)))
  ref = np.asarray(env.model(reference)(jnp.asarray(tokens), jnp.asarray(mask)))

  loaded = transformers.AutoModelForCausalLM.from_pretrained(export).float().eval()
  with torch.no_grad():
    theirs = loaded(input_ids=torch.from_numpy(tokens).long(),
                    attention_mask=torch.from_numpy(mask).long()).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  assert np.abs(ours - ref).max() > 1e-4  # the export is the trained policy, not the source
