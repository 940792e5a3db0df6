"""Priors ``zeta``: every published DPO variant as one function of a sequence.

The MI-DPO loss (see ``midpo.losses``) is

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
one and checks its hyperparameters. A prior that is not finished is not
registered.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp

from midpo.stats import SequenceStats

Array = jax.Array
ROLES = ("chosen", "rejected")

_REGISTRY: dict[str, type["Prior"]] = {}


def register_prior(cls: type["Prior"]) -> type["Prior"]:
  if cls.name in _REGISTRY:
    raise ValueError(f"prior {cls.name!r} is already registered")
  _REGISTRY[cls.name] = cls
  return cls


def registered_priors() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def prior_class(name: str) -> type["Prior"]:
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
  return jnp.sum(jnp.where(mask_BxT > 0, x_BxT, 0.0), axis=-1)


def lengths(stats: SequenceStats) -> Array:
  return jnp.sum((stats.mask > 0).astype(stats.logps.dtype), axis=-1)


def _require(cond: bool, prior: str, message: str) -> None:
  if not cond:
    raise ValueError(f"prior {prior!r}: {message}")


def _finite(x) -> bool:
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
    return False

  @property
  def param_update(self) -> Optional[str]:
    """How the trainer updates the prior's parameters: 'loss' (gradient steps
    on the MI-DPO loss, by the prior's own optimiser), 'mle' (maximum
    likelihood on the policy's samples), 'ema' (a moving average of the
    policy's weights), or None (no parameters)."""
    return "loss" if self.has_params else None

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
    return any(f in self.required_fields()
               for f in ("ref_logps", "kl_ref_policy", "kl_policy_ref", "ref_hidden"))

  def hyperparameters(self) -> dict:
    return dataclasses.asdict(self)


@register_prior
@dataclasses.dataclass(frozen=True)
class DPO(Prior):
  """DPO ("Direct Preference Optimization", 2023): ``log zeta = LR``; ``s = LP - LR``."""
  name: ClassVar[str] = "dpo"
  requires: ClassVar[tuple[str, ...]] = ("ref_logps",)

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    return PriorOutput(masked_sum(stats.logps - stats.ref_logps, stats.mask), {})


@register_prior
@dataclasses.dataclass(frozen=True)
class DICE(Prior):
  """DICE ("Bootstrapping Language Models with DPO Implicit Rewards", 2024): the previous round's policy is the prior.

  ``log zeta = LP_prev``; ``s = LP - LP_prev``. The rounds themselves (sampling
  from the previous policy, implicit-reward labelling) live in the trainer.
  """
  name: ClassVar[str] = "dice"
  requires: ClassVar[tuple[str, ...]] = ("prev_logps",)

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    return PriorOutput(masked_sum(stats.logps - stats.prev_logps, stats.mask), {})


@register_prior
@dataclasses.dataclass(frozen=True)
class HDPO(Prior):
  """H-DPO ("Entropy Controllable Direct Preference Optimization", 2024).

  ``log zeta = LR + (1 - eta) LP`` with the gradient flowing through ``LP``;
  ``s = eta LP - LR``. ``eta < 1`` sharpens the policy; ``eta = 1`` is DPO.
  """
  name: ClassVar[str] = "hdpo"
  requires: ClassVar[tuple[str, ...]] = ("ref_logps",)
  eta: float = 1.0

  def validate(self):
    _require(_finite(self.eta) and self.eta > 0, self.name, f"eta must be > 0; got {self.eta}")

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    return PriorOutput(masked_sum(self.eta * stats.logps - stats.ref_logps, stats.mask), {})


@register_prior
@dataclasses.dataclass(frozen=True)
class RDPO(Prior):
  """R-DPO ("Disentangling Length from Quality in DPO", 2024): DPO with a length regulariser.

  ``log zeta = LR - lam |y|`` with ``lam = length_coef / alpha``, so the logit
  is DPO's plus ``length_coef * (|y_w| - |y_l|)``; ``length_coef`` is the
  R-DPO paper's ``alpha`` (grid 0.05 to 1.0).
  """
  name: ClassVar[str] = "rdpo"
  requires: ClassVar[tuple[str, ...]] = ("ref_logps",)
  length_coef: float = 0.0

  def validate(self):
    _require(_finite(self.length_coef), self.name,
             f"length_coef must be finite; got {self.length_coef}")

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    s = masked_sum(stats.logps - stats.ref_logps, stats.mask)
    return PriorOutput(s + (self.length_coef / alpha) * lengths(stats), {})


