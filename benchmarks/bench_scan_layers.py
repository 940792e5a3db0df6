"""Layers as one ``lax.scan`` against unrolled: compile time, step time and XLA's temporaries.

What an unset ``model.scan_layers`` trades on a CPU (``midpo.training.env.resolve_scan_layers``:
unrolled there). For each model shape and both layouts, the jitted gradient of the summed label
log-probs (the policy's forward+backward, materialised logits, float32) is lowered and compiled
once (timed), then run ``--steps`` times after one warm-up (median), and XLA's memory analysis
gives the compiled step's temporary buffers. The scanned and unrolled runs of one shape
alternate in separate processes, so each compiles from a cold start (no persistent compilation
cache). One JSON line per measurement.

Shapes: ``small`` is vs_trl.py's CPU model (hidden 256, 4 layers, vocabulary 8192) at 16 rows of
256 tokens; ``small16`` the same with 16 layers; ``smollm2-135m`` the named config (30 layers,
hidden 576, vocabulary 49152) at 4 rows of 128 tokens.

    python benchmarks/bench_scan_layers.py
    python benchmarks/bench_scan_layers.py --shapes small --repeats 3
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {  # name: (model, rows, tokens)
    "small": ("small", 16, 256),
    "small16": ("small16", 16, 256),
    "smollm2-135m": ("smollm2-135m", 4, 128),
}


def _model_config(name: str):
  from midpo.models.config import ModelConfig, get_config
  if name.startswith("small"):
    return ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=1024,
                       num_layers=16 if name == "small16" else 4, num_heads=4, num_kv_heads=2,
                       head_dim=64, tie_word_embeddings=True)
  return get_config(name)


def _measure(shape: str, scan: bool, steps: int) -> dict:
  """One measurement, in this process."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from midpo.core import stats
  from midpo.models.transformer import Transformer
  model_name, rows, t = SHAPES[shape]
  config = dataclasses.replace(_model_config(model_name), scan_layers=scan)
  graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(params=0)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, config.vocab_size, (rows, t + 1)),
                       jnp.int32)
  mask = jnp.ones((rows, t), jnp.float32)

  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens[:, :-1])
    return jnp.sum(stats.token_logprobs(logits, tokens[:, 1:], mask))

  t0 = time.perf_counter()
  step = jax.jit(jax.grad(loss)).lower(params).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(step(params))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(step(params))
    times.append(time.perf_counter() - t0)
  memory = step.memory_analysis()
  return {"shape": shape, "layers": config.num_layers, "rows": rows, "tokens": t,
          "layout": "scanned" if scan else "unrolled", "compile_s": round(compile_s, 3),
          "step_s": round(statistics.median(times), 4),
          "temp_mb": round(memory.temp_size_in_bytes / 1e6, 1) if memory else None,
          "backend": jax.default_backend(), "jax": jax.__version__,
          "machine": platform.machine(), "cores": os.cpu_count()}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", default="small,small16,smollm2-135m")
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "LAYOUT"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(_measure(args.worker[0], args.worker[1] == "scanned", args.steps)))
    return
  shapes = args.shapes.split(",")
  unknown = sorted(set(shapes) - set(SHAPES))
  if unknown:
    parser.error(f"unknown shapes {unknown}; known: {sorted(SHAPES)}")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  for shape in shapes:
    rows = {"scanned": [], "unrolled": []}
    for _ in range(args.repeats):
      for layout in ("scanned", "unrolled"):
        out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--worker",
                              shape, layout], env=env, check=True, capture_output=True,
                             text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows[layout].append(row)
        print(json.dumps(row), flush=True)
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("compile_s", "step_s", "temp_mb")}
           for k, v in rows.items()}
    ratio = {f: med["unrolled"][f] / med["scanned"][f] for f in ("step_s", "compile_s", "temp_mb")}
    print(f"# {shape}: unrolled / scanned: step time {ratio['step_s']:.2f}x, compile "
          f"{ratio['compile_s']:.2f}x, temporaries {ratio['temp_mb']:.2f}x", flush=True)


if __name__ == "__main__":
  main()
