"""Validation of a run's config, and the objects it describes.

``validate(config)`` runs once at start and fails within seconds with an error
that names the key and the allowed values, before any data is built or any
model compiled. It checks the generic keys here; an algorithm's own rules
(its recipe's ``validate``) and its config block's (``register_config_block``)
live with the algorithm.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax
import ml_collections

from midpo import files
from midpo.core import losses, priors
from midpo.data import pipeline, sources
from midpo.models import hub

STAGES = ("sft", "preference", "eval")
PAIRS_FROM = ("dataset", "reference")
REFERENCE_MODES = ("online", "cached")
PRIOR_UPDATES = ("joint", "alternate")


class ConfigError(ValueError):
  """A config value is wrong; the message names the key."""


def _get(config, key: str):
  """``config``'s value at the dotted ``key``."""
  value = config
  for part in key.split("."):
    value = value[part]
  return value


def is_number(value) -> bool:
  """A real number (not a bool)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def fail(key: str, msg: str):
  """Raises ``ConfigError("config.<key>: <msg>")``."""
  raise ConfigError(f"config.{key}: {msg}")


# name -> (defaults() -> ConfigDict, validate(config) -> None)
_BLOCKS: dict[str, tuple[Any, Any]] = {}
# Run after the generic rules: validate(config, prior, batch_shards, process_count).
_RULES: list[Any] = []


def register_config_block(name: str, defaults, validate=None) -> None:
  """An algorithm's own block ``config.<name>``, or its keys of an existing
  block (``config.train``): ``defaults()`` builds them; ``validate(config)``,
  checked on every run, raises ``ConfigError``. ``name`` may be registered
  once per algorithm module: a second registration of the same name adds keys.

  Raises:
    ValueError: a key is registered twice.
  """
  if name in _BLOCKS:
    old_defaults, old_validate = _BLOCKS[name]
    clash = set(old_defaults()) & set(defaults())
    if clash:
      raise ValueError(f"config.{name} keys {sorted(clash)} are already registered")

    def merged():
      c = old_defaults()
      c.update(defaults())
      return c

    def both(config):
      for check in (old_validate, validate):
        if check is not None:
          check(config)

    _BLOCKS[name] = (merged, both)
    return
  _BLOCKS[name] = (defaults, validate)


def config_blocks() -> dict[str, Any]:
  """Every registered block's defaults factory, by name."""
  return {name: defaults for name, (defaults, _) in _BLOCKS.items()}


def register_rule(rule) -> None:
  """A rule checked on every run after the generic ones:
  ``rule(config, prior, batch_shards, process_count)`` raises ``ConfigError``."""
  _RULES.append(rule)


def make_prior(config) -> priors.Prior:
  """``config.prior`` -> a Prior; only the fields the prior defines are passed."""
  name = config.prior.name
  try:
    cls = priors.prior_class(name)
  except ValueError as e:
    fail("prior.name", str(e))
  fields = {f.name for f in dataclasses.fields(cls)}
  hp = {k: v for k, v in config.prior.items() if k != "name" and v is not None}
  unused = sorted(set(hp) - fields)
  if unused:
    fail(f"prior.{unused[0]}", f"is set but prior {name!r} has no such hyperparameter "
          f"(it takes {sorted(fields) or 'none'})")
  try:
    return priors.make_prior(name, **hp)
  except ValueError as e:
    fail("prior", str(e))


def make_loss_config(config) -> losses.LossConfig:
  """``config.loss`` -> a ``LossConfig``; ``ConfigError`` naming the key if it is wrong."""
  values = dict(config.loss)
  if isinstance(values.get("loss_weights"), list):
    values["loss_weights"] = tuple(values["loss_weights"])
  try:
    return losses.LossConfig(**values)
  except (ValueError, TypeError) as e:
    named = re.match(r"LossConfig\.(\w+): (.*)", str(e), re.S)
    if named:
      fail(f"loss.{named.group(1)}", named.group(2))
    fail("loss", str(e))


