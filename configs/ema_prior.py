"""The cheap proxy of the mutual-information prior: an EMA of the policy's weights.

``zeta`` is the policy's own architecture with weights
``phi <- decay phi + (1 - decay) theta`` after every policy step, starting
from the reference (TR-DPO's soft update of the reference, here as the prior).
No sampling, no second network: one extra forward pass per step. Held-out
diagnostics every 25 steps, with DPO trained alongside for comparison.
"""

from midpo import config_base as default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.prior = default.prior_config("ema", decay=0.99)
  c.loss.alpha = 0.1
  c.train.diagnostics_every = 25
  c.baselines = ("dpo",)
  return c
