"""SparsePO ("Controlling Preference Alignment of LLMs via Sparse Token Masks", 2024).

Token masks on the reward and on the KL, from a learned head over the
reference's hidden states of every layer; the head is the prior's own
parameters, trained jointly with the policy by the same loss (its own optax
state), with the released defaults: beta = 0.1, mask dropout 0.01, mask
weight decay 0.01, one head shared by both masks.
"""

from midpo import config_base as default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.prior = default.prior_config("sparsepo", mask_source="head", mask_on_reward=True,
                                 mask_on_kl=True, shared_head=True, mask_dropout=0.01,
                                 l1_reward=0.0, l1_kl=0.0)
  c.loss.alpha = 0.1
  c.train.prior_update = "joint"
  c.train.prior_weight_decay = 0.01
  return c
