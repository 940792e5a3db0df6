"""The resumable batch iterator over one process's tokenised pairs (layout in
``midpo.data.pipeline``)."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np

from midpo.data.tokenize import MODES, TokenizedPairs

STATE_VERSION = 1


def round_up(x: int, m: int) -> int:
  """The smallest multiple of ``m`` that is >= ``x``."""
  return -(-x // m) * m


class PreferenceBatchIterator:
  """Deterministic, resumable iterator of fixed-shape batches over one process's pairs."""

  def __init__(
    self,
    pairs: TokenizedPairs,
    *,
    batch_size: int,
    max_length: int,
    pad_id: int,
    seed: int = 0,
    shuffle: bool = True,
    bucket_window: int = 32,
    pad_to_multiple: int = 1,
    num_buckets: int = 8,
    num_epochs: int = 0,
    mode: str = "pairs",
    process_index: int = 0,
    process_count: int = 1,
  ):
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if len(pairs) < batch_size:
      raise ValueError(
        f"{len(pairs)} pairs on process {process_index}: fewer than one batch of {batch_size}"
      )
    self.pairs = pairs
    self.batch_size = int(batch_size)
    self.max_length = int(max_length)
    self.pad_id = int(pad_id)
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.bucket_window = int(bucket_window)
    self.pad_to_multiple = int(pad_to_multiple)
    self.num_epochs = int(num_epochs)
    self.mode = mode
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    lengths = pairs.row_lengths()
    if mode == "sft":
      lengths = lengths[:, :1]
    if len(lengths) and lengths.max() > self.max_length:
      raise ValueError(f"a row of {lengths.max()} tokens > max_length {self.max_length}")
    self._row_lengths = lengths
    self._key = lengths.max(axis=1)
    self.batches_per_epoch = len(pairs) // self.batch_size
    self.num_buckets = int(num_buckets)
    self._bounds = None
    if self.bucket_window and self.num_buckets:
      # Bucket lengths at quantiles of the pairs' lengths: at most num_buckets shapes.
      qs = np.quantile(
        self._key, np.arange(1, self.num_buckets + 1) / self.num_buckets, method="higher"
      )
      self._bounds = np.array(
        sorted({min(self.max_length, round_up(int(q), self.pad_to_multiple)) for q in qs}),
        np.int64,
      )
    self._fingerprint = hashlib.sha256(
      json.dumps(
        [
          pairs.fingerprint(),
          self.batch_size,
          self.max_length,
          self.seed,
          self.shuffle,
          self.bucket_window,
          self.pad_to_multiple,
          self.num_buckets,
          self.mode,
          self.process_index,
          self.process_count,
        ]
      ).encode()
    ).hexdigest()[:16]
    self._epoch = 0
    self._batch = 0
    self._plan_epoch = -1
    self._plan: list[np.ndarray] = []

  # -- planning ---------------------------------------------------------------------------

  def epoch_plan(self, epoch: int) -> list[np.ndarray]:
    """The batches of ``epoch``: arrays of ``batch_size`` pair positions (local)."""
    n, b = len(self.pairs), self.batch_size
    rng = np.random.default_rng([self.seed, epoch])
    order = rng.permutation(n) if self.shuffle else np.arange(n)
    order = order[: self.batches_per_epoch * b]
    if self.bucket_window == 0:
      return list(order.reshape(-1, b))
    batches = []
    w = self.bucket_window * b
    for start in range(0, len(order), w):
      window = order[start : start + w]
      window = window[np.argsort(self._key[window], kind="stable")]
      batches += list(window.reshape(-1, b))
    if self.shuffle:
      batches = [batches[k] for k in rng.permutation(len(batches))]
    return batches

  def _batch_length(self, idx: np.ndarray) -> int:
    if self.bucket_window == 0:
      return self.max_length
    longest = int(self._key[idx].max())
    if self._bounds is None:
      return min(self.max_length, round_up(longest, self.pad_to_multiple))
    return int(self._bounds[np.searchsorted(self._bounds, longest)])

  # -- state ------------------------------------------------------------------------------

  def get_state(self) -> dict[str, Any]:
    """JSON-able position: the next batch is batch ``batch_index`` of epoch ``epoch``.

    Each process has its own state (the fingerprint includes the process index); save one
    per process with the model checkpoint and give each back to its own process.
    """
    return {
      "version": STATE_VERSION,
      "epoch": self._epoch,
      "batch_index": self._batch,
      "fingerprint": self._fingerprint,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if int(state.get("version", -1)) != STATE_VERSION:
      raise ValueError(f"iterator state version {state.get('version')} != {STATE_VERSION}")
    if state["fingerprint"] != self._fingerprint:
      raise ValueError(
        "iterator state was saved for other data, settings or process "
        f"(fingerprint {state['fingerprint']} != {self._fingerprint})"
      )
    epoch, batch = int(state["epoch"]), int(state["batch_index"])
    if not 0 <= batch <= self.batches_per_epoch or epoch < 0:
      raise ValueError(f"iterator state out of range: {state}")
    self._epoch, self._batch = epoch, batch

  # -- iteration --------------------------------------------------------------------------

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._batch >= self.batches_per_epoch:
      self._epoch += 1
      self._batch = 0
    if self.num_epochs and self._epoch >= self.num_epochs:
      raise StopIteration
    if self._plan_epoch != self._epoch:
      self._plan = self.epoch_plan(self._epoch)
      self._plan_epoch = self._epoch
    idx = self._plan[self._batch]
    self._batch += 1
    return self.make_batch(idx)

  def make_batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The batch of pair positions ``idx``: pair-major ``[B, 2, T]`` rows in
    pair mode, ``[B, T]`` in SFT mode (see the module docstring)."""
    p, b = self.pairs, len(idx)
    t = self._batch_length(idx)
    sides = (("chosen", p.chosen, p.chosen_weights),)
    if self.mode == "pairs":
      sides += (("rejected", p.rejected, p.rejected_weights),)
    shape = (b, len(sides), t)
    tokens = np.full(shape, self.pad_id, np.int32)
    attn = np.zeros(shape, np.int32)
    resp = np.zeros(shape, np.int32)
    weights = np.zeros(shape, np.float32) if p.chosen_weights is not None else None
    for s, (_, seqs, ws) in enumerate(sides):
      for j, k in enumerate(idx):
        head = np.concatenate([p.prefix, p.prompt[k]])
        y = seqs[k]
        n0, n1 = len(head), len(head) + len(y)
        tokens[j, s, :n0] = head
        tokens[j, s, n0:n1] = y
        attn[j, s, :n1] = 1
        resp[j, s, n0:n1] = 1
        if weights is not None:
          weights[j, s, n0:n1] = ws[k]
    out = {
      "tokens": tokens,
      "attention_mask": attn,
      "response_mask": resp,
      "pair_index": p.pair_index[idx].astype(np.int32),
    }
    if weights is not None:
      out["token_weights"] = weights
    for name, arr in (("reward", p.reward), ("score", p.score)):
      if arr is not None:
        out[name] = np.asarray(arr[idx, :len(sides)], np.float32)
    if self.mode != "pairs":  # SFT rows: [B, T]
      out = {k: (v[:, 0] if k != "pair_index" else v) for k, v in out.items()}
    return out

  # -- statistics -------------------------------------------------------------------------

  def stats(self, epoch: int = 0) -> dict[str, Any]:
    """Padding statistics of one epoch's plan (no batch is materialised)."""
    plan = self.epoch_plan(epoch)
    real = total = 0
    shapes = set()
    for idx in plan:
      t = self._batch_length(idx)
      shapes.add(t)
      real += int(self._row_lengths[idx].sum())
      total += self._row_lengths.shape[1] * len(idx) * t
    return {
      "mode": self.mode,
      "pairs": len(self.pairs),
      "batch_size": self.batch_size,
      "batches_per_epoch": self.batches_per_epoch,
      "dropped_pairs_per_epoch": len(self.pairs) - self.batches_per_epoch * self.batch_size,
      "real_token_fraction": real / total if total else math.nan,
      "batch_lengths": sorted(shapes),
      "epoch": epoch,
    }


def real_token_fraction(batch: dict[str, np.ndarray]) -> float:
  """The fraction of a batch's positions that hold real tokens (not padding)."""
  return float(batch["attention_mask"].mean())
