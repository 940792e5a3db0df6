"""The training pipeline end to end, on the known-reward task with a tiny model."""

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from midpo import algorithms, files, train
from midpo.algorithms import diagnostics
from midpo.training import checkpoint as ckpt_lib
from midpo.training import config as config_lib
from midpo.training import env as env_lib
from midpo.training import optim, pairs, preference, recipes, sft
from tests import train_utils as tu

ALGORITHMS = ("dpo", "dice", "hdpo", "rdpo", "simpo", "tdpo", "tis_dpo", "sparsepo",
              "constrained_prior", "joint_prior", "ema_prior", "cpo", "orpo")


def test_end_to_end_run_writes_results_logs_and_checkpoints(shared):
  w = shared["workdir"]
  results = json.load(open(os.path.join(w, "eval.json")))
  assert results == shared["results"]
  for who in ("policy", "reference"):
    for key in ("reward", "reward_se", "kl", "length", "length_se"):
      assert np.isfinite(results[who][key]), (who, key)
  assert 0.0 <= results["policy"]["win_rate"] <= 1.0
  assert results["policy"]["kl"] != 0.0  # the policy moved away from the reference
  assert results["implicit_reward_accuracy"]["num_pairs"] == 16
  sft = tu.read_metrics(w, "sft")
  pref = tu.read_metrics(w, "preference")
  assert [r["step"] for r in sft] == list(range(1, 13))
  assert [r["step"] for r in pref] == list(range(1, 11))
  for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
              "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm/policy",
              "perf/steps_per_sec", "perf/tokens_per_sec"):
    assert key in pref[-1], key
  # SFT reduces the NLL of the responses.
  assert sft[-1]["loss"] < sft[0]["loss"]
  assert glob.glob(os.path.join(w, "tensorboard", "events.out.tfevents.*"))
  assert json.load(open(os.path.join(w, "hparams.json")))["prior.name"] == "dpo"
  assert os.path.exists(os.path.join(w, "data_report.json"))
  assert os.path.exists(os.path.join(w, "eval_samples.jsonl"))
  assert 10 in ckpt_lib.Checkpointer(os.path.join(w, "checkpoints")).all_steps()


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_config_runs(shared, tmp_path, name, caplog):
  caplog.set_level(logging.INFO)
  extra = {"train.policy_steps_per_round": 2} if name == "constrained_prior" else {}
  if name in ("joint_prior", "ema_prior"):
    extra = dict(tu.MI_TINY)
  if name == "joint_prior":  # the post-hoc estimate, on one config (it compiles its own model)
    extra.update(tu.MI_ESTIMATE_TINY)
  if name == "dpo":  # the README's protocol: pairs sampled from the reference
    extra["pairs_from"] = "reference"
  if name == "tis_dpo":  # the contrastive models' log-probs cached (test_golden: online)
    extra["tis.cache_weights"] = True
  config = tu.tiny_config(name, **{
      "data.data_dir": shared["data_dir"], "sft.checkpoint": shared["sft"],
      "stages": ("preference", "eval"), "train.steps": 4, "num_pair_prompts": 16,
      "eval.every": 2, **extra})
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results["prior"] == config.prior.name
  assert np.isfinite(results["policy"]["reward"])
  rounds = config.dice.rounds
  _check_evaluation_along_training(tmp_path, config, results, rounds)
  pref = [r for r in tu.read_metrics(str(tmp_path)) if r["stage"].startswith("preference")]
  assert len(pref) == 4 * rounds
  assert all(np.isfinite(r["loss"]) for r in pref)
  if name == "sparsepo":
    assert "grad_norm/prior" in pref[-1] and pref[-1]["grad_norm/prior"] >= 0
  if name == "constrained_prior":
    # 2 policy steps then 1 prior step: step 3 (index 2) updated the coefficients.
    assert "grad_norm/prior" in pref[2] and "grad_norm/policy" in pref[1]
    assert "grad_norm/policy" not in pref[2]
    c = [pref[-1][f"prior/c_{k}_chosen"] for k in ("ref", "pol", "len", "kl")]
    assert 0.0 <= c[0] <= 1.0 and 0.0 <= c[1] <= 0.5 and -0.5 <= c[2] <= 0.5 and c[3] == 0.0
  if name in ("joint_prior", "ema_prior"):
    _check_learned_prior_run(tmp_path, config, results)
  if name == "dpo":
    rows = [json.loads(l) for l in open(tmp_path / "pairs" / "reference_samples.jsonl")]
    assert len(rows) == 16 and all(len(r["response_ids"]) == 2 for r in rows)
  if name == "dice":
    # Round 1's pairs: the round-0 policy's samples, labelled by the implicit
    # reward, plus offline pairs of round 0 (replay ratio 0.5: as many).
    rows = [json.loads(l) for l in open(tmp_path / "pairs" / "dice_round1_samples.jsonl")]
    dice = [r for r in tu.read_metrics(str(tmp_path)) if r["stage"] == "dice/round1"][0]
    assert dice["pairs_new"] + dice["pairs_offline"] == len(rows)
    assert dice["pairs_offline"] == dice["pairs_new"] > 0
    assert all(len(r["responses"]) == 2 for r in rows)
  if name == "tis_dpo":
    # The two contrastive models were trained (on the pairs and reversed) first.
    stages = {r["stage"] for r in tu.read_metrics(str(tmp_path))}
    assert {"tis/plus", "tis/minus"} <= stages
    for model in ("plus", "minus"):
      assert ckpt_lib.Checkpointer(str(tmp_path / "tis" / model)).latest_step() == 4
    # The weights' log-probs were cached once, not computed in the steps.
    assert "cached the plus model's log-probs of" in caplog.text
    assert "cached the minus model's log-probs of" in caplog.text


