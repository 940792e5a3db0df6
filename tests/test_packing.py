"""Padding-free packing: the packer's layout, the model's segment ids, and the
'mi' prior's maximum-likelihood fit on packed rows against padded rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from midpo.algorithms.mi import response_model
from midpo.data import packing
from midpo.models import Transformer, get_config
from midpo.models.attention import positions_from_segments

PAD, BOS, EOS = 0, 1, 2


def _sequences(seed=0, n=12, low=2, high=20, vocab=16):
  rng = np.random.default_rng(seed)
  return [[BOS] + rng.integers(3, vocab, int(rng.integers(low, high))).tolist() + [EOS]
          for _ in range(n)]


def test_pack_places_every_sequence_once_with_its_targets():
  seqs = _sequences()
  starts = [1 + (i % 3) for i in range(len(seqs))]
  p = packing.pack(seqs, starts, width=32, pad_id=PAD, row_multiple=4)
  rows, width = p["tokens"].shape
  assert width == 32 and rows % 4 == 0
  # Fewer rows than one per sequence, and no more than first-fit decreasing needs.
  assert rows < len(seqs)
  seen = []
  for r in range(rows):
    seg = p["segment_ids"][r]
    ids = [s for s in np.unique(seg) if s > 0]
    assert ids == list(range(1, len(ids) + 1))
    for s in ids:
      where = np.flatnonzero(seg == s)
      assert np.all(np.diff(where) == 1)  # contiguous
      tokens = p["tokens"][r, where].tolist()
      i = seqs.index(tokens)
      seen.append(i)
      # Targets: slots start-1 .. n-2 of the span score tokens start .. n-1.
      slots = where[:-1]
      mask = p["target_mask"][r, slots]
      np.testing.assert_array_equal(mask, np.arange(len(where) - 1) >= starts[i] - 1)
      assert np.all(p["sequence_index"][r, slots][mask > 0] == i)
    pad = seg == 0
    assert np.all(p["tokens"][r][pad] == PAD)
  assert sorted(seen) == list(range(len(seqs)))
  assert p["target_mask"].sum() == sum(len(s) - st for s, st in zip(seqs, starts))
  assert np.all(p["sequence_index"][p["target_mask"] == 0] == len(seqs))
  # Deterministic.
  q = packing.pack(seqs, starts, width=32, pad_id=PAD, row_multiple=4)
  for k in p:
    np.testing.assert_array_equal(p[k], q[k])


@pytest.mark.parametrize("bad, match", [
    (dict(sequences=[[1] * 40]), "do not fit"),
    (dict(sequences=[[1]], target_starts=[1]), "2 or more"),
    (dict(target_starts=[0]), "target start"),
    (dict(target_starts=[1, 1]), "2 target starts"),
])
def test_pack_refuses_what_it_cannot_place(bad, match):
  args = dict(sequences=[[1, 2, 3]], target_starts=[1])
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    packing.pack(args["sequences"], args["target_starts"], width=32, pad_id=PAD)


def test_positions_restart_in_every_segment():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(positions_from_segments(seg),
                                [[0, 1, 2, 0, 1, 0, 0, 0], list(range(8))])


def _net(**overrides):
  config = get_config("micro", vocab_size=16, hidden_size=32, intermediate_size=64,
                      num_heads=2, num_kv_heads=2, head_dim=16, bos_token_id=BOS,
                      eos_token_id=EOS, pad_token_id=PAD, **overrides)
  return Transformer(config, rngs=nnx.Rngs(params=0))


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 4},
                                       {"attention_impl": "jax"}])
def test_packed_logits_equal_each_sequence_alone(overrides):
  net = _net(**overrides)
  seqs = _sequences(seed=1, n=5)
  p = packing.pack(seqs, [1] * len(seqs), width=24, pad_id=PAD)
  logits = np.asarray(net(jnp.asarray(p["tokens"]), segment_ids=jnp.asarray(p["segment_ids"])))
  for r in range(len(p["tokens"])):
    for s in range(1, p["segment_ids"][r].max() + 1):
      where = np.flatnonzero(p["segment_ids"][r] == s)
      alone = np.asarray(net(jnp.asarray(p["tokens"][r, where][None])))[0]
      np.testing.assert_allclose(logits[r, where], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conditional", [False, True])
def test_packed_fit_equals_the_padded_fit(conditional):
  """The 'mi' prior's sequence log-likelihoods, loss, gradient norm and two SGD
  steps: packed rows against the padded preference rows of the same samples."""
  net = _net()
  graphdef, state = nnx.split(net)
  params = nnx.to_pure_dict(state)
  model = response_model.ResponseModel(graphdef, conditional, bos_id=BOS, pad_id=PAD)
  rng = np.random.default_rng(2)
  prompts = [[BOS] + rng.integers(3, 16, int(rng.integers(1, 6))).tolist() for _ in range(10)]
  responses = [s[1:] for s in _sequences(seed=3, n=10)]
  width = max(len(p) + len(r) for p, r in zip(prompts, responses))
  rows = {k: jnp.asarray(v) for k, v in _response_rows(prompts, responses, width).items()}
  if conditional:
    seqs, starts = [p + r for p, r in zip(prompts, responses)], [len(p) for p in prompts]
  else:
    seqs, starts = [[BOS] + r for r in responses], [1] * len(responses)
  packed = {k: jnp.asarray(v) for k, v in
            packing.pack(seqs, starts, width=32, pad_id=PAD, row_multiple=4).items()}

  np.testing.assert_allclose(
      jax.jit(model.packed_sequence_logps, static_argnums=2)(params, packed, len(seqs)),
      jax.jit(model.sequence_logps)(params, rows), rtol=1e-5)
  # Plain SGD: the parameters after two steps differ as the gradients do.
  tx = optax.sgd(0.5)
  step_pad = response_model.make_mle_step(functools.partial(response_model.nll, model), tx)
  step_pack = response_model.make_mle_step(functools.partial(response_model.packed_nll, model),
                                           tx)
  embed0 = np.array(params["embed"])
  a = jax.tree.map(jnp.copy, (params, tx.init(params)))  # the steps donate their inputs
  b = jax.tree.map(jnp.copy, a)
  for _ in range(2):
    *a, m_pad = step_pad(*a, rows)
    *b, m_pack = step_pack(*b, packed)
    for k in ("nll_per_token", "nll_per_sequence", "grad_norm"):
      np.testing.assert_allclose(m_pack[k], m_pad[k], rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), b[0], a[0])
  assert not np.allclose(b[0]["embed"], embed0)  # the steps moved it


def _response_rows(prompts, responses, width):
  from midpo import sampling
  return sampling.response_rows(prompts, responses, width, PAD)


def test_the_mutual_information_estimate_is_the_same_packed_or_padded(tmp_path):
  """eval.mi_packing (the default) against the padded fit: the same estimate, from the
  same samples, seed and steps, to float32 rounding."""
  from midpo import sampling
  from midpo.algorithms.mi import estimate
  from midpo.data import synthetic
  from midpo.training import env as env_lib
  from tests import train_utils as tu
  config = tu.tiny_config("dpo", **tu.MI_ESTIMATE_TINY)
  env = env_lib.make_env(config, str(tmp_path))
  params = env_lib.init_params(env, 0)
  prompts = synthetic.prompts(config.data.synthetic.seed, "test", 16)
  fit = sampling.sample(env, params, estimate.fit_prompts(env), jax.random.key(1),
                        temperature=1.0)
  scored = sampling.sample(env, params, prompts, jax.random.key(2), temperature=1.0)
  got = {}
  for packed in (True, False):
    env.config.eval.mi_packing = packed
    got[packed] = estimate.mutual_information(env, fit, scored, seed=3)
  for key in ("value", "se", "nll_per_token", "nll_per_token_fit"):
    np.testing.assert_allclose(got[True][key], got[False][key], rtol=1e-4, err_msg=key)
  assert got[True]["nll_per_token_fit"] < got[True]["nll_per_token"] + 1.0  # it fit something
