"""DPO ("Direct Preference Optimization", 2023), on the known-reward task.

The paper's setting: beta = 0.1, pairs sampled from the SFT model and labelled
by the (here known) reward, the reference = the SFT model. Scaled down for a
CPU; ``--config=configs/dpo.py:full`` for the full-size variant.
"""

from midpo import config_base as default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.prior = default.prior_config("dpo")
  c.loss.alpha = 0.1
  return c
