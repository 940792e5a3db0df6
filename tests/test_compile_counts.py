"""Every jitted entry point compiles once per model and shape set: a second
call with the same shapes triggers no backend compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midpo import algorithms, evaluate, sampling
from midpo.data import synthetic
from midpo.training import config as config_lib
from midpo.training import env as env_lib
from midpo.training import optim, pairs
from tests import train_utils as tu

# Executables made during a call: compiled by the backend, or loaded from JAX's
# persistent compilation cache (which other tests in this process may have
# turned on: the sweep's runs use it), so the counts do not depend on test order.
_COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: _COMPILES.append(name)
    if name == "/jax/core/compile/backend_compile_duration" else None)
jax.monitoring.register_event_listener(
    lambda name, *_, **__: _COMPILES.append(name)
    if name == "/jax/compilation_cache/cache_hits" else None)


@pytest.fixture(autouse=True)
def fresh_compilation_caches():
  """Each test starts with JAX's in-memory caches empty: a test that ran earlier in
  this process (which one depends on the order, and on how ``-n 2`` shares the tests
  out) may have compiled the same functions at the same shapes, and the first call
  here would then compile nothing."""
  jax.clear_caches()


def compiles(fn, *args, **kwargs):
  """``(result, number of executables compiled or loaded from the persistent
  cache during the call)``."""
  before = len(_COMPILES)
  out = fn(*args, **kwargs)
  jax.block_until_ready(jax.tree.leaves(out) if not isinstance(out, np.ndarray) else out)
  return out, len(_COMPILES) - before


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config = tu.tiny_config("dpo", **{"data.synthetic.num_train": 64})
  env = env_lib.make_env(config, str(tmp_path_factory.mktemp("compile")))
  reference = env_lib.init_params(env, 0)
  policy = env_lib.init_params(env, 1)
  prompts = synthetic.prompts(config.data.synthetic.seed, "test", 16)
  return env, reference, policy, prompts


def test_the_counter_sees_a_compilation():
  f = jax.jit(lambda x: x * 3 + 1)
  _, n = compiles(f, np.ones(7, np.float32))
  assert n >= 1
  _, n = compiles(f, np.ones(7, np.float32))
  assert n == 0


def test_sampling_and_sequence_logps_compile_once(setup):
  env, reference, _, prompts = setup
  key = jax.random.key(0)
  samples, first = compiles(sampling.sample, env, reference, prompts, key)
  assert first >= 1
  _, again = compiles(sampling.sample, env, reference, prompts, jax.random.key(1))
  assert again == 0
  lp, first = compiles(sampling.sequence_logps, env, reference, samples)
  assert first >= 1
  np.testing.assert_allclose(lp, samples.logps, rtol=1e-4, atol=1e-3)
  for _ in range(2):
    _, again = compiles(sampling.sequence_logps, env, reference, samples)
    assert again == 0


def test_preference_steps_compile_once(setup):
  env, reference, policy, _ = setup
  prior = algorithms.make_prior("dpo")
  it = env.batches(env.data_config(), "train", mode="pairs")
  local = it.first_batches(1)[0]
  batch = env.global_batch(pairs.select(local, pairs.pair_fields(env, prior)))
  tx = optim.adamw(1e-3, 0, 10, 0.0, 1.0)
  policy = jax.tree.map(jnp.copy, policy)  # sharded as the trainer's (the step donates it)
  opt = optim.init_opt(tx, policy, env.mesh)
  shard = {"policy": env_lib.shardings_of(policy), "policy_opt": env_lib.shardings_of(opt),
           "prior": None, "prior_opt": None}
  steps = pairs.make_preference_steps(env, prior, config_lib.make_loss_config(env.config), tx,
                                      None, shard)
  frozen = {"reference": reference}
  (policy, opt, _), first = compiles(steps.policy, policy, opt, None, frozen, batch,
                                     jax.random.key(0))
  assert first >= 1
  for i in range(2):
    (policy, opt, _), again = compiles(steps.policy, policy, opt, None, frozen, batch,
                                       jax.random.key(i))
    assert again == 0


def test_the_eval_step_compiles_once_per_run_and_prior(setup):
  env, reference, policy, _ = setup
  frozen = {"reference": reference}
  out, first = compiles(evaluate.implicit_reward_accuracy, env, policy, frozen, None)
  assert first >= 1 and out["num_pairs"] > 0
  again_out, again = compiles(evaluate.implicit_reward_accuracy, env, policy, frozen, None)
  assert again == 0 and again_out == out
