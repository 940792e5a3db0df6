"""ORPO ("ORPO: Monolithic Preference Optimization without Reference Model", 2024).

``NLL(y_w) + lambda * -log sigmoid(log odds ratio)`` on per-token-mean
probabilities, with no reference; lambda = 0.1, TRL's ``ORPOConfig.beta``
default. In the framework, the log-odds prior under the constraint
NLL(y_w) <= eps (``midpo.algorithms.orpo``): ``loss.alpha = 1`` makes the
logit ORPO's log odds ratio, ``loss.loss_weights = (lambda,)`` weighs it.
The NLL is the chosen response's (TRL and the authors' code add the prompt's
tokens to it).
"""

from midpo import config_base as default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.prior = default.prior_config("orpo")
  c.loss.alpha = 1.0
  c.loss.loss_weights = (0.1,)     # ORPO's lambda (TRL's beta)
  c.loss.nll_weight = 1.0
  c.loss.nll_normalization = "token"
  return c