def test_the_mi_prior_fits_the_same_on_packed_and_padded_rows(shared, tmp_path):
  """train.prior_packing (the default) against padded rows, in the trainer: the
  same samples, the same NLL before each round's fit to float32 rounding, and
  after the fit close (the fits differ by rounding only)."""
  rounds = {}
  for packed in (True, False):
    config = tu.tiny_config("joint_prior", **{
        "data.data_dir": shared["data_dir"], "sft.checkpoint": shared["sft"],
        "stages": ("preference",), "train.steps": 4, "num_pair_prompts": 16,
        "baselines": (), **tu.MI_TINY, "train.prior_packing": packed})
    train.train_and_evaluate(config, str(tmp_path / str(packed)))
    rounds[packed] = [r for r in tu.read_metrics(str(tmp_path / str(packed)))
                      if r["stage"] == "prior/mle"]
  assert [r["step"] for r in rounds[True]] == [r["step"] for r in rounds[False]] == [0, 2]
  for a, b in zip(rounds[True], rounds[False]):
    assert a["samples"] == b["samples"] and a["sample_length"] == b["sample_length"]
    np.testing.assert_allclose(a["nll_per_token"], b["nll_per_token"], rtol=1e-5)
    np.testing.assert_allclose(a["nll_per_token_fit"], b["nll_per_token_fit"], rtol=1e-3)


def test_a_padding_free_run_trains_as_the_padded_one(shared, tmp_path):
  """train.padding_free in the trainer: the same losses and gradient norms, step by step,
  to float32 rounding (three steps of TDPO, whose loss reads per-token KLs)."""
  logged = {}
  for padding_free in (False, True):
    config = tu.tiny_config("tdpo", **{
        "data.data_dir": shared["data_dir"], "sft.checkpoint": shared["sft"],
        "stages": ("preference",), "train.steps": 3, "log_every": 1,
        "train.padding_free": padding_free})
    train.train_and_evaluate(config, str(tmp_path / str(padding_free)))
    logged[padding_free] = tu.read_metrics(str(tmp_path / str(padding_free)), "preference")
  assert [r["step"] for r in logged[True]] == [1, 2, 3]
  for a, b in zip(logged[True], logged[False]):
    for key in ("loss", "grad_norm/policy", "logps/chosen", "rewards/margins"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-4, err_msg=key)


def _check_evaluation_along_training(workdir, config, results, rounds):
  """eval.every=2 of 4 steps per round: every model at steps 2 and 4 of each
  round, with both pair accuracies (the prior's frozen models restored for
  every round); the last step's file is eval.json's policy."""
  def steps(model):
    return sorted(int(p.stem[5:]) for p in (workdir / "eval" / model).glob("step_*.json"))
  assert steps("reference") == [0]
  assert steps(config.prior.name) == sorted(r * 4 + s for r in range(rounds) for s in (2, 4))
  for name in config.baselines:
    assert steps(name) == [2, 4]
  for model in (config.prior.name, *config.baselines):
    for step in steps(model):
      d = json.load(open(workdir / "eval" / model / f"step_{step:07d}.json"))
      for key in ("implicit_reward_accuracy", "train_implicit_reward_accuracy"):
        assert 0.0 <= d["summary"][key]["value"] <= 1.0, (model, step, key, d["summary"][key])
      assert len(d["per_prompt"]["reward"]) == config.eval.num_prompts
  last = json.load(open(workdir / "eval" / config.prior.name / f"step_{rounds * 4:07d}.json"))
  assert last["summary"]["reward"] == results["policy"]["reward"]
  assert last["summary"]["implicit_reward_accuracy"] == results["implicit_reward_accuracy"]


def _check_learned_prior_run(workdir, config, results):
  """The 'mi' prior's rounds and every learned prior's diagnostics were logged;
  eval.json holds the reference, the DPO baseline and the policy."""
  diag = tu.read_metrics(str(workdir), "prior/diagnostics")
  # Held-out diagnostics every 2 steps and at the end: steps 0, 2, 4.
  assert [r["step"] for r in diag] == [0, 2, 4]
  for r in diag:
    for fixed in diagnostics.FIXED_PRIORS + (config.prior.name,):
      assert np.isfinite(r[f"heldout/loss/{fixed}"]), fixed
    assert r["collapse/alarm"] in (0.0, 1.0)
  # At step 0 the policy is the reference: DPO's logits are all 0.
  assert diag[0]["heldout/loss/dpo"] == pytest.approx(np.log(2.0), abs=1e-6)
  # The post-hoc mutual-information estimate of every model, on the evaluation's samples.
  if config.eval.mutual_information != "none":
    for model in (results["reference"], results["policy"], results["baselines"]["dpo"]):
      mi = model["mutual_information"]
      assert np.isfinite(mi["value"]) and mi["se"] > 0 and mi["num_samples"] == 16, mi
  if config.prior.name == "mi":
    fits = tu.read_metrics(str(workdir), "prior/mle")
    assert [r["step"] for r in fits] == [0, 2]  # a round every 2 policy steps
    assert [r["mle_steps"] for r in fits] == [3, 2]
    for r in fits:
      assert r["samples"] == 16
      assert np.isfinite(r["kl_policy_prior"]) and r["kl_policy_prior_se"] > 0
      # Maximum-likelihood steps lower the NLL of the samples they fit.
      assert r["nll_per_token_fit"] < r["nll_per_token"]
    step, params = tu.latest_params(workdir / "checkpoints", ("prior", "prior_opt"))
    assert step == 4 and params["prior_opt"]  # zeta_phi's own optimiser state
  table = results["table"]
  assert [row["model"] for row in table] == ["reference", "dpo", config.prior.name]
  for row in table:
    for key in ("reward", "kl", "length"):
      assert np.isfinite(row[key]) and np.isfinite(row[f"{key}_se"]), (row["model"], key)
  assert table[1]["reward"] == results["baselines"]["dpo"]["reward"]
  assert ckpt_lib.Checkpointer(str(workdir / "baselines" / "dpo")).latest_step() == 4
  assert json.load(open(workdir / "eval.json"))["table"] == table
  # An eval-only run restores the policy, the prior's parameters and the
  # baselines from the checkpoints: the same numbers.
  again = train.train_and_evaluate(tu.apply_overrides(config.copy_and_resolve_references(), {
      "stages": ("eval",)}), str(workdir))
  assert again["table"] == table
  assert again["implicit_reward_accuracy"] == results["implicit_reward_accuracy"]


