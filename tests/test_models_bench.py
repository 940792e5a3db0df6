"""The model benchmark script runs (tiny sizes) and reports what it measured."""

import jax
import pytest

from benchmarks import bench_model


def test_bench_model_runs(capsys):
  results = bench_model.main(["--batch", "2", "--seq", "16", "--steps", "2", "--gen_batch", "2",
                              "--prompt_len", "4", "--new_tokens", "3"])
  out = capsys.readouterr().out
  train, sample = results["small_train"], results["small_sample"]
  assert train["tokens_per_s"] > 0 and 16 <= train["real_tokens_per_step"] <= 32
  assert sample["new_tokens_per_call"] == 6 and sample["tokens_per_s"] > 0
  if jax.devices()[0].platform != "gpu":
    assert results["big_train"] is None
    assert "No GPU" in out and "skipping the llama3.2-1b MFU measurement" in out


def test_big_config_step_runs_shrunk_on_cpu():
  """The GPU branch's step (bf16 compute, fused attention, remat) on a shrunk
  llama3.2-1b shape, so that it cannot rot unseen on CPU-only machines."""
  from midpo.models import get_config
  config = get_config("llama3.2-1b", vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=8, num_kv_heads=2, head_dim=8, dtype="bfloat16",
                      attention_impl="jax", remat="full")
  out = bench_model.bench_train_step(config, batch=2, seq=32, steps=1)
  assert out["tokens_per_s"] > 0
  assert out["model_flops_per_s"] == pytest.approx(out["tokens_per_s"] * config.flops_per_token(32))
