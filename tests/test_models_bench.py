"""The model benchmark script runs (tiny sizes) and reports what it measured."""

import jax

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