def test_learned_prior_on_users_files_without_a_test_split(shared, tmp_path, caplog):
  """Pairs from the user's files with no test files: the EMA prior trains, and its
  held-out diagnostics are skipped with a warning, not silently."""
  from midpo.data import synthetic
  rows = []
  for i in range(24):
    _, prompt, a, b = synthetic.candidate_pair(0, "train", i)
    rows.append({"prompt": prompt, "chosen": a, "rejected": b})
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = tu.tiny_config("ema_prior", **{
      "sft.checkpoint": shared["sft"], "stages": ("preference",), "train.steps": 3,
      "data.source": "files", "data.files.format": "trl_standard",
      "data.files.train_files": [str(path)], "data.data_dir": str(tmp_path / "tfds"),
      # The synthetic language's words, prompt and response apart (TRL's joined texts would
      # glue the prompt's last word to the response's first).
      "data.tokenization": "separate",
      "train.diagnostics_every": 1, "baselines": ()})
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert "held-out diagnostics are skipped" in caplog.text
  assert len(tu.read_metrics(str(tmp_path / "run"), "preference")) == 3
  assert tu.read_metrics(str(tmp_path / "run"), "prior/diagnostics") == []


def test_keys_a_restart_may_change():
  from midpo.training import run_identity
  for key in ("stages", "train.steps", "log_every", "eval.num_prompts", "eval.every"):
    assert run_identity.resumable(key), key
  for key in ("prior.name", "loss.alpha", "seed", "sft.steps", "train.steps_per_round",
              "evaluation", "data.batch_size", "model.name"):
    assert not run_identity.resumable(key), key


def test_a_config_written_before_the_loss_options_existed_resumes():
  """A workdir's config.json from before the loss options (mixtures,
  f-divergences, WPO, LD-DPO) lacks their keys: at their off values that is
  no change; set to anything else it is one."""
  from midpo.training import run_identity
  config = tu.tiny_config("dpo")
  old = run_identity.config_json(config)
  for key in ("loss_weights", "f_divergence_type", "f_alpha_divergence_coef", "use_weighting",
              "ld_alpha"):
    del old["loss"][key]
  assert run_identity.differences(old, run_identity.config_json(config)) == []
  for key in ("tokenization", "max_unk_fraction", "truncation_mode"):  # the data options too
    del old["data"][key]
  assert run_identity.differences(old, run_identity.config_json(config)) == []
  config.loss.use_weighting = True
  assert run_identity.differences(old, run_identity.config_json(config)) == [
      ("loss.use_weighting", False, True)]


def test_a_workdir_refuses_a_restart_with_another_config(shared, tmp_path, caplog):
  """One workdir, one run: a restart that changes results is refused before any
  work, naming every changed key; more steps or other stages are allowed."""
  workdir = str(tmp_path / "run")
  base = {"sft.checkpoint": shared["sft"], "data.data_dir": shared["data_dir"],
          "stages": ("preference",), "train.steps": 3, "baselines": ()}
  train.train_and_evaluate(tu.tiny_config("dpo", **base), workdir)
  rows = len(tu.read_metrics(workdir, "preference"))
  for changes, match in (
      ({"prior.name": "simpo"}, r"changed: prior.name: 'dpo' -> 'simpo'"),
      ({"loss.alpha": 0.3, "seed": 7}, r"changed: loss.alpha: 0.1 -> 0.3, seed: 0 -> 7"),
      ({"sft.steps": 60}, r"changed: sft.steps: 12 -> 60"),
      ({"data.batch_size": 4, "model.name": "micro"},
       r"changed: data.batch_size: 8 -> 4, model.name: 'tiny' -> 'micro'")):
    with pytest.raises(config_lib.ConfigError, match=match):
      train.train_and_evaluate(tu.tiny_config("dpo", **base, **changes), workdir)
  assert len(tu.read_metrics(workdir, "preference")) == rows  # nothing ran
  assert json.load(open(os.path.join(workdir, "config.json")))["prior"]["name"] == "dpo"
  # What 'auto' attention and unset scan_layers resolved to is recorded, for restarts elsewhere.
  assert json.load(open(os.path.join(workdir, "resolved.json"))) == {
      "model.attention_impl": "xla", "model.scan_layers": False}
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(tu.tiny_config("dpo", **{**base, "train.steps": 5}), workdir)
  assert "learning-rate schedule recomputed for 5 steps" in caplog.text
  assert [r["step"] for r in tu.read_metrics(workdir, "preference")][-1] == 5
  assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 5


