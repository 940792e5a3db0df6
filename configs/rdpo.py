"""R-DPO ("Disentangling Length from Quality in Direct Preference Optimization", 2024).

DPO plus a length term on the logit, length_coef * (|y_w| - |y_l|) (the
paper's alpha; its grid is 0.05 to 1.0, beta 0.01 to 0.1). The annotator of
this config has a length bias, so that there is length to exploit.
"""

from midpo import config_base as default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.prior = default.prior_config("rdpo", length_coef=0.05)
  c.loss.alpha = 0.1
  c.data.synthetic.length_bias = 0.1
  return c
