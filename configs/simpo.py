"""SimPO ("Simple Preference Optimization with a Reference-Free Reward", 2024).

Length-normalised implicit reward with a target margin and no reference
model: the official defaults beta = 2.0 and gamma/beta = 0.25 (gamma = 0.5).
The SFT model is only the starting point (and the sampler of the pairs).
"""

from midpo import config_base as default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.prior = default.prior_config("simpo", gamma=0.5)
  c.loss.alpha = 2.0
  return c