def test_a_second_run_on_a_workdir_in_use_is_refused(shared, tmp_path):
  """The workdir's lock names its holder; a lock file left by a dead run is taken over."""
  import fcntl

  from midpo.training import run_identity
  workdir = tmp_path / "run"
  workdir.mkdir()
  config = tu.tiny_config("dpo", **{"sft.checkpoint": shared["sft"], "baselines": (),
                                    "data.data_dir": shared["data_dir"],
                                    "stages": ("preference",), "train.steps": 2})
  with open(workdir / "workdir.lock", "w") as held:  # a run in progress
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held.write('{"pid": 4242, "host": "other-host", "started": "2026-11-30T10:00:00"}')
    held.flush()
    with pytest.raises(run_identity.WorkdirInUse, match=r"in use by another run \(\{\"pid\": "
                                                        r"4242, \"host\": \"other-host\""):
      train.train_and_evaluate(config, str(workdir))
  assert not (workdir / "metrics.jsonl").exists()  # refused before any work
  # The holder died (its lock is gone, its file stays): the next run takes over.
  train.train_and_evaluate(config, str(workdir))
  assert json.load(open(workdir / "workdir.lock"))["pid"] == os.getpid()
  assert len(tu.read_metrics(str(workdir), "preference")) == 2


def test_a_diverged_run_names_a_good_checkpoint_and_goes_on_at_a_sane_learning_rate(
    shared, tmp_path, caplog):
  """A learning rate of 1e3 drives the loss up by orders of magnitude: the guard
  stops the run, the checkpoint it names holds finite parameters, and a rerun
  at a sane rate resumes from it (the change recorded in restarts.jsonl)."""
  from midpo.training import loop
  workdir = str(tmp_path / "run")
  base = {"sft.checkpoint": shared["sft"], "data.data_dir": shared["data_dir"],
          "stages": ("preference",), "train.steps": 10, "baselines": (),
          "checkpoint_every": 1, "train.warmup_steps": 2, "divergence.max_loss": 100.0}
  with pytest.raises(loop.Diverged) as exc:
    train.train_and_evaluate(tu.tiny_config("dpo", **{**base, "train.learning_rate": 1e3}),
                             workdir)
  match = re.search(r"preference: (.*) at step (\d+); the last good checkpoint is step (\d+) "
                    r"in (\S+)$", str(exc.value))
  assert match, str(exc.value)
  bad, good, directory = int(match[2]), int(match[3]), match[4]
  assert good < bad <= 10  # the bad loss is step bad's, on checkpoint bad - 1's parameters
  step, params = tu.latest_params(directory)
  assert step == good  # the diverged step's checkpoint is gone
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(tu.tiny_config("dpo", **base), workdir)
  assert "train.learning_rate changed from 1000.0 to 0.0001 on restart" in caplog.text
  rows = tu.read_metrics(workdir, "preference")
  assert rows[-1]["step"] == 10 and np.isfinite(rows[-1]["loss"]) and rows[-1]["loss"] < 100
  restarts = [json.loads(line) for line in open(os.path.join(workdir, "restarts.jsonl"))]
  assert restarts[-1]["changed"] == {"train.learning_rate": [1000.0, 0.0001]}


def test_a_stop_signal_during_evaluation_stops_it_at_the_next_batch_and_says_so(
    shared, tmp_path, caplog, monkeypatch):
  """SIGTERM while the eval stage samples: it stops before the next batch of
  prompts (exit code 143), says what it stopped, and writes no partial eval.json."""
  from midpo import sampling
  from midpo.training import loop
  real, calls = sampling.generate_fn, []

  def generate(*args, **kwargs):
    calls.append(1)
    if len(calls) == 1:  # the first batch of evaluation prompts
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

  monkeypatch.setattr(sampling, "generate_fn", generate)
  # The eval stage alone: it evaluates the reference (the SFT checkpoint).
  config = tu.tiny_config("dpo", **{"sft.checkpoint": shared["sft"], "baselines": (),
                                    "data.data_dir": shared["data_dir"], "stages": ("eval",),
                                    "eval.batch_size": 8})
  with caplog.at_level("WARNING"), pytest.raises(loop.Preempted) as exc:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert exc.value.code == 143 and len(calls) == 1
  assert ("SIGTERM received during the eval stage (sampling (8 of 16 done)): stopped it"
          in caplog.text)
  assert not (tmp_path / "run" / "eval.json").exists()


