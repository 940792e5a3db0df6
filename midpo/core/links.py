"""The links of the MI-DPO loss and the options that act on them.

With ``s = LP - log zeta`` each side's score under the prior, ``r = alpha * s``
its implicit reward and ``z = alpha (s_w - s_l)`` (``midpo.core.losses``),
a link turns a pair into its loss. ``s(.)`` below is the logistic sigmoid.

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
  - ``aot``: the sigmoid link (with ``label_smoothing``) on
    ``z_(i) = alpha (sort(LP_w - LP_l)_i - sort(log zeta_w - log zeta_l)_i)``,
    each sorted over the batch; ``aot_unpaired``: on
    ``alpha (sort(s_w)_i - sort(s_l)_i)`` (AOT, "Distributional Preference
    Alignment of LLMs via Optimal Transport", 2024, the paired and unpaired
    forms). Entry ``i`` of ``per_pair`` is the ``i``-th order statistic, not
    pair ``i``; the sort runs over the batch the loss is given (TRL sorts each
    device's batch; midpo's jitted step sorts the global batch).
  - ``sft``: the chosen responses' NLL averaged over all their tokens in the
    batch (TRL's ``sft``), the same value on every pair; with the others in a
    mixture (MPO: ``link="sigmoid,bco_pair,sft"``, ``loss_weights=(0.8, 0.2,
    1.0)``, "Enhancing the Reasoning Ability of Multimodal Large Language
    Models via Mixed Preference Optimization", 2024).

* Mixtures: ``link`` may name several links, comma-separated (TRL's
  ``loss_type`` list); the loss is ``sum_k loss_weights[k] * mean(link_k)``
  (equal weights 1 by default, as TRL).
* ``f_divergence_type`` (f-DPO, "Beyond Reverse KL: Generalizing Direct
  Preference Optimization with Diverse Divergence Constraints", 2023; TRL's
  names): the links built on ``z`` (``F_DIVERGENCE_LINKS``) see
  ``z = alpha (f'(u_w) - f'(u_l))`` with ``u = exp(s)`` the policy/prior ratio
  and ``f'(u)`` = ``log u`` (``reverse_kl``, DPO), ``1 - 1/u``
  (``forward_kl``), ``log 2 + log s(log u)`` (``js_divergence``),
  ``(u^(a-1) - 1)/(a-1)`` with ``a = f_alpha_divergence_coef``
  (``alpha_divergence``; ``(a-1) s`` clipped at 80 as TRL does in float32).
  The rewards logged stay ``alpha * s``, as TRL logs them.
* ``use_weighting`` (WPO, "WPO: Enhancing RLHF with Weighted Preference
  Optimization", 2024, eq. 2, as TRL computes it): every link's per-pair loss
  is multiplied by ``w_w * w_l``, ``w = exp(mean_t(lp_t - log sum_v p_v^2))``
  over the response's tokens, without gradient. Needs
  ``SequenceStats.log_sum_sq_probs``.
* ``ld_alpha`` (LD-DPO, "Length Desensitization in Direct Preference
  Optimization", 2024, as TRL computes it): every per-token log-prob the prior
  reads (policy, reference, previous policy, prior model) is weighted 1 on
  the first ``min(|y_w|, |y_l|)`` response tokens of the pair and
  ``ld_alpha`` after them. The NLL terms use the unweighted log-probs.

Functions here take plain arrays ``[B]`` (per pair) or ``[B, T]`` (per token);
``midpo.core.losses`` calls them with a ``LossConfig``'s values.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from midpo.core.priors import lengths, masked_sum
from midpo.core.stats import SequenceStats

Array = jax.Array

LINKS = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
         "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft")
# Links that read label_smoothing: (low, high, high included) of eps (TRL's ranges).
SMOOTHING_RANGES = {"sigmoid": (0.0, 0.5, True), "robust": (0.0, 0.5, False),
             "exo_pair": (0.0, 0.5, True), "aot": (0.0, 0.5, True),
             "aot_unpaired": (0.0, 0.5, True)}
# Links that read each side's score on its own (not only the pair's
# difference; ipo and sigmoid_norm divide each by its own length): a prior
# that splits a pair term between the sides (``Prior.splits_pair_term``) does
# not define them.
PER_SIDE_LINKS = ("nca_pair", "bco_pair", "sppo_hard", "aot_unpaired", "apo_zero", "apo_down",
                  "ipo", "sigmoid_norm")
# Links that divide each side's score by its length: a prior whose score is
# already a per-token mean (``Prior.length_normalised``) would be divided twice.
LENGTH_NORMALISING_LINKS = ("ipo", "sigmoid_norm")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The links TRL 1.16 generalises to the other f-divergences.
F_DIVERGENCE_LINKS = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop",
                      "sft")
# Per-token log-probs of a model's distribution (reference, previous policy,
# prior model): the f-divergences need a prior that reads one of them.
MODEL_LOGP_FIELDS = ("ref_logps", "prev_logps", "prior_logps")
# The per-token log-prob fields LD-DPO's weights apply to.
LD_FIELDS = ("logps", "ref_logps", "prev_logps", "prior_logps")
# Fields of per-token quantities that are not log-probs of the response's
# tokens: a prior reading them is not defined under ld_alpha.
NOT_LD_FIELDS = ("kl_ref_policy", "kl_policy_ref")


def ld_weights(mask_w_BxT: Array, mask_l_BxT: Array, ld_alpha: float) -> tuple[Array, Array]:
  """LD-DPO's per-token weights of the chosen ``[B, T_w]`` and rejected
  ``[B, T_l]`` responses: 1 on the first ``min(|y_w|, |y_l|)`` response tokens
  of the pair, ``ld_alpha`` after (TRL's ``ld_alpha``; "Length
  Desensitization in Direct Preference Optimization", 2024)."""
  real_w, real_l = mask_w_BxT > 0, mask_l_BxT > 0
  shared = jnp.minimum(jnp.sum(real_w, -1), jnp.sum(real_l, -1))[:, None]

  def weights(real):
    pos = jnp.cumsum(real, axis=-1)
    return jnp.where(pos <= shared, 1.0, ld_alpha).astype(mask_w_BxT.dtype)

  return weights(real_w), weights(real_l)


def desensitise(stats: SequenceStats, w_BxT: Array) -> SequenceStats:
  """``stats`` with every per-token log-prob field of ``LD_FIELDS`` times ``w``."""
  fields = {f: getattr(stats, f) * w_BxT.astype(getattr(stats, f).dtype)
            for f in LD_FIELDS if getattr(stats, f) is not None}
  return dataclasses.replace(stats, **fields)


def f_prime(s: Array, kind: str, coef: float = 0.5) -> Array:
  """``f'(u)`` at ``u = exp(s)`` for the f-divergence ``kind`` (one of
  ``F_DIVERGENCES``; ``coef`` the alpha-divergence's ``a``), as TRL 1.16's
  ``DPOTrainer`` computes it (f-DPO, "Beyond Reverse KL", 2023).

  Raises:
    ValueError: an unknown ``kind``.
  """
  if kind == "reverse_kl":
    return s
  if kind == "forward_kl":
    return 1.0 - jnp.exp(-s)
  if kind == "js_divergence":
    return math.log(2.0) + jax.nn.log_sigmoid(s)
  if kind != "alpha_divergence":
    raise ValueError(f"f-divergence must be one of {F_DIVERGENCES}; got {kind!r}")
  a = float(coef)
  if abs(a - 1.0) < 1e-6:  # the limit a -> 1 is log u (TRL's threshold)
    return s
  return (jnp.exp(jnp.minimum((a - 1.0) * s, 80.0)) - 1.0) / (a - 1.0)


def smoothed_sigmoid(z: Array, eps: float) -> Array:
  """``-(1 - eps) log s(z) - eps log s(-z)`` (exactly ``-log s(z)`` at eps 0)."""
  if not eps:
    return -jax.nn.log_sigmoid(z)
  return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def link_loss(link: str, *, alpha: float, eps: float, tau: float, z: Array, f_w: Array,
              f_l: Array, s_w: Array, s_l: Array, lp_w: Array, lp_l: Array, n_w: Array,
              n_l: Array, sft: Array) -> Array:
  """One link's per-pair loss ``[B]``.

  Args:
    link: one of ``LINKS``.
    alpha, eps, tau: the reward scale, ``label_smoothing`` and
      ``discopop_tau``.
    z: ``alpha (f_w - f_l)`` ``[B]``, with ``f`` the f-divergence's scores of
      each side (``s`` itself under reverse KL).
    s_w, s_l: each side's score ``LP - log zeta`` ``[B]``.
    lp_w, lp_l: the sequence log-probs ``LP`` ``[B]``.
    n_w, n_l: the response lengths ``[B]``.
    sft: the batch's chosen-token mean NLL (a scalar).
  """
  log_sig, sig = jax.nn.log_sigmoid, jax.nn.sigmoid
  if link == "sigmoid":
    return smoothed_sigmoid(z, eps)
  if link == "robust":
    return (-(1.0 - eps) * log_sig(z) + eps * log_sig(-z)) / (1.0 - 2.0 * eps)
  if link == "hinge":
    return jax.nn.relu(1.0 - z)
  if link in ("ipo", "sigmoid_norm"):
    delta = f_w / jnp.maximum(n_w, 1.0) - f_l / jnp.maximum(n_l, 1.0)
    if link == "ipo":
      return jnp.square(delta - 1.0 / (2.0 * alpha))
    return -log_sig(alpha * delta)
  if link == "exo_pair":
    return (sig(z) * (log_sig(z) - math.log1p(-eps))
            + sig(-z) * (log_sig(-z) - math.log(eps)))
  if link == "discopop":
    # The formula as written, on z clipped at -50; below, where exp(-z)
    # overflows while m underflows to 0 (inf * 0), the product in log space.
    # Each branch's input stays inside its region, so neither has a NaN
    # gradient.
    zc = jnp.maximum(z, -50.0)
    m = sig(zc / tau)
    as_written = -log_sig(zc) * (1.0 - m) + jnp.exp(-zc) * m
    zf = jnp.minimum(z, -50.0)
    far = -log_sig(zf) * sig(-zf / tau) + jnp.exp(log_sig(zf / tau) - zf)
    return jnp.where(z < -50.0, far, as_written)
  if link == "sft":
    return jnp.broadcast_to(sft, z.shape)
  r_w, r_l = alpha * s_w, alpha * s_l
  if link == "nca_pair":
    return -log_sig(r_w) - 0.5 * log_sig(-r_w) - 0.5 * log_sig(-r_l)
  if link == "bco_pair":
    return -log_sig(r_w) - log_sig(-r_l)
  if link == "sppo_hard":
    half = 0.5 / alpha
    return jnp.square(s_w - half) + jnp.square(s_l + half)
  if link == "apo_zero":
    return 1.0 - sig(r_w) + sig(r_l)
  if link == "apo_down":
    return sig(r_w) + 1.0 - sig(alpha * (s_w - s_l))
  if link == "aot":
    # log zeta = LP - s: sort the policy's and the prior's log-ratios apart.
    delta = jnp.sort(lp_w - lp_l) - jnp.sort((lp_w - s_w) - (lp_l - s_l))
    return smoothed_sigmoid(alpha * delta, eps)
  if link == "aot_unpaired":
    return smoothed_sigmoid(alpha * (jnp.sort(s_w) - jnp.sort(s_l)), eps)
  raise ValueError(f"link must be one of {LINKS}; got {link!r}")


def wpo_weights(stats: SequenceStats) -> Array:
  """WPO's weight of each response, ``[B]``, without gradient:
  ``exp(mean_t(lp_t - log sum_v p_v^2))`` over its real tokens (WPO, "WPO:
  Enhancing RLHF with Weighted Preference Optimization", 2024, eq. 2, as TRL's
  ``use_weighting`` computes it). Above 1 where the response's tokens are
  likelier than the policy's expected probability ``sum_v p_v^2``.

  Raises:
    ValueError: ``stats.log_sum_sq_probs`` is None.
  """
  if stats.log_sum_sq_probs is None:
    raise ValueError("use_weighting (WPO) needs SequenceStats.log_sum_sq_probs")
  sg = jax.lax.stop_gradient
  aligned = masked_sum(sg(stats.logps) - sg(stats.log_sum_sq_probs), stats.mask)
  return jnp.exp(aligned / jnp.maximum(lengths(stats), 1.0))


__all__ = [
    "F_DIVERGENCES", "F_DIVERGENCE_LINKS", "LD_FIELDS", "LENGTH_NORMALISING_LINKS", "LINKS",
    "MODEL_LOGP_FIELDS", "NOT_LD_FIELDS",
    "PER_SIDE_LINKS", "SMOOTHING_RANGES", "desensitise", "f_prime", "ld_weights", "link_loss",
    "smoothed_sigmoid", "wpo_weights",
]
