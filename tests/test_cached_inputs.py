"""Frozen models' token log-probs computed once before training, against the same inputs
computed in the step: TIS-DPO's contrastive weights (``tis.cache_weights``)."""

import jax
import numpy as np
import optax

from midpo.training import env as env_lib
from midpo.training import inputs, pairs
from midpo.training.reference_cache import ReferenceCache
from tests import train_utils as tu
from tests.test_golden import KEYS, build_step


def test_tis_dpo_cached_weights_give_the_online_step(tmp_path):
  config = tu.tiny_config("tis_dpo", **{"data.synthetic.num_train": 64,
                                        "train.reference": "online"})
  env = env_lib.make_env(config, str(tmp_path))
  models = {name: env_lib.init_params(env, seed) for seed, name in
            enumerate(("reference", "policy", "plus", "minus", "previous"))}
  it = env.batches(env.data_config(), "train", mode="pairs")
  local = it.first_batches(1)[0]
  got = {}
  for cached in (False, True):
    env.config.tis.cache_weights = cached
    batch = dict(local)
    if cached:
      for name in ("plus", "minus"):
        batch = ReferenceCache(env, it, models[name]).add_to(batch, f"{name}_logps")
    update, run, state = build_step(env, models, it, "tis_dpo", optax.sgd(1.0))
    fields = pairs.pair_fields(env, run.prior) + inputs.cacheable_fields(
        inputs.providers_for(env, run.prior, run.prior.required_fields()))
    assert ("plus_logps" in fields) == cached
    state, metrics = update.step(run, state, env.global_batch(pairs.select(batch, fields)),
                                 jax.random.key(0), 0)
    got[cached] = ({k: float(metrics[k]) for k in KEYS if k in metrics}, state["policy"])
  env.config.tis.cache_weights = False
  for k, v in got[False][0].items():
    np.testing.assert_allclose(got[True][0][k], v, rtol=1e-5, atol=1e-7, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               got[True][1], got[False][1])