def test_policy_and_prior_steps_touch_only_their_own_parameters(shared, tmp_path):
  config = tu.tiny_config("sparsepo", **{
      "data.data_dir": shared["data_dir"], "sft.checkpoint": shared["sft"],
      "stages": ("preference",), "train.prior_update": "alternate"})
  env = env_lib.make_env(config, str(tmp_path))
  reference = sft.run_sft(env)
  reference_before = jax.device_get(reference)
  prior = config_lib.make_prior(config)
  it = env.batches(env.data_config(), "train", mode="pairs")
  local = it.first_batches(1)[0]
  batch = env.global_batch(pairs.select(local, pairs.pair_fields(env, prior)))
  policy = jax.tree.map(np.copy, reference_before)
  policy = jax.device_put(policy)
  update = recipes.recipe_for(prior).make_update(prior)
  assert update.on_loss
  prior_params = update.init_params(env, prior, reference, it)
  # A live head, so that the prior's gradient is not zero.
  prior_params["shared"]["mix"] = abs(prior_params["shared"]["mix"])
  tx = optim.adamw(1e-2, 0, 10, 0.0, 1.0)
  policy_opt, prior_opt = tx.init(policy), tx.init(prior_params)
  shard = {"policy": env_lib.shardings_of(policy),
           "policy_opt": env_lib.shardings_of(policy_opt),
           "prior": env_lib.shardings_of(prior_params),
           "prior_opt": env_lib.shardings_of(prior_opt)}
  steps = pairs.make_preference_steps(env, prior, config_lib.make_loss_config(config), tx, tx,
                                      shard, prior_on_loss=True)
  frozen = {"reference": reference}
  rng = jax.random.key(0)

  policy_before, prior_before = jax.device_get(policy), jax.device_get(prior_params)
  new_policy, _, _ = steps.policy(jax.tree.map(np.copy, policy), policy_opt, prior_params,
                                  frozen, batch, rng)
  assert tu.tree_equal(jax.device_get(prior_params), prior_before)
  assert not tu.tree_equal(jax.device_get(new_policy), policy_before)

  # At the reference every log-ratio and KL is 0 and the masks get no
  # gradient; the prior step therefore runs against the updated policy.
  moved = jax.device_get(new_policy)
  new_prior, _, _ = steps.prior(jax.tree.map(np.copy, prior_before), prior_opt, new_policy,
                                frozen, batch, rng)
  assert tu.tree_equal(jax.device_get(new_policy), moved)
  assert not tu.tree_equal(jax.device_get(new_prior), prior_before)
  assert tu.tree_equal(jax.device_get(reference), reference_before)


def test_reference_is_never_modified_by_training(shared, tmp_path):
  config = tu.tiny_config("tdpo", **{
      "data.data_dir": shared["data_dir"], "sft.checkpoint": shared["sft"],
      "stages": ("preference",)})
  env = env_lib.make_env(config, str(tmp_path))
  reference = sft.run_sft(env)
  before = jax.device_get(reference)
  policy, _, frozen = preference.run_preference(env, reference, train.run_pairs(env, reference))
  assert tu.tree_equal(jax.device_get(frozen["reference"]), before)
  assert not tu.tree_equal(jax.device_get(policy), before)


def test_dice_pair_selection_is_length_regularised():
  rng = np.random.default_rng(0)
  lengths = rng.integers(5, 40, (200, 4)).astype(float)
  # Scores that grow with length: unregularised, chosen responses are longer.
  scores = 0.3 * lengths + rng.normal(0, 1, lengths.shape)
  hi0, lo0 = scores.argmax(1), scores.argmin(1)
  rows = np.arange(200)
  gap0 = abs(lengths[rows, hi0].mean() - lengths[rows, lo0].mean())
  hi, lo, a = algorithms.dice.select_pairs(scores, lengths)
  gap = abs(lengths[rows, hi].mean() - lengths[rows, lo].mean())
  assert a > 0 and gap < 0.25 * gap0
  reg = scores - a * lengths
  np.testing.assert_array_equal(hi, reg.argmax(1))
  np.testing.assert_array_equal(lo, reg.argmin(1))
  # Without a length effect nothing is regularised away.
  flat = rng.normal(0, 1, lengths.shape)
  _, _, a_flat = algorithms.dice.select_pairs(flat, np.full_like(lengths, 10.0))
  assert a_flat == 0.0


