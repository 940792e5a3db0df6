"""TDPO ("Token-level Direct Preference Optimization", 2024).

DPO with the sequential KL(reference || policy) in the prior. TDPO2 (the
authors' function default: stop-gradient on the chosen side's KL, alpha 0.5)
with beta = 0.1; ``--config.prior.version=1`` for TDPO1 (which the authors'
released yaml runs). Needs the reference's full distribution at every token,
so the reference forward runs in the step.
"""

from midpo import config_base as default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.prior = default.prior_config("tdpo", version=2, kl_coef=0.5)
  c.loss.alpha = 0.1
  return c
