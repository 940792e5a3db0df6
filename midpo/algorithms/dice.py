"""DICE: rounds of DPO in which each round's policy is the next round's prior.

"Bootstrapping Language Models with DPO Implicit Rewards" (2024) and its
released scripts. Round 0 is DPO on the run's pairs. Round ``r >= 1`` samples
``dice.samples_per_prompt`` responses per training prompt from the round
``r-1`` policy, scores them with the implicit reward ``log pi_{r-1}(y) - log
pi_{r-2}(y)`` (or the known reward, ``dice.labels='reward'``), pairs the best
and the worst after the length regularisation (``select_pairs``), mixes in
round-0 pairs at ``dice.offline_ratio`` and trains with ``pi_{r-1}`` as the
prior (``prev_logps``). ``dice.rounds`` rounds in all.
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import jax
import ml_collections
import numpy as np
from absl import logging

from midpo import files, sampling
from midpo.core.priors import Prior, PriorOutput, masked_sum, register_prior
from midpo.data import pipeline, synthetic
from midpo.training import config as config_lib
from midpo.training import inputs, recipes


@register_prior
@dataclasses.dataclass(frozen=True)
class DICE(Prior):
  """DICE's prior: the previous round's policy.

  ``log zeta = LP_prev``; ``s = LP - LP_prev``. The rounds (sampling from the
  previous policy, implicit-reward labelling) are ``DiceRounds``.
  """
  name: ClassVar[str] = "dice"
  requires: ClassVar[tuple[str, ...]] = ("prev_logps",)

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    return PriorOutput(masked_sum(stats.logps - stats.prev_logps, stats.mask), {})


@inputs.register_input("prev_logps")
def previous_policy_logps(env, prior) -> inputs.Provider:
  """``prev_logps``: token log-probs of the frozen model ``previous`` (the
  previous round's policy; the reference in round 0)."""
  del env, prior
  return inputs.Provider(lambda ctx: ctx.frozen_logps("previous", stop_gradient_logits=True),
                         frozen=("previous",))


def select_pairs(scores: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
  """DICE's length-regularised choice among K samples per prompt.

  ``chosen = argmax_k (score - a |y|)``, ``rejected = argmin_k`` of the same,
  with ``a >= 0`` picked from a grid so that the mean lengths of the chosen and
  the rejected responses differ least (the smallest such ``a`` on ties).
  Returns ``(chosen index [N], rejected index [N], a)``.
  """
  scores = np.asarray(scores, np.float64)
  lengths = np.asarray(lengths, np.float64)
  rows = np.arange(len(scores))
  best = None
  for a in np.concatenate([[0.0], np.geomspace(1e-3, 10.0, 81)]):
    reg = scores - a * lengths
    hi, lo = reg.argmax(axis=1), reg.argmin(axis=1)
    gap = abs(lengths[rows, hi].mean() - lengths[rows, lo].mean())
    if best is None or gap < best[0] - 1e-12:
      best = (gap, hi, lo, float(a))
  return best[1], best[2], best[3]


def sample_dice_pairs(env, sampler, older, name: str, round_index: int, pairs: dict) -> str:
  """DICE round ``r >= 1``: K responses per prompt from the previous policy,
  scored by the implicit reward ``log pi_{r-1}(y) - log pi_{r-2}(y)`` (or the
  known reward, ``dice.labels='reward'``), the best and worst after DICE's
  length regularisation paired, and offline pairs of round 0 mixed in
  (``dice.offline_ratio``). Written as ``[chosen, rejected]`` rows."""
  config = env.config
  d = config.dice
  path = os.path.join(env.workdir, "pairs", f"dice_round{round_index}_samples.jsonl")
  if files.exists(path):
    return path
  prompts = synthetic.prompts(config.data.synthetic.seed, "train", config.num_pair_prompts)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 4), round_index)
  logging.info("DICE round %d: sampling %d x %d responses from %s", round_index,
               d.samples_per_prompt, len(prompts), name)
  samples = [sampling.sample(env, sampler, prompts, jax.random.fold_in(key, k))
             for k in range(d.samples_per_prompt)]
  texts = [[env.tokenizer.decode(s.responses[i]) for s in samples] for i in range(len(prompts))]
  lengths = np.stack([s.lengths for s in samples], axis=1)
  spec = config.data.synthetic.prompt_specificity
  if d.labels == "implicit":
    scores = np.stack([s.logps - sampling.sequence_logps(env, older, s) for s in samples],
                      axis=1)
  else:
    scores = np.array([[synthetic.reward(p, y, spec) for y in ys]
                       for p, ys in zip(prompts, texts)])
  hi, lo, a = select_pairs(scores, lengths)
  keep = [i for i in range(len(prompts)) if texts[i][hi[i]] != texts[i][lo[i]]]
  rows_p = [prompts[i] for i in keep]
  rows_r = [[texts[i][hi[i]], texts[i][lo[i]]] for i in keep]
  true_w = np.array([synthetic.reward(p, r[0], spec) for p, r in zip(rows_p, rows_r)])
  true_l = np.array([synthetic.reward(p, r[1], spec) for p, r in zip(rows_p, rows_r)])
  n_new = len(rows_p)
  n_off = 0
  if d.offline_ratio > 0:
    n_off = int(round(n_new * d.offline_ratio / (1.0 - d.offline_ratio)))
    offline = offline_pairs(env, n_off, pairs)
    n_off = len(offline)
    rows_p += [p for p, _ in offline]
    rows_r += [r for _, r in offline]
  stats_row = {"length_coef": a, "pairs_new": n_new, "pairs_offline": n_off,
               "pairs_identical_dropped": len(prompts) - n_new,
               "true_reward_chosen": float(true_w.mean()) if n_new else float("nan"),
               "true_reward_rejected": float(true_l.mean()) if n_new else float("nan"),
               "label_accuracy_vs_true_reward": float(np.mean(true_w > true_l)) if n_new
               else float("nan"),
               "length_chosen": float(np.mean(lengths[np.arange(len(hi)), hi])),
               "length_rejected": float(np.mean(lengths[np.arange(len(lo)), lo]))}
  env.writer.write(f"dice/round{round_index}", 0, stats_row)
  logging.info("DICE round %d pairs: %s", round_index, stats_row)
  return sampling.write_samples(env, path, rows_p, rows_r, {"model": name, "labels": d.labels})


