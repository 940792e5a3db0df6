"""The MI-DPO loss: one loss over pairs, the algorithm chosen by its prior.

    h(y)  = alpha * (LP(y) - log zeta(y)) = alpha * s(y)
    z     = h(y_w) - h(y_l)
    loss  = link(z) [+ prior penalty] [+ nll_weight * NLL(y_w)]

``alpha`` is every original algorithm's ``beta`` and is applied here, once. The
prior (``midpo.core.priors``) gives ``s``; the link and the regularisers are options
orthogonal to the prior, as TRL users expect them:

* the link: one of ``midpo.core.links.LINKS`` (DPO's sigmoid, cDPO, robust,
  hinge, IPO and every other pair loss type of TRL 1.16's ``DPOTrainer``), or
  a weighted mixture of several; ``f_divergence_type``, ``use_weighting``
  (WPO) and ``ld_alpha`` (LD-DPO) as TRL names them. Their formulas and
  sources are in ``midpo.core.links``.
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

from midpo.core import links as links_lib
from midpo.core import priors as priors_lib
from midpo.core.links import (F_DIVERGENCE_LINKS, F_DIVERGENCES, LD_FIELDS,
                              LENGTH_NORMALISING_LINKS, LINKS, MODEL_LOGP_FIELDS, NOT_LD_FIELDS,
                              PER_SIDE_LINKS, SMOOTHING_RANGES)
from midpo.core.stats import SequenceStats

Array = jax.Array

NLL_NORMALIZATIONS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Options of the link and the regularisers, independent of the prior.

  Attributes:
    alpha: the scale of the implicit reward (each algorithm's ``beta``), > 0.
    link: one of ``LINKS``, or several comma-separated (a mixture; TRL's
      ``loss_type`` list).
    label_smoothing: ``eps`` for the ``sigmoid``, ``robust``, ``exo_pair``,
      ``aot`` and ``aot_unpaired`` links.
    nll_weight: weight of the chosen response's NLL, >= 0.
    nll_normalization: ``"token"`` or ``"sequence"``.
    discopop_tau: the ``discopop`` link's temperature, > 0 (TRL's name and
      default).
    loss_weights: one finite weight per link, or None/empty for weights 1
      (TRL's name; MPO's ``(0.8, 0.2, 1.0)``).
    f_divergence_type: one of ``F_DIVERGENCES`` (TRL's name and default).
    f_alpha_divergence_coef: ``a`` of ``alpha_divergence`` (TRL's name and
      default 0.5).
    use_weighting: WPO's weights on every pair (TRL's name).
    ld_alpha: LD-DPO's weight of the tokens past the pair's shared length, in
      ``[0, 1]``; None is off (TRL's name and default).

  Raises:
    ValueError: naming the field, for any value out of range or an option
      not defined for a chosen link.
  """
  alpha: float = 0.1
  link: str = "sigmoid"
  label_smoothing: float = 0.0
  nll_weight: float = 0.0
  nll_normalization: str = "token"
  discopop_tau: float = 0.05
  loss_weights: Optional[tuple] = None
  f_divergence_type: str = "reverse_kl"
  f_alpha_divergence_coef: float = 0.5
  use_weighting: bool = False
  ld_alpha: Optional[float] = None

  @property
  def links(self) -> tuple[str, ...]:
    """The links of the (possibly mixed) loss, in order."""
    return tuple(part.strip() for part in str(self.link).split(","))

  @property
  def weights(self) -> tuple[float, ...]:
    """One weight per link (``loss_weights``, or 1 each)."""
    if not self.loss_weights:
      return (1.0,) * len(self.links)
    return tuple(float(w) for w in self.loss_weights)

  def required_fields(self) -> tuple[str, ...]:
    """SequenceStats fields the options read beyond ``logps`` and ``mask``."""
    return ("log_sum_sq_probs",) if self.use_weighting else ()

  def __post_init__(self):
    def fail(key, msg):
      raise ValueError(f"LossConfig.{key}: {msg}")

    if not _is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
      fail("alpha", f"must be a finite number > 0; got {self.alpha!r}")
    if not isinstance(self.link, str):
      fail("link", f"must be a string (comma-separated for a mixture); got {self.link!r}")
    links = self.links
    for link in links:
      if link not in LINKS:
        fail("link", f"must be one of {LINKS}, or several comma-separated; got {link!r}")
    if len(set(links)) != len(links):
      fail("link", f"names a link twice: {self.link!r}")
    eps = self.label_smoothing
    if not _is_real(eps) or not math.isfinite(eps):
      fail("label_smoothing", f"must be a number; got {eps!r}")
    for link in links:
      if link not in SMOOTHING_RANGES:
        continue
      lo, hi, hi_in = SMOOTHING_RANGES[link]
      if link == "exo_pair" and not lo < eps <= hi:
        fail("label_smoothing", f"is EXO's eps, in (0, 0.5] (the EXO authors use 1e-3); "
             f"got {eps}")
      if not lo <= eps or not (eps <= hi if hi_in else eps < hi):
        fail("label_smoothing", f"must be in [{lo:g}, {hi:g}{']' if hi_in else ')'} for the "
             f"{link} link; got {eps}")
    if eps != 0.0 and not any(link in SMOOTHING_RANGES for link in links):
      fail("label_smoothing", f"is not defined for the {self.link} link; got {eps}")
    if self.loss_weights is not None and not isinstance(self.loss_weights, (tuple, list)):
      fail("loss_weights", f"must be a tuple of numbers, one per link; got {self.loss_weights!r}")
    if self.loss_weights:
      if len(self.loss_weights) != len(links):
        fail("loss_weights", f"has {len(self.loss_weights)} weight(s) for {len(links)} link(s) "
             f"{links}")
      for w in self.loss_weights:
        if not _is_real(w) or not math.isfinite(w):
          fail("loss_weights", f"must hold finite numbers; got {self.loss_weights!r}")
    if self.f_divergence_type not in F_DIVERGENCES:
      fail("f_divergence_type", f"must be one of {F_DIVERGENCES}; got "
           f"{self.f_divergence_type!r}")
    if self.f_divergence_type != "reverse_kl":
      bad = [link for link in links if link not in F_DIVERGENCE_LINKS]
      if bad:
        fail("f_divergence_type", f"{self.f_divergence_type!r} is not defined for the "
             f"{bad[0]} link (only for {F_DIVERGENCE_LINKS}, as in TRL)")
    a = self.f_alpha_divergence_coef
    if not _is_real(a) or not math.isfinite(a):
      fail("f_alpha_divergence_coef", f"must be a finite number; got {a!r}")
    if not isinstance(self.use_weighting, (bool, np.bool_)):
      fail("use_weighting", f"must be True or False; got {self.use_weighting!r}")
    if self.use_weighting and any(link in ("aot", "aot_unpaired") for link in links):
      fail("use_weighting", "is not defined for the aot links, which sort the batch (as in TRL)")
    ld = self.ld_alpha
    if ld is not None and (not _is_real(ld) or not 0.0 <= ld <= 1.0):
      fail("ld_alpha", f"must be None (off) or a number in [0, 1]; got {ld!r}")
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
                 "token_weights", "log_sum_sq_probs"):
      value = getattr(stats, name)
      if value is None:
        continue
      value = np.asarray(value)
      bad = mask & ~np.isfinite(value)
      if bad.any():
        b, t = map(int, np.argwhere(bad)[0])
        raise ValueError(f"{side}.{name} is not finite on a real token: pair {b}, "
                         f"position {t}: {value[b, t]}")


