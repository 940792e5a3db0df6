"""KV-cache sampling against full recomputation and teacher forcing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from midpo.models import create_model, get_config
from midpo.models.generate import generate, sample_logits

SMALL = get_config("tiny", vocab_size=64, hidden_size=32, intermediate_size=64,
                   num_heads=4, num_kv_heads=2, head_dim=8)
B, P, N = 3, 6, 7


@pytest.fixture(scope="module")
def model():
  return create_model(SMALL, seed=3)


@nnx.jit
def _forward(model, tokens, mask):
  return model(tokens, mask)


def _prompts():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, SMALL.vocab_size, (B, P)).astype(np.int32)
  mask = np.ones((B, P), np.int32)
  mask[0, :2] = 0  # left padded
  mask[1, 4:] = 0  # right padded: generate left-aligns it
  return tokens, mask


def _teacher_forced_logprobs(model, out):
  seq = jnp.concatenate([out.prompt_tokens, out.tokens], axis=1)
  mask = jnp.concatenate([out.prompt_mask, out.mask], axis=1)
  logp = jax.nn.log_softmax(_forward(model, seq, mask), axis=-1)
  return jnp.take_along_axis(logp[:, P - 1:-1], out.tokens[..., None], axis=-1)[..., 0]


def test_greedy_kv_cache_equals_full_recomputation(model):
  tokens, mask = _prompts()
  out = generate(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=N, temperature=0.0)
  assert out.tokens.shape == (B, N) and out.logprobs.shape == (B, N)
  assert np.asarray(out.mask).all() and not np.asarray(out.done).any()
  # Left alignment keeps each row's real tokens in order.
  for r in range(B):
    np.testing.assert_array_equal(np.asarray(out.prompt_tokens)[r][np.asarray(out.prompt_mask)[r] > 0],
                                  tokens[r][mask[r] > 0])
  # Full recomputation of the whole sequence at every step, no cache. The
  # sequence is right-padded to a fixed length (one compile); causal attention
  # makes the padding invisible to the last real position.
  seq = np.concatenate([np.asarray(out.prompt_tokens), np.zeros((B, N), np.int32)], axis=1)
  seq_mask = np.concatenate([np.asarray(out.prompt_mask), np.zeros((B, N), np.int32)], axis=1)
  for step in range(N):
    logits = _forward(model, jnp.asarray(seq), jnp.asarray(seq_mask))
    next_token = np.asarray(jnp.argmax(logits[:, P + step - 1], axis=-1))
    np.testing.assert_array_equal(next_token, np.asarray(out.tokens[:, step]), err_msg=f"step {step}")
    seq[:, P + step] = next_token
    seq_mask[:, P + step] = 1
  tf = _teacher_forced_logprobs(model, out)
  np.testing.assert_allclose(out.logprobs, tf, atol=1e-5, rtol=0)


def test_sampled_logprobs_equal_teacher_forcing_and_eos_stops(model):
  tokens, mask = _prompts()
  # Many EOS ids so that rows stop at different steps.
  eos = tuple(range(0, SMALL.vocab_size, 5))
  out = generate(model, tokens, mask, rng=jax.random.key(1), max_new_tokens=N,
                 temperature=1.3, top_k=40, top_p=0.9, eos_id=eos, pad_id=63)
  toks, m, lp = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.logprobs)
  for r in range(B):
    n_real = m[r].sum()
    assert (m[r, :n_real] == 1).all() and (m[r, n_real:] == 0).all()  # a prefix
    hit = np.isin(toks[r, :n_real], eos)
    assert bool(out.done[r]) == hit.any()
    if hit.any():  # stops right after the first EOS
      assert hit.argmax() == n_real - 1
    assert (toks[r, n_real:] == 63).all() and (lp[r, n_real:] == 0).all()
  assert np.asarray(out.done).any(), "test needs at least one row that hits EOS"
  tf = np.asarray(_teacher_forced_logprobs(model, out))
  np.testing.assert_allclose(np.where(m > 0, lp, 0), np.where(m > 0, tf, 0), atol=1e-5, rtol=0)
  assert (lp[m > 0] < 0).all()


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  greedy = sample_logits(keys, logits, temperature=0.0)
  assert (np.asarray(greedy) == 0).all()
  top1 = sample_logits(keys, logits, top_k=1)
  assert (np.asarray(top1) == 0).all()
  top2 = np.asarray(sample_logits(keys, logits, top_k=2))
  assert set(np.unique(top2)) == {0, 1}
  # top_p 0.7: the smallest set with mass >= 0.7 is {0, 1}.
  top_p = np.asarray(sample_logits(keys, logits, top_p=0.7))
  assert set(np.unique(top_p)) == {0, 1}
  free = np.asarray(sample_logits(keys, logits))
  assert set(np.unique(free)) == {0, 1, 2, 3}
  assert abs((free == 0).mean() - 0.5) < 0.05


def test_generate_rejects_bad_arguments(model):
  tokens, mask = _prompts()
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=0)
  with pytest.raises(ValueError, match="top_p"):
    generate(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="pad_id=None; must be an int"):
    generate(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=2, pad_id=None)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    generate(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=2, eos_id=SMALL.vocab_size)
  empty = mask.copy()
  empty[2] = 0
  with pytest.raises(ValueError, match=r"Rows \[2\] have empty prompts"):
    generate(model, tokens, empty, rng=jax.random.key(0), max_new_tokens=2)
