"""``train.padding_free`` against padded batches, on pairs whose lengths vary.

The vs_trl.py checkpoint (Llama-shaped, random weights; the small CPU shape by default) and rows
with prompts of 1 to ``--prompt_len`` and responses of 2 to ``--response_len`` tokens (uniform),
read by midpo's own data pipeline (``data.source='files'``; by default batches of pairs of
similar lengths padded to a bucket length, ``--bucket_window 0`` random batches padded to
``data.max_length``). The same batches go through midpo's DPO preference step
(online reference, float32) padded and padding-free, alternating step by step after both are
compiled; reported: the median step time, real tokens/s (prompt + response tokens, padding not
counted), the slots the models compute (rows x width) and the compilations each needed.

    python benchmarks/bench_padding_free.py                 # 8 pairs, up to 64 + 192 tokens
    python benchmarks/bench_padding_free.py --bucket_window 0   # random batches
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import vs_trl  # noqa: E402
from midpo import algorithms  # noqa: E402,F401
from midpo.training import config as config_lib  # noqa: E402
from midpo.training import env as env_lib  # noqa: E402
from midpo.training import optim  # noqa: E402
from midpo.training import pairs as pairs_lib  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--pairs", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--response_len", type=int, default=192)
  parser.add_argument("--batches", type=int, default=8, help="distinct batches, each timed")
  parser.add_argument("--repeats", type=int, default=3, help="times each batch is timed")
  parser.add_argument("--bucket_window", type=int, default=None,
                      help="data.bucket_window (default: the config's, 32: batches of pairs of "
                      "similar lengths; 0: random batches, each padded to max_length)")
  args = parser.parse_args()

  with tempfile.TemporaryDirectory(prefix="bench_padding_free_") as root:  # removed after
    ckpt, data = vs_trl.make_assets(root, vs_trl.SHAPES["small"], args.pairs, args.prompt_len,
                                    args.response_len, vary_lengths=True,
                                    num_rows=args.pairs * args.batches)
    import importlib
    config = importlib.import_module("configs.dpo").get_config()
    config.model.hf_path = config.tokenizer = ckpt
    config.stages = ("preference",)
    config.data.source, config.data.files.train_files = "files", data
    config.pairs_from = "dataset"
    config.data.batch_size, config.data.shuffle = args.pairs, False
    config.data.max_length = args.prompt_len + args.response_len + 2
    config.eval.mutual_information = "none"
    if args.bucket_window is not None:
      config.data.bucket_window = args.bucket_window
    env = env_lib.make_env(config, os.path.join(root, "workdir"))
    prior = config_lib.make_prior(config)
    ref = env_lib.load_hf_params(env)
    tx = optim.adamw(1e-4, 0, 1000, 0.0, 1.0)
    policy = jax.tree.map(lambda x: x.copy(), ref)
    opt = optim.init_opt(tx, policy, env.mesh)
    shard = {"policy": env_lib.shardings_of(policy), "policy_opt": env_lib.shardings_of(opt),
             "prior": None, "prior_opt": None}
    step = pairs_lib.make_preference_steps(env, prior, config_lib.make_loss_config(config), tx,
                                           None, shard).policy
    fields = pairs_lib.pair_fields(env, prior)
    it = env.batches(env.data_config(), "train", mode="pairs")
    local = it.first_batches(args.batches)
    host = {"padded": [pairs_lib.select(b, fields) for b in local]}
    host["padding_free"] = [dict(h, **pairs_lib.packed_rows(env, b))
                            for h, b in zip(host["padded"], local)]
    tokens = [int(b["attention_mask"].sum()) for b in local]
    slots = {"padded": [b["tokens"].size for b in local],
             "padding_free": [h["packed_tokens"].size for h in host["padding_free"]]}
    shapes = {k: len({h["tokens"].shape + h.get("packed_tokens", np.zeros(0)).shape
                      for h in v}) for k, v in host.items()}
    frozen, rng = {"reference": ref}, jax.random.key(0)
    state = {k: (policy, opt) for k in host}
    times = {k: [] for k in host}

    def run(kind, i, record):
      p, o = jax.tree.map(lambda x: x.copy(), state[kind])
      batch = env.global_batch(host[kind][i])
      jax.block_until_ready((p, o, batch))  # copies and transfers outside the timing
      t0 = time.perf_counter()
      p, o, m = step(p, o, None, frozen, batch, rng)
      jax.block_until_ready((p, m))
      if record:
        times[kind].append((time.perf_counter() - t0) / tokens[i])

    for i in range(args.batches):  # compile every shape first
      for kind in host:
        run(kind, i, False)
    for _ in range(args.repeats):
      for i in range(args.batches):
        for kind in host:
          run(kind, i, True)
    print(f"# {platform.machine()} CPU, {os.cpu_count()} cores, jax {jax.__version__}; "
          f"{args.pairs} pairs a step, prompts 1-{args.prompt_len}, responses "
          f"2-{args.response_len} tokens; {args.batches} batches x {args.repeats}; "
          f"data.bucket_window={config.data.bucket_window}, data.max_length="
          f"{config.data.max_length}")
    per_token = {k: statistics.median(v) for k, v in times.items()}
    for kind in host:
      print(json.dumps({"kind": kind, "tokens_per_s": 1 / per_token[kind],
                        "real_tokens_per_step": statistics.mean(tokens),
                        "slots_per_step": statistics.mean(slots[kind]),
                        "shapes": shapes[kind]}))
    speed = per_token["padded"] / per_token["padding_free"]
    fewer = statistics.mean(slots["padding_free"]) / statistics.mean(slots["padded"])
    print(f"padding_free / padded: tokens/s {speed:.2f}x; model slots {fewer:.2f}x")


if __name__ == "__main__":
  main()
