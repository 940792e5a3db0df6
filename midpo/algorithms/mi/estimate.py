"""A post-hoc estimate of the mutual information a policy puts between prompt
and response, the quantity the 'mi' prior controls, for any policy.

The MI-DPO paper's Lemma 1: ``E_x KL(pi(.|x) || zeta)`` is smallest, and
equals the mutual information ``I(X; Y)`` under ``p(x) pi(y|x)``, at the
policy's marginal ``zeta*(y) = sum_x p(x) pi(y|x)``. Estimated here with a
fresh response model ``zeta_hat`` (the 'mi' prior's network, unconditional)
fit by maximum likelihood to ``eval.mi_samples`` responses of the policy on
prompts of their own (the synthetic task's 'prior' split, from index
``FIT_PROMPTS_START``, which no training round reaches), then scored on the
evaluation's samples (one response per held-out prompt, with its
``log pi(y|x)``):

    I_hat = mean over evaluation samples of [log pi(y|x) - log zeta_hat(y)]

with its standard error over samples. For any ``zeta_hat``,
``E[log pi(y|x) - log zeta_hat(y)] = I(X; Y) + KL(zeta* || zeta_hat)``, so
``I_hat`` estimates an upper bound whose slack is how well a fixed budget
fits the marginal. Every policy gets the same network, sample size, steps,
prompts and seed, so the estimates are comparable across policies, not exact.

Config (``config.eval``): ``mutual_information`` ('none' | 'final' | 'every':
at the end only, or at every evaluated step), ``reference_mutual_information``
(the reference's too: a sweep estimates it once per seed instead), ``mi_samples``, ``mi_network``,
``mi_steps`` (maximum-likelihood steps), ``mi_batch_size``, ``mi_learning_rate``,
``mi_packing`` (the fit on packed rows, ``midpo.data.packing``; the padded fit to float32
rounding).
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from midpo import sampling
from midpo.algorithms.mi import response_model, rounds
from midpo.core import priors
from midpo.data import synthetic
from midpo.models import config as model_config_lib
from midpo.training import config as config_lib
from midpo.training import env as env_lib
from midpo.training import optim

MODES = ("none", "final", "every")


FIT_PROMPTS_START = 10_000_000


def fit_prompts(env: env_lib.Env) -> list[str]:
  """The prompts whose responses ``zeta_hat`` is fit to."""
  return synthetic.prompts(env.config.data.synthetic.seed, "prior", env.config.eval.mi_samples,
                           start=FIT_PROMPTS_START)


def mutual_information(env: env_lib.Env, fit_samples: sampling.Samples,
                       eval_samples: sampling.Samples, seed: int) -> dict:
  """``I_hat`` (nats) of the policy that drew both sets of samples (one
  response per prompt, temperature 1): ``zeta_hat`` fit to ``fit_samples``,
  scored on ``eval_samples``, with the standard error over ``eval_samples``.

  Returns ``{"value", "se", "nll_per_token", "nll_per_token_fit",
  "num_samples"}`` (``zeta_hat``'s NLL per token on the evaluation's and on
  its own samples), or ``{"skipped": reason}`` when the samples were not drawn
  at temperature 1 (their ``log pi(y|x)`` is then not the policy's).
  """
  e = env.config.eval
  if e.temperature != 1.0:
    return {"skipped": f"the samples are at eval.temperature={e.temperature}, not 1"}
  prior = priors.make_prior("mi", network=e.mi_network, conditional=False)
  model = rounds.make_response_model(env, prior)
  net = rounds.network_config(env, prior)
  tx = optim.constant_adamw(e.mi_learning_rate, 0.0, 1.0)
  packed = bool(e.mi_packing)
  nll = response_model.packed_nll if packed else response_model.nll
  step = env.compiled(("mi_estimate_step", e.mi_network, e.mi_learning_rate, packed), lambda: (
      response_model.make_mle_step(functools.partial(nll, model), tx)))
  seq_logps = env.compiled(
      ("mi_estimate_logps", e.mi_network, packed),
      lambda: (jax.jit(model.packed_sequence_logps, static_argnums=2) if packed
               else jax.jit(model.sequence_logps)))
  bsz = e.mi_batch_size
  if packed:  # the responses packed into rows (midpo.data.packing), as the 'mi' prior's fit
    fit, scored = rounds.Packer(env, model, fit_samples), rounds.Packer(env, model, eval_samples)
    batch_of = fit.batch
    logps_of = lambda packer, p: packer.sequence_logps(seq_logps, p, bsz)
    tokens_of = lambda packer: sum(len(q) - s for q, s in zip(packer.sequences, packer.starts))
  else:  # rows as long as the longest sample (a multiple of 16: few shapes to compile)
    fit = rounds.sample_rows(env, fit_samples, multiple=16)
    scored = rounds.sample_rows(env, eval_samples, multiple=16)
    batch_of = functools.partial(rounds.global_rows, env, fit)
    logps_of = lambda rows, p: rounds.batched_logps(env, seq_logps, p, rows, bsz)
    tokens_of = lambda rows: rows["response_mask"].sum()
  params = env_lib.init_params(env, seed, net)
  opt = optim.init_opt(tx, params, env.mesh)
  rng = np.random.default_rng(seed)
  n = len(fit_samples.prompts)
  order = np.concatenate([rng.permutation(n) for _ in range(-(-e.mi_steps * bsz // n) + 1)])
  for j in range(e.mi_steps):
    env_lib.check_stop(env, f"the mutual-information estimate's fit ({j} of {e.mi_steps} steps)")
    params, opt, _ = step(params, opt, batch_of(order[j * bsz:(j + 1) * bsz]))
  log_zeta = logps_of(scored, params)
  log_zeta_fit = logps_of(fit, params)
  m, se = sampling.mean_se(eval_samples.logps - log_zeta)
  return {"value": m, "se": se,
          "nll_per_token": float(-log_zeta.sum() / tokens_of(scored)),
          "nll_per_token_fit": float(-log_zeta_fit.sum() / tokens_of(fit)),
          "num_samples": len(eval_samples.prompts)}


def default_config() -> ml_collections.ConfigDict:
  """The estimator's keys of ``config.eval`` (see the module docstring)."""
  return ml_collections.ConfigDict({
      "mutual_information": "final", "reference_mutual_information": True,
      "mi_samples": 1024, "mi_network": "micro", "mi_steps": 100,
      "mi_batch_size": 64, "mi_learning_rate": 3e-3,
      # The fit's responses packed into rows (as train.prior_packing), or padded (False).
      "mi_packing": True})


def validate_config(config) -> None:
  """The estimator's config rules."""
  e = config.eval
  if e.mutual_information not in MODES:
    config_lib.fail("eval.mutual_information", f"must be one of {MODES}; got "
                    f"{e.mutual_information!r}")
  if config.data.source == "files" and "eval" in config.stages and (
      e.mutual_information != "none" or e.reference_mutual_information):
    config_lib.fail("eval.mutual_information", "the estimate fits zeta* on the synthetic "
                    "task's prompts; with data.source='files' set it to 'none' and "
                    "eval.reference_mutual_information=False (configs/own_data.py does)")
  if not isinstance(e.mi_packing, bool):
    config_lib.fail("eval.mi_packing", f"must be True or False; got {e.mi_packing!r}")
  for key in ("mi_samples", "mi_steps", "mi_batch_size"):
    if not isinstance(e[key], int) or e[key] < 1:
      config_lib.fail(f"eval.{key}", f"must be a positive int; got {e[key]!r}")
  if not e.mi_learning_rate > 0:
    config_lib.fail("eval.mi_learning_rate", f"must be > 0; got {e.mi_learning_rate}")
  try:
    model_config_lib.get_config(e.mi_network)
  except ValueError as err:
    config_lib.fail("eval.mi_network", str(err))


config_lib.register_config_block("eval", default_config, validate_config)
