"""DICE ("Bootstrapping Language Models with DPO Implicit Rewards", 2024).

Rounds of DPO in which each round's policy becomes the next round's prior:
round r samples new pairs from the round r-1 policy, labels them (here with
the known reward) and trains with that policy as the prior. The official
scripts run 2 rounds with beta = 0.1. Round 0 samples from the SFT model.
"""

from configs import default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.prior = default.prior_config("dice")
  c.loss.alpha = 0.1
  c.rounds = 2
  return c
