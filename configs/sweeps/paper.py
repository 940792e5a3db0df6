"""The full study: every algorithm, 5 alphas, 3 training seeds, both tasks,
at the single-run configs' scale (300 policy updates of 32 pairs, 512
evaluation prompts), evaluated every 50 steps.

    python -m midpo.sweep --config=configs/sweeps/paper.py --workdir=workdirs/sweep_paper \\
        --workers=2

Its cost, estimated from the quick sweep's measured per-run cost, is in
BENCHMARKS.md; on a 2-core CPU it is about 7 hours (estimated), so run it on an
accelerator or a larger machine.

Like for like: the same labels for every algorithm (no length-biased
annotator: R-DPO's length-biased study is its own config), and the same
number of policy updates: DICE's two rounds get half the steps each.
"""

import ml_collections

SUM_OF_LOGPROBS_ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0)
SIMPO_ALPHAS = (0.5, 1.0, 2.0, 4.0, 8.0)
STEPS = 300

TASKS = {
    "sentiment": {},
    "domain_lexicon": {"data": {"synthetic": {"prompt_specificity": 1.0}}},
}

COMMON = {
    "data": {"synthetic": {"length_bias": 0.0}},
    "train": {"steps": STEPS},
    "eval": {"every": 50, "mutual_information": "final"},
    "checkpoint_every": 50,
}


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "paper"
  c.seeds = (0, 1, 2)
  c.tasks = TASKS
  algorithms = {name: {"config": f"{name}.py", "alphas": SUM_OF_LOGPROBS_ALPHAS}
                for name in ("dpo", "hdpo", "rdpo", "tdpo", "tis_dpo", "sparsepo")}
  algorithms.update({
      "simpo": {"config": "simpo.py", "alphas": SIMPO_ALPHAS},
      # Two rounds of half the steps: DICE's policy updates equal the others'.
      "dice": {"config": "dice.py", "alphas": SUM_OF_LOGPROBS_ALPHAS,
               "overrides": {"train": {"steps": STEPS // 2}}},
      "mi": {"config": "joint_prior.py", "alphas": SUM_OF_LOGPROBS_ALPHAS},
      "constrained": {"config": "constrained_prior.py", "alphas": SUM_OF_LOGPROBS_ALPHAS},
      "ema": {"config": "ema_prior.py", "alphas": SUM_OF_LOGPROBS_ALPHAS},
  })
  c.algorithms = algorithms
  c.compare_to = "dpo"
  c.compare_alpha = 0.1
  c.overrides = COMMON
  return c
