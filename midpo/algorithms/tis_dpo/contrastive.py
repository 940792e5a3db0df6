"""TIS-DPO's trainer side: its contrastive models and its token weights.

The paper estimates the weights with two contrastive models, each DPO-trained
from the reference for ``train.steps`` steps: ``pi_plus`` on the pairs and
``pi_minus`` on the reversed pairs (or loaded from ``tis.plus_checkpoint`` /
``tis.minus_checkpoint``). A token's raw score is ``log pi_plus - log pi_minus``
on chosen responses and its negative on rejected ones, mapped to weights by
``tis.transform`` (``weights.tis_weights``). ``tis.weights='oracle'`` reads
the data's weights instead (the synthetic task's true per-token reward,
``data.token_weights='oracle'``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections

from midpo import files
from midpo.algorithms.tis_dpo import weights as weights_lib
from midpo.core import losses, priors
from midpo.training import config as config_lib
from midpo.training import env as env_lib
from midpo.training import inputs, preference, recipes

WEIGHT_SOURCES = ("contrastive", "oracle")


@inputs.register_input("token_weights")
def token_weights(env, prior) -> inputs.Provider:
  """``token_weights``: for TIS-DPO with ``tis.weights='contrastive'``, from
  the contrastive models ``plus`` and ``minus``; otherwise (TIS-DPO's oracle
  weights, or any other prior that reads them) the batch's ``token_weights``."""
  tis = env.config.tis
  if tis.weights != "contrastive" or prior.name != "tis_dpo":
    return inputs.Provider(lambda ctx: ctx.row_field("token_weights")[:, 1:],
                           batch_fields=("token_weights",))

  def weights(ctx: inputs.InputContext, lp: dict):
    sign = jnp.where(ctx.role_B == 0, 1.0, -1.0)[:, None]
    raw = sign * (lp["plus"] - lp["minus"]) * ctx.mask_BxT
    return jax.lax.stop_gradient(weights_lib.tis_weights(raw, ctx.mask_BxT, tis.transform))

  def compute(ctx: inputs.InputContext):
    # Cached (tis.cache_weights, in training): read once-computed log-probs; else compute.
    return weights(ctx, {n: (ctx.row_field(f"{n}_logps")[:, 1:] if f"{n}_logps" in ctx.batch
                             else ctx.frozen_logps(n)) for n in ("plus", "minus")})

  cacheable = ("plus_logps", "minus_logps") if tis.cache_weights else ()
  return inputs.Provider(compute, frozen=("plus", "minus"), cacheable=cacheable)


class ContrastiveModels(recipes.Procedure):
  """One round against the reference, after training (or loading) the
  contrastive models ``plus`` and ``minus`` when the weights come from them."""

  def auxiliary_models(self, env, ref_params, pairs):
    config = env.config
    if config.tis.weights != "contrastive":
      return {}
    dpo = priors.make_prior("dpo")
    loss_config = losses.LossConfig(alpha=config.loss.alpha)
    models = {}
    for name, swap in (("plus", False), ("minus", True)):
      given = config.tis[f"{name}_checkpoint"]
      if given:
        models[name] = env_lib.restore_params(env, given, item="policy")
        continue
      models[name], _ = preference.run_preference_round(
          env, dpo, {"reference": ref_params}, ref_params, 0, pairs=pairs, stage=f"tis/{name}",
          directory=os.path.join(env.workdir, "tis", name), swap_roles=swap,
          loss_config=loss_config)
    return models


def default_config() -> ml_collections.ConfigDict:
  """``config.tis``: where TIS-DPO's token weights come from (see the module docstring)."""
  return ml_collections.ConfigDict({
      "weights": "contrastive", "transform": "threshold_and_scale",
      "plus_checkpoint": "", "minus_checkpoint": "",
      # The contrastive models' token log-probs computed once before the policy's training
      # (as train.reference='cached' does for the reference), not in every step.
      "cache_weights": False})


def validate_config(config) -> None:
  """``config.tis``'s rules (every run); raises ``ConfigError``."""
  tis = config.tis
  if tis.weights not in WEIGHT_SOURCES:
    config_lib.fail("tis.weights", f"must be 'contrastive' or 'oracle'; got {tis.weights!r}")
  if tis.transform not in weights_lib.TRANSFORMS:
    config_lib.fail("tis.transform", f"must be one of {weights_lib.TRANSFORMS}; got "
                    f"{tis.transform!r}")
  if not isinstance(tis.cache_weights, bool):
    config_lib.fail("tis.cache_weights", f"must be True or False; got {tis.cache_weights!r}")
  if tis.cache_weights and tis.weights != "contrastive":
    config_lib.fail("tis.cache_weights", "caches the contrastive models' log-probs; with "
                    f"tis.weights={tis.weights!r} there are none (set it False)")
  for key in ("plus_checkpoint", "minus_checkpoint"):
    if tis[key] and not files.isdir(tis[key]):
      config_lib.fail(f"tis.{key}", f"{tis[key]!r} is not a directory")


def validate_run(config, prior, batch_shards, process_count) -> None:
  """TIS-DPO's rules when it is the run's prior; raises ``ConfigError``."""
  del batch_shards, process_count
  if config.tis.weights == "oracle" and config.data.token_weights == "none":
    config_lib.fail("data.token_weights", f"prior {prior.name!r} with tis.weights='oracle' "
                    "reads the data's token weights; set 'oracle' (the synthetic task's "
                    "per-token reward)")


config_lib.register_config_block("tis", default_config, validate_config)
recipes.register_recipe("tis_dpo", recipes.Recipe(procedure=ContrastiveModels(),
                                                  validate=validate_run))
