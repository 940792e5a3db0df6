"""train.padding_free: the preference step on packed pairs equals the padded step.

Every algorithm's first step (built as the trainer builds it, as in
tests/test_golden.py) from the same start, once on the padded batch and once
with the packed rows added: loss, metrics and the updated parameters agree to
float32 rounding. Also the map back to the padded layout, and a trainer run.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from midpo.data import packing
from midpo.training import config as config_lib
from midpo.training import pairs
from tests import train_utils as tu
from tests.test_golden import ALGORITHMS, KEYS, build_step, world  # noqa: F401 (fixture)


def test_pack_pairs_maps_every_scored_slot_back():
  rng = np.random.default_rng(0)
  b, t = 3, 12
  tokens = rng.integers(3, 50, (b, 2, t)).astype(np.int32)
  att = np.zeros((b, 2, t), np.int32)
  resp = np.zeros((b, 2, t), np.int32)
  for i in range(b):
    for k in range(2):
      p, n = int(rng.integers(1, 4)), int(rng.integers(5, t + 1))
      att[i, k, :n] = 1
      resp[i, k, p:n] = 1
  out = packing.pack_pairs(tokens, att, resp, width=16, pad_id=0, row_multiple=2)
  r, w = out["packed_tokens"].shape
  assert w == 16 and r % 2 == 0 and out["unpack_index"].shape == (b, 2, t - 1)
  # Every scored padded slot points at the packed slot of the same target token.
  flat_targets = np.concatenate([out["packed_tokens"][:, 1:].reshape(-1), [-1]])
  flat_mask = np.concatenate([out["packed_target_mask"].reshape(-1), [0]])
  got = flat_targets[out["unpack_index"]]
  scored = resp[..., 1:] > 0
  np.testing.assert_array_equal(got[scored], tokens[..., 1:][scored])
  assert np.all(flat_mask[out["unpack_index"]][scored] == 1)
  assert np.all(out["unpack_index"][~scored] == r * (w - 1))
  assert out["packed_target_mask"].sum() == scored.sum()
  values = jnp.arange(r * (w - 1), dtype=jnp.float32).reshape(r, w - 1) + 1
  np.testing.assert_array_equal(np.asarray(packing.unpack(values, out["unpack_index"]))[~scored],
                                0)
  one = np.ones((1, 2, 6), np.int32)
  left = one.copy()  # left padding: a pad token would be packed as a real one
  left[0, 0, 0] = 0
  one_resp = np.zeros_like(one)
  one_resp[..., 3:] = 1
  packing.pack_pairs(one * 5, one, one_resp, width=8, pad_id=0)  # right-padded: fine
  with pytest.raises(ValueError, match="right-padded"):
    packing.pack_pairs(one * 5, left, one_resp, width=8, pad_id=0)
  no_prompt = resp.copy()
  no_prompt[0, 0, :att[0, 0].sum()] = 1
  with pytest.raises(ValueError, match="no prompt and no BOS"):
    packing.pack_pairs(tokens, att, no_prompt, width=16, pad_id=0)
  bad = resp.copy()
  bad[0, 0, -1] = 0
  bad[0, 0, 1:att[0, 0].sum() - 1] = 1
  att[0, 0, :] = 1
  with pytest.raises(ValueError, match="padding-free packing needs"):
    packing.pack_pairs(tokens, att, bad, width=16, pad_id=0)


def test_each_shard_packs_its_own_pairs_into_as_many_rows():
  """pack_pairs(shards=S): every group of B/S pairs is packed into its own R/S rows
  (the most any group needs, at least min_rows) and maps back only into them;
  unpack with the same S gives the padded layout's values."""
  rng = np.random.default_rng(1)
  b, t, w = 4, 12, 16
  tokens = rng.integers(3, 50, (b, 2, t)).astype(np.int32)
  att = np.zeros((b, 2, t), np.int32)
  resp = np.zeros((b, 2, t), np.int32)
  for i in range(b):
    for k in range(2):
      n = t if i < 2 else 4  # group 0's pairs are long, group 1's short
      att[i, k, :n] = 1
      resp[i, k, 2:n] = 1
  out = packing.pack_pairs(tokens, att, resp, width=w, pad_id=0, shards=2)
  r = out["packed_tokens"].shape[0]
  assert r == 8  # group 0 needs 4 rows (4 of 12 tokens in rows of 16), group 1 one
  per_group = r // 2 * (w - 1)
  scored = resp[..., 1:] > 0
  assert np.all(out["unpack_index"][~scored] == per_group)
  assert np.all(out["unpack_index"][scored] < per_group)
  # Group 1 (pairs 2, 3) reads only rows 4..7.
  values = jnp.asarray(out["packed_tokens"][:, 1:], jnp.float32)
  got = np.asarray(packing.unpack(values, jnp.asarray(out["unpack_index"]), 2))
  np.testing.assert_array_equal(got[scored], tokens[..., 1:][scored])
  np.testing.assert_array_equal(got[~scored], 0)
  assert out["packed_target_mask"][4:].sum() == scored[2:].sum()
  assert out["packed_segment_ids"][5:].max() == 0  # its other rows are empty
  wider = packing.pack_pairs(tokens, att, resp, width=w, pad_id=0, shards=2, min_rows=5)
  assert wider["packed_tokens"].shape[0] == 10
  # Extending the packed groups afterwards gives the same arrays as packing them wider.
  padded = packing.pad_pairs(out, 5, shards=2, pad_id=0)
  assert set(padded) == set(wider)
  for k in wider:
    np.testing.assert_array_equal(padded[k], wider[k], err_msg=k)
  with pytest.raises(ValueError, match="4 packed rows per group do not fit 3"):
    packing.pad_pairs(out, 3, shards=2, pad_id=0)
  got = np.asarray(packing.unpack(jnp.asarray(wider["packed_tokens"][:, 1:], jnp.float32),
                                  jnp.asarray(wider["unpack_index"]), 2))
  np.testing.assert_array_equal(got[scored], tokens[..., 1:][scored])
  with pytest.raises(ValueError, match="4 pairs do not divide into 3 shards"):
    packing.pack_pairs(tokens, att, resp, width=w, pad_id=0, shards=3)


