"""This process's batches of a split, the same global batch for any number of processes.

The split is cut into ``data.num_shards`` contiguous blocks (``0`` means one per
process). With ``P`` processes, process ``p`` reads only shards
``[p S/P, (p+1) S/P)``, each batching ``data.batch_size * P / S`` pairs per step,
and concatenates them; the global batch of a step is therefore the
concatenation of every shard's batch in shard order, whatever ``P`` is. A run
on one host with ``num_shards=S`` sees exactly the batches of a run on ``S``
hosts, which is how a multi-host run is reproduced (and tested) on one machine.

Batches keep the pipeline's layout: pair-major ``[B, 2, T]`` in pair mode
(``[:, 0]`` chosen, ``[:, 1]`` rejected), so a pair's two responses stay
together whatever the number of shards, processes or devices. Shards'
batches are padded to a common length, then concatenated along the pairs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax.experimental import multihost_utils

from midpo.data import pipeline


def ensure_built(data_config, split: str, process_index: int, process_count: int,
                 workdir: str | None = None, *, shared_data_dir: bool = True) -> None:
  """Builds ``data_config``'s dataset once: process 0 builds it, the others wait for it
  (a barrier named after ``split``); a single process builds it itself, and so does every
  process when the ``data_dir`` is not ``shared_data_dir`` (each its own). A split without a
  usable row is a ``DataError`` (report written to ``workdir``)."""
  if process_count == 1 or process_index == 0 or not shared_data_dir:
    pipeline.build_dataset(data_config, workdir, process_index, process_count)
  if process_count > 1:
    multihost_utils.sync_global_devices(f"built {split}")


class ShardedBatches:
  """This process's batches of ``split``: ``next``, resumable state, epoch 0's
  first batches, and every pair in order (``chunks``)."""

  def __init__(self, data_config, tokenizer, split: str, workdir, *, process_index: int,
               process_count: int, mode: str = "pairs", shared_data_dir: bool = True):
    shards = int(data_config.num_shards) or process_count
    if shards % process_count:
      raise ValueError(f"config.data.num_shards={shards} is not a multiple of the "
                       f"{process_count} processes")
    per_process = shards // process_count
    if data_config.batch_size % per_process:
      raise ValueError(f"config.data.batch_size={data_config.batch_size} does not split over "
                       f"this process's {per_process} shards")
    c = data_config.copy_and_resolve_references()
    c.batch_size = data_config.batch_size // per_process
    self.mode = mode
    self.pad_id = tokenizer.pad_id
    first = process_index * per_process
    ensure_built(c, split, process_index, process_count, workdir,
                 shared_data_dir=shared_data_dir)
    self.shards = [
        pipeline.make_iterator(c, tokenizer, split, workdir, process_index=s,
                               process_count=shards, mode=mode, build=False)
        for s in range(first, first + per_process)]

  # -- iteration --------------------------------------------------------------

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return self.combine([next(it) for it in self.shards])

  def get_state(self) -> dict[str, Any]:
    return {"shards": [it.get_state() for it in self.shards]}

  def set_state(self, state: dict[str, Any]) -> None:
    if len(state["shards"]) != len(self.shards):
      raise ValueError(f"the saved data state has {len(state['shards'])} shards on this "
                       f"process, this run has {len(self.shards)}: keep data.num_shards and "
                       "the process count")
    for it, s in zip(self.shards, state["shards"]):
      it.set_state(s)

  @property
  def pairs(self) -> int:
    return sum(len(it.pairs) for it in self.shards)

  def first_batches(self, n: int) -> list[dict[str, np.ndarray]]:
    """Up to ``n`` batches of epoch 0, in lockstep over this process's shards."""
    plans = [it.epoch_plan(0) for it in self.shards]
    n = min([n] + [len(p) for p in plans])
    return [self.combine([it.make_batch(p[i]) for it, p in zip(self.shards, plans)])
            for i in range(n)]

  def num_epoch_batches(self) -> int:
    return min(len(it.epoch_plan(0)) for it in self.shards)

  def chunks(self, i: int) -> dict[str, np.ndarray]:
    """Batch ``i`` of every pair in order (no shuffling), wrapping around."""
    out = []
    for it in self.shards:
      n, b = len(it.pairs), it.batch_size
      out.append(it.make_batch(np.arange(i * b, (i + 1) * b) % max(n, 1)))
    return self.combine(out)

  def num_chunks(self) -> int:
    return max(-(-len(it.pairs) // it.batch_size) for it in self.shards)

  # -- layout -------------------------------------------------------------------

  def combine(self, batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Shards' batches -> one batch: padded to a common length, concatenated
    along the pairs (rows in SFT mode)."""
    if len(batches) == 1:
      return batches[0]
    t = max(b["tokens"].shape[-1] for b in batches)
    batches = [pad_length(b, t, self.pad_id) for b in batches]
    return {key: np.concatenate([np.asarray(b[key]) for b in batches]) for key in batches[0]}


def pad_length(batch: dict[str, np.ndarray], t: int, pad_id: int) -> dict[str, np.ndarray]:
  """Right-pads the length axis (the last) of every per-token array to ``t``
  (tokens with ``pad_id``, the rest with 0)."""
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.ndim >= 2 and value.shape[-1] < t and key in _TIME_KEYS:
      fill = pad_id if key == "tokens" else 0
      pad = [(0, 0)] * (value.ndim - 1) + [(0, t - value.shape[-1])]
      value = np.pad(value, pad, constant_values=fill)
    out[key] = value
  return out


_TIME_KEYS = ("tokens", "attention_mask", "response_mask", "token_weights", "ref_logps")
# Per-response values of a pair batch, [B, 2]: no length axis.
RESPONSE_VALUE_KEYS = ("reward", "score")
