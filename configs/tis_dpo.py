"""TIS-DPO ("Token-level Importance Sampling for DPO With Estimated Weights", 2024).

DPO with per-token importance weights from two contrastive models, as the
paper estimates them: ``pi_plus`` DPO-trained on the pairs and ``pi_minus`` on
the reversed pairs (each for ``train.steps`` steps from the reference), the
raw score ``log pi_plus - log pi_minus`` mapped to [0.7, 1.3] by the released
threshold-and-scale transform. On the known-reward task the true per-token
reward gives the weights exactly: ``--config.tis.weights=oracle
--config.data.token_weights=oracle``. The KL term is off, as in the released
config (``--config.prior.token_level=True`` turns it on). beta = 0.1.
"""

from midpo import config_base as default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.prior = default.prior_config("tis_dpo", token_level=False, kl_coef=0.5)
  c.loss.alpha = 0.1
  c.tis.weights = "contrastive"
  c.tis.transform = "threshold_and_scale"
  return c
