"""Mathematical properties of the MI-DPO loss and its clear errors on bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midpo import algorithms
from midpo.algorithms.tis_dpo import weights as token_weights
from midpo.core import losses, stats

B, T, V = 4, 6, 9


def _random_side(key, with_ref=True, mask=None):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  logits = 2 * jax.random.normal(k1, (B, T, V))
  ref_logits = 2 * jax.random.normal(k2, (B, T, V))
  targets = jax.random.randint(k3, (B, T), 0, V)
  if mask is None:
    lengths = jax.random.randint(k4, (B,), 1, T + 1)
    mask = (jnp.arange(T)[None] < lengths[:, None]).astype(jnp.float32)
  return logits, ref_logits if with_ref else None, targets, mask


def _stats(logits, ref_logits, targets, mask, **extra):
  ts = stats.token_stats(logits, targets, mask, ref_logits,
                         kl_ref_policy=ref_logits is not None,
                         kl_policy_ref=ref_logits is not None)
  return stats.SequenceStats.from_token_stats(ts, mask, **extra)


def _full_extra(mask):
  return dict(prev_logps=0.5 * jnp.where(mask > 0, -1.0, 0.0), token_weights=mask,
              mask_reward=mask, mask_kl=mask)


ROLE_FREE_PRIORS = [
    ("dpo", {}), ("dice", {}), ("hdpo", dict(eta=0.8)), ("rdpo", dict(length_coef=0.1)),
    ("simpo", dict(gamma=0.0)), ("tdpo", dict(version=1)), ("tdpo", dict(version=2)),
    ("tis_dpo", dict(token_level=True)), ("sparsepo", dict(mask_source="given")),
]


@pytest.mark.parametrize("name,hp", ROLE_FREE_PRIORS,
                         ids=[f"{n}-{'-'.join(map(str, h.values()))}" for n, h in ROLE_FREE_PRIORS])
def test_swapping_chosen_and_rejected_negates_the_logit(name, hp):
  a = _random_side(jax.random.PRNGKey(0))
  b = _random_side(jax.random.PRNGKey(1))
  sa = _stats(*a, **_full_extra(a[3]))
  sb = _stats(*b, **_full_extra(b[3]))
  prior = algorithms.make_prior(name, **hp)
  z_ab = losses.mi_dpo_loss(sa, sb, prior).logits
  z_ba = losses.mi_dpo_loss(sb, sa, prior).logits
  assert np.abs(np.asarray(z_ab)).max() > 1e-3
  np.testing.assert_allclose(np.asarray(z_ba), -np.asarray(z_ab), rtol=1e-5, atol=1e-6)


def test_simpo_margin_breaks_the_symmetry_by_exactly_two_gamma():
  a, b = _random_side(jax.random.PRNGKey(0)), _random_side(jax.random.PRNGKey(1))
  sa, sb = _stats(*a), _stats(*b)
  prior = algorithms.make_prior("simpo", gamma=0.7)
  z_ab = losses.mi_dpo_loss(sa, sb, prior, losses.LossConfig(alpha=2.0)).logits
  z_ba = losses.mi_dpo_loss(sb, sa, prior, losses.LossConfig(alpha=2.0)).logits
  np.testing.assert_allclose(np.asarray(z_ab + z_ba), -1.4, rtol=1e-5)


def test_label_smoothing_half_gives_log2_and_zero_gradient_at_the_reference():
  logits, _, targets, mask = _random_side(jax.random.PRNGKey(2))
  rl, _, rt, rm = _random_side(jax.random.PRNGKey(3))

  def loss(pol_w, pol_l, eps):
    # Policy == reference, so the logit is 0.
    cw = _stats(pol_w, jax.lax.stop_gradient(pol_w), targets, mask)
    cl = _stats(pol_l, jax.lax.stop_gradient(pol_l), rt, rm)
    return losses.mi_dpo_loss(cw, cl, "dpo", losses.LossConfig(label_smoothing=eps)).loss

  value, grads = jax.value_and_grad(loss, argnums=(0, 1))(logits, rl, 0.5)
  np.testing.assert_allclose(float(value), np.log(2.0), rtol=1e-6)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)
  # Without smoothing the same point has a gradient: the check can fail.
  grads0 = jax.grad(loss, argnums=(0, 1))(logits, rl, 0.0)
  assert float(jnp.abs(grads0[0]).max()) > 1e-3


def _grad_pair(prior, sw_fn, sl_fn, logits_w, logits_l, config=losses.LossConfig()):
  def loss(pw, pl):
    return losses.mi_dpo_loss(sw_fn(pw), sl_fn(pl), prior, config).loss
  return jax.value_and_grad(loss, argnums=(0, 1))(logits_w, logits_l)


def test_tis_dpo_with_unit_weights_is_dpo():
  a, b = _random_side(jax.random.PRNGKey(4)), _random_side(jax.random.PRNGKey(5))
  mk = lambda side, w: (lambda p: _stats(p, side[1], side[2], side[3],
                                         token_weights=w * side[3]))
  v_dpo, g_dpo = _grad_pair("dpo", mk(a, 1.0), mk(b, 1.0), a[0], b[0])
  v_tis, g_tis = _grad_pair(algorithms.make_prior("tis_dpo"), mk(a, 1.0), mk(b, 1.0), a[0], b[0])
  np.testing.assert_allclose(float(v_tis), float(v_dpo), rtol=1e-6)
  for x, y in zip(g_tis, g_dpo):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-8)
  # Non-unit weights change it.
  v_w, _ = _grad_pair(algorithms.make_prior("tis_dpo"), mk(a, 1.3), mk(b, 0.7), a[0], b[0])
  assert abs(float(v_w) - float(v_dpo)) > 1e-4


def test_sparsepo_with_unit_masks_and_no_kl_is_dpo():
  a, b = _random_side(jax.random.PRNGKey(6)), _random_side(jax.random.PRNGKey(7))
  mk = lambda side: (lambda p: _stats(p, side[1], side[2], side[3], mask_reward=side[3],
                                      mask_kl=side[3]))
  prior = algorithms.make_prior("sparsepo", mask_source="given", kl_coef=0.0)
  v_dpo, g_dpo = _grad_pair("dpo", mk(a), mk(b), a[0], b[0])
  v_sp, g_sp = _grad_pair(prior, mk(a), mk(b), a[0], b[0])
  np.testing.assert_allclose(float(v_sp), float(v_dpo), rtol=1e-6)
  for x, y in zip(g_sp, g_dpo):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-8)


def test_hdpo_with_eta_one_is_dpo_and_rdpo_with_zero_length_coef_is_dpo():
  a, b = _random_side(jax.random.PRNGKey(8)), _random_side(jax.random.PRNGKey(9))
  sa, sb = _stats(*a), _stats(*b)
  want = float(losses.mi_dpo_loss(sa, sb, "dpo").loss)
  for prior in (algorithms.make_prior("hdpo", eta=1.0), algorithms.make_prior("rdpo", length_coef=0.0)):
    np.testing.assert_allclose(float(losses.mi_dpo_loss(sa, sb, prior).loss), want, rtol=1e-6)


def test_simpo_needs_no_reference_at_all():
  a = _random_side(jax.random.PRNGKey(10), with_ref=False)
  b = _random_side(jax.random.PRNGKey(11), with_ref=False)
  sa, sb = _stats(*a), _stats(*b)
  assert sa.ref_logps is None
  out = losses.mi_dpo_loss(sa, sb, "simpo", losses.LossConfig(alpha=2.0))
  assert np.isfinite(float(out.loss))
  assert not algorithms.make_prior("simpo").uses_reference
  with pytest.raises(ValueError, match=r"prior 'dpo' needs SequenceStats.ref_logps"):
    losses.mi_dpo_loss(sa, sb, "dpo")


def test_metrics_use_the_names_users_compare():
  a, b = _random_side(jax.random.PRNGKey(12)), _random_side(jax.random.PRNGKey(13))
  out = losses.mi_dpo_loss(_stats(*a), _stats(*b), "dpo", losses.LossConfig(alpha=0.1))
  for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected", "prior/log_zeta_chosen", "kl/chosen",
              "kl/rejected", "lengths/chosen", "lengths/rejected"):
    assert key in out.metrics, key
  m = out.metrics
  np.testing.assert_allclose(float(m["rewards/margins"]),
                             float(m["rewards/chosen"] - m["rewards/rejected"]), rtol=1e-5)
  np.testing.assert_allclose(float(m["rewards/margins"]), float(jnp.mean(out.logits)), rtol=1e-5)
  # For DPO, log zeta is the reference log-likelihood.
  sa = _stats(*a)
  np.testing.assert_allclose(float(m["prior/log_zeta_chosen"]),
                             float(jnp.mean(jnp.sum(sa.ref_logps, -1))), rtol=1e-5)


def test_sparsepo_reports_mask_sparsity():
  a, b = _random_side(jax.random.PRNGKey(14)), _random_side(jax.random.PRNGKey(15))
  half = a[3] * (jnp.arange(T)[None] % 2)
  sa = _stats(*a, mask_reward=half, mask_kl=a[3])
  sb = _stats(*b, mask_reward=b[3], mask_kl=b[3])
  out = losses.mi_dpo_loss(sa, sb, algorithms.make_prior("sparsepo", mask_source="given"))
  frac = float(out.metrics["prior/mask_reward_zero_frac_chosen"])
  want = float(jnp.mean(jnp.sum((a[3] > 0) & (half == 0), -1) / jnp.sum(a[3], -1)))
  np.testing.assert_allclose(frac, want, rtol=1e-6)
  assert float(out.metrics["prior/mask_reward_zero_frac_rejected"]) == 0.0


# ------------------------------- errors ------------------------------------


def test_empty_response_is_a_clear_error_eagerly_and_counted_under_jit():
  a, b = _random_side(jax.random.PRNGKey(16)), _random_side(jax.random.PRNGKey(17))
  empty_mask = b[3].at[2].set(0.0)
  sa, sb = _stats(*a), _stats(b[0], b[1], b[2], empty_mask)
  with pytest.raises(ValueError, match=r"1 rejected response\(s\) have no real tokens.*pair 2"):
    losses.mi_dpo_loss(sa, sb, "dpo")
  with pytest.raises(ValueError, match=r"length-normalised prior"):
    losses.mi_dpo_loss(sa, sb, "simpo")
  out = jax.jit(lambda x, y: losses.mi_dpo_loss(x, y, "simpo"))(sa, sb)
  assert int(out.metrics["invalid/empty_responses"]) == 1
  assert np.all(np.isfinite(np.asarray(out.per_pair)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(alpha=0.0), r"LossConfig.alpha: must be a finite number > 0"),
    (dict(alpha=-1.0), r"LossConfig.alpha"),
    (dict(alpha=float("nan")), r"LossConfig.alpha"),
    (dict(label_smoothing=-0.1), r"LossConfig.label_smoothing: must be in \[0, 0.5\]"),
    (dict(label_smoothing=0.6), r"LossConfig.label_smoothing"),
    (dict(link="robust", label_smoothing=0.5), r"label_smoothing: must be in \[0, 0.5\)"),
    (dict(link="hinge", label_smoothing=0.1), r"not defined for the hinge link"),
    (dict(link="nope"), r"LossConfig.link: must be one of"),
    (dict(nll_weight=-1.0), r"LossConfig.nll_weight"),
    (dict(nll_normalization="pair"), r"LossConfig.nll_normalization"),
    (dict(link="exo_pair"), r"label_smoothing: is EXO's eps, in \(0, 0.5\]"),
    (dict(link="nca_pair", label_smoothing=0.1), r"not defined for the nca_pair link"),
    (dict(link="discopop", discopop_tau=0.0), r"LossConfig.discopop_tau: must be a finite"),
])
def test_bad_loss_config_names_the_key(kwargs, match):
  with pytest.raises(ValueError, match=match):
    losses.LossConfig(**kwargs)


@pytest.mark.parametrize("name,hp,match", [
    ("nope", {}, r"unknown prior 'nope'; registered priors: alphapo, constrained, cpo, dice, dpo, ema"),
    ("simpo", dict(beta=2.0), r"prior 'simpo' has no hyperparameter\(s\) \['beta'\]"),
    ("hdpo", dict(eta=0.0), r"prior 'hdpo': eta must be > 0"),
    ("tdpo", dict(version=3), r"prior 'tdpo': version must be 1 or 2"),
    ("tdpo", dict(version=1, kl_coef=0.3), r"kl_coef only applies to version=2"),
    ("tis_dpo", dict(kl_coef=-1.0), r"prior 'tis_dpo': kl_coef must be >= 0"),
    ("sparsepo", dict(mask_source="x"), r"mask_source must be 'head' or 'given'"),
    ("sparsepo", dict(mask_dropout=1.0), r"mask_dropout must be in \[0, 1\)"),
])
def test_bad_prior_names_the_hyperparameter(name, hp, match):
  with pytest.raises(ValueError, match=match):
    algorithms.make_prior(name, **hp)


def test_unknown_prior_name_in_the_loss_is_an_error():
  a, b = _random_side(jax.random.PRNGKey(18)), _random_side(jax.random.PRNGKey(19))
  with pytest.raises(ValueError, match="unknown prior 'dpoo'"):
    losses.mi_dpo_loss(_stats(*a), _stats(*b), "dpoo")


def test_mismatched_shapes_are_named():
  a, b = _random_side(jax.random.PRNGKey(20)), _random_side(jax.random.PRNGKey(21))
  sa, sb = _stats(*a), _stats(*b)
  with pytest.raises(ValueError, match=r"chosen.mask shape \(4, 5\) != chosen.logps shape"):
    losses.mi_dpo_loss(dataclasses.replace(sa, mask=sa.mask[:, :5]), sb, "dpo")
  with pytest.raises(ValueError, match=r"rejected.ref_logps has shape \(4, 3\); expected"):
    losses.mi_dpo_loss(sa, dataclasses.replace(sb, ref_logps=sb.ref_logps[:, :3]), "dpo")
  with pytest.raises(ValueError, match=r"batch sizes differ: 4 vs 3"):
    losses.mi_dpo_loss(sa, jax.tree.map(lambda x: x[:3], sb), "dpo")
  with pytest.raises(ValueError, match=r"targets shape \(4, 5\) does not match logits"):
    stats.token_stats(a[0], a[2][:, :5], a[3])
  with pytest.raises(ValueError, match=r"needs SequenceStats.prev_logps for the chosen"):
    losses.mi_dpo_loss(sa, sb, "dice")
  with pytest.raises(ValueError, match=r"has parameters: pass prior_params"):
    hid = jnp.zeros((B, T, 2, 4))
    losses.mi_dpo_loss(dataclasses.replace(sa, ref_hidden=hid),
                       dataclasses.replace(sb, ref_hidden=hid), "sparsepo")


def test_out_of_vocabulary_targets_are_reported_on_the_host():
  targets = np.zeros((2, 3), np.int32)
  mask = np.ones((2, 3))
  stats.validate_targets(targets, mask, V)
  targets[1, 2] = V
  with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 9\); first at row 1, position 2"):
    stats.validate_targets(targets, mask, V)
  mask[1, 2] = 0  # on padding, anything goes
  stats.validate_targets(targets, mask, V)


def test_non_finite_statistics_on_real_tokens_are_reported():
  a, b = _random_side(jax.random.PRNGKey(22)), _random_side(jax.random.PRNGKey(23))
  sa, sb = _stats(*a), _stats(*b)
  bad = sa.ref_logps.at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r"chosen.ref_logps is not finite on a real token: pair 0"):
    losses.mi_dpo_loss(dataclasses.replace(sa, ref_logps=bad), sb, "dpo")


# ------------------------- TIS-DPO weight transforms -------------------------


def test_tis_weight_transforms():
  raw = jnp.array([[-3.0, -1.0, 0.0, 0.5, 2.5, 9.0]])
  mask = jnp.array([[1, 1, 1, 1, 1, 0]], jnp.float32)
  w = lambda t, **k: np.asarray(token_weights.tis_weights(raw, mask, t, **k))[0]
  np.testing.assert_allclose(w("rank_based"), [0.7, 0.85, 1.0, 1.15, 1.3, 0.0], rtol=1e-6)
  np.testing.assert_allclose(w("threshold_and_scale"), [0.7, 0.8, 1.0, 1.1, 1.3, 0.0], rtol=1e-6)
  np.testing.assert_allclose(w("aggressive"), [0.5, 0.75, 1.0, 1.125, 1.5, 0.0], rtol=1e-6)
  np.testing.assert_allclose(w("binary"), [0.7, 0.7, 0.7, 1.3, 1.3, 0.0], rtol=1e-6)
  np.testing.assert_allclose(w("exponential", k=2.0, mu=0.5, lower=-1.0, upper=2.0),
                             (2 * np.exp(0.5 * np.array([-1.0, -1.0, 0.0, 0.5, 2.0]))).tolist() + [0.0],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="unknown TIS-DPO weight transform"):
    token_weights.tis_weights(raw, mask, "softmax")


def test_tis_contrastive_scores_flip_sign_on_rejected():
  lp_plus = jnp.array([[-1.0, -2.0]])
  lp_minus = jnp.array([[-1.5, -1.0]])
  mask = jnp.ones((1, 2))
  np.testing.assert_allclose(
      np.asarray(token_weights.contrastive_scores(lp_plus, lp_minus, mask, "chosen")), [[0.5, -1.0]])
  np.testing.assert_allclose(
      np.asarray(token_weights.contrastive_scores(lp_plus, lp_minus, mask, "rejected")), [[-0.5, 1.0]])


# Every registered prior, with the hyperparameters that give it all its terms.
EVERY_PRIOR = ROLE_FREE_PRIORS + [
    ("simpo", dict(gamma=0.5)), ("tis_dpo", {}),
    ("sparsepo", dict(mask_source="given", l1_reward=0.01, l1_kl=0.02)),
    ("constrained", dict(len_bounds=(-1.0, 1.0), kl_bounds=(-1.0, 0.0))),
    ("mi", {}), ("ema", dict(decay=0.9)), ("cpo", {}), ("cpo", dict(reward_alpha=0.05)),
    ("alphapo", {}), ("orpo", {}),
]


def _link_configs():
  """Every link alone, then each option of the loss over a link it applies to."""
  out = [dict(link=link, label_smoothing=1e-3 if link == "exo_pair" else 0.0)
         for link in losses.LINKS]
  out += [dict(link="sigmoid,bco_pair,sft", loss_weights=(0.8, 0.2, 1.0)),
          dict(link="ipo", f_divergence_type="js_divergence"),
          dict(link="sigmoid", f_divergence_type="alpha_divergence"),
          dict(link="discopop", f_divergence_type="forward_kl"),
          dict(link="apo_zero", use_weighting=True),
          dict(link="sigmoid", ld_alpha=0.5)]
  return [losses.LossConfig(alpha=0.1, **kw) for kw in out]


def _side_stats(side):
  """Every field any prior or option reads, at a random policy."""
  logits, ref_logits, targets, mask = side
  ts = stats.token_stats(logits, targets, mask, ref_logits, kl_ref_policy=True,
                         kl_policy_ref=True, log_sum_sq_probs=True)
  near = lambda x: stats.token_logprobs(0.5 * logits + 0.5 * x, targets, mask)
  return stats.SequenceStats.from_token_stats(
      ts, mask, prev_logps=near(ref_logits), prior_logps=near(ref_logits[..., ::-1]),
      token_weights=mask, mask_reward=mask, mask_kl=mask)


def _with_logps(seq, logps):
  # WPO's weights read logps - log_sum_sq_probs: moved together, the weights
  # stay those of the start, so that a gradient step must lower the loss.
  return dataclasses.replace(seq, logps=logps,
                             log_sum_sq_probs=seq.log_sum_sq_probs + (logps - seq.logps))


@pytest.mark.parametrize("name,hp", EVERY_PRIOR,
                         ids=[f"{n}-{'-'.join(map(str, h.values()))}" for n, h in EVERY_PRIOR])
def test_every_link_over_every_compatible_prior_descends_for_a_few_steps(name, hp):
  """Each link and option is one of the loss whatever the prior: over every
  prior that supplies what it needs, three gradient steps on the policy's
  token log-probs (the prior's own parameters, if it has any, held at their
  start, as in a policy round) keep the loss and gradients finite and lower
  the loss (but for the hinge link past its margin); an incompatible pair is
  a ValueError naming the link or option and the prior."""
  sa = _side_stats(_random_side(jax.random.PRNGKey(0)))
  sb = _side_stats(_random_side(jax.random.PRNGKey(1)))
  prior = algorithms.make_prior(name, **hp)
  params = prior.init_params(jax.random.PRNGKey(2), sa)
  compatible, refused = [], []
  for config in _link_configs():
    try:
      losses.check_compatible(config, prior)
      compatible.append(config)
    except ValueError as e:
      assert name in str(e), str(e)
      assert (any(link in str(e) for link in config.links) or "ld_alpha" in str(e)
              or "f_divergence_type" in str(e)), str(e)
      refused.append(config)

  def total(theta, params):
    values = jnp.stack([
        losses.mi_dpo_loss(_with_logps(sa, theta[0][k]), _with_logps(sb, theta[1][k]), prior,
                           config, prior_params=params).loss
        for k, config in enumerate(compatible)])
    return jnp.sum(values), values

  step = jax.jit(jax.value_and_grad(total, has_aux=True))
  n = len(compatible)
  theta = (jnp.broadcast_to(sa.logps, (n,) + sa.logps.shape),
           jnp.broadcast_to(sb.logps, (n,) + sb.logps.shape))
  history = []
  for _ in range(4):
    (_, values), g_theta = step(theta, params)
    history.append(np.asarray(values))
    assert all(np.isfinite(np.asarray(x)).all() for x in g_theta), name
    theta = jax.tree.map(lambda x, g: x - 0.05 * g, theta, g_theta)
  history = np.stack(history)
  assert np.isfinite(history).all(), name
  for k, config in enumerate(compatible):
    first, last = history[0, k], history[-1, k]
    if config.link == "hinge" and first == 0.0:
      continue
    assert last < first, (config, name, history[:, k])
  # SimPO's split margin refuses exactly the per-side links, a per-token-mean
  # score the links that divide by the length again; ld_alpha is
  # refused by the priors that read per-token KLs, the f-divergences by the
  # reference-free priors.
  fields = set(prior.required_fields())
  want_refused = [c for c in _link_configs()
                  if (prior.splits_pair_term and set(c.links) & set(losses.PER_SIDE_LINKS))
                  or (prior.length_normalised and set(c.links) & {"ipo", "sigmoid_norm"})
                  or (c.ld_alpha is not None and fields & {"kl_ref_policy", "kl_policy_ref"})
                  or (c.f_divergence_type != "reverse_kl"
                      and not fields & {"ref_logps", "prev_logps", "prior_logps"})]
  assert refused == want_refused


def test_discopop_is_its_formula_where_finite_and_has_no_nan_far_below_zero():
  """DiscoPOP's ``exp(-z) m`` overflows where ``m = s(z/tau)`` underflows: in
  that region (z < -50) it is taken in log space; elsewhere the value is the
  formula as written, bit for bit, and the gradient is finite everywhere."""
  from midpo.core import links

  def loss(z, tau=0.05):
    zeros = jnp.zeros_like(z)
    return links.link_loss("discopop", alpha=1.0, eps=0.0, tau=tau, z=z, f_w=zeros, f_l=zeros,
                           s_w=zeros, s_l=zeros, lp_w=zeros, lp_l=zeros, n_w=zeros, n_l=zeros,
                           sft=jnp.float32(0.0))

  z = jnp.linspace(-50.0, 40.0, 901)
  m = jax.nn.sigmoid(z / 0.05)
  as_written = -jax.nn.log_sigmoid(z) * (1.0 - m) + jnp.exp(-z) * m
  np.testing.assert_array_equal(np.asarray(jax.jit(loss)(z)), np.asarray(jax.jit(
      lambda z: -jax.nn.log_sigmoid(z) * (1.0 - jax.nn.sigmoid(z / 0.05))
      + jnp.exp(-z) * jax.nn.sigmoid(z / 0.05))(z)))
  assert np.isfinite(np.asarray(as_written)).all()
  far = jnp.array([-60.0, -200.0, -1e4])
  grads = jax.vmap(jax.grad(lambda z: loss(z[None])[0]))(far)
  assert np.isfinite(np.asarray(loss(far))).all() and np.isfinite(np.asarray(grads)).all()
  # tau = 1: m does not underflow, and the log-space branch is the same function.
  with jax.enable_x64(True):
    zz = jnp.array([-60.0, -80.0])
    m1 = jax.nn.sigmoid(zz)
    want = -jax.nn.log_sigmoid(zz) * (1 - m1) + jnp.exp(-zz) * m1
    np.testing.assert_allclose(np.asarray(loss(zz, tau=1.0)), np.asarray(want), rtol=1e-12)


def test_orpo_log_odds_is_exact_and_has_finite_gradients_up_to_p_one():
  from midpo.algorithms import orpo

  logp = jnp.array([-30.0, -5.0, -0.7, -0.69, -1e-3, -1e-8], jnp.float32)
  grads = jax.vmap(jax.grad(orpo.log_odds))(logp)
  assert np.isfinite(np.asarray(grads)).all()
  p = np.exp(np.asarray(logp, np.float64))
  np.testing.assert_allclose(np.asarray(orpo.log_odds(logp)), np.log(p / -np.expm1(np.log(p))),
                             rtol=1e-5)
