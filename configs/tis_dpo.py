"""TIS-DPO ("Token-level Importance Sampling for DPO With Estimated Weights", 2024).

DPO with per-token importance weights. The paper estimates the weights with
two contrastive models; on the known-reward task the true per-token reward
gives them exactly (``data.token_weights='oracle'``, mapped to [0.7, 1.3] by
the released threshold-and-scale transform). The KL term is off, as in the
released config (``--config.prior.token_level=True`` turns it on). beta = 0.1.
"""

from configs import default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.prior = default.prior_config("tis_dpo", token_level=False, kl_coef=0.5)
  c.loss.alpha = 0.1
  c.data.token_weights = "oracle"
  c.data.token_weight_transform = "threshold_and_scale"
  return c