@pytest.fixture(scope="module")
def packed_world(world):
  """test_golden's world (the synthetic task's rows, of unequal lengths, padded to the
  bucket) with its first batch."""
  env, models, it = world
  return env, models, it.first_batches(1)[0]


def _step(env, models, local, name, packed):
  # Plain SGD: the update is minus the gradient, compared element by element.
  update, run, state = build_step(env, models, _Batches(local), name, optax.sgd(1.0))
  host = pairs.select(local, pairs.pair_fields(env, run.prior))
  if packed:
    host.update(pairs.packed_rows(env, local))
  state, metrics = update.step(run, state, env.global_batch(host), jax.random.key(0), 0)
  return {k: float(metrics[k]) for k in KEYS if k in metrics}, state["policy"]


# The packed rows feed only the models' per-token statistics, which are mapped back to the
# padded layout before any prior reads them: one algorithm per kind of statistic. DPO
# (sequence log-probs), SimPO (no reference), TDPO (KL(ref || policy) per token), TIS-DPO
# (KL(policy || ref), token weights from its own models), SparsePO (the reference's hidden
# states, prior parameters), 'mi' (its prior network's log-probs). Each also through the
# fused LM head.
CASES = [(name, False) for name in ("dpo", "simpo", "tdpo", "tis_dpo", "sparsepo", "mi")] + [
    ("dpo", True), ("tdpo", True)]