@pytest.mark.parametrize("overrides,match", [
    ({"prior.name": "dpoo"}, r"config.prior.name: unknown prior 'dpoo'"),
    ({"prior.gamma": 1.0}, r"config.prior.gamma: is set but prior 'dpo' has no such"),
    ({"mesh.data": 3}, r"config.mesh: data x fsdp x tensor = 3 does not match the 1 devices"),
    ({"mesh.fsdp": 0}, r"config.mesh.fsdp: must be a positive size or -1"),
    ({"sft.checkpoint": "/nonexistent/sft"}, r"config.sft.checkpoint: '/nonexistent/sft' is not"),
    ({"model.hf_path": "/nonexistent/hf"}, r"config.model.hf_path"),
    ({"loss.alpha": -1.0}, r"config.loss.alpha: must be a finite number > 0; got -1.0"),
    ({"train.reference": "cached", "prior.name": "tdpo"}, r"config.train.reference: prior 'tdpo'"),
    ({"stages": ("eval", "sft")}, r"config.stages: stages run in the order"),
    ({"prior.name": "tis_dpo", "tis.weights": "oracle"},
     r"config.data.token_weights: prior 'tis_dpo' with tis.weights='oracle'"),
    ({"tis.weights": "learned"}, r"config.tis.weights: must be 'contrastive' or 'oracle'"),
    ({"dice.offline_ratio": 1.0}, r"config.dice.offline_ratio: must be in \[0, 1\)"),
    ({"dice.labels": "judge"}, r"config.dice.labels: must be 'implicit' or 'reward'"),
    ({"data.bad_rows": "ignore"}, r"config.data.bad_rows"),
    ({"prior.name": "mi", "prior.network": "huge"}, r"config.prior.network: Unknown model"),
    ({"prior.name": "mi", "train.prior_batch_size": 512},
     r"config.train.prior_batch_size: 512 is more than the 256 samples"),
    ({"prior.name": "mi", "data.source": "files", "stages": ("sft", "preference"),
      "pairs_from": "dataset", "data.files.train_files": str(tu.ROOT / "tests" / "golden" /
                                                              "preference_step.json")},
     r"config.prior.name: prior 'mi' samples the policy"),  # (any file: only named here)
    ({"prior.name": "ema", "prior.decay": 1.5}, r"config.prior: prior 'ema': decay must be"),
    ({"baselines": ("dpo", "sparsepo")}, r"config.baselines: prior 'sparsepo' needs parameters"),
    ({"baselines": ("dop",)}, r"config.baselines: unknown prior 'dop'"),
    ({"train.collapse_margin": -1.0}, r"config.train.collapse_margin: must be >= 0"),
    # Accepted once, then broken mid-run (a division by zero after the data build, a flipped
    # gradient, a NaN step).
    ({"checkpoint_every": 0}, r"config.checkpoint_every: must be a positive int; got 0"),
    ({"log_every": 0}, r"config.log_every: must be a positive int; got 0"),
    ({"train.grad_clip": -1.0}, r"config.train.grad_clip: must be a finite number >= 0"),
    ({"train.learning_rate": float("inf")},
     r"config.train.learning_rate: must be a finite number > 0; got inf"),
    ({"sft.learning_rate": float("nan")}, r"config.sft.learning_rate: must be a finite number"),
    ({"train.weight_decay": -0.1}, r"config.train.weight_decay: must be a finite number >= 0"),
    ({"train.warmup_steps": -5}, r"config.train.warmup_steps: must be a non-negative int"),
    ({"train.diagnostics_every": -1}, r"config.train.diagnostics_every: must be a non-negative"),
    ({"divergence.spike_factor": -2.0}, r"config.divergence.spike_factor: must be a finite"),
    ({"loss.link": "ipo", "loss.alpha": 0.01},
     r"config.divergence.max_loss: 10000 is within 10x of the ipo link's starting loss "
     r"1/\(4 alpha\^2\) = 2500 at loss.alpha=0.01: raise it"),
    ({"loss.link": "sigmoid,ipo", "loss.loss_weights": (1.0, 2.0), "loss.alpha": 0.02},
     r"config.divergence.max_loss: 10000 is within 10x of the ipo link's starting loss "
     r"1/\(4 alpha\^2\) = 1250 at loss.alpha=0.02 \(weight 2\)"),
    # A link or option and a prior that does not supply what it needs: both named.
    ({"prior.name": "simpo", "prior.gamma": 0.5, "loss.link": "nca_pair"},
     r"config.loss.link: the nca_pair link reads each response's reward alpha\*s on its own, "
     r"and prior 'simpo' splits a pair-level term"),
    ({"prior.name": "tdpo", "loss.ld_alpha": 0.5},
     r"config.loss.ld_alpha: ld_alpha \(LD-DPO\) weights per-token log-probs, and prior "
     r"'tdpo' reads per-token kl_ref_policy"),
    ({"loss.link": "nca_pair", "loss.f_divergence_type": "forward_kl"},
     r"config.loss.f_divergence_type: 'forward_kl' is not defined for the nca_pair"),
    ({"prior.name": "simpo", "loss.f_divergence_type": "js_divergence"},
     r"config.loss.f_divergence_type: f_divergence_type='js_divergence' is defined on the ratio "
     r"of the policy to a model's distribution, and prior 'simpo' reads no model's log-probs"),
    ({"baselines": ("simpo",), "loss.link": "bco_pair"},
     r"config.baselines: baseline 'simpo' trains with the run's loss: the bco_pair link"),
    ({"prior.name": "simpo", "prior.gamma": 0.0, "loss.link": "ipo"},
     r"config.loss.link: the ipo link divides each side's score by its length, and prior "
     r"'simpo' scores a per-token mean already"),
    ({"loss.link": "sigmoid,bco_pair", "loss.loss_weights": (1.0,)},
     r"config.loss.loss_weights: has 1 weight\(s\) for 2 link\(s\)"),
    ({"loss.link": "aot", "loss.use_weighting": True},
     r"config.loss.use_weighting: is not defined for the aot links"),
    ({"loss.link": "sigmoid,simpo"}, r"config.loss.link: must be one of"),
    ({"dice.rounds": 2}, r"config.dice.rounds: 2 rounds are DICE's procedure; prior 'dpo'"),
    ({"prior.name": "sparsepo", "prior.mask_source": "given"},
     r"config.prior: prior 'sparsepo' reads \['mask_reward', 'mask_kl'\], which no input"),
])
def test_wrong_configs_name_the_key(overrides, match):
  config = tu.apply_overrides(tu.tiny_config("dpo"), overrides)
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(config)


def test_batch_that_does_not_divide_over_the_mesh_is_named():
  config = tu.tiny_config("dpo", **{"data.batch_size": 6, "mesh.data": 4})
  with pytest.raises(config_lib.ConfigError, match=r"config.data.batch_size: 6 pairs per step"):
    config_lib.validate(config, num_devices=4)


def test_command_line_errors_come_before_any_work(tmp_path):
  rc, out = tu.run_main("configs/dpo.py", str(tmp_path / "w"), {"prior.name": "nope"})
  assert rc != 0
  assert "config.prior.name: unknown prior 'nope'" in out
  assert not os.path.exists(tmp_path / "w")  # nothing was built, not even the workdir
  assert "Traceback" not in out  # a user's error is one line, not a traceback
  rc, out = tu.run_main("configs/dpo.py", str(tmp_path / "w"), {"train.stpes": 3})
  assert rc == 2 and "Traceback" not in out, out[-3000:]  # a typo in a key (locked config)
  assert out.strip().splitlines()[-1] == (
      "midpo: error: config.train.stpes: unknown key (config.train has no key 'stpes'; did you "
      "mean config.train.steps?)")


