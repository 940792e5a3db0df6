"""H-DPO ("Entropy Controllable Direct Preference Optimization", 2024).

DPO with the policy's log-likelihood scaled by eta inside the ratio:
eta < 1 sharpens the policy (lower entropy), eta = 1 is DPO. No official
code was found; eta = 0.95 is a moderate sharpening, beta as DPO's.
"""

from midpo import config_base as default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.prior = default.prior_config("hdpo", eta=0.95)
  c.loss.alpha = 0.1
  return c
