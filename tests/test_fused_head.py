"""The fused LM head (``midpo.core.fused_head``): the same statistics and gradients as
``stats.token_stats`` on materialised logits, to float32 rounding, for both head layouts, with
and without soft-capping, for every statistic; and a compiled step whose temporary memory stays
below one ``[B, T, V]`` float32 array at ``V = 32k`` (XLA's memory analysis), where the plain
path's does not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midpo.core import fused_head, stats

B, T, D, V = 3, 7, 16, 50


def _inputs(seed, layout):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  ref_h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  shape = (V, D) if layout == "vd" else (D, V)
  w = jnp.asarray(rng.normal(size=shape) * 0.5, jnp.float32)
  ref_w = jnp.asarray(rng.normal(size=shape) * 0.5, jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  mask = jnp.asarray(rng.random((B, T)) < 0.7, jnp.float32)
  return h, w, ref_h, ref_w, targets.at[0, 0].set(-100), mask.at[0, 0].set(0.0)


def _plain_logits(h, w, head):
  spec = "btd,vd->btv" if head.layout == "vd" else "btd,dv->btv"
  x = jnp.einsum(spec, h, w, preferred_element_type=jnp.float32)
  return x if head.softcap is None else head.softcap * jnp.tanh(x / head.softcap)


FIELDS = ("logps", "ref_logps", "kl_ref_policy", "kl_policy_ref", "log_sum_sq_probs")


@pytest.mark.parametrize("layout,softcap,chunk", [("vd", None, 16), ("dv", None, None),
                                                  ("vd", 3.0, 7), ("dv", 3.0, 64)])
def test_fused_equals_the_plain_path_values_and_gradients(layout, softcap, chunk):
  h, w, ref_h, ref_w, targets, mask = _inputs(0, layout)
  head = fused_head.Head(layout, jnp.float32, softcap)
  weights = {f: jnp.asarray(np.random.default_rng(i).normal(size=(B, T)), jnp.float32)
             for i, f in enumerate(FIELDS)}
  kw = dict(kl_ref_policy=True, kl_policy_ref=True, log_sum_sq_probs=True, vocab_chunk=chunk)

  def fused(h, w):
    ts = fused_head.token_stats_from_hidden(h, w, head, targets, mask, ref_h, ref_w, **kw)
    return sum(jnp.sum(weights[f] * getattr(ts, f)) for f in FIELDS), ts

  def plain(h, w):
    ts = stats.token_stats(_plain_logits(h, w, head), targets, mask,
                           _plain_logits(ref_h, ref_w, head), **kw)
    return sum(jnp.sum(weights[f] * getattr(ts, f)) for f in FIELDS), ts

  (value_f, ts_f), grads_f = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(h, w)
  (value_p, ts_p), grads_p = jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(h, w)
  for f in FIELDS:
    np.testing.assert_allclose(getattr(ts_f, f), getattr(ts_p, f), rtol=1e-5, atol=2e-5,
                               err_msg=f)
    assert np.all(np.asarray(getattr(ts_f, f))[np.asarray(mask) == 0] == 0), f
  np.testing.assert_allclose(value_f, value_p, rtol=1e-5)
  for gf, gp, name in zip(grads_f, grads_p, ("h", "w")):
    assert float(jnp.abs(gp).max()) > 1e-3, name  # a gradient that is there to compare
    np.testing.assert_allclose(gf, gp, rtol=1e-4, atol=1e-5, err_msg=name)


def test_the_reference_gets_no_gradient_and_bad_shapes_are_named():
  h, w, ref_h, ref_w, targets, mask = _inputs(1, "vd")
  head = fused_head.Head("vd", jnp.float32)

  def loss(ref_h, ref_w):
    ts = fused_head.token_stats_from_hidden(h, w, head, targets, mask, ref_h, ref_w,
                                            kl_ref_policy=True)
    return jnp.sum(ts.ref_logps) + jnp.sum(ts.kl_ref_policy)

  for g in jax.grad(loss, argnums=(0, 1))(ref_h, ref_w):
    assert not np.any(np.asarray(g))
  with pytest.raises(ValueError, match="does not fit hidden size"):
    fused_head.token_stats_from_hidden(h, w.T, head, targets, mask)
  with pytest.raises(ValueError, match="needs the reference"):
    fused_head.token_stats_from_hidden(h, w, head, targets, mask, kl_policy_ref=True)
  with pytest.raises(ValueError, match="needs both"):
    fused_head.token_stats_from_hidden(h, w, head, targets, mask, ref_h)


def test_peak_temporary_memory_at_32k_vocabulary_stays_below_one_logits_array():
  """A DPO-like step's gradient, compiled: XLA's temporary buffers with the fused head stay
  below one ``[B, T, V]`` float32 array; with materialised logits they hold several."""
  b, t, d, v = 4, 128, 64, 32768
  h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  w = jax.ShapeDtypeStruct((v, d), jnp.float32)
  targets = jax.ShapeDtypeStruct((b, t), jnp.int32)
  mask = jax.ShapeDtypeStruct((b, t), jnp.float32)
  head = fused_head.Head("vd", jnp.float32)

  def fused(h, w, ref_h, targets, mask):
    ts = fused_head.token_stats_from_hidden(h, w, head, targets, mask, ref_h, w)
    return jnp.sum(jax.nn.log_sigmoid(jnp.sum(ts.logps - ts.ref_logps, -1)))

  def plain(h, w, ref_h, targets, mask):
    ts = stats.token_stats(_plain_logits(h, w, head), targets, mask,
                           _plain_logits(ref_h, w, head))
    return jnp.sum(jax.nn.log_sigmoid(jnp.sum(ts.logps - ts.ref_logps, -1)))

  one_logits = b * t * v * 4
  temp = {}
  for name, fn in (("fused", fused), ("plain", plain)):
    compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(h, w, h, targets, mask).compile()
    temp[name] = compiled.memory_analysis().temp_size_in_bytes
  print(f"temp bytes: {temp}; one [B, T, V] float32 array: {one_logits}")
  assert temp["fused"] < one_logits, temp
  assert temp["plain"] > one_logits, temp  # what the fused head avoids


def test_the_pair_step_and_the_sft_loss_through_the_fused_head_equal_the_plain_ones(
    shared, tmp_path, monkeypatch):
  """``train.fused_lm_head=True`` in the trainer: the pair statistics every prior reads
  (policy and online reference log-probs, both KLs, WPO's term, the reference's layer
  outputs) and their gradients, and the SFT loss and its gradient, on a batch of the tiny
  run, equal the materialised-logits path's to float32 rounding."""
  from midpo.training import env as env_lib
  from midpo.training import pairs, sft
  from tests import train_utils as tu

  fields = ("logps", "ref_logps", "kl_ref_policy", "kl_policy_ref", "log_sum_sq_probs",
            "ref_hidden")
  config = tu.tiny_config("dpo", **{"data.data_dir": shared["data_dir"],
                                    "sft.checkpoint": shared["sft"], "train.vocab_chunk": 24})
  env = env_lib.make_env(config, str(tmp_path))
  reference = sft.run_sft(env)
  policy = jax.tree.map(lambda x: x * 1.01, reference)  # away from the reference: KLs > 0
  local = env.batches(env.data_config(), "train", mode="pairs").first_batches(1)[0]
  batch = env.global_batch(pairs.select(local, pairs.ROW_FIELDS))
  sft_batch = {k: pairs.to_rows(batch[k]) for k in sft.SFT_FIELDS}
  results, calls = {}, []
  real = fused_head.token_stats_from_hidden
  monkeypatch.setattr(fused_head, "token_stats_from_hidden",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  for fused in (False, True):
    with env.config.unlocked():
      env.config.train.fused_lm_head = fused
    stats_fn = pairs.make_pair_stats(env, fields)

    def objective(policy):
      chosen, rejected = stats_fn(policy, None, {"reference": reference}, batch)
      total = sum(jnp.sum(getattr(s, f)) for s in (chosen, rejected)
                  for f in ("logps", "kl_ref_policy", "kl_policy_ref"))
      return total, (chosen, rejected)

    (_, seqs), grads = jax.value_and_grad(objective, has_aux=True)(policy)
    (sft_value, _), sft_grads = jax.value_and_grad(
        lambda p: sft.sft_loss(env.graphdef, p, sft_batch, fused_lm_head=fused, vocab_chunk=24),
        has_aux=True)(policy)
    results[fused] = jax.device_get((seqs, grads, sft_value, sft_grads))
    assert bool(calls) == fused  # the option picks the path: pair stats and SFT loss

  (seqs_p, grads_p, sft_p, sft_grads_p), (seqs_f, grads_f, sft_f, sft_grads_f) = (
      results[False], results[True])
  for side_p, side_f in zip(seqs_p, seqs_f):
    for f in fields:
      a, b = np.asarray(getattr(side_p, f)), np.asarray(getattr(side_f, f))
      assert np.abs(a).max() > 0, f  # a statistic that is there to compare
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4, err_msg=f)
  np.testing.assert_allclose(sft_f, sft_p, rtol=1e-5)
  for gp, gf in ((grads_p, grads_f), (sft_grads_p, sft_grads_f)):
    for x, y in zip(jax.tree.leaves(gp), jax.tree.leaves(gf)):
      np.testing.assert_allclose(y, x, rtol=1e-3, atol=2e-5)
