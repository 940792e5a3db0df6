"""Implicit-reward accuracy cannot read the labels: swapping a pair's chosen
and rejected responses negates its margin, for every algorithm config.

Each algorithm's evaluation step runs on a batch of tiny pairs with random
models (policy, reference and whatever frozen models and parameters its prior
reads), as labelled and swapped. Some priors' MI-DPO logits themselves depend
on the label (SimPO's margin gamma is subtracted whichever response is
chosen), which is why the accuracy uses the label-free margin.
"""

import numpy as np
import pytest

from midpo import evaluate
from midpo.training import config as config_lib
from midpo.training import env as env_lib
from midpo.training import inputs, recipes
from midpo.training import pairs as pairs_lib
from tests import train_utils as tu
from tests.test_train import ALGORITHMS


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("swap_tfds"))


@pytest.mark.parametrize("name", ALGORITHMS)
def test_swapping_labels_negates_the_accuracy_margin(name, data_dir, tmp_path):
  config = tu.tiny_config(name, **{"data.data_dir": data_dir})
  env = env_lib.make_env(config, str(tmp_path))
  prior = config_lib.make_prior(config)
  it = env.batches(env.data_config(), "train", mode="pairs")
  reference = env_lib.init_params(env, 1)
  policy = env_lib.init_params(env, 2)
  frozen = {"reference": reference}
  providers = inputs.providers_for(env, prior, prior.required_fields())
  for i, model in enumerate(sorted({m for p in providers.values() for m in p.frozen})):
    frozen[model] = env_lib.init_params(env, 10 + i)
  prior_params = recipes.recipe_for(prior).make_update(prior).init_params(env, prior, reference,
                                                                          it)
  evaluator = evaluate.pair_evaluator(env, prior)
  local = it.first_batches(1)[0]
  _, z, margin = evaluate.label_free_margins(env, evaluator, policy, prior_params, frozen, local)
  _, z_sw, margin_sw = evaluate.label_free_margins(env, evaluator, policy, prior_params, frozen,
                                                   pairs_lib.swap_roles(local))
  assert np.abs(margin).max() > 1e-4  # the models differ: the margins are not all 0
  np.testing.assert_allclose(margin_sw, -margin, rtol=1e-5, atol=1e-6)
  if name == "simpo":  # the logit as labelled is not antisymmetric: z(l, w) = -z(w, l) - 2 gamma
    gamma_alpha = 2 * prior.gamma
    np.testing.assert_allclose(z_sw, -z - gamma_alpha, rtol=1e-5, atol=1e-5)
  env.writer.close()
