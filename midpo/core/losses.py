"""The MI-DPO loss: one loss over pairs, the algorithm chosen by its prior.

    h(y)  = alpha * (LP(y) - log zeta(y)) = alpha * s(y)
    z     = h(y_w) - h(y_l)
    loss  = link(z) [+ prior penalty] [+ nll_weight * NLL(y_w)]

``alpha`` is every original algorithm's ``beta`` and is applied here, once. The
prior (``midpo.core.priors``) gives ``s``; the link and the regularisers are options
orthogonal to the prior, as TRL users expect them:

* ``sigmoid``: ``-(1-eps) log s(z) - eps log s(-z)`` (DPO; with
  ``label_smoothing = eps > 0`` conservative DPO (cDPO), as in
  TRL's CPO trainer and older DPO trainers). ``eps`` in ``[0, 0.5]``.
* ``robust``: ``(-(1-eps) log s(z) + eps log s(-z)) / (1 - 2 eps)`` (robust
  DPO, "Provably Robust DPO", 2024; TRL ``loss_type="robust"``). ``eps`` in ``[0, 0.5)``.
* ``hinge``: ``relu(1 - z)`` (SLiC; TRL ``hinge``).
* ``ipo``: ``(s_w/|y_w| - s_l/|y_l| - 1/(2 alpha))^2`` on length-normalised
  scores, as TRL's ``ipo`` (IPO, "A General Theoretical Paradigm to Understand
  Learning from Human Preferences", 2023).
* TRL 1.16's other pair loss types (``DPOTrainer``, ``loss_type=``), over any
  prior, with ``r = alpha * s`` each side's implicit reward:

  - ``exo_pair``: ``KL(q || p)`` with ``q = (s(z), s(-z))`` and
    ``p = (1 - eps, eps)``, ``eps = label_smoothing`` in ``(0, 0.5]`` (EXO,
    "Towards Efficient Exact Optimization of Language Model Alignment", 2024,
    eq. 16; TRL's ``exo_pair``, which the EXO authors run at ``eps = 1e-3``).
  - ``nca_pair``: ``-log s(r_w) - log s(-r_w)/2 - log s(-r_l)/2`` (NCA, "Noise
    Contrastive Alignment of Language Models with Explicit Rewards", 2024).
  - ``bco_pair``: ``-log s(r_w) - log s(-r_l)`` (TRL's ``bco_pair``: BCO's
    pairwise form, without the running reward mean of TRL's BCO trainer).
  - ``sppo_hard``: ``(s_w - 1/(2 alpha))^2 + (s_l + 1/(2 alpha))^2`` (SPPO with
    hard win probabilities, "Self-Play Preference Optimization", 2024, eq. 4.7).
  - ``apo_zero``: ``1 - s(r_w) + s(r_l)``; ``apo_down``: ``s(r_w) + 1 - s(z)``
    (APO, "Anchored Preference Optimization", 2024, eqs. 7 and 8).
  - ``discopop``: ``-log s(z) (1 - m) + exp(-z) m`` with ``m = s(z / tau)``,
    ``tau = discopop_tau`` (DiscoPOP, "Discovering Preference Optimization
    Algorithms with and for Large Language Models", 2024, eq. 5; TRL's default
    tau 0.05).
  - ``sigmoid_norm``: ``-log s(alpha (s_w/|y_w| - s_l/|y_l|))`` (TRL's
    length-normalised sigmoid).

* ``nll_weight``: adds ``nll_weight * NLL`` of the chosen response (RPO,
  SimPO's ``sft_weight``); ``nll_normalization="token"`` averages over all
  chosen tokens of the batch (TRL), ``"sequence"`` averages per response then
  over pairs (SimPO's official code).

Bad input raises a clear ``ValueError`` at trace time (shapes, missing fields,
hyperparameters). Value errors that can only be seen on concrete data (a
response with no real tokens) raise when the loss is called eagerly; inside
``jit`` they are counted in ``metrics["invalid/empty_responses"]`` (and the
loss stays finite), and ``check_pairs`` validates host batches before a step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from midpo.core import priors as priors_lib
from midpo.core.stats import SequenceStats

Array = jax.Array

LINKS = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
         "apo_zero", "apo_down", "discopop", "sigmoid_norm")
# Links that read label_smoothing.
_SMOOTHED = ("sigmoid", "robust", "exo_pair")
NLL_NORMALIZATIONS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Options of the link and the regularisers, independent of the prior.

  Attributes:
    alpha: the scale of the implicit reward (each algorithm's ``beta``), > 0.
    link: one of ``LINKS``.
    label_smoothing: ``eps`` for the ``sigmoid``, ``robust`` and
      ``exo_pair`` links.
    nll_weight: weight of the chosen response's NLL, >= 0.
    nll_normalization: ``"token"`` or ``"sequence"``.
    discopop_tau: the ``discopop`` link's temperature, > 0 (TRL's name and
      default).
  """
  alpha: float = 0.1
  link: str = "sigmoid"
  label_smoothing: float = 0.0
  nll_weight: float = 0.0
  nll_normalization: str = "token"
  discopop_tau: float = 0.05

  def __post_init__(self):
    def fail(key, msg):
      raise ValueError(f"LossConfig.{key}: {msg}")

    if not _is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
      fail("alpha", f"must be a finite number > 0; got {self.alpha!r}")
    if self.link not in LINKS:
      fail("link", f"must be one of {LINKS}; got {self.link!r}")
    eps = self.label_smoothing
    if not _is_real(eps) or not math.isfinite(eps):
      fail("label_smoothing", f"must be a number; got {eps!r}")
    if self.link == "sigmoid" and not 0.0 <= eps <= 0.5:
      fail("label_smoothing", f"must be in [0, 0.5] for the sigmoid link; got {eps}")
    if self.link == "robust" and not 0.0 <= eps < 0.5:
      fail("label_smoothing", f"must be in [0, 0.5) for the robust link; got {eps}")
    if self.link == "exo_pair" and not 0.0 < eps <= 0.5:
      fail("label_smoothing", f"is EXO's eps, in (0, 0.5] (the EXO authors use 1e-3); "
           f"got {eps}")
    if self.link not in _SMOOTHED and eps != 0.0:
      fail("label_smoothing", f"is not defined for the {self.link} link; got {eps}")
    tau = self.discopop_tau
    if not _is_real(tau) or not math.isfinite(tau) or tau <= 0:
      fail("discopop_tau", f"must be a finite number > 0; got {tau!r}")
    if not _is_real(self.nll_weight) or not math.isfinite(self.nll_weight) or self.nll_weight < 0:
      fail("nll_weight", f"must be a finite number >= 0; got {self.nll_weight!r}")
    if self.nll_normalization not in NLL_NORMALIZATIONS:
      fail("nll_normalization",
           f"must be one of {NLL_NORMALIZATIONS}; got {self.nll_normalization!r}")