def check_compatible(config: LossConfig, prior: priors_lib.Prior) -> None:
  """Raises ValueError naming the link (or option) and the prior when ``prior``
  does not supply what ``config`` needs.

  * A link of ``PER_SIDE_LINKS`` reads each side's ``s`` on its own: a prior
    that splits a pair-level term between the sides (SimPO's margin) does not
    define it.
  * ``ipo`` and ``sigmoid_norm`` divide each side's ``s`` by its length: not
    over a prior whose ``s`` is a per-token mean already (``length_normalised``).
  * An f-divergence other than reverse KL acts on ``u = exp(s)`` as the
    ratio of the policy to a model's distribution (reference, previous
    policy, prior model): a reference-free prior (SimPO, CPO, ORPO) has none.
  * ``ld_alpha`` weights per-token log-probs; a prior that reads per-token KLs
    (``kl_ref_policy``, ``kl_policy_ref``) would keep the verbose tail in its
    KL term, which LD-DPO does not define.
  """
  if prior.splits_pair_term:
    for link in config.links:
      if link in PER_SIDE_LINKS:
        raise ValueError(
            f"the {link} link reads each response's reward alpha*s on its own, and prior "
            f"{prior.name!r} splits a pair-level term between the two sides "
            f"({prior.split_term_description}); use a link of the pair's margin, or the prior "
            "without that term")
  if prior.length_normalised:
    for link in config.links:
      if link in LENGTH_NORMALISING_LINKS:
        raise ValueError(
            f"the {link} link divides each side's score by its length, and prior "
            f"{prior.name!r} scores a per-token mean already: use the sigmoid link (or the "
            "reference-free 'cpo' prior, whose score is a sum, as TRL's CPO ipo does)")
  if config.f_divergence_type != "reverse_kl" and not set(prior.required_fields()) & set(
      MODEL_LOGP_FIELDS):
    raise ValueError(
        f"f_divergence_type={config.f_divergence_type!r} is defined on the ratio of the policy "
        f"to a model's distribution, and prior {prior.name!r} reads no model's log-probs "
        f"(one of {MODEL_LOGP_FIELDS}): its exp(s) is not such a ratio")
  if config.ld_alpha is not None:
    kl = [f for f in prior.required_fields() if f in NOT_LD_FIELDS]
    if kl:
      raise ValueError(f"ld_alpha (LD-DPO) weights per-token log-probs, and prior "
                       f"{prior.name!r} reads per-token {kl[0]}, which it would not weight")


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

  Raises:
    ValueError: bad shapes or missing fields (naming them), a prior without
      its parameters, or a link or option the prior does not define
      (``check_compatible``, naming both).
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

  check_compatible(config, prior)
  if config.use_weighting and chosen.log_sum_sq_probs is None:
    raise ValueError("use_weighting (WPO) needs SequenceStats.log_sum_sq_probs on both sides")

  alpha = float(config.alpha)
  raw_w, raw_l = chosen, rejected
  if config.ld_alpha is not None:
    w_w, w_l = links_lib.ld_weights(chosen.mask, rejected.mask, float(config.ld_alpha))
    chosen, rejected = links_lib.desensitise(chosen, w_w), links_lib.desensitise(rejected, w_l)
  rng_w, rng_l = (None, None) if rng is None else tuple(jax.random.split(rng))
  out_w = prior.score(chosen, "chosen", alpha=alpha, params=prior_params, rng=rng_w,
                      train=train)
  out_l = prior.score(rejected, "rejected", alpha=alpha, params=prior_params, rng=rng_l,
                      train=train)
  s_w, s_l = out_w.score, out_l.score
  n_w, n_l = priors_lib.lengths(chosen), priors_lib.lengths(rejected)
  f_kind, f_coef = config.f_divergence_type, config.f_alpha_divergence_coef
  f_w, f_l = links_lib.f_prime(s_w, f_kind, f_coef), links_lib.f_prime(s_l, f_kind, f_coef)
  z = alpha * (f_w - f_l)
  lp_w = priors_lib.masked_sum(chosen.logps, chosen.mask)
  lp_l = priors_lib.masked_sum(rejected.logps, rejected.mask)
  raw_lp_w = priors_lib.masked_sum(raw_w.logps, raw_w.mask)
  # TRL's sft: the mean NLL over every chosen token of the batch.
  sft = -jnp.sum(raw_lp_w) / jnp.maximum(jnp.sum(n_w), 1.0)
  pair_weight = None
  if config.use_weighting:
    pair_weight = links_lib.wpo_weights(raw_w) * links_lib.wpo_weights(raw_l)
  per_pair = 0.0
  for link, weight in zip(config.links, config.weights):
    term = links_lib.link_loss(
        link, alpha=alpha, eps=config.label_smoothing, tau=config.discopop_tau, z=z, f_w=f_w,
        f_l=f_l, s_w=s_w, s_l=s_l, lp_w=lp_w, lp_l=lp_l, n_w=n_w, n_l=n_l, sft=sft)
    if pair_weight is not None:
      term = term * pair_weight
    per_pair = per_pair + weight * term
  if "penalty" in out_w.aux:
    per_pair = per_pair + out_w.aux["penalty"] + out_l.aux["penalty"]

  nll = None
  if config.nll_weight:
    if config.nll_normalization == "token":
      nll = -raw_lp_w * (chosen.batch_size / jnp.maximum(jnp.sum(n_w), 1.0))
    else:
      nll = -raw_lp_w / jnp.maximum(n_w, 1.0)
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
  if pair_weight is not None:
    metrics["wpo/pair_weight"] = mean(sg(pair_weight))
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


__all__ = [
    "F_DIVERGENCES", "F_DIVERGENCE_LINKS", "LD_FIELDS", "LINKS", "LossConfig", "LossOutput",
    "PER_SIDE_LINKS", "check_compatible", "check_pairs", "mi_dpo_loss",
]