def offline_pairs(env, n: int, pairs: dict) -> list[tuple[str, list[str]]]:
  """The first ``n`` labelled pairs of round 0's training data (``pairs``: its
  source), DICE's replay."""
  source = pipeline.builder_from_config(env.data_config(**pairs), build=False)
  data = source.as_data_source(split="train")
  text = lambda x: x.decode() if isinstance(x, bytes) else str(x)
  out = []
  for i in range(min(n, len(data))):
    ex = data[i]
    out.append((text(ex["prompt"]), [text(ex["chosen"]), text(ex["rejected"])]))
  return out


class DiceRounds(recipes.Procedure):
  """``dice.rounds`` rounds; round ``r``'s prior is the round ``r-1`` policy
  and its pairs are sampled from it (``sample_dice_pairs``), scored against
  the round ``r-2`` policy (the reference before that)."""
  history = 2

  def num_rounds(self, config) -> int:
    return config.dice.rounds

  def frozen_models(self, round_index, ref_params, policies):
    del round_index
    return {"previous": policies[-1] if policies else ref_params}

  def round_pairs(self, env, round_index, pairs, ref_params, policies):
    if round_index == 0:
      return pairs
    previous = policies[-1]
    older = policies[-2] if len(policies) > 1 else ref_params
    path = sample_dice_pairs(env, previous, older, f"policy_round{round_index - 1}",
                             round_index, pairs)
    return {"samples_path": path, "labels": "given"}


def default_config() -> ml_collections.ConfigDict:
  """``config.dice``: DICE's rounds (see the module docstring)."""
  return ml_collections.ConfigDict({
      "rounds": 1, "labels": "implicit", "samples_per_prompt": 4, "offline_ratio": 0.5})


def validate_config(config) -> None:
  """``config.dice``'s rules (every run); raises ``ConfigError``."""
  d = config.dice
  if not isinstance(d.rounds, int) or d.rounds < 1:
    config_lib.fail("dice.rounds", f"must be a positive int; got {d.rounds!r}")
  if d.rounds > 1 and config.prior.name != "dice":
    config_lib.fail("dice.rounds", f"{d.rounds} rounds are DICE's procedure; prior "
                    f"{config.prior.name!r} trains one round")
  if d.labels not in ("implicit", "reward"):
    config_lib.fail("dice.labels", f"must be 'implicit' or 'reward'; got {d.labels!r}")
  if not isinstance(d.samples_per_prompt, int) or d.samples_per_prompt < 2:
    config_lib.fail("dice.samples_per_prompt",
                    f"must be an int >= 2; got {d.samples_per_prompt!r}")
  if not 0.0 <= d.offline_ratio < 1.0:
    config_lib.fail("dice.offline_ratio", f"must be in [0, 1); got {d.offline_ratio}")


def validate_run(config, prior, batch_shards, process_count) -> None:
  """DICE's rules when it is the run's prior; raises ``ConfigError``."""
  del prior, batch_shards, process_count
  if config.dice.rounds > 1 and config.data.source != "synthetic":
    config_lib.fail("dice.rounds", "rounds after the first sample new pairs labelled by the "
                    "synthetic task's known reward; with data.source='files' use rounds=1")


config_lib.register_config_block("dice", default_config, validate_config)
recipes.register_recipe("dice", recipes.Recipe(procedure=DiceRounds(), validate=validate_run))
