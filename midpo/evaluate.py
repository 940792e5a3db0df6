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
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from midpo import config_lib, learned_prior, priors, stats
from midpo.data import synthetic
from midpo.models.generate import generate as generate_fn


@dataclasses.dataclass
class Samples:
  prompts: list[str]
  responses: list[list[int]]     # token ids, EOS excluded
  lengths: np.ndarray            # generated tokens, EOS included
  logps: np.ndarray              # log pi(y|x) of the sampling model
  finished: np.ndarray           # the response ended with EOS


def _gather(x) -> np.ndarray:
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def prompt_ids(env, prompt: str) -> list[int]:
  """A prompt's token ids as the data pipeline writes them (with BOS when ``add_bos``)."""
  tok = env.tokenizer
  ids = list(tok.encode(prompt))
  if env.config.data.add_bos and tok.bos_id is not None:
    ids = [tok.bos_id] + ids
  return ids


def sample_ids(env, samples: Samples) -> tuple[list[list[int]], list[list[int]]]:
  """``(prompt ids, response ids)`` of each sample; a finished response ends with EOS."""
  eos = env.tokenizer.eos_id
  return ([prompt_ids(env, p) for p in samples.prompts],
          [list(r) + ([eos] if done else []) for r, done in zip(samples.responses,
                                                                  samples.finished)])