def mesh_shape(config, num_devices: int) -> dict[str, int]:
  """Resolves ``-1`` axes; the product must equal the device count."""
  shape = {k: int(config.mesh[k]) for k in ("data", "fsdp", "tensor")}
  free = [k for k, v in shape.items() if v == -1]
  if len(free) > 1:
    fail("mesh", f"at most one axis may be -1; got {shape}")
  for k, v in shape.items():
    if v == 0 or v < -1:
      fail(f"mesh.{k}", f"must be a positive size or -1; got {v}")
  fixed = 1
  for v in shape.values():
    if v != -1:
      fixed *= v
  if free:
    if num_devices % fixed:
      fail("mesh", f"{shape} cannot fill {num_devices} devices ({num_devices} is not a "
            f"multiple of {fixed})")
    shape[free[0]] = num_devices // fixed
  total = shape["data"] * shape["fsdp"] * shape["tensor"]
  if total != num_devices:
    fail("mesh", f"data x fsdp x tensor = {total} does not match the {num_devices} devices")
  return shape


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             process_count: int | None = None) -> None:
  """Checks every key (the generic ones, the registered blocks' and rules').

  Raises:
    ConfigError: naming the first wrong key and what it allows.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  stages = tuple(config.stages)
  for s in stages:
    if s not in STAGES:
      fail("stages", f"unknown stage {s!r}; allowed: {STAGES}")
  if list(stages) != sorted(stages, key=STAGES.index):
    fail("stages", f"stages run in the order {STAGES}; got {stages}")
  if config.pairs_from not in PAIRS_FROM:
    fail("pairs_from", f"must be one of {PAIRS_FROM}; got {config.pairs_from!r}")
  if config.pairs_from == "reference" and config.data.source != "synthetic":
    fail("pairs_from", "'reference' pairs are labelled by the synthetic task's known reward; "
          "use 'dataset' with data.source='files'")
  if config.train.reference not in REFERENCE_MODES:
    fail("train.reference", f"must be one of {REFERENCE_MODES}; got {config.train.reference!r}")
  if config.train.prior_update not in PRIOR_UPDATES:
    fail("train.prior_update",
          f"must be one of {PRIOR_UPDATES}; got {config.train.prior_update!r}")
  # Counts and frequencies: 0 allowed where it means "none" or "off" (steps, eval.every).
  for key, zero_ok in (("sft.steps", True), ("train.steps", True), ("sft.warmup_steps", True),
                       ("train.warmup_steps", True), ("train.policy_steps_per_round", False),
                       ("train.prior_steps_per_round", False), ("checkpoint_every", False),
                       ("log_every", False), ("max_checkpoints", False),
                       ("eval.num_prompts", False), ("eval.batch_size", False),
                       ("eval.max_new_tokens", False), ("eval.every", True)):
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
      fail(key, f"must be a {'non-negative' if zero_ok else 'positive'} int; "
            f"got {value!r}")
  for key in ("sft.learning_rate", "train.learning_rate", "train.prior_learning_rate"):
    value = _get(config, key)
    if not is_number(value) or not math.isfinite(value) or not value > 0:
      fail(key, f"must be a finite number > 0; got {value!r}")
  # 0 turns clipping (weight decay) off; a negative clip would flip the gradient's sign.
  for key in ("train.grad_clip", "sft.weight_decay", "train.weight_decay",
              "train.prior_weight_decay"):
    value = _get(config, key)
    if not is_number(value) or not math.isfinite(value) or value < 0:
      fail(key, f"must be a finite number >= 0 (0: off); got {value!r}")
  if config.model.hf_path and not (files.isdir(config.model.hf_path)
                                   or hub.is_hub_id(config.model.hf_path)):
    fail("model.hf_path", f"{config.model.hf_path!r} is not a directory (nor a Hub id, "
         "org/name)")
  if files.is_remote(config.data.data_dir):
    fail("data.data_dir", f"{config.data.data_dir!r}: TFDS writes array_record files, which "
         "need a local or mounted filesystem; leave it empty (a remote workdir builds into a "
         "local cache) or name a local directory")
  if config.pairs_file and config.pairs_from != "reference":
    fail("pairs_file", "is a file of pairs sampled from the reference: set pairs_from="
         "'reference' or leave it empty")
  if config.pairs_file and not files.isfile(config.pairs_file):
    fail("pairs_file", f"{config.pairs_file!r} is not a file")
  if config.sft.checkpoint and not files.isdir(config.sft.checkpoint):
    fail("sft.checkpoint", f"{config.sft.checkpoint!r} is not a directory")
  if "sft" not in stages and "preference" in stages and not (
      config.sft.checkpoint or config.model.hf_path):
    fail("stages", "without the 'sft' stage, set sft.checkpoint or model.hf_path for the "
          "reference")
  data = config.data.copy_and_resolve_references()
  if not data.data_dir:
    data.data_dir = "<workdir>/tfds"  # the trainer's default
  try:
    pipeline.validate_config(data)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.data.source == "files":
    test_files = sources.resolve_files(config.data.files.test_files, "test_files")
    if "eval" in stages and not test_files:
      fail("data.files.test_files", "the 'eval' stage on your files needs held-out pairs: set "
           "it, or leave 'eval' out of config.stages")
    if test_files and "eval" not in stages and not (
        "preference" in stages and config.train.get("diagnostics_every", 0)
        and make_prior(config).has_params):
      fail("data.files.test_files", "is set but nothing in this run reads it: add 'eval' to "
           "config.stages (or clear it)")
  prior = make_prior(config)
  loss_config = make_loss_config(config)
  try:
    losses.check_compatible(loss_config, prior)
  except ValueError as e:
    key = next((f"loss.{k}" for k in ("ld_alpha", "f_divergence_type") if str(e).startswith(k)),
               "loss.link")
    fail(key, f"{e} (config.prior.name={prior.name!r})")
  if config.train.reference == "cached" and any(
      f in prior.required_fields() for f in ("kl_ref_policy", "kl_policy_ref", "ref_hidden")):
    fail("train.reference", f"prior {prior.name!r} needs the reference's full distribution at "
          "every token; use 'online'")
  for name in config.baselines:
    if name not in priors.registered_priors():
      fail("baselines", f"unknown prior {name!r}; registered: {priors.registered_priors()}")
    try:
      losses.check_compatible(loss_config, priors.make_prior(name))
    except ValueError as e:
      fail("baselines", f"baseline {name!r} trains with the run's loss: {e}")
  for name, (_, check) in _BLOCKS.items():
    if name not in config:
      fail(name, "is missing: the config was built before the module that registers it was "
           "imported")
    if check is not None:
      check(config)
  shards = config.data.get("num_shards", 0)
  if not isinstance(shards, int) or shards < 0:
    fail("data.num_shards", f"must be an int >= 0; got {shards!r}")
  if shards and shards % process_count:
    fail("data.num_shards", f"{shards} is not a multiple of the {process_count} processes")
  if shards and config.data.batch_size % (shards // process_count):
    fail("data.batch_size", f"{config.data.batch_size} pairs per process do not split over "
          f"{shards // process_count} shards per process")
  shape = mesh_shape(config, num_devices)
  batch_shards = shape["data"] * shape["fsdp"]
  global_pairs = config.data.batch_size * process_count
  if global_pairs % batch_shards:
    fail("data.batch_size", f"{global_pairs} pairs per step ({config.data.batch_size} per "
          f"process x {process_count} processes) do not divide over the mesh's "
          f"data x fsdp = {batch_shards} batch shards")
  if config.eval.batch_size * process_count % batch_shards:
    fail("eval.batch_size", f"must divide over data x fsdp = {batch_shards} batch shards")
  padding_free = config.train.get("padding_free", False)
  if not isinstance(padding_free, bool):
    fail("train.padding_free", f"must be True or False; got {padding_free!r}")
  if padding_free and batch_shards % process_count:
    # Each batch shard's pairs are packed into its own rows by the process that reads them.
    fail("train.padding_free", f"packs each batch shard's pairs on the process that reads "
         f"them: the mesh's data x fsdp = {batch_shards} batch shards must divide over the "
         f"{process_count} processes")
  for rule in _RULES:
    rule(config, prior, batch_shards, process_count)