@register_prior
@dataclasses.dataclass(frozen=True)
class SimPO(Prior):
  """SimPO ("Simple Preference Optimization with a Reference-Free Reward", 2024): length-normalised, reference-free, with a margin.

  Role-dependent: ``log zeta = (1 - 1/|y|) LP + b``, ``b = +gamma/(2 alpha)``
  for the chosen and ``-gamma/(2 alpha)`` for the rejected response, so
  ``s = LP/|y| -+ gamma/(2 alpha)`` and the logit is
  ``alpha (LP_w/|y_w| - LP_l/|y_l|) - gamma``. ``gamma = gamma_beta_ratio *
  beta`` of the official code; TRL's ``simpo_gamma``.
  """
  name: ClassVar[str] = "simpo"
  length_normalised: ClassVar[bool] = True
  gamma: float = 0.5

  def validate(self):
    _require(_finite(self.gamma), self.name, f"gamma must be finite; got {self.gamma}")

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    n = jnp.maximum(lengths(stats), 1.0)  # empty responses are reported by the loss
    sign = 1.0 if role == "chosen" else -1.0
    return PriorOutput(masked_sum(stats.logps, stats.mask) / n - sign * self.gamma / (2 * alpha),
                       {})


@register_prior
@dataclasses.dataclass(frozen=True)
class TDPO(Prior):
  """TDPO ("Token-level Direct Preference Optimization", 2024) with the sequential KL.

  ``log zeta = LR - c d`` with ``d = sum m KL(ref||policy)``:

  * ``version=1``: ``c = 1`` on both sides; logit
    ``beta [(LP_w-LR_w) - (LP_l-LR_l) - (d_l - d_w)]``.
  * ``version=2``: ``c = kl_coef`` and the chosen side's ``d`` under
    stop-gradient; logit ``beta [... - kl_coef (d_l - sg(d_w))]``.

  Official defaults: ``beta = 0.1``, ``kl_coef (alpha) = 0.5``; the function
  defaults to TDPO2, the released yaml runs TDPO1.
  """
  name: ClassVar[str] = "tdpo"
  requires: ClassVar[tuple[str, ...]] = ("ref_logps", "kl_ref_policy")
  version: int = 2
  kl_coef: Optional[float] = None  # TDPO2 only; None means the official 0.5

  def validate(self):
    _require(self.version in (1, 2), self.name, f"version must be 1 or 2; got {self.version}")
    if self.kl_coef is not None:
      _require(self.version == 2, self.name,
               "kl_coef only applies to version=2 (TDPO1 weighs the KL by 1)")
      _require(_finite(self.kl_coef) and self.kl_coef >= 0, self.name,
               f"kl_coef must be >= 0; got {self.kl_coef}")

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    margin = masked_sum(stats.logps - stats.ref_logps, stats.mask)
    d = masked_sum(stats.kl_ref_policy, stats.mask)
    if self.version == 1:
      kl_term = d
    else:
      coef = 0.5 if self.kl_coef is None else self.kl_coef
      kl_term = coef * (jax.lax.stop_gradient(d) if role == "chosen" else d)
    return PriorOutput(margin + kl_term, {"kl": d})