def _is_real(x) -> bool:
  return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool)


class LossOutput(NamedTuple):
  """``loss`` scalar (the mean of ``per_pair``), ``per_pair`` ``[B]``, ``logits``
  ``[B]`` (``z``), scalar ``metrics`` with the names TRL and Tunix use."""
  loss: Array
  per_pair: Array
  logits: Array
  metrics: dict


def _is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _check_stats(stats: SequenceStats, side: str, prior: priors_lib.Prior) -> None:
  if stats.logps.ndim != 2:
    raise ValueError(f"{side}.logps must be [B, T]; got shape {stats.logps.shape}")
  if stats.mask.shape != stats.logps.shape:
    raise ValueError(f"{side}.mask shape {stats.mask.shape} != {side}.logps shape "
                     f"{stats.logps.shape}")
  for name in prior.required_fields():
    value = stats.get(name)
    if value is None:
      raise ValueError(f"prior {prior.name!r} needs SequenceStats.{name} for the {side} "
                       "responses, and it is None")
  for name, value in stats.fields().items():
    if name in ("logps", "mask"):
      continue
    want = stats.logps.shape if name != "ref_hidden" else stats.logps.shape + (None, None)
    got = value.shape
    if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
      shown = tuple("?" if w is None else w for w in want)
      raise ValueError(f"{side}.{name} has shape {got}; expected {shown}")


