"""Validation of a run's config, and the objects it describes.

``validate(config)`` runs once at start and fails within seconds with an error
that names the key and the allowed values, before any data is built or any
model compiled.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from midpo import losses, priors, token_weights
from midpo.data import pipeline
from midpo.models import config as model_config

STAGES = ("sft", "preference", "eval")
PAIRS_FROM = ("dataset", "reference")
REFERENCE_MODES = ("online", "cached")
PRIOR_UPDATES = ("joint", "alternate")


class ConfigError(ValueError):
  """A config value is wrong; the message names the key."""


def _fail(key: str, msg: str):
  raise ConfigError(f"config.{key}: {msg}")


def make_prior(config) -> priors.Prior:
  """``config.prior`` -> a Prior; only the fields the prior defines are passed."""
  name = config.prior.name
  try:
    cls = priors.prior_class(name)
  except ValueError as e:
    _fail("prior.name", str(e))
  fields = {f.name for f in dataclasses.fields(cls)}
  hp = {k: v for k, v in config.prior.items() if k != "name" and v is not None}
  unused = sorted(set(hp) - fields)
  if unused:
    _fail(f"prior.{unused[0]}", f"is set but prior {name!r} has no such hyperparameter "
          f"(it takes {sorted(fields) or 'none'})")
  try:
    return priors.make_prior(name, **hp)
  except ValueError as e:
    _fail("prior", str(e))


def make_loss_config(config) -> losses.LossConfig:
  try:
    return losses.LossConfig(**dict(config.loss))
  except (ValueError, TypeError) as e:
    _fail("loss", str(e))


def mesh_shape(config, num_devices: int) -> dict[str, int]:
  """Resolves ``-1`` axes; the product must equal the device count."""
  shape = {k: int(config.mesh[k]) for k in ("data", "fsdp", "tensor")}
  free = [k for k, v in shape.items() if v == -1]
  if len(free) > 1:
    _fail("mesh", f"at most one axis may be -1; got {shape}")
  for k, v in shape.items():
    if v == 0 or v < -1:
      _fail(f"mesh.{k}", f"must be a positive size or -1; got {v}")
  fixed = 1
  for v in shape.values():
    if v != -1:
      fixed *= v
  if free:
    if num_devices % fixed:
      _fail("mesh", f"{shape} cannot fill {num_devices} devices ({num_devices} is not a "
            f"multiple of {fixed})")
    shape[free[0]] = num_devices // fixed
  total = shape["data"] * shape["fsdp"] * shape["tensor"]
  if total != num_devices:
    _fail("mesh", f"data x fsdp x tensor = {total} does not match the {num_devices} devices")
  return shape


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             process_count: int | None = None) -> None:
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  stages = tuple(config.stages)
  for s in stages:
    if s not in STAGES:
      _fail("stages", f"unknown stage {s!r}; allowed: {STAGES}")
  if list(stages) != sorted(stages, key=STAGES.index):
    _fail("stages", f"stages run in the order {STAGES}; got {stages}")
  if config.pairs_from not in PAIRS_FROM:
    _fail("pairs_from", f"must be one of {PAIRS_FROM}; got {config.pairs_from!r}")
  if config.pairs_from == "reference" and config.data.source != "synthetic":
    _fail("pairs_from", "'reference' pairs are labelled by the synthetic task's known reward; "
          "use 'dataset' with data.source='files'")
  if "eval" in stages and config.data.source != "synthetic":
    _fail("stages", "the 'eval' stage samples the synthetic task's held-out prompts and scores "
          "them with its known reward; with data.source='files' leave it out")
  if config.train.reference not in REFERENCE_MODES:
    _fail("train.reference", f"must be one of {REFERENCE_MODES}; got {config.train.reference!r}")
  if config.train.prior_update not in PRIOR_UPDATES:
    _fail("train.prior_update",
          f"must be one of {PRIOR_UPDATES}; got {config.train.prior_update!r}")
  if not isinstance(config.rounds, int) or config.rounds < 1:
    _fail("rounds", f"must be a positive int; got {config.rounds!r}")
  if config.rounds > 1 and config.data.source != "synthetic":
    _fail("rounds", "rounds after the first sample new pairs labelled by the synthetic task's "
          "known reward; with data.source='files' use rounds=1")
  if config.dice.labels not in ("implicit", "reward"):
    _fail("dice.labels", f"must be 'implicit' or 'reward'; got {config.dice.labels!r}")
  if not isinstance(config.dice.samples_per_prompt, int) or config.dice.samples_per_prompt < 2:
    _fail("dice.samples_per_prompt", f"must be an int >= 2; got {config.dice.samples_per_prompt!r}")
  if not 0.0 <= config.dice.offline_ratio < 1.0:
    _fail("dice.offline_ratio", f"must be in [0, 1); got {config.dice.offline_ratio}")
  for key in ("sft.steps", "train.steps", "train.policy_steps_per_round",
              "train.prior_steps_per_round", "train.prior_samples", "train.prior_warmup_samples", "train.prior_batch_size",
              "train.prior_warmup_steps", "train.diagnostics_every", "train.prior_eval_pairs",
              "checkpoint_every", "log_every",
              "max_checkpoints", "eval.num_prompts", "eval.batch_size", "eval.max_new_tokens"):
    section, name = key.split(".") if "." in key else (None, key)
    value = config[section][name] if section else config[name]
    zero_ok = key.endswith("steps") or key.endswith("_every")
    if not isinstance(value, int) or value < (0 if zero_ok else 1):
      _fail(key, f"must be a {'non-negative' if zero_ok else 'positive'} int; "
            f"got {value!r}")
  for key in ("sft.learning_rate", "train.learning_rate", "train.prior_learning_rate"):
    section, name = key.split(".")
    if not config[section][name] > 0:
      _fail(key, f"must be > 0; got {config[section][name]}")
  if config.model.hf_path and not os.path.isdir(config.model.hf_path):
    _fail("model.hf_path", f"{config.model.hf_path!r} is not a directory")
  if config.sft.checkpoint and not os.path.isdir(config.sft.checkpoint):
    _fail("sft.checkpoint", f"{config.sft.checkpoint!r} is not a directory")
  if "sft" not in stages and "preference" in stages and not (
      config.sft.checkpoint or config.model.hf_path):
    _fail("stages", "without the 'sft' stage, set sft.checkpoint or model.hf_path for the "
          "reference")
  data = config.data.copy_and_resolve_references()
  if not data.data_dir:
    data.data_dir = "<workdir>/tfds"  # the trainer's default
  try:
    pipeline.validate_config(data)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  prior = make_prior(config)
  make_loss_config(config)
  if config.train.reference == "cached" and any(
      f in prior.required_fields() for f in ("kl_ref_policy", "kl_policy_ref", "ref_hidden")):
    _fail("train.reference", f"prior {prior.name!r} needs the reference's full distribution at "
          "every token; use 'online'")
  if prior.param_update == "mle":
    if config.data.source != "synthetic":
      _fail("prior.name", "prior 'mi' samples the policy on the synthetic task's held-out "
            "prompts ('prior' split); with data.source='files' use 'ema' or 'constrained'")
    if config.train.policy_steps_per_round < 1:
      _fail("train.policy_steps_per_round", "must be >= 1: the policy steps between two "
            "maximum-likelihood rounds of the 'mi' prior")
    for key in ("prior_samples", "prior_warmup_samples"):
      if config.train.prior_batch_size > config.train[key]:
        _fail("train.prior_batch_size", f"{config.train.prior_batch_size} is more than the "
              f"{config.train[key]} samples of a round (train.{key})")
    try:
      model_config.get_config(prior.network)
    except ValueError as e:
      _fail("prior.network", str(e))
  if config.train.collapse_margin < 0:
    _fail("train.collapse_margin", f"must be >= 0; got {config.train.collapse_margin}")
  for name in config.baselines:
    if name not in priors.registered_priors():
      _fail("baselines", f"unknown prior {name!r}; registered: {priors.registered_priors()}")
    if priors.make_prior(name).has_params or name in ("dice", "tis_dpo"):
      _fail("baselines", f"prior {name!r} needs parameters or models of its own; baselines "
            "are fixed priors that train on the run's pairs alone (e.g. 'dpo', 'simpo')")
  if config.tis.weights not in ("contrastive", "oracle"):
    _fail("tis.weights", f"must be 'contrastive' or 'oracle'; got {config.tis.weights!r}")
  if config.tis.transform not in token_weights.TRANSFORMS:
    _fail("tis.transform", f"must be one of {token_weights.TRANSFORMS}; got "
          f"{config.tis.transform!r}")
  for key in ("plus_checkpoint", "minus_checkpoint"):
    if config.tis[key] and not os.path.isdir(config.tis[key]):
      _fail(f"tis.{key}", f"{config.tis[key]!r} is not a directory")
  if prior.name == "tis_dpo" and config.tis.weights == "oracle" and (
      config.data.token_weights == "none"):
    _fail("data.token_weights", "prior 'tis_dpo' with tis.weights='oracle' reads the data's "
          "token weights; set 'oracle' (the synthetic task's per-token reward)")
  shards = config.data.get("num_shards", 0)
  if not isinstance(shards, int) or shards < 0:
    _fail("data.num_shards", f"must be an int >= 0; got {shards!r}")
  if shards and shards % process_count:
    _fail("data.num_shards", f"{shards} is not a multiple of the {process_count} processes")
  if shards and config.data.batch_size % (shards // process_count):
    _fail("data.batch_size", f"{config.data.batch_size} pairs per process do not split over "
          f"{shards // process_count} shards per process")
  shape = mesh_shape(config, num_devices)
  batch_shards = shape["data"] * shape["fsdp"]
  global_pairs = config.data.batch_size * process_count
  if global_pairs % batch_shards:
    _fail("data.batch_size", f"{global_pairs} pairs per step ({config.data.batch_size} per "
          f"process x {process_count} processes) do not divide over the mesh's "
          f"data x fsdp = {batch_shards} batch shards")
  if prior.param_update == "mle" and (
      config.train.prior_batch_size % (process_count * batch_shards)):
    _fail("train.prior_batch_size", f"{config.train.prior_batch_size} must divide over the "
          f"{process_count} processes and data x fsdp = {batch_shards} batch shards")
  if config.eval.batch_size * process_count % batch_shards:
    _fail("eval.batch_size", f"must divide over data x fsdp = {batch_shards} batch shards")