@register_prior
@dataclasses.dataclass(frozen=True)
class TISDPO(Prior):
  """TIS-DPO ("Token-level Importance Sampling for DPO", 2024).

  ``log zeta = LP - sum m w (lp - lr) + c sum m w KLp`` with ``c = kl_coef``
  when ``token_level`` (official default off) and 0 otherwise; so
  ``s = sum m w (lp - lr) - c sum m w KL(policy||ref)`` (no stop-gradient).
  All weights 1 and ``token_level=False`` is DPO. Weights come from
  ``midpo.token_weights``.
  """
  name: ClassVar[str] = "tis_dpo"
  requires: ClassVar[tuple[str, ...]] = ("ref_logps", "token_weights")
  kl_coef: float = 0.5
  token_level: bool = False

  def validate(self):
    _require(_finite(self.kl_coef) and self.kl_coef >= 0, self.name,
             f"kl_coef must be >= 0; got {self.kl_coef}")
    _require(isinstance(self.token_level, bool), self.name, "token_level must be a bool")

  def required_fields(self):
    return self.requires + (("kl_policy_ref",) if self.token_level else ())

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    w = stats.token_weights
    s = masked_sum(w * (stats.logps - stats.ref_logps), stats.mask)
    aux = {}
    if self.token_level:
      wkl = masked_sum(w * stats.kl_policy_ref, stats.mask)
      s = s - self.kl_coef * wkl
      aux["kl"] = wkl
    return PriorOutput(s, aux)


# ---------------------------------------------------------------------------
# SparsePO: token masks from a learned head over the reference's hidden states.
# ---------------------------------------------------------------------------


def init_mask_head(rng: Array, num_layers: int, hidden_dim: int) -> dict:
  """One mask head, as in the released SparsePO code (``SimpleMaskAllLayers``).

  A LayerNorm shared by all layers, then per layer Linear(D, 1) -> ReLU ->
  dropout, then a bias-free Linear(L, 1) mixer -> ReLU -> dropout. Initialised
  like PyTorch's ``nn.Linear`` (uniform in +-1/sqrt(fan_in)) and
  ``nn.LayerNorm`` (scale 1, bias 0). As there, a mixer whose weights start
  all negative gives an all-zero mask; ``prior/mask_*_zero_frac`` shows it.
  """
  k_w, k_b, k_mix = jax.random.split(rng, 3)
  bound_d = 1.0 / math.sqrt(hidden_dim)
  bound_l = 1.0 / math.sqrt(num_layers)
  return {
      "ln_scale": jnp.ones((hidden_dim,), jnp.float32),
      "ln_bias": jnp.zeros((hidden_dim,), jnp.float32),
      "w": jax.random.uniform(k_w, (num_layers, hidden_dim), jnp.float32, -bound_d, bound_d),
      "b": jax.random.uniform(k_b, (num_layers,), jnp.float32, -bound_d, bound_d),
      "mix": jax.random.uniform(k_mix, (num_layers,), jnp.float32, -bound_l, bound_l),
  }


