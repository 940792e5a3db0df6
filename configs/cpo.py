"""CPO ("Contrastive Preference Optimization", 2024).

The reference-free sigmoid loss on the sequence log-probs plus the chosen
responses' NLL (behaviour cloning) with weight 1: CPO's and TRL's defaults,
beta = 0.1 and cpo_alpha = 1.0. In the framework, a flat prior under the
constraint NLL(y_w) <= eps (``midpo.algorithms.cpo``). Override
``--config.prior.reward_alpha`` for AlphaPO's reward shape (TRL's ``alpha``).
"""

from midpo import config_base as default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.prior = default.prior_config("cpo")
  c.loss.alpha = 0.1
  c.loss.nll_weight = 1.0          # TRL's cpo_alpha
  c.loss.nll_normalization = "token"
  return c
