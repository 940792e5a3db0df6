"""The transformer itself: masks, positions, dtype policy, remat, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from midpo.models import Transformer, create_model, get_config
from midpo.models.transformer import LAYER_PARAM_AXES

SMALL = get_config("tiny", vocab_size=64, hidden_size=32, intermediate_size=64,
                   num_heads=4, num_kv_heads=2, head_dim=8)


@nnx.jit(static_argnames="hidden")
def _fwd(model, tokens, mask=None, hidden=False):
  return model(tokens, mask, return_hidden_states=hidden)


def _with_config(model, config, dtype=None):
  """The same weights under another config (dtype policy, remat), no re-init."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  state = nnx.state(model)
  if dtype is not None:
    state = jax.tree.map(lambda x: x.astype(dtype), state)
  return nnx.merge(graphdef, state)


def _tokens(b, t, vocab, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


def test_tiny_config_size_and_named_configs():
  tiny = get_config("tiny")
  model = create_model(tiny)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == tiny.num_params()
  assert 100_000 < n < 1_000_000, n
  big = get_config("llama3.2-1b")
  assert big.num_params() == 1_235_814_400  # Llama-3.2-1B's published size.
  assert big.rope_scaling.rope_type == "llama3" and big.num_groups == 4
  with pytest.raises(ValueError, match=r"Unknown model config 'nope'"):
    get_config("nope")


def test_flops_per_token_counts_matmul_params_and_causal_attention():
  c = get_config("llama3.2-1b")
  n = c.num_params(include_embeddings=False) + c.vocab_size * c.hidden_size
  t = 1024
  expected = 6 * n + 3 * 2 * c.num_layers * c.num_heads * c.head_dim * t
  assert c.flops_per_token(t) == pytest.approx(expected)
  assert c.flops_per_token(t, training=False) == pytest.approx(expected / 3)


@pytest.mark.parametrize("key,value,allowed", [
    ("dtype", "float8", "float32"), ("remat", "some", "full"),
    ("attention_impl", "flash", "cudnn"), ("model_type", "gpt2", "llama")])
def test_config_validation_names_key_and_allowed_values(key, value, allowed):
  with pytest.raises(ValueError, match=rf"ModelConfig\.{key}='{value}'; allowed: .*{allowed}"):
    SMALL.replace(**{key: value})
  with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
    SMALL.replace(num_heads=3)


def test_every_parameter_has_logical_axes():
  state = nnx.state(create_model(SMALL), nnx.Param)
  seen = set()
  for path, var in jax.tree.leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = var.get_metadata()["out_sharding"]
    assert len(names) == var.ndim, (path, names)
    seen.add(path[0].key if path[0].key != "layers" else path[1].key)
    if path[0].key == "layers":
      assert names[0] == "layers" and tuple(names[1:]) == LAYER_PARAM_AXES[path[1].key]
  assert {"embed", "final_norm", "q", "k", "v", "o", "gate", "up", "down"} <= seen


def test_padding_left_or_right_does_not_change_real_logits():
  model = create_model(SMALL)
  t = _tokens(1, 6, SMALL.vocab_size)
  ref = _fwd(model, t)[0]
  pad = jnp.zeros((1, 3), jnp.int32) + 5
  right = _fwd(model, jnp.concatenate([t, pad], 1), jnp.array([[1] * 6 + [0] * 3]))[0, :6]
  left = _fwd(model, jnp.concatenate([pad, t], 1), jnp.array([[0] * 3 + [1] * 6]))[0, 3:]
  np.testing.assert_allclose(right, ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(left, ref, atol=1e-5, rtol=0)
  assert np.isfinite(np.asarray(_fwd(model, jnp.concatenate([pad, t], 1),
                                      jnp.array([[0] * 3 + [1] * 6])))).all()


def test_causal():
  model = create_model(SMALL)
  t = _tokens(2, 8, SMALL.vocab_size)
  t2 = t.at[:, 5].set((t[:, 5] + 1) % SMALL.vocab_size)
  a, b = _fwd(model, t), _fwd(model, t2)
  np.testing.assert_array_equal(a[:, :5], b[:, :5])
  assert np.abs(np.asarray(a[:, 5:] - b[:, 5:])).max() > 1e-4


def _loss_and_grads(model, tokens):
  graphdef, params = nnx.split(model)

  @jax.jit
  def f(params):
    def loss(params):
      logits = nnx.merge(graphdef, params)(tokens[:, :-1])
      logp = jax.nn.log_softmax(logits, -1)
      return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    return jax.value_and_grad(loss)(params)

  return f(params)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_and_scan_give_the_same_gradients(scan_layers):
  tokens = _tokens(2, 9, SMALL.vocab_size)
  model = create_model(SMALL.replace(scan_layers=not scan_layers), seed=1)
  l0, g0 = _loss_and_grads(model, tokens)
  for remat in ("none", "full", "dots_no_batch"):
    other = SMALL.replace(remat=remat, scan_layers=scan_layers)
    l1, g1 = _loss_and_grads(_with_config(model, other), tokens)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_bfloat16_policy():
  f32 = create_model(SMALL, seed=2)
  bf = _with_config(f32, SMALL.replace(dtype="bfloat16", param_dtype="bfloat16"), jnp.bfloat16)
  assert bf.layers.q[...].dtype == jnp.bfloat16
  t = _tokens(2, 7, SMALL.vocab_size)
  out, hidden = _fwd(bf, t, hidden=True)
  assert out.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
  # bfloat16 compute with float32 master weights stays close to float32.
  mixed = _with_config(f32, SMALL.replace(dtype="bfloat16"))
  assert mixed.layers.q[...].dtype == jnp.float32
  diff = np.abs(np.asarray(_fwd(mixed, t)) - np.asarray(_fwd(f32, t))).max()
  assert 0 < diff < 0.05, diff


def test_tiny_model_learns_a_repeated_string():
  config = get_config("tiny")
  text = np.frombuffer(b"midpo aligns models. " * 4, np.uint8).astype(np.int32)
  tokens = jnp.asarray(np.stack([text[i:i + 64] for i in range(8)]))
  model = create_model(config)
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      logp = jax.nn.log_softmax(model(tokens[:, :-1]), -1)
      return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(40)]
  assert losses[0] > np.log(config.vocab_size) - 0.5  # Starts near uniform.
  assert losses[-1] < 0.25 * losses[0], losses[::5]


@pytest.mark.parametrize("window", [None, 3])
def test_dot_product_attention_path_matches_on_right_padding(window):
  """attention_impl 'jax' (the arguments 'cudnn' also uses, minus the kernel)
  equals the explicit masked attention on a right-padded batch."""
  config = SMALL.replace(sliding_window=window)
  model = create_model(config, seed=4)
  fused = _with_config(model, config.replace(attention_impl="jax"))
  t = _tokens(3, 9, SMALL.vocab_size)
  mask = jnp.asarray((np.arange(9)[None] < np.array([[9], [6], [2]])).astype(np.int32))
  a, b = np.asarray(_fwd(model, t, mask)), np.asarray(_fwd(fused, t, mask))
  real = np.asarray(mask) > 0
  np.testing.assert_allclose(b[real], a[real], atol=1e-5, rtol=0)
