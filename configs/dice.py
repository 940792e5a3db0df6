"""DICE ("Bootstrapping Language Models with DPO Implicit Rewards", 2024).

Rounds of DPO in which each round's policy becomes the next round's prior:
round r samples several responses per prompt from the round r-1 policy,
scores them with DPO's implicit reward log pi_{r-1}(y) - log pi_{r-2}(y),
pairs the best and the worst after the length regularisation (its coefficient
chosen to make the chosen and rejected lengths agree), mixes in offline pairs
of round 0 (replay ratio 0.5), and trains with pi_{r-1} as the prior. The
official scripts run 2 rounds with beta = 0.1. Round 0 is DPO on pairs sampled
from the SFT model. ``--config.dice.labels=reward`` labels with the known
reward instead; 4 samples per prompt is our choice.
"""

from midpo import config_base as default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.prior = default.prior_config("dice")
  c.loss.alpha = 0.1
  c.dice.rounds = 2
  c.dice.labels = "implicit"
  c.dice.samples_per_prompt = 4
  c.dice.offline_ratio = 0.5
  return c
