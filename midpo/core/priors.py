"""Priors ``zeta``: every published DPO variant as one function of a sequence.

The MI-DPO loss (see ``midpo.core.losses``) is

    h(y) = alpha * (LP(y) - log zeta(y))
    loss = -log sigmoid(h(y_w) - h(y_l))

A prior is a frozen dataclass of hyperparameters whose ``score`` returns
``s(y) = LP(y) - log zeta(y)`` per sequence, computed directly rather than as a
difference (which would lose float32 precision for long responses). It may read
any field of ``SequenceStats`` it names in ``requires``, may depend on the
policy (gradients flow through ``logps``), on the role of the sequence
(``"chosen"`` or ``"rejected"``) and on parameters of its own (SparsePO's mask
head), which belong to the prior, not to the policy.

Notation (sums over response tokens, ``m`` the mask): ``LP = sum m lp``,
``LR = sum m lr``, ``|y| = sum m``, ``KLr_t = KL(ref||policy)``,
``KLp_t = KL(policy||ref)``, ``sg`` stop-gradient.

Priors are registered by name; ``make_prior(name, **hyperparameters)`` builds
one and checks its hyperparameters. This module holds the base class and the
registry only; the published priors live in ``midpo.algorithms`` (importing
that package registers them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp

from midpo.core.stats import SequenceStats

Array = jax.Array
ROLES = ("chosen", "rejected")
# SequenceStats fields computed from the frozen reference model.
REFERENCE_FIELDS = ("ref_logps", "kl_ref_policy", "kl_policy_ref", "ref_hidden")

_REGISTRY: dict[str, type["Prior"]] = {}


def register_prior(cls: type["Prior"]) -> type["Prior"]:
  """Class decorator: registers a ``Prior`` subclass under ``cls.name``.

  Raises:
    ValueError: the name is empty or already registered.
  """
  if not cls.name:
    raise ValueError(f"{cls.__name__} has no name")
  if cls.name in _REGISTRY:
    raise ValueError(f"prior {cls.name!r} is already registered")
  _REGISTRY[cls.name] = cls
  return cls


def registered_priors() -> tuple[str, ...]:
  """The names of every registered prior, sorted."""
  return tuple(sorted(_REGISTRY))


def prior_class(name: str) -> type["Prior"]:
  """The class registered as ``name``; ValueError listing the registered ones if none."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(
        f"unknown prior {name!r}; registered priors: {', '.join(registered_priors())}") from None


def make_prior(name: str, **hyperparameters) -> "Prior":
  """Builds the prior registered as ``name`` and validates its hyperparameters."""
  cls = prior_class(name)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(hyperparameters) - fields)
  if unknown:
    raise ValueError(f"prior {name!r} has no hyperparameter(s) {unknown}; "
                     f"it takes {sorted(fields) or 'none'}")
  return cls(**hyperparameters)


class PriorOutput(NamedTuple):
  """``score`` is ``LP - log zeta`` per sequence ``[B]``; ``aux`` holds extras.

  Recognised ``aux`` entries: ``penalty`` ``[B]`` (added to the per-pair loss),
  ``kl`` ``[B]`` (the sequence KL the prior uses, for logging), and any
  ``[B]`` arrays to be logged as ``prior/<key>``.
  """
  score: Array
  aux: dict


def masked_sum(x_BxT: Array, mask_BxT: Array) -> Array:
  """``sum_t x[b, t]`` over the positions where ``mask > 0``: ``[B]``."""
  return jnp.sum(jnp.where(mask_BxT > 0, x_BxT, 0.0), axis=-1)


def lengths(stats: SequenceStats) -> Array:
  """Response lengths ``|y|`` in tokens, ``[B]`` (float, the dtype of ``logps``)."""
  return jnp.sum((stats.mask > 0).astype(stats.logps.dtype), axis=-1)


def require(cond: bool, prior: str, message: str) -> None:
  """Raises ``ValueError("prior '<prior>': <message>")`` unless ``cond``."""
  if not cond:
    raise ValueError(f"prior {prior!r}: {message}")


def is_finite(x) -> bool:
  """Whether ``x`` is a finite real number (a hyperparameter check)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class Prior:
  """Base class. Subclasses set ``name`` and ``requires`` and implement ``score``."""
  name: ClassVar[str] = ""
  # SequenceStats fields this prior reads, beyond logps and mask.
  requires: ClassVar[tuple[str, ...]] = ()
  # Whether ``score`` needs the sequence length to be positive (divides by it).
  length_normalised: ClassVar[bool] = False

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the hyperparameter that is out of range."""

  @property
  def has_params(self) -> bool:
    """Whether the prior has parameters of its own (how they move is the
    algorithm's choice: ``midpo.training.recipes``)."""
    return False

  @property
  def splits_pair_term(self) -> bool:
    """Whether ``score`` adds a term that belongs to the pair (not to either
    response), split between the two sides (SimPO's margin). Links that read
    each side's ``s`` alone (``losses.PER_SIDE_LINKS``) are then not defined."""
    return False

  @property
  def split_term_description(self) -> str:
    """What the split pair-level term is, for error messages."""
    return ""

  @property
  def scores_with_params(self) -> bool:
    """Whether ``score`` reads ``params`` (the loss then requires them)."""
    return self.has_params

  def init_params(self, rng: Array, example: SequenceStats) -> Any:
    """The prior's own parameters (None for a prior without any)."""
    del rng, example
    return None

  def project(self, params: Any) -> Any:
    """Maps parameters back into the prior's feasible set after an update."""
    return params

  def score(self, stats: SequenceStats, role: str, *, alpha: float, params: Any = None,
            rng: Optional[Array] = None, train: bool = False) -> PriorOutput:
    raise NotImplementedError

  def required_fields(self) -> tuple[str, ...]:
    """SequenceStats fields read with the current hyperparameters."""
    return self.requires

  @property
  def uses_reference(self) -> bool:
    return any(f in self.required_fields() for f in REFERENCE_FIELDS)

  def hyperparameters(self) -> dict:
    return dataclasses.asdict(self)


__all__ = [
    "Prior", "PriorOutput", "REFERENCE_FIELDS", "ROLES", "is_finite", "lengths", "make_prior",
    "masked_sum", "prior_class", "register_prior", "registered_priors", "require",
]