def test_a_write_that_fails_mid_run_stops_it_with_one_line(shared, tmp_path):
  """A full disk, as a file-size limit (which a test can set): the first
  checkpoint's background write fails; the run stops at the first step after
  that, with one line naming the error and the file, without tracebacks."""
  # The SFT stage (one model to compile) on the shared data.
  # The save at step 100 fails in the background while steps go on; the run
  # stops at the first step after that, long before the next save (step 200).
  overrides = {"data.data_dir": shared["data_dir"], "stages": ("sft",), "sft.steps": 200,
               "checkpoint_every": 100, "log_every": 10}
  # SIGXFSZ ignored: a write over the limit fails (EFBIG) instead of killing.
  limited = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
             " resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024));"
             " sys.argv[0] = 'midpo.main'; runpy.run_module('midpo.main', run_name='__main__')")
  proc = subprocess.Popen(
      [sys.executable, "-c", limited, "--config=configs/dpo.py", f"--workdir={tmp_path / 'w'}",
       *tu.cli_args({**tu.TINY_OVERRIDES, **overrides})],
      cwd=tu.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false"))
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 1, out[-3000:]
  # orbax's background threads log the failure (a line each, and asyncio's
  # complaints); no traceback goes through midpo's code, and the last line says it.
  assert "midpo/" not in "".join(l for l in out.splitlines() if l.startswith("  File")), out
  last = out.strip().splitlines()[-1]
  assert re.match(r"midpo: error: File too large writing \S+/sft/100\.orbax-checkpoint-tmp/"
                  r".*\. The run stopped there", last), last
  steps = [r["step"] for r in tu.read_metrics(str(tmp_path / "w"), "sft")]
  assert 100 <= steps[-1] < 200, steps  # stopped before the next save


@pytest.mark.parametrize("config_file", ["configs/dpo.py", "configs/constrained_prior.py",
                                         "configs/joint_prior.py"])
def test_resume_after_sigterm_is_bitwise_identical(shared, tmp_path, config_file, request):
  """Killed with SIGTERM (or SIGINT) mid-run and restarted == uninterrupted, bit
  for bit: the policy, and for a learned prior its parameters, and both
  optimiser states (the 'mi' prior's rounds sample from the policy: their
  samples too), and metrics.jsonl row for row. DPO's interrupted run has its
  workdir in a Cloud Storage bucket (the local emulator): checkpoints,
  metrics and the eval stage's eval.json there, and the same results as the
  local run."""
  overrides = {"data.data_dir": shared["data_dir"], "sft.checkpoint": shared["sft"],
               "stages": ("preference",), "train.steps": 16, "checkpoint_every": 5}
  items = ("policy", "policy_opt")
  kill_after = 7  # logged rows
  if "constrained" in config_file:
    # Rows of 3 steps each: the kill falls inside a logging window, whose
    # running values the checkpoint holds (the next row averages all 3 steps).
    overrides.update({"train.policy_steps_per_round": 2, "log_every": 3})
    items += ("prior", "prior_opt")
    kill_after = 3
  if "joint" in config_file:  # rounds start at steps 0, 3, 6, ...: not at checkpoints
    overrides.update(tu.MI_TINY, **{"train.policy_steps_per_round": 3,
                                    "train.diagnostics_every": 3, "baselines": ()})
    items += ("prior", "prior_opt")
  if "joint" in config_file:  # a first round long enough to outlast a grace period
    overrides["train.prior_warmup_steps"] = 400  # about 8 s of MLE steps here
  straight = tmp_path / "straight"
  rc, out = tu.run_main(config_file, str(straight), overrides)
  assert rc == 0, out[-3000:]

  killed = tmp_path / "killed"
  if "dpo" in config_file:
    killed = f"gs://{request.getfixturevalue('gcs')}/resume"
  if "joint" in config_file:
    # SIGTERM during the first round's fit: out before the fit's end (it checks
    # for the signal between its steps), its step's state saved; resumed below.
    proc = tu.run_main(config_file, str(killed), overrides, wait=False)
    lines = tu.lines_until(proc, "prior round 0 (step 0): 16 samples drawn in")
    time.sleep(0.5)  # into the fit
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=60)[0]
    assert time.time() - sent < 10.0, out[-3000:]  # a loaded machine: the save takes seconds
    assert proc.returncode == 143, out[-3000:]
    assert "during step 1's prior round 0's fit" in out, out[-3000:]
    assert "MLE steps in" not in out  # the round did not run to its end
  # Ctrl-C (SIGINT) does what SIGTERM does.
  stop = signal.SIGINT if "constrained" in config_file else signal.SIGTERM
  # The bucket's run also evaluates (after training; the comparison is of training).
  killed_overrides = {**overrides, "stages": ("preference", "eval")} if (
      "dpo" in config_file) else overrides
  proc = tu.run_main(config_file, str(killed), killed_overrides, wait=False)
  lines = []
  if "dpo" in config_file:  # metrics.jsonl reaches the bucket at checkpoints: wait for the log
    lines = tu.lines_until(proc, f"preference step {kill_after}/16")
    proc.send_signal(stop)
  metrics = os.path.join(str(killed), "metrics.jsonl")
  deadline = time.time() + 300
  while not lines and time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(tu.read_metrics(str(killed), "preference")) >= kill_after:
      proc.send_signal(stop)
      break
    time.sleep(0.05)
  out = "".join(lines) + proc.communicate(timeout=300)[0]
  assert proc.returncode == 128 + stop, out[-3000:]  # 130 after SIGINT, 143 after SIGTERM
  assert f"{stop.name} received" in out and "saved (the run resumes from it exactly)" in out
  interrupted_at = tu.read_metrics(str(killed), "preference")[-1]["step"]
  assert kill_after <= interrupted_at < 16
  rc, out = tu.run_main(config_file, str(killed), killed_overrides)
  assert rc == 0, out[-3000:]
  assert "resumed from step" in out
  if "dpo" in config_file:
    assert f"workdir {killed} is remote: it is not locked" in out
    eval_json = json.loads(files.read_text(f"{killed}/eval.json"))
    assert [r["model"] for r in eval_json["table"]] == ["reference", "dpo"]
    # max_to_keep=2: orbax deleted the older ones in the bucket, as on a disk
    assert files.listdir(f"{killed}/checkpoints") == sorted(os.listdir(straight / "checkpoints"))
    assert files.listdir(f"{killed}/checkpoints") == ["15", "16"]
    assert files.listdir(f"{killed}/tensorboard")
    assert not (tu.ROOT / "gs:").exists()  # nothing went to a local look-alike of the bucket

  step_a, a = tu.latest_params(straight / "checkpoints", items)
  step_b, b = tu.latest_params(os.path.join(str(killed), "checkpoints"), items)
  assert step_a == step_b == 16
  for item in items:
    assert tu.tree_equal(a[item], b[item]), item
  if "constrained" in config_file:  # the prior did train
    assert not np.array_equal(np.asarray(a["prior"]["coefficients"]), [1.0, 0.0, 0.0, 0.0])
  if "joint" in config_file:
    # Every round's samples and fit, and the held-out diagnostics, agree too.
    rows = lambda w: {(r["stage"], r["step"], k): v for r in tu.read_metrics(str(w))
                      if r["stage"].startswith("prior/") for k, v in r.items()
                      if k not in ("seconds", "sampling_seconds", "stage", "step")}
    pa, pb = rows(straight), rows(killed)
    assert sorted({s for st, s, _ in pa if st == "prior/mle"}) == [0, 3, 6, 9, 12, 15]
    assert sorted({s for st, s, _ in pa if st == "prior/diagnostics"}) == [0, 3, 6, 9, 12, 15, 16]
    assert pa == pb
  # metrics.jsonl, row for row, but for wall times.
  rows = lambda w: [{k: v for k, v in r.items() if not k.startswith("perf/")}
                    for r in tu.read_metrics(str(w), "preference")]
  ma, mb = rows(straight), rows(killed)
  every = overrides.get("log_every", 1)
  assert [r["step"] for r in ma] == sorted({*range(every, 17, every), 16})
  assert ma == mb


