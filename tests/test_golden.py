"""Golden values: one preference step of every algorithm from a fixed start.

The policy (seed 1) and the reference (seed 0) are random tiny models, the
batch is the tiny synthetic task's first, and each algorithm's prior, its
parameters and its update are built as the trainer builds them (its
recipe); the step is the trainer's. The loss and the main metrics must match
``tests/golden/preference_step.json`` to ``RTOL``.

When they change: a refactoring must not change them. If you changed a loss,
a prior, an input or the step on purpose, and the parity tests still pass,
regenerate with

    MIDPO_REGENERATE_GOLDEN=1 python -m pytest tests/test_golden.py

and commit the new file, saying why in the commit message. Values are
float32 on a CPU; another machine may differ in the last digits (hence the
tolerance).
"""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import optax
import pytest

from midpo import algorithms
from midpo.training import config as config_lib
from midpo.training import env as env_lib
from midpo.training import optim, pairs, recipes
from tests import train_utils as tu

GOLDEN = pathlib.Path(__file__).parent / "golden" / "preference_step.json"
REGENERATE = os.environ.get("MIDPO_REGENERATE_GOLDEN") == "1"
RTOL, ATOL = 1e-4, 1e-6
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected", "grad_norm/policy", "grad_norm/prior")
ALGORITHMS = ("dpo", "dice", "hdpo", "rdpo", "simpo", "tdpo", "tis_dpo", "sparsepo",
              "constrained", "mi", "ema")
# Hyperparameters away from the values at which a prior is DPO.
HYPERPARAMETERS = {"hdpo": {"eta": 0.8}, "rdpo": {"length_coef": 0.2},
                   "constrained": {"init": (1.0, 0.2, 0.1, 0.0)}, "ema": {"decay": 0.9}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  config = tu.tiny_config("dpo", **{"data.synthetic.num_train": 64, "train.reference": "online"})
  env = env_lib.make_env(config, str(tmp_path_factory.mktemp("golden")))
  models = {name: env_lib.init_params(env, seed) for seed, name in
            enumerate(("reference", "policy", "plus", "minus", "previous"))}
  it = env.batches(env.data_config(), "train", mode="pairs")
  return env, models, it


def build_step(env, models, batches, name, tx):
  """``(update, run, state)`` of algorithm ``name``'s first preference step, built as the
  trainer builds it (its recipe), the policy from ``models['policy']`` with optimiser ``tx``."""
  prior = algorithms.make_prior(name, **HYPERPARAMETERS.get(name, {}))
  frozen = {k: models[k] for k in ("reference", "previous", "plus", "minus")}
  update = recipes.recipe_for(prior).make_update(prior)
  prior_tx = update.optimizer(env)
  policy = jax.tree.map(jnp.copy, models["policy"])
  policy_opt = optim.init_opt(tx, policy, env.mesh)
  prior_params = update.init_params(env, prior, models["reference"], batches)
  prior_opt = optim.init_opt(prior_tx, prior_params, env.mesh) if prior_tx else None
  shard = {"policy": env_lib.shardings_of(policy),
           "policy_opt": env_lib.shardings_of(policy_opt),
           "prior": env_lib.shardings_of(prior_params) if prior_params is not None else None,
           "prior_opt": env_lib.shardings_of(prior_opt) if prior_opt is not None else None}
  loss_config = config_lib.make_loss_config(env.config)
  steps = pairs.make_preference_steps(env, prior, loss_config, tx, prior_tx, shard,
                                      prior_on_loss=update.on_loss)
  run = recipes.RoundRun(env, prior, loss_config, frozen, steps, shard, prior_tx, 0, 1)
  state = {"policy": policy, "policy_opt": policy_opt, "prior": prior_params,
           "prior_opt": prior_opt}
  return update, run, state


def one_step(env, models, it, name) -> dict:
  update, run, state = build_step(env, models, it, name, optim.adamw(1e-3, 0, 10, 0.0, 1.0))
  local = it.first_batches(1)[0]
  batch = env.global_batch(pairs.select(local, pairs.pair_fields(env, run.prior)))
  state, metrics = update.step(run, state, batch, jax.random.key(0), 0)
  out = {k: float(metrics[k]) for k in KEYS if k in metrics}
  if state["prior"] is not None:  # where the prior's own parameters went
    out["prior_params_norm"] = float(optax.tree.norm(state["prior"]))
  return out


def test_one_preference_step_of_every_algorithm_matches_its_golden_values(world):
  env, models, it = world
  got = {name: one_step(env, models, it, name) for name in ALGORITHMS}
  if REGENERATE:
    GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    pytest.skip(f"regenerated {GOLDEN}")
  want = json.loads(GOLDEN.read_text())
  assert sorted(want) == sorted(ALGORITHMS), "regenerate: the algorithms changed"
  bad = []
  for name in ALGORITHMS:
    assert set(got[name]) == set(want[name]), f"{name}: metrics {sorted(got[name])}"
    for k, v in want[name].items():
      if abs(got[name][k] - v) > ATOL + RTOL * abs(v):
        bad.append(f"{name} {k}: {got[name][k]!r}, golden {v!r}")
  assert not bad, ("one preference step changed (see this file's docstring for when and how "
                   "to regenerate tests/golden/preference_step.json):\n  " + "\n  ".join(bad))


def test_the_golden_step_is_not_trivial(world):
  """Every algorithm has a gradient, and no two give the same loss (each is
  away from the hyperparameters at which it is DPO), but for the EMA prior."""
  want = json.loads(GOLDEN.read_text())
  for name, m in want.items():
    assert m["grad_norm/policy"] > 0, name
  # The EMA prior starts at the reference: its first step is DPO's, and only
  # its own parameters (which moved towards the policy) tell it apart.
  assert want["ema"]["loss"] == want["dpo"]["loss"] and "prior_params_norm" in want["ema"]
  losses = {round(m["loss"], 6) for name, m in want.items() if name != "ema"}
  assert len(losses) == len(want) - 1, f"two algorithms gave the same loss: {want}"
