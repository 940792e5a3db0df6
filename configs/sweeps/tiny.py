"""A sweep small enough to try the driver in a few minutes on a laptop CPU
(and the sweep tests' own config): DPO at two alphas and SimPO at one, two
training seeds, a tiny model trained for a few steps.

    python -m midpo.sweep --config=configs/sweeps/tiny.py --workdir=workdirs/sweep_tiny

Its numbers mean nothing (a few steps of training on a small dataset); use
``configs/sweeps/quick.py`` for results.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "tiny"
  c.seeds = (0, 1)
  c.tasks = {"sentiment": {}}
  c.algorithms = {
      "dpo": {"config": "dpo.py", "alphas": (0.1, 0.3)},
      "simpo": {"config": "simpo.py", "alphas": (2.0,)},
  }
  c.compare_to = "dpo"
  c.compare_alpha = 0.1
  c.overrides = {
      "data": {"synthetic": {"num_sft": 256, "num_train": 64, "num_test": 64,
                             "length_bias": 0.0},
               "batch_size": 8, "max_length": 64, "num_buckets": 1},
      "num_pair_prompts": 64,
      "sft": {"steps": 12},
      "train": {"steps": 8},
      "eval": {"num_prompts": 16, "batch_size": 16, "max_new_tokens": 12, "num_pairs": 16,
               "every": 4, "mutual_information": "final", "mi_samples": 32, "mi_steps": 4,
               "mi_batch_size": 8},
      "log_every": 4,
      "checkpoint_every": 4,
  }
  return c