def check_pairs(chosen: SequenceStats, rejected: SequenceStats,
                prior: Optional[priors_lib.Prior] = None) -> None:
  """Host-side value checks on concrete arrays; raises ValueError naming the pair."""
  for side, stats in (("chosen", chosen), ("rejected", rejected)):
    mask = np.asarray(stats.mask) > 0
    empty = np.flatnonzero(~mask.any(axis=-1))
    if empty.size:
      extra = (" (a length-normalised prior divides by the length)"
               if prior is not None and prior.length_normalised else "")
      raise ValueError(f"{empty.size} {side} response(s) have no real tokens (mask sums to 0)"
                       f"{extra}; first at pair {int(empty[0])}")
    for name in ("logps", "ref_logps", "prev_logps", "kl_ref_policy", "kl_policy_ref",
                 "token_weights"):
      value = getattr(stats, name)
      if value is None:
        continue
      value = np.asarray(value)
      bad = mask & ~np.isfinite(value)
      if bad.any():
        b, t = map(int, np.argwhere(bad)[0])
        raise ValueError(f"{side}.{name} is not finite on a real token: pair {b}, "
                         f"position {t}: {value[b, t]}")


def _link(z: Array, s_w: Array, s_l: Array, n_w: Array, n_l: Array, cfg: LossConfig) -> Array:
  eps = cfg.label_smoothing
  if cfg.link == "sigmoid":
    out = -jax.nn.log_sigmoid(z)
    if eps:
      out = -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    return out
  if cfg.link == "robust":
    return ((-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z))
            / (1.0 - 2.0 * eps))
  if cfg.link == "hinge":
    return jax.nn.relu(1.0 - z)
  if cfg.link == "ipo":
    delta = s_w / jnp.maximum(n_w, 1.0) - s_l / jnp.maximum(n_l, 1.0)
    return jnp.square(delta - 1.0 / (2.0 * cfg.alpha))
  log_sig, sig = jax.nn.log_sigmoid, jax.nn.sigmoid
  r_w, r_l = cfg.alpha * s_w, cfg.alpha * s_l
  if cfg.link == "exo_pair":
    return (sig(z) * (log_sig(z) - math.log1p(-eps))
            + sig(-z) * (log_sig(-z) - math.log(eps)))
  if cfg.link == "nca_pair":
    return -log_sig(r_w) - 0.5 * log_sig(-r_w) - 0.5 * log_sig(-r_l)
  if cfg.link == "bco_pair":
    return -log_sig(r_w) - log_sig(-r_l)
  if cfg.link == "sppo_hard":
    half = 0.5 / cfg.alpha
    return jnp.square(s_w - half) + jnp.square(s_l + half)
  if cfg.link == "apo_zero":
    return 1.0 - sig(r_w) + sig(r_l)
  if cfg.link == "apo_down":
    return sig(r_w) + 1.0 - sig(z)
  if cfg.link == "discopop":
    m = sig(z / cfg.discopop_tau)
    return -log_sig(z) * (1.0 - m) + jnp.exp(-z) * m
  if cfg.link == "sigmoid_norm":
    delta = s_w / jnp.maximum(n_w, 1.0) - s_l / jnp.maximum(n_l, 1.0)
    return -log_sig(cfg.alpha * delta)
  raise AssertionError(cfg.link)