@pytest.mark.parametrize("name, fused", CASES)
def test_the_padding_free_step_equals_the_padded_step(packed_world, name, fused):
  env, models, local = packed_world
  assert set(n for n, _ in CASES) <= set(ALGORITHMS)
  env.config.train.fused_lm_head = fused
  try:
    padded, p_pad = _step(env, models, local, name, packed=False)
    packed, p_pack = _step(env, models, local, name, packed=True)
  finally:
    env.config.train.fused_lm_head = False
  assert set(packed) == set(padded)
  for k in padded:
    np.testing.assert_allclose(packed[k], padded[k], rtol=2e-5, atol=1e-6, err_msg=k)
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), p_pad,
                       models["policy"])
  assert max(jax.tree.leaves(moved)) > 1e-4  # the step has a gradient to compare
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               p_pack, p_pad)


class _Batches:
  """What a recipe's ``init_params`` reads of the batch iterator: the first batch."""

  def __init__(self, local):
    self.local = local

  def first_batches(self, n):
    return [self.local][:n]


def test_the_packed_rows_are_fewer_than_the_padded_ones(packed_world):
  env, _, local = packed_world
  rows = pairs.packed_rows(env, local)
  padded_slots = local["tokens"].shape[0] * 2 * local["tokens"].shape[-1]
  packed_slots = rows["packed_tokens"].size
  assert packed_slots < padded_slots
  assert rows["packed_tokens"].shape[1] == env.config.data.max_length


def _other_processes(env, rows_elsewhere):
  """``env`` as one of several processes, another of which needs ``rows_elsewhere``
  rows per shard (0: it could not pack its pairs); records the collectives."""
  calls = []

  def over(fn):
    def agree(n):
      calls.append(n)
      return fn(n, rows_elsewhere)
    return agree

  return types.SimpleNamespace(mesh=env.mesh, process_count=1, config=env.config,
                               tokenizer=env.tokenizer, max_over_processes=over(max),
                               min_over_processes=over(min)), calls


def test_a_process_packs_into_as_many_rows_as_the_process_that_needs_most(packed_world):
  """packed_rows with another process that needs more rows: this one pads to its
  count (empty rows appended: packing.pad_pairs), and the map back is unchanged; a process that
  cannot pack still joins the collectives, and every process then raises."""
  env, _, local = packed_world
  own = pairs.packed_rows(env, local)
  r = own["packed_tokens"].shape[0]
  fake, calls = _other_processes(env, r + 4)
  more = pairs.packed_rows(fake, local)
  assert more["packed_tokens"].shape[0] == r + 4 and calls == [r, r]
  np.testing.assert_array_equal(more["packed_tokens"][:r], own["packed_tokens"])
  assert more["packed_segment_ids"][r:].max() == 0
  scored = local["response_mask"][..., 1:] > 0
  for rows in (own, more):
    got = np.asarray(packing.unpack(jnp.asarray(rows["packed_tokens"][:, 1:]),
                                    jnp.asarray(rows["unpack_index"])))
    np.testing.assert_array_equal(got[scored], local["tokens"][..., 1:][scored])
  fake, calls = _other_processes(env, 0)  # the other process failed
  with pytest.raises(ValueError, match="another process could not pack its pairs"):
    pairs.packed_rows(fake, local)
  bad = dict(local, response_mask=np.ones_like(local["response_mask"]))  # no token before
  fake, calls = _other_processes(env, r)
  with pytest.raises(ValueError, match="padding-free packing needs"):
    pairs.packed_rows(fake, bad)
  assert calls == [0, 0]  # it joined both collectives before raising


def test_padding_free_needs_whole_batch_shards_in_every_process():
  config = tu.tiny_config("dpo", **{"train.padding_free": True})
  config_lib.validate(config, num_devices=2, process_count=1)
  config_lib.validate(config, num_devices=2, process_count=2)
  config.mesh.data, config.mesh.tensor = 1, 2
  with pytest.raises(config_lib.ConfigError,
                     match="train.padding_free.*1 batch shards must divide over the 2 proc"):
    config_lib.validate(config, num_devices=2, process_count=2)
