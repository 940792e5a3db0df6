"""Model throughput: a jitted forward+backward step and KV-cache sampling.

    python benchmarks/bench_model.py                 # tiny config (CPU), then 1B MFU if a GPU is there
    python benchmarks/bench_model.py --skip_big      # tiny only
    python benchmarks/bench_model.py --big_batch 8 --big_seq 1024 --attention cudnn

The forward+backward step computes the mean next-token NLL (float32
log-softmax) over the real tokens of a right-padded batch (lengths uniform in
[seq/2, seq]) and its gradients with respect to all parameters; no optimizer.
Tokens/s counts real tokens only. MFU = (6 N + causal attention) FLOPs per
real token x tokens/s / peak dense bf16 FLOP/s, with N the matmul parameters
(LM head included, input embedding excluded; `ModelConfig.flops_per_token`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from midpo.models import get_config
from midpo.models.generate import generate
from midpo.models.transformer import Transformer

# Peak dense bf16 tensor-core FLOP/s by device kind (vendor datasheets, SXM parts).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def _peak_flops(device) -> float | None:
  kind = device.device_kind
  for name, peak in PEAK_BF16.items():
    if name in kind:
      return peak
  return None


def _batch(vocab, batch, seq, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
  lengths = rng.integers(seq // 2, seq + 1, (batch,))
  mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(mask)


def _time(fn, steps, warmup=2):
  for _ in range(warmup):
    jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def bench_train_step(config, batch, seq, steps, seed=0):
  # Build the state under jit (one compile, no eager init of a 1B model).
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  params = jax.jit(lambda: nnx.state(Transformer(config, rngs=nnx.Rngs(params=seed))))()
  tokens, mask = _batch(config.vocab_size, batch, seq)

  @jax.jit
  def step(params, tokens, mask):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(tokens, mask)[:, :-1]
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
      weights = mask[:, 1:]
      return (nll * weights).sum() / weights.sum()
    return jax.value_and_grad(loss_fn)(params)

  seconds = _time(lambda: step(params, tokens, mask), steps)
  real_tokens = int(mask.sum())
  flops = config.flops_per_token(seq) * real_tokens
  return {"seconds_per_step": seconds, "real_tokens_per_step": real_tokens,
          "tokens_per_s": real_tokens / seconds, "model_flops_per_s": flops / seconds}


def bench_sampling(config, batch, prompt_len, new_tokens, steps, seed=0, top_p=0.95):
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  params = jax.jit(lambda: nnx.state(Transformer(config, rngs=nnx.Rngs(params=seed))))()
  model = nnx.merge(graphdef, params)
  tokens, _ = _batch(config.vocab_size, batch, prompt_len, seed=1)
  mask = jnp.ones_like(tokens)
  # No EOS: every row samples exactly `new_tokens` tokens.
  run = lambda: generate(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=new_tokens,
                         temperature=1.0, top_p=top_p).tokens
  seconds = _time(run, steps, warmup=1)
  return {"seconds_per_call": seconds, "new_tokens_per_call": batch * new_tokens,
          "tokens_per_s": batch * new_tokens / seconds}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default="tiny")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--gen_batch", type=int, default=16)
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--top_p", type=float, default=0.95,
                 help="nucleus sampling (midpo's own sampling, in training and evaluation, is 1.0)")
  p.add_argument("--big_config", default="llama3.2-1b")
  p.add_argument("--big_batch", type=int, default=8)
  p.add_argument("--big_seq", type=int, default=1024)
  p.add_argument("--big_steps", type=int, default=10)
  p.add_argument("--attention", default="xla", choices=("xla", "jax", "cudnn"))
  p.add_argument("--remat", default="none")
  p.add_argument("--skip_big", action="store_true")
  p.add_argument("--json", default=None, help="also write the results to this file")
  args = p.parse_args(argv)

  device = jax.devices()[0]
  results = {"jax": jax.__version__, "device": device.device_kind, "platform": device.platform,
             "num_devices": jax.device_count(), "host": platform.processor() or platform.machine()}
  print(f"jax {jax.__version__} on {jax.device_count()} x {device.device_kind} ({device.platform})")

  small = get_config(args.config)
  train = bench_train_step(small, args.batch, args.seq, args.steps)
  results["small_train"] = {"config": args.config, "batch": args.batch, "seq": args.seq, **train}
  print(f"[{args.config}] fwd+bwd  batch {args.batch} x {args.seq}: "
        f"{train['tokens_per_s']:,.0f} real tokens/s ({train['seconds_per_step'] * 1e3:.1f} ms/step, "
        f"{train['model_flops_per_s'] / 1e9:.2f} model GFLOP/s)")
  sample = bench_sampling(small, args.gen_batch, args.prompt_len, args.new_tokens,
                          max(2, args.steps // 3), top_p=args.top_p)
  results["small_sample"] = {"config": args.config, "batch": args.gen_batch,
                             "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                             "top_p": args.top_p, **sample}
  print(f"[{args.config}] sampling batch {args.gen_batch}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new, top-p {args.top_p}: {sample['tokens_per_s']:,.0f} new tokens/s "
        f"({sample['seconds_per_call']:.3f} s/call)")

  if args.skip_big:
    pass
  elif device.platform != "gpu":
    print(f"No GPU ({device.platform}): skipping the {args.big_config} MFU measurement.")
    results["big_train"] = None
  else:
    big = get_config(args.big_config, dtype="bfloat16", param_dtype="float32",
                     attention_impl=args.attention, remat=args.remat)
    train = bench_train_step(big, args.big_batch, args.big_seq, args.big_steps)
    peak = _peak_flops(device)
    mfu = train["model_flops_per_s"] / peak if peak else None
    results["big_train"] = {"config": args.big_config, "batch": args.big_batch,
                            "seq": args.big_seq, "attention": args.attention,
                            "remat": args.remat, "peak_flops": peak, "mfu": mfu, **train}
    mfu_text = f"{mfu:.1%} MFU" if mfu is not None else "MFU unknown (peak not in table)"
    print(f"[{args.big_config}] fwd+bwd bf16 batch {args.big_batch} x {args.big_seq}: "
          f"{train['tokens_per_s']:,.0f} real tokens/s, "
          f"{train['model_flops_per_s'] / 1e12:.1f} TFLOP/s, {mfu_text}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()
