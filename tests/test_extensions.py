"""Algorithms added from outside the package, through the command line."""

import dataclasses
import json
import math
import os
from typing import ClassVar

from midpo import algorithms
from midpo.core import priors
from midpo.training import env as env_lib
from midpo.training import inputs
from tests import train_utils as tu

STAGES = {"stages": ("sft", "preference"), "train.steps": 4, "log_every": 1,
          "checkpoint_every": 100}


def _first_loss(workdir):
  return tu.read_metrics(workdir, "preference")[0]["loss"]


def test_a_prior_registered_outside_midpo_takes_its_hyperparameter_from_the_command_line(
    tmp_path):
  config = "tests/extensions/scaled_reference.py"
  w = str(tmp_path / "scaled")
  rc, out = tu.run_main(config, w, {**STAGES, "prior.name": "scaled_reference",
                                    "prior.scale": 0.5})
  assert rc == 0, out[-3000:]
  saved = json.load(open(os.path.join(w, "config.json")))
  assert saved["prior"]["name"] == "scaled_reference" and saved["prior"]["scale"] == 0.5
  rows = tu.read_metrics(w, "preference")
  assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
  # At the first step the policy is the reference: DPO's loss is exactly
  # log 2, this prior's is not (its logit is alpha * 0.5 (LR_w - LR_l)).
  assert abs(_first_loss(w) - math.log(2)) > 1e-4
  rc, out = tu.run_main(config, str(tmp_path / "bad"), {**STAGES,
                                                        "prior.name": "scaled_reference",
                                                        "prior.scale": -1.0})
  assert rc != 0 and "scale must be > 0; got -1.0" in out


def test_a_prior_with_a_new_per_token_input_trains_without_touching_the_trainer(tmp_path):
  w = str(tmp_path / "entropy")
  rc, out = tu.run_main("tests/extensions/entropy_weighted.py", w,
                        {**STAGES, "prior.name": "entropy_weighted"})
  assert rc == 0, out[-3000:]
  rows = tu.read_metrics(w, "preference")
  assert len(rows) == 4
  for r in rows:
    assert math.isfinite(r["loss"])
    # exp(-entropy) of a trained reference: strictly between 0 and 1.
    assert 0.0 < r["prior/mean_weight_chosen"] < 1.0
    assert 0.0 < r["prior/mean_weight_rejected"] < 1.0


@dataclasses.dataclass(frozen=True)
class _ReadsTokenWeights(priors.Prior):  # not registered: only its provider is asked for
  name: ClassVar[str] = "reads_token_weights"
  requires: ClassVar[tuple[str, ...]] = ("ref_logps", "token_weights")


def test_an_input_an_algorithm_provides_serves_other_priors_too(tmp_path):
  """TIS-DPO's ``token_weights`` provider computes them from its contrastive
  models for TIS-DPO only; any other prior reading them gets the data's."""
  env = env_lib.make_env(tu.tiny_config("dpo"), str(tmp_path))
  assert env.config.tis.weights == "contrastive"
  other = inputs.providers_for(env, _ReadsTokenWeights(), ["token_weights"])["token_weights"]
  assert other.batch_fields == ("token_weights",) and other.frozen == ()
  tis = inputs.providers_for(env, algorithms.make_prior("tis_dpo"),
                             ["token_weights"])["token_weights"]
  assert tis.batch_fields == () and tis.frozen == ("plus", "minus")
