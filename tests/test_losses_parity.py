"""Each prior reproduces its original algorithm: value and gradient, float64.

The MI-DPO loss under each prior, computed from logits by midpo (chunked
per-token statistics, then ``mi_dpo_loss``), must equal the original
algorithm's loss written independently in ``reference_algorithms`` (float64
numpy, from the authors' formulas), to 1e-6 relative, per pair; and its
gradient with respect to the policy logits must equal a central finite
difference of the reference, on random inputs with ragged padding and
different chosen/rejected lengths.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midpo import algorithms
from midpo.core import losses, stats
from tests import reference_algorithms as ref

B, TW, TL, V = 3, 7, 6, 11
RTOL = 1e-6


def _mask(rng, t, lengths):
  """Prompt (0), response (1), padding (0); ragged per row."""
  m = np.zeros((len(lengths), t))
  for i, (start, n) in enumerate(lengths):
    m[i, start:start + n] = 1
  return m


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  b = {
      "pol_w": 2 * rng.standard_normal((B, TW, V)),
      "pol_l": 2 * rng.standard_normal((B, TL, V)),
      "ref_w": 2 * rng.standard_normal((B, TW, V)),
      "ref_l": 2 * rng.standard_normal((B, TL, V)),
      "prev_w": 2 * rng.standard_normal((B, TW, V)),
      "prev_l": 2 * rng.standard_normal((B, TL, V)),
      "tgt_w": rng.integers(0, V, (B, TW)),
      "tgt_l": rng.integers(0, V, (B, TL)),
      "m_w": _mask(rng, TW, [(2, 4), (1, 6), (3, 1)]),
      "m_l": _mask(rng, TL, [(2, 3), (0, 6), (3, 2)]),
  }
  # Padding targets hold junk, as real batches do (-100, pad ids).
  b["tgt_w"] = np.where(b["m_w"] > 0, b["tgt_w"], -100)
  b["tgt_l"] = np.where(b["m_l"] > 0, b["tgt_l"], -100)
  for side, t in (("w", TW), ("l", TL)):
    b[f"wt_{side}"] = rng.uniform(0.5, 1.5, (B, t))
    mu = rng.uniform(0.0, 2.0, (B, t))
    mu[rng.uniform(size=(B, t)) < 0.3] = 0.0  # sparse, as ReLU masks are
    b[f"mur_{side}"] = mu
    b[f"muk_{side}"] = rng.uniform(0.0, 2.0, (B, t))
    # The logits of a prior that is a model ('mi', 'ema'): zeta_phi.
    b[f"zeta_{side}"] = 2 * rng.standard_normal((B, t, V))
  return b


def midpo_side(b, side, pol):
  m = jnp.asarray(b[f"m_{side}"])
  tgt = jnp.asarray(b[f"tgt_{side}"])
  ts = stats.token_stats(pol, tgt, m, jnp.asarray(b[f"ref_{side}"]), kl_ref_policy=True,
                         kl_policy_ref=True, log_sum_sq_probs=True, vocab_chunk=4)  # 11 = 2 * 4 + 3: remainder chunk
  prev = stats.token_logprobs(jnp.asarray(b[f"prev_{side}"]), tgt, m, vocab_chunk=4)
  zeta = stats.token_logprobs(jnp.asarray(b[f"zeta_{side}"]), tgt, m, vocab_chunk=4)
  return stats.SequenceStats.from_token_stats(
      ts, m, prev_logps=prev, prior_logps=zeta, token_weights=jnp.asarray(b[f"wt_{side}"]),
      mask_reward=jnp.asarray(b[f"mur_{side}"]), mask_kl=jnp.asarray(b[f"muk_{side}"]))


def midpo_loss(b, prior, config, **kw):
  def per_pair(pol_w, pol_l):
    out = losses.mi_dpo_loss(midpo_side(b, "w", pol_w), midpo_side(b, "l", pol_l), prior,
                             config, **kw)
    return out.loss, out.per_pair

  (_, pairs), grads = jax.value_and_grad(per_pair, argnums=(0, 1), has_aux=True)(
      jnp.asarray(b["pol_w"]), jnp.asarray(b["pol_l"]))
  return np.asarray(pairs), {"pol_w": np.asarray(grads[0]), "pol_l": np.asarray(grads[1])}


# (id, prior, prior hyperparameters, LossConfig kwargs, reference per-pair loss)
CASES = [
    ("dpo", "dpo", {}, dict(alpha=0.1), lambda b: ref.dpo(b, 0.1)),
    ("cdpo", "dpo", {}, dict(alpha=0.1, label_smoothing=0.2), lambda b: ref.dpo(b, 0.1, 0.2)),
    ("robust", "dpo", {}, dict(alpha=0.1, link="robust", label_smoothing=0.2),
     lambda b: ref.robust_dpo(b, 0.1, 0.2)),
    ("hinge", "dpo", {}, dict(alpha=0.1, link="hinge"), lambda b: ref.hinge(b, 0.1)),
    ("ipo", "dpo", {}, dict(alpha=0.1, link="ipo"), lambda b: ref.ipo(b, 0.1)),
    ("rpo", "dpo", {}, dict(alpha=0.1, nll_weight=0.5), lambda b: ref.rpo(b, 0.1, 0.5)),
    ("exo_pair", "dpo", {}, dict(alpha=0.1, link="exo_pair", label_smoothing=1e-3),
     lambda b: ref.exo_pair(b, 0.1, 1e-3)),
    ("nca_pair", "dpo", {}, dict(alpha=0.1, link="nca_pair"), lambda b: ref.nca_pair(b, 0.1)),
    ("bco_pair", "dpo", {}, dict(alpha=0.1, link="bco_pair"), lambda b: ref.bco_pair(b, 0.1)),
    ("sppo_hard", "dpo", {}, dict(alpha=0.1, link="sppo_hard"), lambda b: ref.sppo_hard(b, 0.1)),
    ("apo_zero", "dpo", {}, dict(alpha=0.1, link="apo_zero"), lambda b: ref.apo_zero(b, 0.1)),
    ("apo_down", "dpo", {}, dict(alpha=0.1, link="apo_down"), lambda b: ref.apo_down(b, 0.1)),
    ("discopop", "dpo", {}, dict(alpha=0.1, link="discopop", discopop_tau=0.05),
     lambda b: ref.discopop(b, 0.1, 0.05)),
    ("sigmoid_norm", "dpo", {}, dict(alpha=0.1, link="sigmoid_norm"),
     lambda b: ref.sigmoid_norm(b, 0.1)),
    ("aot", "dpo", {}, dict(alpha=0.5, link="aot"), lambda b: ref.aot(b, 0.5)),
    ("aot_smoothed", "dpo", {}, dict(alpha=0.5, link="aot", label_smoothing=0.1),
     lambda b: ref.aot(b, 0.5, 0.1)),
    ("aot_unpaired", "dpo", {}, dict(alpha=0.5, link="aot_unpaired"),
     lambda b: ref.aot_unpaired(b, 0.5)),
    ("sft", "dpo", {}, dict(alpha=0.1, link="sft"), ref.sft),
    ("mpo", "dpo", {}, dict(alpha=0.1, link="sigmoid,bco_pair,sft", loss_weights=(0.8, 0.2, 1.0)),
     lambda b: ref.mpo(b, 0.1)),
    # (exp(-s) saturates the sigmoid on this batch's large log-ratios at a
    # larger alpha: the gradient would vanish.)
    ("forward_kl", "dpo", {}, dict(alpha=0.01, f_divergence_type="forward_kl"),
     lambda b: ref.f_dpo(b, 0.01, "forward_kl")),
    ("js_divergence", "dpo", {}, dict(alpha=0.5, f_divergence_type="js_divergence"),
     lambda b: ref.f_dpo(b, 0.5, "js_divergence")),
    ("alpha_divergence", "dpo", {}, dict(alpha=0.01, f_divergence_type="alpha_divergence",
                                         f_alpha_divergence_coef=0.3),
     lambda b: ref.f_dpo(b, 0.01, "alpha_divergence", 0.3)),
    ("wpo", "dpo", {}, dict(alpha=0.5, use_weighting=True), lambda b: ref.wpo(b, 0.5)),
    ("wpo_sft", "dpo", {}, dict(alpha=0.5, link="sft", use_weighting=True),
     lambda b: ref.sft(b) * ref.wpo_weight(b, "w") * ref.wpo_weight(b, "l")),
    ("ld_dpo", "dpo", {}, dict(alpha=0.5, ld_alpha=0.4), lambda b: ref.ld_dpo(b, 0.5, 0.4)),
    # Links over other priors (what TRL cannot express).
    ("ipo_over_tdpo2", "tdpo", dict(version=2, kl_coef=0.5), dict(alpha=0.5, link="ipo"),
     lambda b: ref.ipo_over_tdpo(b, 0.5, 0.5)),
    ("discopop_over_mi", "mi", {}, dict(alpha=0.5, link="discopop"),
     lambda b: ref.discopop_over_model_prior(b, 0.5, 0.05)),
    # CPO, AlphaPO and ORPO: reference-free priors, the NLL their constraint.
    ("cpo", "cpo", {}, dict(alpha=0.1, nll_weight=1.0), lambda b: ref.cpo(b, 0.1, 1.0)),
    ("cpo_alphapo_reward", "cpo", dict(reward_alpha=0.05), dict(alpha=0.1, nll_weight=1.0),
     lambda b: ref.cpo(b, 0.1, 1.0, 0.05)),
    ("alphapo", "alphapo", dict(reward_alpha=0.25, gamma=0.5), dict(alpha=2.0),
     lambda b: ref.alphapo(b, 2.0, 0.5, 0.25)),
    ("orpo", "orpo", {}, dict(alpha=1.0, loss_weights=(0.1,), nll_weight=1.0),
     lambda b: ref.orpo(b, 0.1)),
    ("dice", "dice", {}, dict(alpha=0.1), lambda b: ref.dice(b, 0.1)),
    ("hdpo", "hdpo", dict(eta=0.7), dict(alpha=0.1), lambda b: ref.hdpo(b, 0.1, 0.7)),
    ("rdpo", "rdpo", dict(length_coef=0.05), dict(alpha=0.1), lambda b: ref.rdpo(b, 0.1, 0.05)),
    # Official SimPO: beta 2, gamma/beta 0.25 (gamma 0.5), with label smoothing and sft_weight.
    ("simpo", "simpo", dict(gamma=0.5),
     dict(alpha=2.0, label_smoothing=0.1, nll_weight=0.3, nll_normalization="sequence"),
     lambda b: ref.simpo(b, 2.0, 0.25, 0.1, 0.3)),
    ("tdpo1", "tdpo", dict(version=1), dict(alpha=0.1), lambda b: ref.tdpo(b, 0.1, tdpo2=False)),
    ("tdpo2", "tdpo", dict(version=2, kl_coef=0.5), dict(alpha=0.1),
     lambda b: ref.tdpo(b, 0.1, 0.5, tdpo2=True)),
    ("tis_dpo", "tis_dpo", {}, dict(alpha=0.1), lambda b: ref.tisdpo(b, 0.1)),
    ("tis_dpo_token_level", "tis_dpo", dict(token_level=True, kl_coef=0.5), dict(alpha=0.1),
     lambda b: ref.tisdpo(b, 0.1, 0.5, token_level=True)),
    ("sparsepo", "sparsepo", dict(mask_source="given", l1_reward=0.01, l1_kl=0.02),
     dict(alpha=0.1), lambda b: ref.sparsepo(b, 0.1, 0.01, 0.02)),
    # The learnable bounded family at points that are published algorithms:
    # c_len = -lam = -length_coef / alpha is R-DPO; c_kl = -1 is TDPO1.
    ("constrained_as_rdpo", "constrained", dict(len_bounds=(-1.0, 1.0), init=(1.0, 0.0, -0.5, 0.0)),
     dict(alpha=0.1), lambda b: ref.rdpo(b, 0.1, 0.05)),
    # Priors that are models: DPO with log zeta_phi(y) in place of log pi_ref.
    ("mi", "mi", {}, dict(alpha=0.1), lambda b: ref.model_prior(b, 0.1)),
    ("ema", "ema", dict(decay=0.9), dict(alpha=0.1), lambda b: ref.model_prior(b, 0.1)),
    ("constrained_as_tdpo1", "constrained", dict(kl_bounds=(-1.0, 0.0), init=(1.0, 0.0, 0.0, -1.0)),
     dict(alpha=0.1), lambda b: ref.tdpo(b, 0.1, tdpo2=False)),
]


# Losses of the chosen responses alone: no gradient reaches the rejected logits.
CHOSEN_ONLY = ("sft", "wpo_sft")


def test_every_registered_prior_has_a_parity_case():
  assert {c[1] for c in CASES} == set(algorithms.registered_priors())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_prior_matches_original_algorithm(case):
  _, prior_name, hp, cfg, reference = case
  with jax.enable_x64(True):
    b = make_batch()
    prior = algorithms.make_prior(prior_name, **hp)
    params = prior.init_params(None, None) if prior.scores_with_params else None
    if params is not None:
      params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    got, got_grads = midpo_loss(b, prior, losses.LossConfig(**cfg), prior_params=params)
    b["sg_pol_w"], b["sg_pol_l"] = b["pol_w"].copy(), b["pol_l"].copy()
    want = reference(b)
    want_grads = ref.finite_difference_grad(reference, b)
  if case[0] in ("rpo", "mpo", "cpo", "cpo_alphapo_reward", "orpo"):
    # The token-averaged NLL is a batch quantity: TRL adds the batch mean to
    # every pair, midpo splits it into per-pair shares. The means agree.
    got, want = got.mean(), want.mean()
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)
  for key in ("pol_w", "pol_l"):
    g, w = got_grads[key], want_grads[key]
    if key == "pol_l" and case[0] in CHOSEN_ONLY:
      assert np.all(g == 0) and np.all(w == 0)
      continue
    assert np.abs(w).max() > 1e-4, "the reference gradient should not vanish on this batch"
    np.testing.assert_allclose(g, w, rtol=RTOL, atol=RTOL * np.abs(w).max(), err_msg=key)
    # Padding positions of the policy logits get exactly zero gradient.
    pad = b[f"m_{key[-1]}"] == 0
    assert np.all(g[pad] == 0)


def test_tdpo2_stop_gradient_is_on_the_chosen_kl_only():
  """TDPO2 differs from TDPO1-with-coefficient exactly by sg(d_w)."""
  with jax.enable_x64(True):
    b = make_batch(1)
    _, g2 = midpo_loss(b, algorithms.make_prior("tdpo", version=2, kl_coef=1.0),
                       losses.LossConfig(alpha=0.1))
    _, g1 = midpo_loss(b, algorithms.make_prior("tdpo", version=1), losses.LossConfig(alpha=0.1))
  # Same value (kl_coef 1), same rejected gradient, different chosen gradient.
  np.testing.assert_allclose(g2["pol_l"], g1["pol_l"], rtol=1e-10, atol=1e-14)
  assert np.abs(g2["pol_w"] - g1["pol_w"]).max() > 1e-6


def test_sparsepo_learned_mask_head_matches_released_architecture():
  with jax.enable_x64(True):
    b = make_batch(2)
    rng = np.random.default_rng(3)
    L, D = 3, 8
    hid = {s: rng.standard_normal((B, t, L, D)) for s, t in (("w", TW), ("l", TL))}
    prior = algorithms.make_prior("sparsepo", mask_source="head", l1_reward=0.01, l1_kl=0.02)
    example = dataclasses.replace(midpo_side(b, "w", jnp.asarray(b["pol_w"])),
                                  ref_hidden=jnp.asarray(hid["w"]))
    params = prior.init_params(jax.random.PRNGKey(0), example)
    # A mixer that starts all-negative gives an all-zero mask: make it live.
    params["shared"]["mix"] = jnp.abs(params["shared"]["mix"]).astype(jnp.float64)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    np_params = {k: np.asarray(v) for k, v in params["shared"].items()}
    for s in ("w", "l"):
      mu = ref.sparsepo_mask_head(hid[s], **np_params)
      got = algorithms.apply_mask_head(params["shared"], jnp.asarray(hid[s]))
      np.testing.assert_allclose(np.asarray(got), mu, rtol=1e-9, atol=1e-12)
      assert (mu == 0).any() and (mu > 0).any()
      b[f"mur_{s}"] = b[f"muk_{s}"] = mu

    def run(pol_w, pol_l, p):
      cw = dataclasses.replace(midpo_side(b, "w", pol_w), ref_hidden=jnp.asarray(hid["w"]))
      cl = dataclasses.replace(midpo_side(b, "l", pol_l), ref_hidden=jnp.asarray(hid["l"]))
      out = losses.mi_dpo_loss(cw, cl, prior, losses.LossConfig(alpha=0.1), prior_params=p)
      return out.loss, out.per_pair

    (_, pairs), (gw, gl, gp) = jax.value_and_grad(run, argnums=(0, 1, 2), has_aux=True)(
        jnp.asarray(b["pol_w"]), jnp.asarray(b["pol_l"]), params)
    reference = lambda bb: ref.sparsepo(bb, 0.1, 0.01, 0.02)
    np.testing.assert_allclose(np.asarray(pairs), reference(b), rtol=RTOL)
    fd = ref.finite_difference_grad(reference, b)
    np.testing.assert_allclose(np.asarray(gw), fd["pol_w"], rtol=RTOL,
                               atol=RTOL * np.abs(fd["pol_w"]).max())
    np.testing.assert_allclose(np.asarray(gl), fd["pol_l"], rtol=RTOL,
                               atol=RTOL * np.abs(fd["pol_l"]).max())
    # The head's parameters are the prior's and receive gradient from the loss.
    assert np.abs(np.asarray(gp["shared"]["mix"])).max() > 0