def mi_dpo_loss(chosen: SequenceStats, rejected: SequenceStats,
                prior: Union[str, priors_lib.Prior], config: LossConfig = LossConfig(), *,
                prior_params: Any = None, rng: Optional[Array] = None,
                train: bool = False) -> LossOutput:
  """The MI-DPO loss of a batch of pairs under ``prior``.

  Args:
    chosen, rejected: per-token statistics of the chosen and rejected
      responses; same batch size, any (possibly different) lengths.
    prior: a ``Prior`` or a registered name (built with default
      hyperparameters).
    config: the link, ``alpha`` and regularisers.
    prior_params: the prior's own parameters, if it has any.
    rng: randomness for the prior (SparsePO's mask dropout in training).
    train: training mode (dropout on).

  Returns:
    ``LossOutput``; differentiate ``loss`` with respect to the policy (through
    ``logps``) and, for a prior with parameters, ``prior_params``.
  """
  if isinstance(prior, str):
    prior = priors_lib.make_prior(prior)
  if not isinstance(prior, priors_lib.Prior):
    raise ValueError(f"prior must be a Prior or a registered name; got {type(prior).__name__}")
  if not isinstance(config, LossConfig):
    raise ValueError(f"config must be a LossConfig; got {type(config).__name__}")
  _check_stats(chosen, "chosen", prior)
  _check_stats(rejected, "rejected", prior)
  if chosen.batch_size != rejected.batch_size:
    raise ValueError(f"chosen and rejected batch sizes differ: {chosen.batch_size} vs "
                     f"{rejected.batch_size}")
  if prior.scores_with_params and prior_params is None:
    raise ValueError(f"prior {prior.name!r} has parameters: pass prior_params "
                     "(from prior.init_params)")
  if not any(_is_tracer(x) for x in jax.tree.leaves((chosen, rejected))):
    check_pairs(chosen, rejected, prior)

  alpha = float(config.alpha)
  rng_w, rng_l = (None, None) if rng is None else tuple(jax.random.split(rng))
  out_w = prior.score(chosen, "chosen", alpha=alpha, params=prior_params, rng=rng_w,
                      train=train)
  out_l = prior.score(rejected, "rejected", alpha=alpha, params=prior_params, rng=rng_l,
                      train=train)
  s_w, s_l = out_w.score, out_l.score
  n_w, n_l = priors_lib.lengths(chosen), priors_lib.lengths(rejected)
  z = alpha * (s_w - s_l)
  per_pair = _link(z, s_w, s_l, n_w, n_l, config)
  if "penalty" in out_w.aux:
    per_pair = per_pair + out_w.aux["penalty"] + out_l.aux["penalty"]

  lp_w = priors_lib.masked_sum(chosen.logps, chosen.mask)
  lp_l = priors_lib.masked_sum(rejected.logps, rejected.mask)
  nll = None
  if config.nll_weight:
    if config.nll_normalization == "token":
      nll = -lp_w * (chosen.batch_size / jnp.maximum(jnp.sum(n_w), 1.0))
    else:
      nll = -lp_w / jnp.maximum(n_w, 1.0)
    per_pair = per_pair + config.nll_weight * nll
  loss = jnp.mean(per_pair)

  sg = jax.lax.stop_gradient
  r_w, r_l = sg(alpha * s_w), sg(alpha * s_l)
  mean = jnp.mean
  metrics = {
      "loss": sg(loss),
      "rewards/chosen": mean(r_w),
      "rewards/rejected": mean(r_l),
      "rewards/margins": mean(r_w - r_l),
      "rewards/accuracies": mean((r_w > r_l).astype(r_w.dtype)),
      "logps/chosen": mean(sg(lp_w)),
      "logps/rejected": mean(sg(lp_l)),
      "prior/log_zeta_chosen": mean(sg(lp_w - s_w)),
      "prior/log_zeta_rejected": mean(sg(lp_l - s_l)),
      # Collapse alarm for learned priors: prior mass moving to rejected responses.
      "prior/log_zeta_gap": mean(sg((lp_w - s_w) - (lp_l - s_l))),
      "lengths/chosen": mean(n_w),
      "lengths/rejected": mean(n_l),
      "invalid/empty_responses": jnp.sum(n_w == 0) + jnp.sum(n_l == 0),
  }
  if nll is not None:
    metrics["nll"] = mean(sg(nll))
  for side, stats in (("chosen", chosen), ("rejected", rejected)):
    if stats.kl_ref_policy is not None:
      metrics[f"kl/{side}"] = mean(priors_lib.masked_sum(sg(stats.kl_ref_policy), stats.mask))
    if stats.kl_policy_ref is not None:
      metrics[f"kl_policy_ref/{side}"] = mean(
          priors_lib.masked_sum(sg(stats.kl_policy_ref), stats.mask))
  for side, out in (("chosen", out_w), ("rejected", out_l)):
    for key, value in out.aux.items():
      metrics[f"prior/{key}_{side}"] = mean(sg(value))
  return LossOutput(loss=loss, per_pair=per_pair, logits=z, metrics=metrics)


__all__ = ["LINKS", "LossConfig", "LossOutput", "check_pairs", "mi_dpo_loss"]
