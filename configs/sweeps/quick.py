"""The quick study: finishes on a 2-core laptop CPU in under an hour.

    python -m midpo.sweep --config=configs/sweeps/quick.py --workdir=workdirs/sweep_quick

DPO, the learned mutual-information prior ('mi', ``joint_prior.py``), the
learned constrained prior and two published variants (SimPO, reference-free
with its own alpha scale; R-DPO, with its length penalty, on the same labels
as the others), each at 3 alphas log-spaced around its paper's default, on 3
training seeds and both built-in tasks:
'sentiment' (the reward hardly depends on the prompt) and 'domain_lexicon'
(each domain likes its own half of the sentiment words,
``prompt_specificity = 1``), so that an information penalty must cost reward.

Like for like: every run trains on the same labels (no length-biased
annotator), from its seed's SFT reference and pairs, for the same number of
policy updates, evaluated every ``eval.every`` steps on the same prompts.
Scaled down from the single-run configs for time: 150 policy steps of 32
pairs, evaluated at steps 75 and 150 on 256 prompts and 128 pairs, the
mutual-information estimate at the end. ``configs/sweeps/paper.py`` is the
full study (every algorithm, TDPO and the other token-level priors included).
"""

import ml_collections

# Log-spaced around each paper's default (DPO's beta = 0.1; SimPO's beta = 2).
SUM_OF_LOGPROBS_ALPHAS = (0.03, 0.1, 0.3)
SIMPO_ALPHAS = (1.0, 2.0, 4.0)

TASKS = {
    "sentiment": {},
    "domain_lexicon": {"data": {"synthetic": {"prompt_specificity": 1.0}}},
}

# Every run: the same labels, budget and evaluation.
COMMON = {
    "data": {"synthetic": {"length_bias": 0.0}},
    "train": {"steps": 150},
    "eval": {"every": 75, "num_prompts": 256, "num_pairs": 128, "mutual_information": "final",
             "mi_samples": 512},
    "checkpoint_every": 75,
    "log_every": 25,
}


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "quick"
  c.seeds = (0, 1, 2)
  c.tasks = TASKS
  c.algorithms = {
      "dpo": {"config": "dpo.py", "alphas": SUM_OF_LOGPROBS_ALPHAS},
      "mi": {"config": "joint_prior.py", "alphas": SUM_OF_LOGPROBS_ALPHAS},
      "constrained": {"config": "constrained_prior.py", "alphas": SUM_OF_LOGPROBS_ALPHAS},
      "simpo": {"config": "simpo.py", "alphas": SIMPO_ALPHAS},
      "rdpo": {"config": "rdpo.py", "alphas": SUM_OF_LOGPROBS_ALPHAS},
  }
  c.compare_to = "dpo"
  c.compare_alpha = 0.1
  c.overrides = COMMON
  return c
