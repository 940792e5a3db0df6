"""Preference-training step speed: online reference vs cached reference log-probs.

Builds the default run's pieces (the known-reward task, the tiny model, the
DPO prior) without training an SFT model (speed does not depend on the
weights), then times jitted policy steps on the same batches with the
reference forward inside the step (``online``) and with the reference's
log-probs cached before training (``cached``). Batches are drawn round-robin
from the same iterator plan; each figure is a median over rounds.

    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --config=configs/dpo.py --pairs 32 --rounds 10
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

import jax
import numpy as np

from midpo import algorithms  # noqa: F401  (registers every published algorithm)
from midpo.training import config as config_lib
from midpo.training import env as env_lib
from midpo.training import optim, pairs
from midpo.training.reference_cache import ReferenceCache


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/dpo.py")
  parser.add_argument("--pairs", type=int, default=32, help="pairs per step")
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--steps_per_round", type=int, default=10)
  parser.add_argument("--workdir", default=None, help="default: a temporary directory")
  args = parser.parse_args()

  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.batch_size = args.pairs
  config.data.synthetic.num_train = 2000
  config.pairs_from = "dataset"
  workdir = args.workdir or tempfile.mkdtemp(prefix="bench_train_")

  results = {}
  for mode in ("online", "cached"):
    config.train.reference = mode
    env = env_lib.make_env(config, os.path.join(workdir, mode))
    prior = config_lib.make_prior(config)
    loss_config = config_lib.make_loss_config(config)
    ref = env_lib.init_params(env, 0)
    it = env.batches(env.data_config(), "train", mode="pairs")
    fields = pairs.pair_fields(env, prior)
    t0 = time.perf_counter()
    cache = ReferenceCache(env, it, ref) if mode == "cached" else None
    cache_seconds = time.perf_counter() - t0
    tx = optim.adamw(1e-4, 0, 1000, 0.0, 1.0)
    policy = jax.tree.map(lambda x: x.copy(), ref)
    opt = optim.init_opt(tx, policy, env.mesh)
    shard = {"policy": env_lib.shardings_of(policy), "policy_opt": env_lib.shardings_of(opt),
             "prior": None, "prior_opt": None}
    steps = pairs.make_preference_steps(env, prior, loss_config, tx, None, shard)
    frozen = {"reference": ref}
    batches = []
    for local in it.first_batches(args.steps_per_round):
      if cache is not None:
        local = cache.add_to(local)
      batches.append((env.global_batch(pairs.select(local, fields)),
                      int(local["attention_mask"].sum())))
    rng = jax.random.key(0)
    for b, _ in batches:  # compile every bucket shape
      policy, opt, m = steps.policy(policy, opt, None, frozen, b, rng)
    jax.block_until_ready(m)
    per_round = []
    for _ in range(args.rounds):
      start = time.perf_counter()
      for b, _ in batches:
        policy, opt, m = steps.policy(policy, opt, None, frozen, b, rng)
      jax.block_until_ready(m)
      per_round.append(time.perf_counter() - start)
    seconds = statistics.median(per_round) / len(batches)
    tokens = np.mean([n for _, n in batches])
    results[mode] = dict(seconds=seconds, tokens=tokens, cache_seconds=cache_seconds,
                         pairs=it.pairs)

  device = jax.devices()[0]
  print(f"# {platform.machine()} {device.platform}, {jax.device_count()} device(s), "
        f"jax {jax.__version__}; config {args.config}, {args.pairs} pairs/step, "
        f"{args.steps_per_round} batches x {args.rounds} rounds")
  for mode, r in results.items():
    extra = (f"  (cache of {r['pairs']} pairs built in {r['cache_seconds']:.1f} s)"
             if mode == "cached" else "")
    print(f"{mode:7s} {1e3 * r['seconds']:8.2f} ms/step  {1 / r['seconds']:6.2f} steps/s  "
          f"{r['tokens'] / r['seconds']:9.0f} tokens/s{extra}")
  ratio = results["cached"]["seconds"] / results["online"]["seconds"]
  print(f"cached/online step time: {ratio:.3f}")


if __name__ == "__main__":
  main()