def _encode_prompts(env, prompts: Sequence[str], width: int):
  tok = env.tokenizer
  rows = [prompt_ids(env, p)[-width:] for p in prompts]
  tokens = np.full((len(rows), width), tok.pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, ids in enumerate(rows):
    tokens[i, :len(ids)] = ids
    mask[i, :len(ids)] = 1
  return tokens, mask


def _batches(env, prompts: Sequence[str]):
  """Global batches of ``eval.batch_size`` prompts per process, the last padded."""
  per_process = env.config.eval.batch_size
  global_size = per_process * env.process_count
  for start in range(0, len(prompts), global_size):
    chunk = list(prompts[start:start + global_size])
    real = len(chunk)
    chunk += [chunk[0]] * (global_size - real)
    mine = chunk[env.process_index * per_process:(env.process_index + 1) * per_process]
    yield chunk, real, mine


def sample(env, params, prompts: Sequence[str], rng, *,
           temperature: float | None = None) -> Samples:
  """One response per prompt from the model with ``params`` (at
  ``eval.temperature`` unless ``temperature`` is given)."""
  c = env.config.eval
  temperature = c.temperature if temperature is None else temperature
  model = nnx.merge(env.graphdef, params)
  width = max(len(env.tokenizer.encode(p)) for p in prompts) + 1
  responses, lengths, logps, finished = [], [], [], []
  for i, (chunk, real, mine) in enumerate(_batches(env, prompts)):
    tokens, mask = _encode_prompts(env, mine, width)
    g = env.global_batch({"tokens": tokens, "mask": mask})
    out = generate_fn(model, g["tokens"], g["mask"], rng=jax.random.fold_in(rng, i),
                                max_new_tokens=c.max_new_tokens, temperature=temperature,
                                eos_id=env.tokenizer.eos_id, pad_id=env.tokenizer.pad_id)
    toks, m, lp, done = (_gather(x) for x in (out.tokens, out.mask, out.logprobs, out.done))
    for r in range(real):
      n = int(m[r].sum())
      ids = toks[r, :n].tolist()
      if done[r] and ids and ids[-1] == env.tokenizer.eos_id:
        ids = ids[:-1]
      responses.append(ids)
      lengths.append(n)
      logps.append(float((lp[r] * m[r]).sum()))
      finished.append(bool(done[r]))
  return Samples(list(prompts), responses, np.array(lengths), np.array(logps),
                 np.array(finished))


def sequence_logps(env, params, samples: Samples) -> np.ndarray:
  """``log pi(y|x)`` of given responses under ``params`` (teacher forcing)."""
  tok = env.tokenizer
  model_fn = jax.jit(lambda p, t, a, m: jnp.sum(stats.token_logprobs(
      nnx.merge(env.graphdef, p)(t[:, :-1], a[:, :-1]), t[:, 1:], m[:, 1:]), axis=-1))
  rows = list(zip(*sample_ids(env, samples)))
  width = max(len(p) + len(r) for p, r in rows)
  out = []
  per_process = env.config.eval.batch_size
  global_size = per_process * env.process_count
  for start in range(0, len(rows), global_size):
    chunk = rows[start:start + global_size]
    real = len(chunk)
    chunk = chunk + [chunk[0]] * (global_size - real)
    mine = chunk[env.process_index * per_process:(env.process_index + 1) * per_process]
    r = learned_prior.response_rows(*zip(*mine), width, tok.pad_id)
    g = env.global_batch({"t": r["tokens"], "a": r["attention_mask"],
                          "m": r["response_mask"].astype(np.float32)})
    out.append(_gather(model_fn(params, g["t"], g["a"], g["m"]))[:real])
  return np.concatenate(out)


def _mean_se(x) -> tuple[float, float]:
  x = np.asarray(x, np.float64)
  if x.size < 2:
    return float(x.mean()) if x.size else float("nan"), float("nan")
  return float(x.mean()), float(x.std(ddof=1) / np.sqrt(x.size))


def _summary(name, values) -> dict:
  m, se = _mean_se(values)
  return {name: m, f"{name}_se": se}


def implicit_reward_accuracy(env, policy, frozen, prior_params, prior=None) -> dict:
  """On held-out labelled pairs: the fraction with a positive MI-DPO logit
  under ``prior`` (the config's by default), and the mean MI-DPO loss."""
  from midpo import train as train_lib  # the pair loss lives with the trainer

  config = env.config
  prior = prior or config_lib.make_prior(config)
  if prior.has_params and prior_params is None:
    return {"skipped": f"prior {prior.name!r} has parameters that this run did not train"}
  if "prev_logps" in prior.required_fields() and "previous" not in frozen:
    return {"skipped": "the previous round's policy (DICE's prior) is not in this run"}
  data_config = config.data.copy_and_resolve_references()
  if not data_config.data_dir:
    data_config.data_dir = os.path.join(env.workdir, "tfds")
  data_config.shuffle = False
  if config.data.source == "files" and not list(config.data.files.test_files):
    return {"skipped": "no test files (config.data.files.test_files)"}
  it = train_lib.make_batches(env, data_config, "test", mode="pairs")
  loss_fn = train_lib.make_pair_loss(env, prior, config_lib.make_loss_config(config),
                                     reference="online",
                                     prior_model=train_lib.make_prior_model(env, prior))

  def eval_step(p, q, r, b):
    loss, (_, logits) = loss_fn(p, q, r, b, None, False)
    return loss, logits

  eval_step = jax.jit(eval_step)
  fields = train_lib.pair_fields(prior, config, reference="online",
                                 contrastive="plus" in frozen)
  per_step = config.data.batch_size * env.process_count
  n_batches = min(it.num_epoch_batches(), max(1, -(-config.eval.num_pairs // per_step)))
  if env.process_count > 1:  # every process runs the same number of steps
    n_batches = int(np.min(multihost_utils.process_allgather(np.array(n_batches))))
  logits, batch_losses = [], []
  for local in it.first_batches(n_batches):
    batch = env.global_batch(train_lib._pair_arrays(local, fields))
    loss, z = eval_step(policy, prior_params, frozen, batch)
    logits.append(_gather(z))
    batch_losses.append(float(loss))
  z = np.concatenate(logits)
  m, se = _mean_se((z > 0).astype(np.float64))
  return {"value": m, "se": se, "num_pairs": int(z.size),
          "loss": float(np.mean(batch_losses))}


def _policy_summary(env, name, params, reference, prompts, key, r_ref=None) -> tuple[dict, Any]:
  """Samples of one policy on the eval prompts -> KL, length, (reward, win rate)."""
  pol = sample(env, params, prompts, key)
  kl = pol.logps - sequence_logps(env, reference, pol)
  out = {**_summary("kl", kl), **_summary("length", pol.lengths),
         "finished_fraction": float(pol.finished.mean())}
  rewards = None
  if env.config.data.source == "synthetic":
    rewards = np.array([synthetic.reward(p, env.tokenizer.decode(y))
                        for p, y in zip(prompts, pol.responses)])
    out.update(_summary("reward", rewards))
    if r_ref is not None:
      out.update(_summary("win_rate", (rewards > r_ref) + 0.5 * (rewards == r_ref)))
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
  ref = sample(env, reference, prompts, jax.random.fold_in(key, 1))
  results: dict[str, Any] = {
      "num_prompts": len(prompts),
      "prior": config.prior.name,
      "reference": {"kl": 0.0, "kl_se": 0.0, **_summary("length", ref.lengths),
                    "finished_fraction": float(ref.finished.mean())},
  }
  decode = lambda ids: env.tokenizer.decode(ids)
  r_ref = None
  if config.data.source == "synthetic":
    r_ref = np.array([synthetic.reward(p, decode(y)) for p, y in zip(prompts, ref.responses)])
    results["reference"].update(_summary("reward", r_ref))
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
      b.update(_summary("policy_win_rate_against", (r_pol > r_b) + 0.5 * (r_pol == r_b)))
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
    env.writer.write("eval", 0, _flat_scalars(results))
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


def _flat_scalars(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat_scalars(v, f"{prefix}{k}/"))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[f"{prefix}{k}"] = v
  return out

