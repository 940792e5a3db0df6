"""Batches: layout, masks, oracle weights, padding, shuffling, sharding, exact resume."""

import json

import numpy as np
import pytest

from midpo.data import pipeline
from midpo.data import report as report_lib
from midpo.data import synthetic
from midpo.data import tfds_builders

TOK = synthetic.SyntheticTokenizer()


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  c = pipeline.default_config()
  c.data_dir = str(tmp_path_factory.mktemp("tfds"))
  c.synthetic.update(dict(seed=5, num_sft=100, num_train=1200, num_test=20))
  c.batch_size = 8
  c.max_length = 64
  pipeline.builder_from_config(c)  # build once for the module
  return c


def _source(c, split="train"):
  return pipeline.builder_from_config(c, build=False).as_data_source(split=split)


def _copy(c, **kw):
  c = c.copy_and_resolve_references()
  c.update(kw)
  return c


def test_batch_layout_and_masks(cfg, tmp_path):
  c = _copy(cfg, token_weights="oracle")
  it = pipeline.make_iterator(c, TOK, "train", str(tmp_path))
  src = _source(c)
  b = c.batch_size
  for _ in range(3):
    batch = next(it)
    t = batch["tokens"].shape[-1]
    assert set(batch) == {
      "tokens",
      "attention_mask",
      "response_mask",
      "token_weights",
      "pair_index",
      "reward",
    }
    for k in ("tokens", "attention_mask", "response_mask"):
      assert batch[k].shape == (b, 2, t) and batch[k].dtype == np.int32  # pair-major
    assert batch["token_weights"].dtype == np.float32
    assert batch["reward"].shape == (b, 2) and batch["pair_index"].shape == (b,)
    for j, pi in enumerate(batch["pair_index"]):
      ex = tfds_builders.decode_example(src[int(pi)])
      for row, side in (((j, 0), "chosen"), ((j, 1), "rejected")):
        toks = batch["tokens"][row]
        attn = batch["attention_mask"][row].astype(bool)
        resp = batch["response_mask"][row].astype(bool)
        n = attn.sum()
        assert attn[:n].all() and not attn[n:].any()  # right padding
        assert (toks[n:] == TOK.pad_id).all()
        assert toks[0] == TOK.bos_id and toks[n - 1] == TOK.eos_id
        assert TOK.decode(toks[1:n][~resp[1:n]]) == ex["prompt"]
        assert TOK.decode(toks[resp]) == ex[side]
        assert not (resp & ~attn).any()
        assert batch["reward"][row] == pytest.approx(ex[f"reward_{side}"])
        expect = pipeline.oracle_token_weights(
          ex[f"{side}_token_rewards"], side == "chosen", "threshold_and_scale"
        )
        np.testing.assert_allclose(batch["token_weights"][row][resp], np.append(expect, 1.0))
        assert (batch["token_weights"][row][~resp] == 0).all()
      # Same prompt on both rows of the pair.
      pc = batch["tokens"][j, 0][
        ~batch["response_mask"][j, 0].astype(bool) & batch["attention_mask"][j, 0].astype(bool)
      ]
      pr = batch["tokens"][j, 1][
        ~batch["response_mask"][j, 1].astype(bool) & batch["attention_mask"][j, 1].astype(bool)
      ]
      np.testing.assert_array_equal(pc, pr)


def test_oracle_weights_favour_good_chosen_and_bad_rejected_tokens():
  w_c = pipeline.oracle_token_weights(np.array([2.0, 0.0, -1.0]), True, "threshold_and_scale")
  w_r = pipeline.oracle_token_weights(np.array([2.0, 0.0, -1.0]), False, "threshold_and_scale")
  np.testing.assert_allclose(w_c, [1.3, 1.0, 0.8], rtol=1e-6)
  np.testing.assert_allclose(w_r, [0.7, 1.0, 1.2], rtol=1e-6)


def test_real_token_fraction_reported_and_at_least_0_8(cfg, tmp_path):
  it = pipeline.make_iterator(cfg, TOK, "train", str(tmp_path))
  rep = json.loads((tmp_path / "data_report.json").read_text())["batches"]["train/pairs"]
  # Measured on the batches themselves, one whole epoch.
  batches = [next(it) for _ in range(it.batches_per_epoch)]
  real = sum(int(x["attention_mask"].sum()) for x in batches)
  total = sum(x["attention_mask"].size for x in batches)
  assert rep["real_token_fraction"] == pytest.approx(real / total)
  assert real / total >= 0.8, real / total
  assert len({x["tokens"].shape for x in batches}) <= cfg.num_buckets
  # Without bucketing (every batch max_length long) padding dominates.
  flat = pipeline.PreferenceBatchIterator(
    it.pairs, batch_size=8, max_length=64, pad_id=TOK.pad_id, bucket_window=0
  )
  assert flat.stats()["real_token_fraction"] < 0.5
  # An epoch uses each pair once; only the remainder of a whole batch is left out.
  used = np.concatenate([x["pair_index"] for x in batches])
  assert len(set(used.tolist())) == len(used) == rep["pairs"] - rep["dropped_pairs_per_epoch"]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_resume_exactly(cfg):
  c = _copy(cfg, batch_size=64)  # ~18 batches an epoch: the run crosses epoch boundaries
  full = pipeline.make_iterator(c, TOK, "train", None)
  n_epoch = full.batches_per_epoch
  reference = _take(full, 2 * n_epoch + 5)
  for stop in (0, 7, n_epoch, n_epoch + 3):
    it = pipeline.make_iterator(c, TOK, "train", None)
    _equal(_take(it, stop), reference[:stop])
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint would keep it
    _take(it, 3)  # the state must not depend on what happened after it was saved
    fresh = pipeline.make_iterator(c, TOK, "train", None)
    fresh.set_state(state)
    _equal(_take(fresh, len(reference) - stop), reference[stop:])
  # Epochs are reshuffled, deterministically.
  e0 = np.concatenate([x["pair_index"] for x in reference[:n_epoch]])
  e1 = np.concatenate([x["pair_index"] for x in reference[n_epoch : 2 * n_epoch]])
  assert not np.array_equal(e0, e1)
  # A state for other settings is refused.
  other = pipeline.make_iterator(_copy(c, seed=1), TOK, "train", None)
  with pytest.raises(ValueError, match="fingerprint"):
    other.set_state(state)