def _dropout(x, rate, rng):
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def apply_mask_head(params: dict, hidden_BxTxLxD: Array, *, dropout: float = 0.0,
                    rng: Optional[Array] = None, train: bool = False,
                    eps: float = 1e-5) -> Array:
  """Non-negative, unbounded token mask ``[B, T]`` from every layer's hidden state."""
  h = hidden_BxTxLxD.astype(jnp.promote_types(hidden_BxTxLxD.dtype, jnp.float32))
  mean = jnp.mean(h, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
  h = (h - mean) * jax.lax.rsqrt(var + eps) * params["ln_scale"] + params["ln_bias"]
  per_layer_BxTxL = jax.nn.relu(jnp.einsum("btld,ld->btl", h, params["w"]) + params["b"])
  drop = train and dropout > 0
  if drop:
    if rng is None:
      raise ValueError("SparsePO mask dropout in training needs an rng")
    rng_layer, rng_mix = jax.random.split(rng)
    per_layer_BxTxL = _dropout(per_layer_BxTxL, dropout, rng_layer)
  mask_BxT = jax.nn.relu(jnp.einsum("btl,l->bt", per_layer_BxTxL, params["mix"]))
  if drop:
    mask_BxT = _dropout(mask_BxT, dropout, rng_mix)
  return mask_BxT


@register_prior
@dataclasses.dataclass(frozen=True)
class SparsePO(Prior):
  """SparsePO ("Controlling Preference Alignment of LLMs via Sparse Token Masks", 2024): learned token masks on reward and KL.

  ``log zeta = LP - sum m mu_r (lp - lr) - kl_coef sum m mu_k KL(ref||policy)``,
  so ``s = U + kl_coef K`` with ``U = sum m mu_r (lp - lr)`` and
  ``K = sum m mu_k KLr``; the logit is ``beta [U_w - U_l + K_w - K_l]`` and each
  pair adds ``l1_reward |mu_r|_1 + l1_kl |mu_k|_1`` over both responses. A mask
  that is off (``mask_on_reward`` / ``mask_on_kl`` false) is 1 on every token.
  ``kl_coef`` is ours (the released code always has the KL term, i.e. 1.0).

  ``mask_source="head"``: the masks come from the prior's own parameters, a
  head over the reference's hidden states of every layer (``ref_hidden``); one
  head for both masks (``shared_head``) or one each. ``mask_source="given"``:
  fixed masks read from ``SequenceStats.mask_reward`` / ``mask_kl``.
  """
  name: ClassVar[str] = "sparsepo"
  mask_source: str = "head"
  mask_on_reward: bool = True
  mask_on_kl: bool = True
  shared_head: bool = True
  l1_reward: float = 0.0
  l1_kl: float = 0.0
  kl_coef: float = 1.0
  mask_dropout: float = 0.01

  def validate(self):
    _require(self.mask_source in ("head", "given"), self.name,
             f"mask_source must be 'head' or 'given'; got {self.mask_source!r}")
    for key in ("l1_reward", "l1_kl", "kl_coef"):
      v = getattr(self, key)
      _require(_finite(v) and v >= 0, self.name, f"{key} must be >= 0; got {v}")
    _require(_finite(self.mask_dropout) and 0 <= self.mask_dropout < 1, self.name,
             f"mask_dropout must be in [0, 1); got {self.mask_dropout}")

  def required_fields(self):
    req = ["ref_logps"]
    if self.kl_coef > 0:
      req.append("kl_ref_policy")
    if self.mask_source == "head" and (self.mask_on_reward or self.mask_on_kl):
      req.append("ref_hidden")
    if self.mask_source == "given":
      if self.mask_on_reward:
        req.append("mask_reward")
      if self.mask_on_kl:
        req.append("mask_kl")
    return tuple(req)

  @property
  def has_params(self) -> bool:
    return self.mask_source == "head" and (self.mask_on_reward or self.mask_on_kl)

  def init_params(self, rng, example):
    if not self.has_params:
      return None
    if example.ref_hidden is None or example.ref_hidden.ndim != 4:
      raise ValueError("prior 'sparsepo': init_params needs ref_hidden of shape [B, T, L, D]")
    _, _, num_layers, hidden_dim = example.ref_hidden.shape
    k_r, k_k = jax.random.split(rng)
    if self.shared_head:
      return {"shared": init_mask_head(k_r, num_layers, hidden_dim)}
    return {"reward": init_mask_head(k_r, num_layers, hidden_dim),
            "kl": init_mask_head(k_k, num_layers, hidden_dim)}

  def masks(self, stats, params, rng=None, train=False) -> tuple[Array, Array]:
    ones = jnp.ones_like(stats.logps)
    if self.mask_source == "given":
      mu_r = stats.mask_reward if self.mask_on_reward else ones
      mu_k = stats.mask_kl if self.mask_on_kl else ones
      return mu_r.astype(stats.logps.dtype), mu_k.astype(stats.logps.dtype)
    if params is None:
      raise ValueError("prior 'sparsepo' with mask_source='head' needs its params "
                       "(prior.init_params)")
    rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
    head = lambda key, r: apply_mask_head(params[key], stats.ref_hidden,
                                          dropout=self.mask_dropout, rng=r, train=train)
    if self.shared_head:
      mu = head("shared", rngs[0])
      mu_r, mu_k = mu, mu
    else:
      mu_r = head("reward", rngs[0]) if self.mask_on_reward else None
      mu_k = head("kl", rngs[1]) if self.mask_on_kl else None
    mu_r = mu_r if self.mask_on_reward else ones
    mu_k = mu_k if self.mask_on_kl else ones
    return mu_r.astype(stats.logps.dtype), mu_k.astype(stats.logps.dtype)

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    mu_r, mu_k = self.masks(stats, params, rng, train)
    real = stats.mask > 0
    u = masked_sum(mu_r * (stats.logps - stats.ref_logps), stats.mask)
    s = u
    aux = {}
    if self.kl_coef > 0:
      k = masked_sum(mu_k * stats.kl_ref_policy, stats.mask)
      s = s + self.kl_coef * k
      aux["kl"] = k
    penalty = jnp.zeros_like(u)
    if self.mask_on_reward and self.l1_reward:
      penalty = penalty + self.l1_reward * masked_sum(jnp.abs(mu_r), stats.mask)
    if self.mask_on_kl and self.l1_kl:
      penalty = penalty + self.l1_kl * masked_sum(jnp.abs(mu_k), stats.mask)
    aux["penalty"] = penalty
    n = jnp.maximum(jnp.sum(real, axis=-1), 1)
    if self.mask_on_reward:
      aux["mask_reward_zero_frac"] = jnp.sum(real & (mu_r == 0), axis=-1) / n
    if self.mask_on_kl:
      aux["mask_kl_zero_frac"] = jnp.sum(real & (mu_k == 0), axis=-1) / n
    return PriorOutput(s, aux)


# ---------------------------------------------------------------------------
# A learnable prior in a bounded family (the paper's constrained joint
# minimisation).
# ---------------------------------------------------------------------------

COEFFICIENTS = ("ref", "pol", "len", "kl")


def _bounds(value, name) -> tuple[float, float]:
  lo, hi = (float(v) for v in value)
  if not (lo <= hi) or math.isnan(lo) or math.isnan(hi):
    raise ValueError(f"prior 'constrained': {name}_bounds must be (low, high) with low <= high; "
                     f"got {value}")
  return lo, hi


@register_prior
@dataclasses.dataclass(frozen=True)
class Constrained(Prior):
  """A prior learned jointly with the policy, within a box.

  ``log zeta = c_ref LR + c_pol sg(LP) + c_len |y| + c_kl sum m KL(ref||policy)``
  with each coefficient in ``[low, high]`` (``<name>_bounds``), so
  ``s = LP - log zeta``. Its four coefficients are the prior's parameters,
  trained on the MI-DPO loss by their own optimiser (projected back into the
  box after every update, ``project``) in alternation with the policy. The
  family holds DPO (1, 0, 0, 0), R-DPO (1, 0, -lam, 0) and TDPO1 (1, 0, 0, -1)
  when the box allows, and an H-DPO-like (1, 1 - eta, 0, 0), which differs
  from H-DPO in that no gradient flows through the prior's LP. Unbounded coefficients let the prior drive the loss to zero
  by itself (putting prior mass on rejected responses): the
  ``prior/log_zeta_gap`` metric shows that collapse.
  """
  name: ClassVar[str] = "constrained"
  ref_bounds: tuple = (0.0, 1.0)
  pol_bounds: tuple = (0.0, 0.5)
  len_bounds: tuple = (-0.5, 0.5)
  kl_bounds: tuple = (0.0, 0.0)
  init: tuple = (1.0, 0.0, 0.0, 0.0)

  def validate(self):
    bounds = [_bounds(getattr(self, f"{c}_bounds"), c) for c in COEFFICIENTS]
    _require(len(self.init) == 4, self.name, f"init must hold 4 coefficients {COEFFICIENTS}")
    for c, (lo, hi), v in zip(COEFFICIENTS, bounds, self.init):
      _require(lo <= v <= hi, self.name, f"init {c}={v} is outside {c}_bounds ({lo}, {hi})")

  def required_fields(self):
    req = []
    if self.ref_bounds != (0.0, 0.0) or self.init[0] != 0.0:
      req.append("ref_logps")
    if tuple(self.kl_bounds) != (0.0, 0.0):
      req.append("kl_ref_policy")
    return tuple(req)

  @property
  def has_params(self) -> bool:
    return True

  @property
  def low(self):
    return jnp.array([_bounds(getattr(self, f"{c}_bounds"), c)[0] for c in COEFFICIENTS])

  @property
  def high(self):
    return jnp.array([_bounds(getattr(self, f"{c}_bounds"), c)[1] for c in COEFFICIENTS])

  def init_params(self, rng, example):
    del rng, example
    return {"coefficients": jnp.asarray(self.init, jnp.float32)}

  def project(self, params):
    c = params["coefficients"]
    return {"coefficients": jnp.clip(c, self.low.astype(c.dtype), self.high.astype(c.dtype))}

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    if params is None:
      raise ValueError("prior 'constrained' needs its params (prior.init_params)")
    c = params["coefficients"].astype(stats.logps.dtype)
    lp = masked_sum(stats.logps, stats.mask)
    log_zeta = c[1] * jax.lax.stop_gradient(lp) + c[2] * lengths(stats)
    if stats.ref_logps is not None:
      log_zeta = log_zeta + c[0] * masked_sum(stats.ref_logps, stats.mask)
    aux = {}
    if "kl_ref_policy" in self.required_fields():
      d = masked_sum(stats.kl_ref_policy, stats.mask)
      log_zeta = log_zeta + c[3] * d
      aux["kl"] = d
    for name, value in zip(COEFFICIENTS, c):
      aux[f"c_{name}"] = jnp.broadcast_to(value, lp.shape)
    return PriorOutput(lp - log_zeta, aux)


# ---------------------------------------------------------------------------
# Priors that are language models: the mutual-information prior and its EMA
# proxy. ``log zeta_phi(y)`` comes from a model (``midpo.prior_model``) whose
# forward the trainer runs; the prior reads its token log-probs.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelPrior(Prior):
  """Base of the priors that are language models: ``s = LP - log zeta_phi(y)``
  from the token log-probs ``prior_logps`` of the prior's network, which the
  trainer computes with the prior's parameters (``midpo.learned_prior``) and
  updates as ``param_update`` says."""
  requires: ClassVar[tuple[str, ...]] = ("prior_logps",)

  @property
  def has_params(self) -> bool:
    return True

  def score(self, stats, role, *, alpha, params=None, rng=None, train=False):
    return PriorOutput(masked_sum(stats.logps - stats.prior_logps, stats.mask), {})


@register_prior
@dataclasses.dataclass(frozen=True)
class MutualInformation(ModelPrior):
  """The mutual-information prior (the paper's Lemma 1): ``zeta_phi(y)``, a small
  language model over responses, tracks the policy's marginal
  ``sum_x p(x) pi(y|x)``, the prior that minimises ``E_x KL(pi(.|x) || zeta)``.

  ``s = LP - log zeta_phi(y)``. The trainer alternates policy steps on the
  MI-DPO loss (``zeta_phi`` frozen) with maximum-likelihood steps of
  ``zeta_phi`` on responses sampled from the current policy on held-out
  prompts (a Blahut-Arimoto step). ``network`` names the model configuration
  of ``zeta_phi`` (``midpo.models.config``); ``conditional`` makes it read the
  prompt too (then it tracks the policy itself rather than its marginal).
  """
  name: ClassVar[str] = "mi"
  network: str = "micro"
  conditional: bool = False

  def validate(self):
    _require(bool(self.network), self.name, "network must name a model configuration")

  @property
  def param_update(self) -> str:
    return "mle"


@register_prior
@dataclasses.dataclass(frozen=True)
class EMA(ModelPrior):
  """The cheap proxy of the mutual-information prior: ``zeta`` is the policy's
  own architecture with weights that are an exponential moving average of the
  policy's (as TR-DPO does for the reference), ``phi <- decay phi + (1 - decay)
  theta`` after every policy step, starting from the reference.

  ``s = LP - log pi_phi(y|x)``. ``decay = 1`` is DPO; ``decay = 0`` compares
  the policy with its own previous step.
  """
  name: ClassVar[str] = "ema"
  decay: float = 0.99

  def validate(self):
    _require(0.0 <= self.decay <= 1.0, self.name, f"decay must be in [0, 1]; got {self.decay}")

  @property
  def param_update(self) -> str:
    return "ema"

  @property
  def conditional(self) -> bool:
    return True


__all__ = [
    "Constrained", "EMA", "ModelPrior", "MutualInformation", "DICE", "DPO", "HDPO", "Prior", "PriorOutput", "RDPO", "ROLES", "SimPO", "SparsePO", "TDPO",
    "TISDPO", "apply_mask_head", "init_mask_head", "lengths", "make_prior", "masked_sum",
    "prior_class", "register_prior", "registered_priors",
]
