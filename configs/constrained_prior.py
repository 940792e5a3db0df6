"""A learnable prior in a bounded family, minimised jointly with the policy.

The paper's section 5.2 proposes optimising the prior zeta together with the
policy. Here zeta is the family
``log zeta = c_ref LR + c_pol sg(LP) + c_len |y| + c_kl sum KL(ref||policy)``
with each coefficient in a box (without the box, the prior alone separates the
pairs and the policy stops learning: see tests/test_constrained_prior.py).
The four coefficients have their own Adam state and jitted step, alternating
with the policy: 4 policy steps, then 1 prior step. Starts at DPO (1, 0, 0, 0).
"""

from midpo import config_base as default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.prior = default.prior_config(
      "constrained", ref_bounds=(0.0, 1.0), pol_bounds=(0.0, 0.5), len_bounds=(-0.5, 0.5),
      kl_bounds=(0.0, 0.0), init=(1.0, 0.0, 0.0, 0.0))
  c.loss.alpha = 0.1
  c.train.prior_update = "alternate"
  c.train.policy_steps_per_round = 4
  c.train.prior_steps_per_round = 1
  c.train.prior_learning_rate = 1e-2
  return c