def test_shuffle_by_seed(cfg):
  a = _take(pipeline.make_iterator(cfg, TOK, "train", None), 5)
  b = _take(pipeline.make_iterator(cfg, TOK, "train", None), 5)
  c = _take(pipeline.make_iterator(_copy(cfg, seed=1), TOK, "train", None), 5)
  _equal(a, b)
  assert not np.array_equal(
    np.concatenate([x["pair_index"] for x in a]), np.concatenate([x["pair_index"] for x in c])
  )


def test_num_epochs_stops(cfg):
  it = pipeline.make_iterator(_copy(cfg, num_epochs=2, batch_size=100), TOK, "train", None)
  assert len(list(it)) == 2 * 12


@pytest.mark.parametrize("n,p", [(10, 3), (7, 7), (1200, 4), (5, 8)])
def test_shard_indices_partition(n, p):
  shards = [pipeline.shard_indices(n, i, p) for i in range(p)]
  allidx = np.concatenate(shards)
  np.testing.assert_array_equal(np.sort(allidx), np.arange(n))  # disjoint and covering
  assert max(map(len, shards)) - min(map(len, shards)) <= 1


class _Recording:
  def __init__(self, source):
    self.source, self.read = source, set()

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    self.read.add(i)
    return self.source[i]


def test_processes_read_only_their_share_and_cover_the_split(cfg, tmp_path):
  src = _source(cfg)
  seen = []
  for p in range(3):
    rec = _Recording(src)
    idx = pipeline.shard_indices(len(src), p, 3)
    pairs = pipeline.tokenize_split(rec, idx, TOK, cfg, "pairs", report_lib.BadRowReport())
    assert rec.read == set(idx.tolist())
    seen.append(set(pairs.pair_index.tolist()))
    it = pipeline.make_iterator(cfg, TOK, "train", str(tmp_path), process_index=p, process_count=3)
    assert set(it.pairs.pair_index.tolist()) == seen[-1]
    batch_ids = {int(i) for _ in range(it.batches_per_epoch) for i in next(it)["pair_index"]}
    assert batch_ids <= seen[-1]
    rep = json.loads((tmp_path / report_lib.data_report_filename(p, 3)).read_text())
    assert rep["process_index"] == p and rep["stages"]["train/tokenize/pairs"]["rows_read"] == 400
  assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
  assert seen[0] | seen[1] | seen[2] == set(range(len(src)))


def test_sft_mode(cfg, tmp_path):
  pipeline.make_iterator(cfg, TOK, "train", str(tmp_path))
  it = pipeline.make_iterator(cfg, TOK, "sft", str(tmp_path), mode="sft")
  rep = json.loads((tmp_path / "data_report.json").read_text())
  # One report for the run: the second split is added, not written over the first.
  assert set(rep["stages"]) == {
    "train/build",
    "train/tokenize/pairs",
    "sft/build",
    "sft/tokenize/sft",
  }
  assert set(rep["batches"]) == {"train/pairs", "sft/sft"}
  src = _source(cfg, "sft")
  batch = next(it)
  b = cfg.batch_size
  assert batch["tokens"].shape[0] == b and batch["reward"].shape == (b,)
  for j, pi in enumerate(batch["pair_index"]):
    ex = tfds_builders.decode_example(src[int(pi)])
    resp = batch["response_mask"][j].astype(bool)
    assert TOK.decode(batch["tokens"][j][resp]) == ex["chosen"]
    assert batch["reward"][j] == pytest.approx(ex["reward_chosen"])


def test_config_errors_name_the_key(cfg):
  with pytest.raises(ValueError, match="config.data.source"):
    pipeline.validate_config(_copy(cfg, source="hf"))
  with pytest.raises(ValueError, match="config.data.max_prompt_length"):
    pipeline.validate_config(_copy(cfg, truncate_responses=True))
  with pytest.raises(ValueError, match="config.data.token_weights"):
    pipeline.validate_config(_copy(cfg, source="files", token_weights="oracle"))
