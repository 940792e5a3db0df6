"""Providers of the ``SequenceStats`` fields a prior reads.

The policy's token log-probs and, when the prior reads them, the reference's
(``ref_logps``, ``kl_ref_policy``, ``kl_policy_ref``, ``ref_hidden``: one fused
pass, ``midpo.core.stats.token_stats``) are computed by the pair step itself.
Every other field comes from a provider registered here by name, next to the
algorithm that needs it::

    @inputs.register_input("my_weights")
    def my_weights(env, prior) -> inputs.Provider:
      def compute(ctx: inputs.InputContext):          # -> [2B, T-1]
        return jnp.exp(-ctx.frozen_logps("reference"))
      return inputs.Provider(compute)

A provider's ``compute`` is traced inside the jitted step; ``batch_fields``
names the host batch arrays it reads (they are then sent to the device).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from midpo.core import stats

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class InputContext:
  """What a provider reads: the batch's rows flattened pair-major (row ``2j``
  is pair ``j``'s chosen response, row ``2j + 1`` its rejected one).

  Attributes:
    graphdef: the policy's NNX graph definition (frozen models share it).
    vocab_chunk: the vocabulary chunk of ``stats.token_logprobs``.
    frozen: the frozen models' parameters by name (``reference`` always).
    prior_params: the prior's own parameters (None for a prior without any).
    batch: the device batch, pair-major ``[B, 2, ...]`` arrays.
    rows: ``tokens``, ``attention_mask``, ``response_mask`` as ``[2B, T]`` rows.
    inputs_BxT, targets_BxT, input_mask_BxT: the model's inputs, its targets
      and the inputs' attention mask, ``[2B, T-1]``.
    mask_BxT: 1.0 on response targets, ``[2B, T-1]`` float32.
    role_B: ``[2B]`` int32, 0 for a chosen row and 1 for a rejected one.
  """
  graphdef: Any
  vocab_chunk: int
  frozen: dict
  prior_params: PyTree
  batch: dict
  rows: dict
  inputs_BxT: Array
  targets_BxT: Array
  input_mask_BxT: Array
  mask_BxT: Array
  role_B: Array

  def row_field(self, name: str) -> Array:
    """A batch array ``[B, 2, ...]`` as rows ``[2B, ...]``."""
    x = self.batch[name]
    return x.reshape((-1,) + x.shape[2:])

  def frozen_logps(self, name: str, *, stop_gradient_logits: bool = False) -> Array:
    """``[2B, T-1]`` target token log-probs under the frozen model ``name``
    (0 off the response)."""
    logits = nnx.merge(self.graphdef, self.frozen[name])(self.inputs_BxT, self.input_mask_BxT)
    if stop_gradient_logits:
      logits = jax.lax.stop_gradient(logits)
    return stats.token_logprobs(logits, self.targets_BxT, self.mask_BxT,
                                vocab_chunk=self.vocab_chunk)


@dataclasses.dataclass(frozen=True)
class Provider:
  """Computes one field: ``compute(ctx) -> [2B, T-1]`` (aligned with the targets).

  Attributes:
    compute: the function, traced in the step.
    batch_fields: host batch arrays it reads (``ctx.batch[...]``).
    frozen: frozen models it reads (``ctx.frozen[...]``).
    cacheable: ``<model>_logps`` fields of frozen models that it reads from the batch when
      they are there (the trainer computes them once before training:
      ``midpo.training.reference_cache``), and computes in the step otherwise (evaluation).
  """
  compute: Callable[[InputContext], Array]
  batch_fields: tuple[str, ...] = ()
  frozen: tuple[str, ...] = ()
  cacheable: tuple[str, ...] = ()


# field -> factory(env, prior) -> Provider
_PROVIDERS: dict[str, Callable[[Any, Any], Provider]] = {}


def register_input(field: str) -> Callable:
  """Decorator: ``factory(env, prior) -> Provider`` fills ``field`` for any prior
  that requires it.

  Raises:
    ValueError: ``field`` already has a provider, or is computed by the step
      itself (the policy's and the reference's statistics).
  """
  def wrap(factory):
    if field in _PROVIDERS or field in BUILT_IN:
      raise ValueError(f"input {field!r} already has a provider")
    _PROVIDERS[field] = factory
    return factory
  return wrap


# Computed by the pair step from the policy's and the reference's logits.
BUILT_IN = ("logps", "mask", "ref_logps", "kl_ref_policy", "kl_policy_ref", "ref_hidden",
            "log_sum_sq_probs")


def registered_inputs() -> tuple[str, ...]:
  """The fields with a provider, in registration order."""
  return tuple(_PROVIDERS)


def providers_for(env, prior, fields) -> dict[str, Provider]:
  """The providers of ``fields`` that the step does not compute itself, in
  registration order.

  Raises:
    ValueError: a field has no provider (naming the prior and the field).
  """
  wanted = [f for f in fields if f not in BUILT_IN]
  missing = sorted(f for f in wanted if f not in _PROVIDERS)
  if missing:
    name = getattr(prior, "name", "?")
    raise ValueError(f"prior {name!r} reads {missing}, which nothing provides; register a "
                     f"provider (midpo.training.inputs.register_input); provided: "
                     f"{list(BUILT_IN) + list(_PROVIDERS)}")
  return {f: _PROVIDERS[f](env, prior) for f in _PROVIDERS if f in wanted}


def batch_fields(providers: dict[str, Provider]) -> tuple[str, ...]:
  """The host batch arrays the providers read."""
  out: list[str] = []
  for p in providers.values():
    out += [f for f in p.batch_fields if f not in out]
  return tuple(out)


def cacheable_fields(providers: dict[str, Provider]) -> tuple[str, ...]:
  """The frozen models' ``<model>_logps`` fields the providers read when cached."""
  out: list[str] = []
  for p in providers.values():
    out += [f for f in p.cacheable if f not in out]
  return tuple(out)


def role_of_rows(num_pairs: int) -> Array:
  """``[2B]`` int32: 0, 1, 0, 1, ... (chosen, rejected of each pair)."""
  return jnp.tile(jnp.arange(2, dtype=jnp.int32), num_pairs)


__all__ = ["BUILT_IN", "InputContext", "Provider", "batch_fields", "providers_for",
           "register_input", "registered_inputs", "role_of_rows"]
