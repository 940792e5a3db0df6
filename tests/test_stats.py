"""Per-token statistics: exact against a plain log-softmax, chunked == unchunked,
masked padding, float32 whatever the input dtype, and bounded memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midpo.core import stats


def _inputs(key, b=3, t=7, v=50, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(key, 3)
  pol = (3 * jax.random.normal(k1, (b, t, v))).astype(dtype)
  ref = (3 * jax.random.normal(k2, (b, t, v))).astype(dtype)
  tgt = jax.random.randint(k3, (b, t), 0, v)
  mask = jnp.array([[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0, 0]],
                   jnp.float32)[:b, :t]
  tgt = jnp.where(mask > 0, tgt, -100)  # junk on padding
  return pol, ref, tgt, mask


def _plain(pol, ref, tgt, mask):
  """The textbook computation on the full vocabulary, in float64 numpy."""
  pol, ref = np.asarray(pol, np.float64), np.asarray(ref, np.float64)
  lsm = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
  lp, lr = lsm(pol), lsm(ref)
  m = np.asarray(mask)
  safe = np.where(m > 0, np.asarray(tgt), 0)
  g = lambda l: np.take_along_axis(l, safe[..., None], -1)[..., 0] * m
  return dict(logps=g(lp), ref_logps=g(lr),
              kl_ref_policy=(np.exp(lr) * (lr - lp)).sum(-1) * m,
              kl_policy_ref=(np.exp(lp) * (lp - lr)).sum(-1) * m)


@pytest.mark.parametrize("chunk", [None, 7, 16, 50, 128])
def test_values_match_full_log_softmax(chunk):
  pol, ref, tgt, mask = _inputs(jax.random.PRNGKey(0))
  got = stats.token_stats(pol, tgt, mask, ref, kl_ref_policy=True, kl_policy_ref=True,
                          vocab_chunk=chunk)
  want = _plain(pol, ref, tgt, mask)
  for key, value in want.items():
    np.testing.assert_allclose(np.asarray(getattr(got, key)), value, rtol=2e-5, atol=2e-5,
                               err_msg=key)


def test_chunked_equals_unchunked_values_and_gradients():
  pol, ref, tgt, mask = _inputs(jax.random.PRNGKey(1))
  cot = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 7))

  def f(p, chunk):
    s = stats.token_stats(p, tgt, mask, ref, kl_ref_policy=True, kl_policy_ref=True,
                          vocab_chunk=chunk)
    return jnp.sum(cot[0] * s.logps + cot[1] * s.kl_ref_policy + cot[2] * s.kl_policy_ref)

  full_v, full_g = jax.value_and_grad(f)(pol, None)
  for chunk in (7, 16, 49):
    v, g = jax.value_and_grad(f)(pol, chunk)
    np.testing.assert_allclose(float(v), float(full_v), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g), np.asarray(full_g), rtol=1e-4, atol=1e-6)


def test_hand_written_gradient_matches_autodiff_of_the_textbook_formula():
  pol, ref, tgt, mask = _inputs(jax.random.PRNGKey(3))
  cot = jax.random.normal(jax.random.PRNGKey(4), (3, 3, 7))
  safe = jnp.where(mask > 0, tgt, 0)

  def textbook(p):
    lp, lr = jax.nn.log_softmax(p), jax.nn.log_softmax(ref)
    g = jnp.take_along_axis(lp, safe[..., None], -1)[..., 0]
    klr = jnp.sum(jnp.exp(lr) * (lr - lp), -1)
    klp = jnp.sum(jnp.exp(lp) * (lp - lr), -1)
    return jnp.sum(mask * (cot[0] * g + cot[1] * klr + cot[2] * klp))

  def ours(p):
    s = stats.token_stats(p, tgt, mask, ref, kl_ref_policy=True, kl_policy_ref=True, vocab_chunk=16)
    return jnp.sum(cot[0] * s.logps + cot[1] * s.kl_ref_policy + cot[2] * s.kl_policy_ref)

  np.testing.assert_allclose(np.asarray(jax.grad(ours)(pol)), np.asarray(jax.grad(textbook)(pol)),
                             rtol=1e-4, atol=1e-6)
  # The reference is frozen: no gradient reaches its logits.
  g_ref = jax.grad(lambda r: jnp.sum(stats.token_stats(pol, tgt, mask, r, kl_ref_policy=True).kl_ref_policy))(ref)
  assert float(jnp.abs(g_ref).max()) == 0.0


def test_padding_is_exactly_zero_and_junk_targets_are_harmless():
  pol, ref, tgt, mask = _inputs(jax.random.PRNGKey(5))
  s = stats.token_stats(pol, tgt, mask, ref, kl_ref_policy=True, kl_policy_ref=True, vocab_chunk=16)
  for key in ("logps", "ref_logps", "kl_ref_policy", "kl_policy_ref"):
    x = np.asarray(getattr(s, key))
    assert np.all(x[np.asarray(mask) == 0] == 0), key
    assert np.all(np.isfinite(x)), key
  g = jax.grad(lambda p: jnp.sum(stats.token_logprobs(p, tgt, mask, vocab_chunk=16)))(pol)
  assert np.all(np.asarray(g)[np.asarray(mask) == 0] == 0)


def test_bfloat16_logits_give_float32_statistics():
  pol, ref, tgt, mask = _inputs(jax.random.PRNGKey(6), dtype=jnp.bfloat16)
  s = stats.token_stats(pol, tgt, mask, ref, kl_ref_policy=True, vocab_chunk=16)
  assert s.logps.dtype == jnp.float32 and s.kl_ref_policy.dtype == jnp.float32
  want = _plain(pol.astype(jnp.float32), ref.astype(jnp.float32), tgt, mask)
  np.testing.assert_allclose(np.asarray(s.logps), want["logps"], rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda p: jnp.sum(stats.token_logprobs(p, tgt, mask)))(pol)
  assert g.dtype == jnp.bfloat16


def test_kl_is_non_negative_and_zero_when_policy_equals_reference():
  pol, _, tgt, mask = _inputs(jax.random.PRNGKey(7))
  s = stats.token_stats(pol, tgt, mask, pol, kl_ref_policy=True, kl_policy_ref=True, vocab_chunk=16)
  np.testing.assert_allclose(np.asarray(s.kl_ref_policy), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(s.kl_policy_ref), 0.0, atol=1e-5)
  pol2, ref2, tgt2, mask2 = _inputs(jax.random.PRNGKey(8))
  s2 = stats.token_stats(pol2, tgt2, mask2, ref2, kl_ref_policy=True, kl_policy_ref=True)
  assert float(s2.kl_ref_policy.min()) >= -1e-6 and float(s2.kl_policy_ref.min()) >= -1e-6


@pytest.mark.parametrize("direction", ["kl_ref_policy", "kl_policy_ref"])
def test_compiled_memory_of_the_kl_stays_far_below_one_full_float32_array(direction):
  """At V = 32k, neither the forward nor the gradient keeps a [B, T, V] float32 temporary."""
  b, t, v, chunk = 4, 128, 32768, 2048
  full_bytes = b * t * v * 4
  logits = jax.ShapeDtypeStruct((b, t, v), jnp.float32)
  targets = jax.ShapeDtypeStruct((b, t), jnp.int32)
  mask = jax.ShapeDtypeStruct((b, t), jnp.float32)

  def kl_sum(p, r, tgt, m):
    s = stats.token_stats(p, tgt, m, r, vocab_chunk=chunk, **{direction: True})
    return jnp.sum(getattr(s, direction)) + jnp.sum(s.logps)

  for name, fn in (("forward", kl_sum), ("gradient", jax.grad(kl_sum))):
    compiled = jax.jit(fn).lower(logits, logits, targets, mask).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    # A few [B, T, chunk] float32 blocks (chunk = V / 16) and [B, T] vectors.
    assert temp < full_bytes / 4, f"{name}: {temp / 2**20:.1f} MiB temporaries"

  # The textbook gradient (autodiff through a full log-softmax) does hold
  # full-size temporaries: the check above can fail.
  def textbook(p, r, tgt, m):
    lp, lr = jax.nn.log_softmax(p), jax.nn.log_softmax(r)
    if direction == "kl_ref_policy":
      kl = jnp.sum(jnp.exp(lr) * (lr - lp), -1)
    else:
      kl = jnp.sum(jnp.exp(lp) * (lp - lr), -1)
    return jnp.sum(m * kl)

  compiled = jax.jit(jax.grad(textbook)).lower(logits, logits, targets, mask).compile()
  assert compiled.memory_analysis().temp_size_in_bytes >= full_bytes / 4
