"""The front door: the policy and a learned mutual-information prior, in alternation.

``python -m midpo.main --config=configs/joint_prior.py --workdir=workdirs/joint_prior``
runs, on a laptop CPU in minutes:

1. SFT of a tiny model on the known-reward task (the reference);
2. preference training with the 'mi' prior: ``zeta_phi``, a small language
   model over responses, tracks the policy's marginal ``sum_x p(x) pi(y|x)``
   (the paper's Lemma 1). Every round of 25 policy steps starts by sampling
   256 responses from the policy on fresh held-out prompts and taking 8
   maximum-likelihood steps of ``zeta_phi`` on them (two passes; the first
   round, which fits the reference's marginal from scratch, samples 2048 and
   takes 100 steps); the policy steps minimise the MI-DPO loss with
   ``log zeta_phi`` frozen;
3. DPO from the same reference, on the same pairs, with the same budget and
   seed (``baselines``);
4. evaluation: ``eval.json``'s ``table`` holds the true reward, KL to the
   reference, length and win rate of the reference, of DPO and of the
   joint-prior policy, with standard errors, also printed in the log.

Per-round diagnostics (stage 'prior' of ``metrics.jsonl``): the prior's NLL on
the fresh samples, the Monte-Carlo ``E_x KL(pi(.|x) || zeta)``, the held-out
MI-DPO loss under the learned prior and under each fixed prior, and the
collapse alarm.
"""

from midpo import config_base as default


def get_config(arg: str = ""):
  c = default.get_config(arg)
  c.prior = default.prior_config("mi", network="micro", conditional=False)
  c.loss.alpha = 0.1
  c.train.policy_steps_per_round = 25
  c.train.prior_steps_per_round = 8
  c.train.prior_warmup_samples = 2048
  c.train.prior_warmup_steps = 100
  c.train.prior_samples = 256
  c.train.prior_batch_size = 64
  c.train.prior_learning_rate = 3e-3
  c.train.diagnostics_every = 25
  c.baselines = ("dpo",)
  return c
