"""Evaluation: samples from the policy and the reference on held-out prompts.

Reported in ``eval.json`` (means with standard errors over prompts):

* ``reward``: the known reward ``r*(x, y)`` of sampled responses (synthetic task);
* ``kl``: the sequence ``KL(policy || reference)`` estimated from the policy's
  own samples, ``mean(log pi(y|x) - log pi_ref(y|x))``;
* ``length``: response length in tokens (the final EOS included);
* ``win_rate``: how often the policy's sample beats the reference's sample on
  the same prompt under ``r*`` (ties count one half);
* ``implicit_reward_accuracy``: on held-out labelled pairs, the fraction whose
  MI-DPO logit ``alpha (s(y_w) - s(y_l))`` under the trained prior is positive.

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

from midpo import sampling
from midpo.core import priors
from midpo.data import synthetic
from midpo.training import config as config_lib
from midpo.training import env as env_lib
from midpo.training import inputs, metrics_writer
from midpo.training import pairs as pairs_lib



def implicit_reward_accuracy(env, policy, frozen: dict, prior_params, prior=None) -> dict:
  """On held-out labelled pairs: the fraction with a positive MI-DPO logit
  under ``prior`` (the config's by default) with its standard error, and the
  mean MI-DPO loss. A prior whose parameters or frozen models this run does
  not have is skipped, with the reason. The evaluation step (the trainer's
  pair loss) is compiled once per run and prior."""
  config = env.config
  prior = prior or config_lib.make_prior(config)
  if prior.has_params and prior_params is None:
    return {"skipped": f"prior {prior.name!r} has parameters that this run did not train"}
  providers = inputs.providers_for(env, prior, prior.required_fields())
  missing = sorted({m for p in providers.values() for m in p.frozen} - set(frozen))
  if missing:
    return {"skipped": f"prior {prior.name!r} reads the frozen model(s) {missing}, which "
                       "this run does not have"}
  if config.data.source == "files" and not list(config.data.files.test_files):
    return {"skipped": "no test files (config.data.files.test_files)"}
  data_config = env.data_config()
  data_config.shuffle = False
  it = env.batches(data_config, "test", mode="pairs")
  loss_config = config_lib.make_loss_config(config)
  evaluator = env.compiled(
      ("pair_evaluator", prior, loss_config, "online"),
      lambda: pairs_lib.PairEvaluator(env, prior, loss_config, reference="online"))
  per_step = config.data.batch_size * env.process_count
  n_batches = min(it.num_epoch_batches(), max(1, -(-config.eval.num_pairs // per_step)))
  n_batches = env.min_over_processes(n_batches)  # every process runs the same steps
  logits, batch_losses = [], []
  for local in it.first_batches(n_batches):
    batch = env.global_batch(pairs_lib.select(local, evaluator.fields))
    loss, z = evaluator(policy, prior_params, frozen, batch)
    logits.append(env_lib.gather(z))
    batch_losses.append(float(loss))
  z = np.concatenate(logits)
  m, se = sampling.mean_se((z > 0).astype(np.float64))
  return {"value": m, "se": se, "num_pairs": int(z.size),
          "loss": float(np.mean(batch_losses))}


def _policy_summary(env, name, params, reference, prompts, key, r_ref=None) -> tuple[dict, Any]:
  """Samples of one policy on the eval prompts -> KL, length, (reward, win rate)."""
  pol = sampling.sample(env, params, prompts, key)
  kl = pol.logps - sampling.sequence_logps(env, reference, pol)
  out = {**sampling.summary("kl", kl), **sampling.summary("length", pol.lengths),
         "finished_fraction": float(pol.finished.mean())}
  rewards = None
  if env.config.data.source == "synthetic":
    rewards = np.array([synthetic.reward(p, env.tokenizer.decode(y))
                        for p, y in zip(prompts, pol.responses)])
    out.update(sampling.summary("reward", rewards))
    if r_ref is not None:
      out.update(sampling.summary("win_rate", (rewards > r_ref) + 0.5 * (rewards == r_ref)))
  logging.info("eval: sampled %d prompts from %s", len(prompts), name)
  return out, (pol, rewards)


TABLE_KEYS = ("reward", "kl", "length", "win_rate")


def format_table(rows: list[dict]) -> str:
  """eval.json's ``table`` as fixed-width text (mean +- standard error)."""
  head = f"{'model':<14}" + "".join(f"{k:>18}" for k in TABLE_KEYS) + f"{'held-out loss':>15}"
  lines = [head, "-" * len(head)]
  for r in rows:
    cells = "".join(f"{r[k]:>10.3f} +- {r[k + '_se']:<4.2f}" if k in r else f"{'-':>18}"
                    for k in TABLE_KEYS)
    loss = r.get("heldout_loss")
    lines.append(f"{r['model']:<14}{cells}" + (f"{loss:>15.4f}" if loss is not None else
                                               f"{'-':>15}"))
  return "\n".join(lines)


def run_eval(env, policy, frozen, prior_params, baselines: dict | None = None) -> dict:
  """Writes ``eval.json`` and ``eval_samples.jsonl``; ``frozen["reference"]`` is the
  reference the policy is compared with. ``baselines`` maps a prior's name to
  a policy trained under it in the same run: each is sampled with the same
  prompts and random numbers as the policy, and is a row of the table."""
  config = env.config
  reference = frozen["reference"]
  baselines = baselines or {}
  key = jax.random.fold_in(jax.random.key(config.seed), 3)
  prompts = synthetic.prompts(config.data.synthetic.seed, "test", config.eval.num_prompts)
  logging.info("eval: sampling %d prompts from the policy, the reference and %d baselines",
               len(prompts), len(baselines))
  ref = sampling.sample(env, reference, prompts, jax.random.fold_in(key, 1))
  results: dict[str, Any] = {
      "num_prompts": len(prompts),
      "prior": config.prior.name,
      "reference": {"kl": 0.0, "kl_se": 0.0, **sampling.summary("length", ref.lengths),
                    "finished_fraction": float(ref.finished.mean())},
  }
  decode = lambda ids: env.tokenizer.decode(ids)
  r_ref = None
  if config.data.source == "synthetic":
    r_ref = np.array([synthetic.reward(p, decode(y)) for p, y in zip(prompts, ref.responses)])
    results["reference"].update(sampling.summary("reward", r_ref))
  # The policy and every baseline share the prompts and the sampling key.
  results["policy"], (pol, r_pol) = _policy_summary(env, config.prior.name, policy, reference,
                                                    prompts, jax.random.fold_in(key, 0), r_ref)
  results["implicit_reward_accuracy"] = implicit_reward_accuracy(env, policy, frozen,
                                                                 prior_params)
  table = [dict(model="reference", **{k: v for k, v in results["reference"].items()
                                      if k.split("_se")[0] in TABLE_KEYS})]
  if baselines:
    results["baselines"] = {}
  for name, params in baselines.items():
    b, (_, r_b) = _policy_summary(env, name, params, reference, prompts,
                                  jax.random.fold_in(key, 0), r_ref)
    b["implicit_reward_accuracy"] = implicit_reward_accuracy(
        env, params, {"reference": reference}, None, prior=priors.make_prior(name))
    if r_pol is not None:
      b.update(sampling.summary("policy_win_rate_against", (r_pol > r_b) + 0.5 * (r_pol == r_b)))
    results["baselines"][name] = b
    table.append(_table_row(name, b))
  table.append(_table_row(config.prior.name, dict(
      results["policy"], implicit_reward_accuracy=results["implicit_reward_accuracy"])))
  results["table"] = table
  if env.process_index == 0:
    with open(os.path.join(env.workdir, "eval.json"), "w") as f:
      json.dump(results, f, indent=1)
    with open(os.path.join(env.workdir, "eval_samples.jsonl"), "w") as f:
      for i in range(min(32, len(prompts))):
        row = {"prompt": prompts[i], "policy": decode(pol.responses[i]),
               "reference": decode(ref.responses[i])}
        if r_pol is not None:
          row.update(policy_reward=float(r_pol[i]), reference_reward=float(r_ref[i]))
        f.write(json.dumps(row) + "\n")
    env.writer.write("eval", 0, metrics_writer.flatten(results, sep="/", scalars_only=True))
  logging.info("eval: %s", json.dumps({k: v for k, v in results.items() if k != "table"},
                                      indent=1))
  logging.info("eval (%d held-out prompts; mean +- standard error):\n%s", len(prompts),
               format_table(table))
  return results


def _table_row(name: str, summary: dict) -> dict:
  row = {"model": name}
  row.update({k: v for k, v in summary.items() if k.split("_se")[0] in TABLE_KEYS})
  acc = summary.get("implicit_reward_accuracy", {})
  if "loss" in acc:
    row["heldout_loss"] = acc["loss"]
    row["implicit_reward_accuracy"] = acc["value"]
  return row
