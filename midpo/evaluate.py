"""Evaluation: samples from the policy and the reference on held-out prompts.

Reported in ``eval.json`` (means with standard errors over prompts):

* ``reward``: the known reward ``r*(x, y)`` of sampled responses (synthetic task;
  on users' files, which have none, ``eval.json``'s ``not_measured`` says what
  is left out and why, and the prompts are those of ``data.files.test_files``);
* ``kl``: the sequence ``KL(policy || reference)`` estimated from the policy's
  own samples, ``mean(log pi(y|x) - log pi_ref(y|x))``;
* ``length``: response length in tokens (the final EOS included);
* ``win_rate``: how often the policy's sample beats the reference's sample on
  the same prompt under ``r*`` (ties count one half);
* ``implicit_reward_accuracy``: on held-out labelled pairs, the fraction whose
  label-free implicit-reward margin under the trained prior is positive (see
  ``implicit_reward_accuracy``), and the mean MI-DPO loss there (``loss``: the
  held-out loss); ``train_implicit_reward_accuracy``: the same on the run's
  training pairs;
* ``mutual_information``: the post-hoc estimate of ``E_x KL(pi(.|x) || zeta*)``
  from the samples (``midpo.algorithms.mi.estimate``; ``eval.mutual_information``
  says at which steps), for the reference, the policy and the baselines.

With ``config.eval.every > 0`` the kept preference checkpoints along
training are evaluated the same way (same prompts, same sampling keys), each
written to ``eval/<model>/step_<n>.json`` with its per-prompt values; the
reference's to ``eval/reference/step_0000000.json``. ``eval.json`` also records
the commit, the machine and the versions (results are deterministic per
machine and build).

Sampling and teacher-forced scoring are ``midpo.sampling``'s; the pair loss is
the trainer's (``midpo.training.pairs``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from midpo import files, sampling
from midpo.algorithms.mi import estimate as mi_estimate
from midpo.core import priors
from midpo.data import batches as batches_lib
from midpo.data import pipeline, sources, synthetic
from midpo.training import config as config_lib
from midpo.training import env as env_lib
from midpo.training import inputs, metrics_writer, preference, provenance
from midpo.training import pairs as pairs_lib



def implicit_reward_accuracy(env, policy, frozen: dict, prior_params, prior=None, *,
                             split: str = "test", pairs: dict | None = None) -> dict:
  """On labelled pairs of ``split`` (held-out ``test`` pairs, or ``train``:
  the run's pair source ``pairs``) under ``prior`` (the config's by default).

  ``value`` (with ``se``): the fraction of pairs whose implicit-reward margin
  is positive (a tie counts one half). The margin is label-free: half the
  MI-DPO logit ``alpha (s(y_w) - s(y_l))`` of the pair as labelled minus that
  of the pair with chosen and rejected swapped, so swapping a pair's labels
  negates it for every prior (a prior whose scores depend on the label, as
  TIS-DPO's signed token weights, SimPO's margin or the constrained prior's
  separate coefficients do, cannot read the label through it). ``logit_value``:
  the fraction of positive logits as labelled (TRL's ``rewards/accuracies``
  for DPO; label-dependent for those priors). ``loss``: the mean MI-DPO loss as
  labelled (nats per pair). A prior whose parameters or frozen models this
  run does not have is skipped, with the reason. The evaluation step (the
  trainer's pair loss) is compiled once per run and prior."""
  config = env.config
  prior = prior or config_lib.make_prior(config)
  if prior.has_params and prior_params is None:
    return {"skipped": f"prior {prior.name!r} has parameters that this run did not train"}
  providers = inputs.providers_for(env, prior, prior.required_fields())
  missing = sorted({m for p in providers.values() for m in p.frozen} - set(frozen))
  if missing:
    return {"skipped": f"prior {prior.name!r} reads the frozen model(s) {missing}, which "
                       "this run does not have"}
  if split == "test" and config.data.source == "files" and not sources.resolve_files(
      config.data.files.test_files, "test_files"):
    return {"skipped": "no test files (config.data.files.test_files)"}
  if split == "train" and pairs is None:
    return {"skipped": "the run's training pairs are not known to this evaluation"}
  data_config = env.data_config(**(pairs or {}))
  data_config.shuffle = False
  it = env.batches(data_config, split, mode="pairs")
  evaluator = pair_evaluator(env, prior)
  per_step = config.data.batch_size * env.process_count
  n_batches = min(it.num_epoch_batches(), max(1, -(-config.eval.num_pairs // per_step)))
  n_batches = env.min_over_processes(n_batches)  # every process runs the same steps
  logits, margins, batch_losses = [], [], []
  for local in it.first_batches(n_batches):
    loss, z, margin = label_free_margins(env, evaluator, policy, prior_params, frozen, local)
    logits.append(z)
    margins.append(margin)
    batch_losses.append(loss)
  z, margin = np.concatenate(logits), np.concatenate(margins)
  m, se = sampling.mean_se((margin > 0) + 0.5 * (margin == 0))
  return {"value": m, "se": se, "logit_value": float(np.mean(z > 0)), "num_pairs": int(z.size),
          "loss": float(np.mean(batch_losses))}


def pair_evaluator(env, prior) -> pairs_lib.PairEvaluator:
  """The run's compiled evaluation step for ``prior`` (online reference)."""
  loss_config = config_lib.make_loss_config(env.config)
  return env.compiled(
      ("pair_evaluator", prior, loss_config, "online"),
      lambda: pairs_lib.PairEvaluator(env, prior, loss_config, reference="online"))


def label_free_margins(env, evaluator, policy, prior_params, frozen: dict,
                       local: dict) -> tuple[float, np.ndarray, np.ndarray]:
  """``(loss, logits_B, margins_B)`` of a host batch of pairs: the MI-DPO loss
  and logits as labelled, and the label-free margins
  ``(logit(w, l) - logit(l, w)) / 2`` (every process gets every pair's)."""
  batch = env.global_batch(pairs_lib.select(local, evaluator.fields))
  swapped = env.global_batch(pairs_lib.select(pairs_lib.swap_roles(local), evaluator.fields))
  loss, z = evaluator(policy, prior_params, frozen, batch)
  _, z_swapped = evaluator(policy, prior_params, frozen, swapped)
  z, z_swapped = env_lib.gather(z), env_lib.gather(z_swapped)
  return float(loss), z, (z - z_swapped) / 2


# What an evaluation on users' files cannot report, and why (eval.json's "not_measured").
NOT_MEASURED_ON_FILES = {
    "reward": "users' files have no true reward r*(x, y) to score samples with",
    "win_rate": "needs a true reward (or a judge) to compare two samples",
    "mutual_information": "the estimate's prior zeta* is fitted on the synthetic task's prompts",
}


def heldout_prompts(env) -> list:
  """The evaluation's prompts: ``eval.num_prompts`` of the synthetic task's
  'test' prompts (text), or the first distinct prompts of the users' 'test'
  split (``data.files.test_files``) as the pipeline tokenises them (ids, BOS
  included), in the files' order."""
  config = env.config
  if config.data.source == "synthetic":
    return synthetic.prompts(config.data.synthetic.seed, "test", config.eval.num_prompts)
  c = env.data_config()
  c.batch_size, c.shuffle = 1, False
  # An eval-only run (from a checkpoint) may be the first to need the dataset.
  batches_lib.ensure_built(c, "test", env.process_index, env.process_count, env.workdir,
                           shared_data_dir=env.shared_data_dir)
  it = pipeline.make_iterator(c, env.tokenizer, "test", None, mode="sft", build=False)
  seen, out = set(), []
  for k in np.argsort(it.pairs.pair_index, kind="stable"):
    ids = tuple(int(i) for i in np.concatenate([it.pairs.prefix, it.pairs.prompt[k]]))
    if ids not in seen:
      seen.add(ids)
      out.append(list(ids))
    if len(out) == config.eval.num_prompts:
      break
  return out


def decode_sample(tok, ids) -> str:
  """Sampled ids as text; an id of the model's padded vocabulary that the tokenizer lacks (an
  undertrained model samples them) is written as U+FFFD, one per id, not dropped."""
  out, run = [], []
  for i in ids:
    if 0 <= int(i) < tok.vocab_size:
      run.append(int(i))
    else:
      out += [tok.decode(run), "\ufffd"]
      run = []
  return "".join(out + [tok.decode(run)])


class _Context:
  """What every evaluated model shares: the held-out prompts, the sampling
  key, the reference and its samples (sampled once) and their rewards."""

  def __init__(self, env, reference):
    config = env.config
    self.reference = reference
    self.key = jax.random.fold_in(jax.random.key(config.seed), 3)
    self.prompts = heldout_prompts(env)
    self.ref = sampling.sample(env, reference, self.prompts, jax.random.fold_in(self.key, 1))
    self.rewards = None
    if config.data.source == "synthetic":
      spec = config.data.synthetic.prompt_specificity
      self.rewards = np.array([synthetic.reward(p, env.tokenizer.decode(y), spec)
                               for p, y in zip(self.prompts, self.ref.responses)])


def _mutual_information(env, params, samples) -> dict:
  """The post-hoc ``E_x KL(pi(.|x) || zeta*)`` of ``params``, which drew the
  evaluation's ``samples`` (``midpo.algorithms.mi.estimate``): the same fit
  prompts, sampling key and seed for every model."""
  key = jax.random.fold_in(jax.random.key(env.config.seed), 7)
  fit = sampling.sample(env, params, mi_estimate.fit_prompts(env), key)
  return mi_estimate.mutual_information(env, fit, samples, seed=int(env.config.seed))


def _policy_summary(env, ctx: _Context, name, params, mi: bool) -> tuple[dict, Any]:
  """Samples of one policy on the eval prompts -> KL, length, (reward, win
  rate, reward per token, ``mi``: the mutual-information estimate); and
  ``(samples, rewards, per-prompt values)``."""
  pol = sampling.sample(env, params, ctx.prompts, jax.random.fold_in(ctx.key, 0))
  kl = pol.logps - sampling.sequence_logps(env, ctx.reference, pol)
  out = {**sampling.summary("kl", kl), **sampling.summary("length", pol.lengths),
         "finished_fraction": float(pol.finished.mean())}
  per_prompt = {"kl": kl.tolist(), "length": pol.lengths.tolist()}
  rewards = None
  if env.config.data.source == "synthetic":
    spec = env.config.data.synthetic.prompt_specificity
    rewards = np.array([synthetic.reward(p, env.tokenizer.decode(y), spec)
                        for p, y in zip(ctx.prompts, pol.responses)])
    out.update(sampling.summary("reward", rewards))
    out.update(sampling.summary("reward_per_token", rewards / np.maximum(pol.lengths, 1)))
    r_ref = ctx.rewards
    out.update(sampling.summary("win_rate", (rewards > r_ref) + 0.5 * (rewards == r_ref)))
    per_prompt["reward"] = rewards.tolist()
  if mi:
    out["mutual_information"] = _mutual_information(env, params, pol)
  logging.info("eval: sampled %d prompts from %s", len(ctx.prompts), name)
  return out, (pol, rewards, per_prompt)


def _evaluate(env, ctx: _Context, name, params, frozen, prior_params, prior, pairs, *,
              final: bool):
  """One model's samples summary and both pair accuracies; ``(summary, extras)``."""
  mode = env.config.eval.mutual_information
  out, extras = _policy_summary(env, ctx, name, params, mode == "every" or
                                (final and mode == "final"))
  out["implicit_reward_accuracy"] = implicit_reward_accuracy(env, params, frozen, prior_params,
                                                             prior)
  if pairs is not None:
    out["train_implicit_reward_accuracy"] = implicit_reward_accuracy(
        env, params, frozen, prior_params, prior, split="train", pairs=pairs)
  return out, extras


def _step_path(env, model: str, step: int) -> str:
  return os.path.join(env.workdir, "eval", model, f"step_{step:07d}.json")


def _write_step(env, model: str, step: int, summary: dict, per_prompt: dict) -> None:
  if env.process_index == 0:
    path = _step_path(env, model, step)
    files.makedirs(os.path.dirname(path))
    files.write_json(path, {"model": model, "step": step, "summary": summary,
                                     "per_prompt": per_prompt})


def evaluate_along_training(env, ctx: _Context, pairs: dict | None,
                            loader: preference.SnapshotLoader) -> list[dict]:
  """Evaluates every kept preference checkpoint but each model's last (which
  ``run_eval`` evaluates from memory); skips steps already written (a resumed
  evaluation). A snapshot's training pairs are its round's (None: ``pairs``
  unknown). Returns their ``{"model", "step", ...summary}`` rows."""
  snaps = preference.snapshots(env, env.config.eval.every)
  last = {}
  for s in snaps:
    last[s.model] = max(last.get(s.model, 0), s.step)
  rows = []
  for snap in snaps:
    if snap.step == last[snap.model] or files.exists(_step_path(env, snap.model, snap.step)):
      continue
    policy, prior_params, frozen, prior = loader.load(snap)
    train_pairs = pairs if pairs is None or snap.baseline else loader.training_pairs(
        snap.round_index)
    summary, (_, _, per_prompt) = _evaluate(env, ctx, f"{snap.model} at step {snap.step}",
                                            policy, frozen, prior_params, prior, train_pairs,
                                            final=False)
    _write_step(env, snap.model, snap.step, summary, per_prompt)
    rows.append({"model": snap.model, "step": snap.step, **summary})
  return rows


TABLE_KEYS = ("reward", "kl", "length", "win_rate")


def format_table(rows: list[dict]) -> str:
  """eval.json's ``table`` as fixed-width text (mean +- standard error)."""
  keys = TABLE_KEYS + (("mutual_information",) if any("mutual_information" in r for r in rows)
                       else ())
  names = {"mutual_information": "MI estimate"}
  head = f"{'model':<14}" + "".join(f"{names.get(k, k):>18}" for k in keys) + \
      f"{'held-out loss':>15}{'accuracy':>10}"
  lines = [head, "-" * len(head)]
  for r in rows:
    cells = "".join(f"{r[k]:>10.3f} +- {r[k + '_se']:<4.2f}" if k in r else f"{'-':>18}"
                    for k in keys)
    loss, acc = r.get("heldout_loss"), r.get("implicit_reward_accuracy")
    lines.append(f"{r['model']:<14}{cells}"
                 + (f"{loss:>15.4f}" if loss is not None else f"{'-':>15}")
                 + (f"{acc:>10.3f}" if acc is not None else f"{'-':>10}"))
  return "\n".join(lines)


def _reference_summary(env, ctx: _Context, mi: bool) -> dict:
  """The reference's row: KL 0, length, reward (and the mutual-information
  estimate when ``mi`` and ``eval.mutual_information`` is not 'none')."""
  ref = ctx.ref
  out = {"kl": 0.0, "kl_se": 0.0, **sampling.summary("length", ref.lengths),
         "finished_fraction": float(ref.finished.mean())}
  if ctx.rewards is not None:
    out.update(sampling.summary("reward", ctx.rewards))
    out.update(sampling.summary("reward_per_token", ctx.rewards / np.maximum(ref.lengths, 1)))
  if mi and env.config.eval.mutual_information != "none":
    out["mutual_information"] = _mutual_information(env, ctx.reference, ref)
  return out


def _write_reference_step(env, ctx: _Context, summary: dict) -> None:
  per_prompt = {"kl": [0.0] * len(ctx.prompts), "length": ctx.ref.lengths.tolist()}
  if ctx.rewards is not None:
    per_prompt["reward"] = ctx.rewards.tolist()
  _write_step(env, "reference", 0, summary, per_prompt)


def evaluate_reference(env, reference) -> dict:
  """The reference alone, as the eval stage evaluates it (same prompts and
  keys; the mutual-information estimate as ``eval.mutual_information`` says),
  written to ``eval/reference/step_0000000.json``: for a sweep, once per
  seed instead of in every run (``eval.reference_mutual_information``)."""
  ctx = _Context(env, reference)
  summary = _reference_summary(env, ctx, True)
  _write_reference_step(env, ctx, summary)
  return summary


def run_eval(env, policy, frozen, prior_params, baselines: dict | None = None,
             pairs: dict | None = None) -> dict:
  """Writes ``eval.json`` and ``eval_samples.jsonl``; ``frozen["reference"]`` is the
  reference the policy is compared with. ``baselines`` maps a prior's name to
  a policy trained under it in the same run: each is sampled with the same
  prompts and random numbers as the policy, and is a row of the table.
  ``pairs`` is the run's pair source (None: no training-pair metrics). With
  ``config.eval.every`` the checkpoints along training are evaluated first."""
  config = env.config
  reference = frozen["reference"]
  baselines = baselines or {}
  ctx = _Context(env, reference)
  prompts, ref, r_ref = ctx.prompts, ctx.ref, ctx.rewards
  logging.info("eval: sampled %d prompts from the reference; the policy and %d baselines next",
               len(prompts), len(baselines))
  results: dict[str, Any] = {
      "num_prompts": len(prompts),
      "prior": config.prior.name,
      "reference": _reference_summary(env, ctx,
                                      config.eval.reference_mutual_information),
  }
  if config.data.source == "files":
    results["not_measured"] = NOT_MEASURED_ON_FILES
  decode = lambda ids: decode_sample(env.tokenizer, ids)
  # Along training only when the run trained a policy (not a reference-only evaluation).
  along = bool(config.eval.every) and files.isdir(preference.preference_dir(env))
  loader = preference.SnapshotLoader(env, reference, pairs or {})
  n_rounds = preference.num_rounds(env)
  if along:
    _write_reference_step(env, ctx, results["reference"])
    evaluate_along_training(env, ctx, pairs, loader)
  # The policy's training pairs are its last round's (DICE's: its own samples).
  train_pairs = pairs
  if pairs is not None and n_rounds > 1 and files.isdir(preference.preference_dir(env, 0)):
    train_pairs = loader.training_pairs(n_rounds - 1)
  # The policy and every baseline share the prompts and the sampling key.
  results["policy"], (pol, r_pol, per_prompt) = _evaluate(
      env, ctx, config.prior.name, policy, frozen, prior_params, None, train_pairs, final=True)
  results["implicit_reward_accuracy"] = results["policy"].pop("implicit_reward_accuracy")
  final_step = config.train.steps * n_rounds
  if along:
    _write_step(env, config.prior.name, final_step, dict(
        results["policy"], implicit_reward_accuracy=results["implicit_reward_accuracy"]),
        per_prompt)
  table = [_table_row("reference", results["reference"])]
  if baselines:
    results["baselines"] = {}
  for name, params in baselines.items():
    b, (_, r_b, b_per_prompt) = _evaluate(env, ctx, name, params, {"reference": reference},
                                          None, priors.make_prior(name), pairs, final=True)
    if along:
      _write_step(env, name, config.train.steps, b, b_per_prompt)
    if r_pol is not None:
      b.update(sampling.summary("policy_win_rate_against", (r_pol > r_b) + 0.5 * (r_pol == r_b)))
    results["baselines"][name] = b
    table.append(_table_row(name, b))
  table.append(_table_row(config.prior.name, dict(
      results["policy"], implicit_reward_accuracy=results["implicit_reward_accuracy"])))
  results["table"] = table
  results["provenance"] = provenance.record()
  if env.process_index == 0:
    files.write_json(os.path.join(env.workdir, "eval.json"), results)
    lines = []
    for i in range(min(32, len(prompts))):
      prompt = prompts[i] if isinstance(prompts[i], str) else decode(prompts[i])
      row = {"prompt": prompt, "policy": decode(pol.responses[i]),
             "reference": decode(ref.responses[i])}
      if r_pol is not None:
        row.update(policy_reward=float(r_pol[i]), reference_reward=float(r_ref[i]))
      lines.append(json.dumps(row) + "\n")
    files.write_text(os.path.join(env.workdir, "eval_samples.jsonl"), "".join(lines))
    env.writer.write("eval", 0, metrics_writer.flatten(
        {k: v for k, v in results.items() if k != "provenance"}, sep="/", scalars_only=True))
  logging.info("eval: %s", json.dumps({k: v for k, v in results.items() if k != "table"},
                                      indent=1))
  logging.info("eval (%d held-out prompts; mean +- standard error):\n%s", len(prompts),
               format_table(table))
  return results


def _table_row(name: str, summary: dict) -> dict:
  row = {"model": name}
  row.update({k: v for k, v in summary.items() if k.split("_se")[0] in TABLE_KEYS})
  mi = summary.get("mutual_information", {})
  if "value" in mi:
    row["mutual_information"], row["mutual_information_se"] = mi["value"], mi["se"]
  acc = summary.get("implicit_reward_accuracy", {})
  if "loss" in acc:
    row["heldout_loss"] = acc["loss"]
    row["implicit_reward_accuracy"] = acc["value"]
  return row
