"""Would the sweep be faster training several runs as one vectorised program?

The sweep's runs of one algorithm differ only in alpha (a scalar of the loss),
so K of them could train as one ``jax.vmap``-ed step over K stacked policies
and optimiser states, sharing each batch and the reference's forward pass.
This times that program against the same K runs stepped one after another in
one process (what ``--workers=1`` does), on the quick sweep's shapes: the
default run's task and tiny model, DPO, 32 pairs per step, the online
reference. The K copies carry the same alpha here: alpha changes a scalar,
not the work. Each figure is the median over rounds of the time per run and
step (all K runs' step divided by K).

    python benchmarks/bench_vectorised_runs.py
    python benchmarks/bench_vectorised_runs.py --runs 3 6 --rounds 8
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
import jax.numpy as jnp

from midpo import algorithms  # noqa: F401  (registers every published algorithm)
from midpo.training import config as config_lib
from midpo.training import env as env_lib
from midpo.training import optim, pairs


def _median_seconds(fn, state, batches, rounds: int) -> float:
  """Median over ``rounds`` of the seconds ``fn`` takes over ``batches``."""
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for b in batches:
      state = fn(state, b)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  return statistics.median(times) / len(batches)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/dpo.py")
  parser.add_argument("--runs", type=int, nargs="+", default=[3],
                      help="numbers of runs K to vectorise")
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--steps_per_round", type=int, default=8)
  args = parser.parse_args()

  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.synthetic.num_train = 2000
  config.pairs_from = "dataset"
  env = env_lib.make_env(config, tempfile.mkdtemp(prefix="bench_vectorised_"))
  prior = config_lib.make_prior(config)
  loss_config = config_lib.make_loss_config(config)
  ref = env_lib.init_params(env, 0)
  it = env.batches(env.data_config(), "train", mode="pairs")
  fields = pairs.pair_fields(env, prior)
  batches = [env.global_batch(pairs.select(local, fields))
             for local in it.first_batches(args.steps_per_round)]
  tx = optim.adamw(1e-4, 0, 1000, 0.0, 1.0)
  shard = {"policy": None, "policy_opt": None, "prior": None, "prior_opt": None}
  steps = pairs.make_preference_steps(env, prior, loss_config, tx, None, shard)
  frozen = {"reference": ref}
  rng = jax.random.key(0)

  def one(state, batch):
    policy, opt = state
    policy, opt, _ = steps.policy(policy, opt, None, frozen, batch, rng)
    return policy, opt

  device = jax.devices()[0]
  print(f"# {platform.machine()} {device.platform}, {jax.device_count()} device(s), "
        f"jax {jax.__version__}; {args.config}, {config.data.batch_size} pairs/step, "
        f"model {config.model.name}, {args.steps_per_round} batches x {args.rounds} rounds")
  for k in args.runs:
    states = []
    for i in range(k):
      policy = jax.tree.map(jnp.copy, ref)
      states.append((policy, optim.init_opt(tx, policy, env.mesh)))

    def sequential(states, batch):
      return [one(s, batch) for s in states]

    vmapped = jax.jit(jax.vmap(one, in_axes=(0, None)), donate_argnums=0)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    for b in batches:  # compile every bucket shape of both
      states = sequential(states, b)
      stacked = vmapped(stacked, b)
    t_seq = _median_seconds(sequential, states, batches, args.rounds) / k
    t_vec = _median_seconds(vmapped, stacked, batches, args.rounds) / k
    print(f"K={k}: one after another {1e3 * t_seq:7.2f} ms per run-step, vectorised "
          f"{1e3 * t_vec:7.2f} ms per run-step: vectorised/sequential {t_vec / t_seq:.3f}")


if __name__ == "__main__":
  main()
