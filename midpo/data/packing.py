"""Padding-free packing: several sequences per row, told apart by segment ids.

A batch of variable-length sequences padded to the longest spends most of its
compute on padding when a few are long (sampled responses: a mean of 25
tokens, a maximum of 65). :func:`pack` places them, first-fit decreasing, into
rows of a fixed width; the model reads the rows with ``segment_ids``
(``midpo.models.Transformer``: attention within a segment, positions from 0 in
each), so every sequence's log-probabilities equal its unpacked ones up to
float32 rounding. The row count is rounded up to a multiple, so a few shapes
(and compilations) cover every batch.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def pack(sequences: Sequence[Sequence[int]], target_starts: Sequence[int], *, width: int,
         pad_id: int, row_multiple: int = 1, min_rows: int = 0) -> dict[str, np.ndarray]:
  """Packs ``N`` token sequences into ``R`` rows of ``width`` tokens.

  Args:
    sequences: ``N`` lists of token ids (each at least 2 tokens: a target
      needs a token before it).
    target_starts: for each sequence, the index of its first scored token
      (1 for ``[bos] response``; the prompt length for ``prompt response``).
    width: tokens per row ``W``.
    pad_id: the id written in the unused slots.
    row_multiple: ``R`` is rounded up to a multiple of it (few distinct
      shapes, and so few compilations).
    min_rows: at least this many rows (empty ones after the used ones; for
      row counts that agree across processes).

  Returns:
    ``tokens`` ``[R, W]`` int32; ``segment_ids`` ``[R, W]`` int32 (1, 2, ...
    in each row, 0 = padding); ``target_mask`` ``[R, W-1]`` float32 (1 where
    ``tokens[:, 1:]`` is a scored token of the same segment as the token
    before it); ``sequence_index`` ``[R, W-1]`` int32 (the sequence of each
    target, ``N`` where ``target_mask`` is 0), for per-sequence sums with
    ``jax.ops.segment_sum(..., num_segments=N + 1)``; ``sequence_row`` and
    ``sequence_offset`` ``[N]`` int32: where each sequence starts.

  Raises:
    ValueError: lengths of ``sequences`` and ``target_starts`` differ, a
      sequence is longer than ``width`` or shorter than 2 tokens, or a target
      start is outside ``[1, len(sequence) - 1]``.
  """
  if len(sequences) != len(target_starts):
    raise ValueError(f"{len(sequences)} sequences but {len(target_starts)} target starts")
  lengths = np.array([len(s) for s in sequences], np.int64)
  for i, (n, start) in enumerate(zip(lengths, target_starts)):
    if n > width:
      raise ValueError(f"sequence {i}: {n} tokens do not fit a packed row of {width}")
    if n < 2 or not 1 <= start <= n - 1:
      raise ValueError(f"sequence {i}: {n} tokens with targets from {start}; need 2 or more "
                       "tokens and 1 <= target start <= length - 1")
  # First-fit decreasing, ties in input order: deterministic.
  free: list[int] = []
  placed: list[tuple[int, int]] = [(0, 0)] * len(sequences)
  for i in sorted(range(len(sequences)), key=lambda i: (-lengths[i], i)):
    row = next((r for r, f in enumerate(free) if f >= lengths[i]), len(free))
    if row == len(free):
      free.append(width)
    placed[i] = (row, width - free[row])
    free[row] -= int(lengths[i])
  rows = -(-max(len(free), 1, min_rows) // row_multiple) * row_multiple
  tokens = np.full((rows, width), pad_id, np.int32)
  segment_ids = np.zeros((rows, width), np.int32)
  target_mask = np.zeros((rows, width - 1), np.float32)
  sequence_index = np.full((rows, width - 1), len(sequences), np.int32)
  in_row = np.zeros(rows, np.int32)
  for i in sorted(range(len(sequences)), key=lambda i: placed[i]):
    row, offset = placed[i]
    n = int(lengths[i])
    in_row[row] += 1
    tokens[row, offset:offset + n] = sequences[i]
    segment_ids[row, offset:offset + n] = in_row[row]
    # Target slot j scores tokens[j + 1]: sequence i's scored tokens are at
    # offset + start .. offset + n - 1, so its slots are one less.
    lo, hi = offset + int(target_starts[i]) - 1, offset + n - 1
    target_mask[row, lo:hi] = 1.0
    sequence_index[row, lo:hi] = i
  return {"tokens": tokens, "segment_ids": segment_ids, "target_mask": target_mask,
          "sequence_index": sequence_index,
          "sequence_row": np.array([r for r, _ in placed], np.int32).reshape(-1),
          "sequence_offset": np.array([o for _, o in placed], np.int32).reshape(-1)}


def pack_pairs(tokens_Bx2xT, attention_Bx2xT, response_Bx2xT, *, width: int, pad_id: int,
               row_multiple: int = 1, shards: int = 1, min_rows: int = 0
               ) -> dict[str, np.ndarray]:
  """Right-padded preference rows ``[prompt response]`` packed padding-free (TRL's
  ``padding_free``), with the map back to the padded layout.

  Each of the ``2B`` rows (pair-major) is its real tokens; its scored tokens are
  the response, which must be the last span of the row. The ``B`` pairs are cut
  into ``shards`` consecutive groups (the batch shards of a mesh: every
  device's pairs), each packed into its own ``R / shards`` rows, the same count
  for every group (the largest any needs, at least ``min_rows``, a multiple of
  ``row_multiple``); a group's pairs read only its rows, so the map back
  (:func:`unpack` with the same ``shards``) needs no data from another device.

  Returns:
    ``packed_tokens``, ``packed_segment_ids`` ``[R, W]``; ``packed_target_mask``
    ``[R, W-1]`` (:func:`pack`; the groups' rows one after the other);
    ``unpack_index`` ``[B, 2, T-1]`` int32: for each padded target slot
    (``response_mask[..., 1:]``) the flat index of its packed slot among its
    group's ``R / shards * (W-1)``, and that count (one past the end: a zero)
    for the slots that are not scored.

  Raises:
    ValueError: a row's response is not one span ending at its last real token,
      a row does not fit ``width``, or ``shards`` does not divide ``B``.
  """
  tokens = np.asarray(tokens_Bx2xT).reshape(-1, np.shape(tokens_Bx2xT)[-1])
  att = np.asarray(attention_Bx2xT).reshape(tokens.shape)
  resp = np.asarray(response_Bx2xT).reshape(tokens.shape)
  lengths = att.sum(axis=1)
  starts = np.argmax(resp > 0, axis=1)
  sequences = []
  for r, (n, start) in enumerate(zip(lengths, starts)):
    index = np.arange(tokens.shape[1])
    if (not np.array_equal(att[r] > 0, index < n)
        or not np.array_equal(resp[r] > 0, (index >= start) & (index < n)) or n < 2):
      raise ValueError(f"row {r}: padding-free packing needs right-padded [prompt response] "
                       "rows, the response one non-empty span ending at the last real token")
    if start < 1:
      raise ValueError(f"row {r}: its response starts at the first token (no prompt and no "
                       "BOS before it); padding-free packing needs a token before the first "
                       "scored one (set data.add_bos, or train.padding_free=False)")
    sequences.append(tokens[r, :n].tolist())
  num_pairs = len(sequences) // 2
  if shards < 1 or num_pairs % shards:
    raise ValueError(f"{num_pairs} pairs do not divide into {shards} shards")
  per = len(sequences) // shards
  groups = [slice(g * per, (g + 1) * per) for g in range(shards)]

  packed = [pack(sequences[g], starts[g].tolist(), width=width, pad_id=pad_id,
                 row_multiple=row_multiple, min_rows=min_rows) for g in groups]
  rows = max(p["tokens"].shape[0] for p in packed)
  t = tokens.shape[1] - 1
  slots = rows * (width - 1)
  unpack = np.full((len(sequences), t), slots, np.int32)
  for r, (n, start) in enumerate(zip(lengths, starts)):
    p, i = packed[r // per], r % per
    j = np.arange(start - 1, n - 1)
    unpack[r, j] = p["sequence_row"][i] * (width - 1) + p["sequence_offset"][i] + j
  return {f"packed_{k}": np.concatenate([_extend(p[k], rows, fill) for p in packed])
          for k, fill in _empty_row(pad_id).items()} | {
              "unpack_index": unpack.reshape(np.shape(tokens_Bx2xT)[:-1] + (t,))}


def pad_pairs(packed: dict[str, np.ndarray], rows: int, *, shards: int,
              pad_id: int) -> dict[str, np.ndarray]:
  """:func:`pack_pairs`' output with every group's rows extended to ``rows``
  (empty rows after its own), its ``unpack_index`` pointing at the new end;
  the same values once unpacked (for row counts agreed across processes,
  without packing again).

  Raises:
    ValueError: a group already has more than ``rows`` rows.
  """
  have = len(packed["packed_tokens"]) // shards
  if rows < have:
    raise ValueError(f"{have} packed rows per group do not fit {rows}")
  slots = packed["packed_tokens"].shape[1] - 1
  out = {f"packed_{k}": np.concatenate([_extend(g, rows, fill)
                                        for g in np.split(packed[f"packed_{k}"], shards)])
         for k, fill in _empty_row(pad_id).items()}
  index = packed["unpack_index"]
  out["unpack_index"] = np.where(index == have * slots, rows * slots, index).astype(index.dtype)
  return out


def _empty_row(pad_id: int) -> dict[str, float]:
  """What an empty packed row holds, by field."""
  return {"tokens": pad_id, "segment_ids": 0, "target_mask": 0.0}


def _extend(x: np.ndarray, rows: int, fill) -> np.ndarray:
  """``x`` with rows of ``fill`` appended, to ``rows`` rows."""
  return np.concatenate([x, np.full((rows - len(x),) + x.shape[1:], fill, x.dtype)])


def unpack(x_RxW, index_BxT, shards: int = 1):
  """Values of packed target slots ``[R, W-1, ...]`` at the padded layout's slots
  (``unpack_index``, made by :func:`pack_pairs` with the same ``shards``):
  ``[B, T-1, ...]``, zero where the index is one past its group's end. Each
  group gathers from its own rows only (a batched gather over the groups), so
  with ``x_RxW`` and ``index_BxT`` sharded alike over the batch every device
  reads its own rows."""
  groups = x_RxW.reshape((shards, -1) + x_RxW.shape[2:])
  groups = jnp.concatenate([groups, jnp.zeros((shards, 1) + groups.shape[2:], groups.dtype)],
                           axis=1)
  index = index_BxT.reshape((shards, -1) + index_BxT.shape[1:])
  out = jax.vmap(lambda g, i: jnp.take(g, i, axis=0))(groups, index)
  return out.reshape(index_BxT.shape + x_RxW.shape[2:])


__all__ = ["pack", "pack_pairs", "pad_pairs", "unpack"]