def test_cached_reference_gives_the_same_losses_as_the_online_reference(shared, tmp_path):
  runs = {}
  for mode in ("online", "cached"):
    config = tu.tiny_config("dpo", **{
        "data.data_dir": shared["data_dir"], "sft.checkpoint": shared["sft"],
        "stages": ("preference",), "train.reference": mode, "train.steps": 6,
        "train.warmup_steps": 0})
    train.train_and_evaluate(config, str(tmp_path / mode))
    runs[mode] = tu.read_metrics(str(tmp_path / mode), "preference")
  assert len(runs["online"]) == len(runs["cached"]) == 6
  for a, b in zip(runs["online"], runs["cached"]):
    for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
      assert a[key] == b[key], (a["step"], key, a[key], b[key])
  assert runs["online"][-1]["loss"] != runs["online"][0]["loss"]  # it trained


def test_a_mixture_with_every_option_trains_from_the_command_line(shared, tmp_path):
  """TRL's options as a user types them: a weighted mixture of links (one of
  them TRL's sft), WPO's weights, LD-DPO's length split and an f-divergence,
  over the learned 'mi' prior, through ``midpo.main``: finite steps, the WPO
  weight logged, the resolved config holding the parsed values, and the
  held-out diagnostics under the fixed priors that define this loss (not
  SimPO: no f-divergence without a model's log-probs; not TDPO: no ld_alpha
  with its KL), the others named in the log."""
  w = tmp_path / "w"
  rc, out = tu.run_main("configs/joint_prior.py", str(w), {
      **tu.MI_TINY, "data.data_dir": shared["data_dir"], "sft.checkpoint": shared["sft"],
      "stages": ("preference",), "train.steps": 4, "loss.link": "sigmoid,sft",
      "loss.loss_weights": "0.8,0.5", "loss.use_weighting": True, "loss.ld_alpha": 0.5,
      "loss.f_divergence_type": "js_divergence"})
  assert rc == 0, out[-3000:]
  rows = tu.read_metrics(str(w), "preference")
  steps = [r for r in rows if "loss" in r and "wpo/pair_weight" in r]
  assert len(steps) == 4 and all(np.isfinite(r["loss"]) for r in steps)
  # (exp(mean(lp - log sum p^2)) exceeds 1 where the tokens are likelier
  # than the policy's expected probability.)
  assert all(0 < r["wpo/pair_weight"] < np.inf for r in steps)
  heldout = [r for r in tu.read_metrics(str(w), "prior/diagnostics") if "heldout/loss/mi" in r]
  assert heldout and all(np.isfinite(r["heldout/loss/dpo"]) for r in heldout)
  assert not any("heldout/loss/simpo" in r or "heldout/loss/tdpo" in r for r in heldout)
  assert "no loss under the fixed prior 'simpo'" in out
  assert "no loss under the fixed prior 'tdpo'" in out
  resolved = json.load(open(w / "config.json"))["loss"]
  assert resolved["loss_weights"] == [0.8, 0.5] and resolved["ld_alpha"] == 0.5
