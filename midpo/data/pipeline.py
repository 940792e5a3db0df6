"""Tokenisation, truncation, length bucketing, sharding and a resumable batch iterator.

Entry point: :func:`make_iterator` (``config.data`` -> :class:`PreferenceBatchIterator`); it builds
the TFDS dataset if needed, tokenises this process's share of a split, and writes
``data_report.json`` (schema in ``report.py``) into the run's workdir.

Batch layout (numpy; ``B = batch_size`` pairs per process, ``T`` the batch's length), pair-major
from here to the loss: ``[:, 0]`` is the chosen response of each pair, ``[:, 1]`` the rejected::

    tokens          int32   [B, 2, T]  [bos] prompt response [eos], right-padded with pad_id
    attention_mask  int32   [B, 2, T]  1 on real tokens
    response_mask   int32   [B, 2, T]  1 on response tokens (incl. eos): the positions whose
                                       token is predicted and scored (the trainer shifts by one)
    token_weights   float32 [B, 2, T]  only with token_weights='oracle': TIS-DPO weights of
                                       response tokens from the synthetic task's per-token
                                       reward (the eos gets the weight of reward 0, i.e. 1.0),
                                       0 off the response
    pair_index      int32   [B]        example position in the TFDS split
    reward          float32 [B, 2]     synthetic task only: r*(x, y) of each response
    score           float32 [B, 2]     files datasets whose every pair has scores (UltraFeedback)

``mode='sft'`` gives ``tokens``, ``attention_mask``, ``response_mask`` (and ``pair_index``,
``reward``/``score``, ``token_weights``) of shape ``[B, T]``, with the chosen response only.

Tokenisation. The prompt and each response are encoded separately (as TRL does), so a row's
tokens are exactly the prompt's tokens followed by the response's.
``tokenizer.encode(text)`` must return the text's ids without BOS/EOS; the pipeline
adds ``bos_id`` before the prompt (``add_bos``) and ``eos_id`` after each response
(``add_eos``). If the encoded prompt already starts with ``bos_id`` (a chat template that writes
the BOS text) and ``add_bos`` is on, that is an error: set ``add_bos=False``. Message-list pairs
are rendered with ``tokenizer.apply_chat_template``: the prompt with
``add_generation_prompt=True``, the response as the rest of the rendered prompt+response (which
must start with the rendered prompt, else the row is ``template_mismatch``).

Truncation (never drops a response silently):

- ``max_prompt_length > 0`` first keeps the prompt's last ``max_prompt_length`` tokens;
- the prompt then keeps its last ``max_length - len(bos) - max(len(chosen), len(rejected))``
  tokens (from the left; counted as the note ``prompt_truncated``, and ``prompt_emptied`` when
  nothing is left);
- a response longer than ``max_length - len(bos)`` is the bad row ``over_length`` (dropped and
  counted) unless ``truncate_responses=True``; then responses are cut from the right (losing
  their eos) so that the prompt keeps up to ``max_prompt_length`` tokens (required > 0), counted
  as the note ``response_truncated``.

Batching. Each epoch: a permutation of this process's pairs by ``(seed, epoch)``; the pairs that
do not fill a last whole batch are left out of that epoch (``dropped_pairs_per_epoch`` in the
report; a different set each epoch when shuffled). With ``bucket_window = W > 0`` the permutation
is cut into windows of ``W * B`` pairs, each window is sorted by the pair's longer row and cut
into batches, and the epoch's batches are shuffled. Each batch is padded to the smallest bucket
length that holds its longest row; the ``num_buckets`` bucket lengths are quantiles
(1/K, 2/K, ..., 1) of the pairs' longer-row lengths, rounded up to ``pad_to_multiple`` and at most
``max_length`` (so at most ``num_buckets`` shapes, i.e. compilations). ``num_buckets = 0`` pads
to the longest row rounded up to ``pad_to_multiple``. With ``W = 0`` every batch is
``max_length`` long. :meth:`PreferenceBatchIterator.stats` reports the real-token fraction (on
the synthetic task with the defaults: about 0.83 for pairs, 0.92 for SFT).

Sharding. Process ``p`` of ``P`` (passed in explicitly, e.g. ``jax.process_index()``) reads and
tokenises only the contiguous block ``[N*p//P, N*(p+1)//P)`` of the split's N examples (TFDS
shuffled them at write time); blocks are disjoint and cover the split. Each process iterates over its own block forever (or for
``num_epochs``); a trainer that runs by steps gets one batch per process per step. When several
processes share ``data_dir``, let process 0 build first (``build=True``) and the others wait for
it (a barrier) and call with ``build=False``.

State. :meth:`PreferenceBatchIterator.get_state` returns a small JSON-able dict (epoch, batch
position and a fingerprint of the data and settings); :meth:`set_state` restores it exactly, and
refuses a state made for other data, other settings or another process.

``config.data`` fields read here (defaults in :func:`default_config`)::

    source                 'synthetic' | 'files'
    data_dir               TFDS data directory (built datasets live under it)
    synthetic.*            see tfds_builders.py (seed, num_sft, num_train, num_test, temperature,
                           label_noise, length_bias, sft_best_of, samples_path, pairing, labels)
    files.format, files.train_files, files.test_files     see formats.py / tfds_builders.py
    bad_rows               'skip' | 'fatal'
    max_reported_bad_rows  how many bad rows are listed with file and line
    batch_size             pairs per batch per process
    max_length             longest row, in tokens
    max_prompt_length      0 = only max_length limits the prompt
    truncate_responses     see "Truncation"
    add_bos, add_eos
    bucket_window, num_buckets, pad_to_multiple    see "Batching"
    shuffle, seed          per-epoch shuffling
    num_epochs             0 = repeat forever
    token_weights          'none' | 'oracle' (synthetic task only)
    token_weight_transform 'threshold_and_scale' (TIS-DPO's: clamp to [-1.5, 1.5], map to
                           [0.7, 1.3]) | 'raw' (the per-token reward itself, negated on rejected)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Protocol, Sequence

import ml_collections
import numpy as np

from midpo.data import report as report_lib
from midpo.data import tfds_builders

MODES = ("pairs", "sft")
SOURCES = ("synthetic", "files")
TOKEN_WEIGHTS = ("none", "oracle")
TRANSFORMS = ("threshold_and_scale", "raw")
STATE_VERSION = 1


class Tokenizer(Protocol):
  """The project's tokenizer protocol (what the pipeline uses)."""

  @property
  def vocab_size(self) -> int: ...
  @property
  def bos_id(self) -> int: ...
  @property
  def eos_id(self) -> int: ...
  @property
  def pad_id(self) -> int: ...
  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Sequence[int]) -> str: ...
  def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str: ...


def default_config() -> ml_collections.ConfigDict:
  """The ``config.data`` section with its defaults (fields documented in the module docstring)."""
  return ml_collections.ConfigDict(
    {
      "source": "synthetic",
      "data_dir": "",
      "synthetic": {
        "seed": 0,
        "num_sft": 20000,
        "num_train": 20000,
        "num_test": 2000,
        "temperature": 1.0,
        "label_noise": 0.0,
        "length_bias": 0.0,
        "sft_best_of": 4,
        "samples_path": "",
        "pairing": "disjoint",
        "labels": "annotator",
      },
      "files": {"format": "trl_standard", "train_files": [], "test_files": []},
      "bad_rows": "skip",
      "max_reported_bad_rows": 5,
      "batch_size": 16,
      "max_length": 128,
      "max_prompt_length": 0,
      "truncate_responses": False,
      "add_bos": True,
      "add_eos": True,
      "bucket_window": 32,
      "num_buckets": 8,
      "pad_to_multiple": 1,
      "shuffle": True,
      "seed": 0,
      "num_epochs": 0,
      "token_weights": "none",
      "token_weight_transform": "threshold_and_scale",
    }
  )


def validate_config(c) -> None:
  """Fails with the key and the allowed values."""

  def check(ok, key, msg):
    if not ok:
      raise ValueError(f"config.data.{key}: {msg}")

  check(c.source in SOURCES, "source", f"must be one of {SOURCES}, got {c.source!r}")
  check(bool(c.data_dir), "data_dir", "must be set (TFDS data directory)")
  check(c.bad_rows in report_lib.POLICIES, "bad_rows", f"must be one of {report_lib.POLICIES}")
  check(c.batch_size >= 1, "batch_size", "must be >= 1")
  check(c.max_length >= 2, "max_length", "must be >= 2")
  check(c.max_prompt_length >= 0, "max_prompt_length", "must be >= 0")
  check(
    c.max_prompt_length < c.max_length - int(c.add_bos),
    "max_prompt_length",
    "must leave room for a response (< max_length - 1)",
  )
  check(
    not c.truncate_responses or c.max_prompt_length > 0,
    "max_prompt_length",
    "must be > 0 when truncate_responses is on",
  )
  check(c.bucket_window >= 0, "bucket_window", "must be >= 0")
  check(c.pad_to_multiple >= 1, "pad_to_multiple", "must be >= 1")
  check(c.num_buckets >= 0, "num_buckets", "must be >= 0")
  check(c.num_epochs >= 0, "num_epochs", "must be >= 0 (0 = forever)")
  check(c.token_weights in TOKEN_WEIGHTS, "token_weights", f"must be one of {TOKEN_WEIGHTS}")
  check(
    c.token_weight_transform in TRANSFORMS, "token_weight_transform", f"must be one of {TRANSFORMS}"
  )
  check(
    c.token_weights == "none" or c.source == "synthetic",
    "token_weights",
    "'oracle' needs the synthetic task (source='synthetic')",
  )


# ----------------------------------------------------------------------------------------------
# Sharding.


def shard_indices(n: int, process_index: int, process_count: int) -> np.ndarray:
  """The contiguous block of ``range(n)`` that process ``process_index`` reads."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  bounds = [(n * p) // process_count for p in range(process_count + 1)]
  return np.arange(bounds[process_index], bounds[process_index + 1], dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Tokenisation.


def oracle_token_weights(token_rewards: np.ndarray, chosen: bool, transform: str) -> np.ndarray:
  """TIS-DPO weights from per-token rewards: raw = r_t (chosen) or -r_t (rejected)."""
  raw = np.asarray(token_rewards, np.float32) * (1.0 if chosen else -1.0)
  if transform == "raw":
    return raw
  if transform == "threshold_and_scale":
    return (0.7 + 0.6 * (np.clip(raw, -1.5, 1.5) + 1.5) / 3.0).astype(np.float32)
  raise ValueError(f"token_weight_transform must be one of {TRANSFORMS}, got {transform!r}")


@dataclasses.dataclass
class TokenizedPairs:
  """This process's pairs, tokenised: prefix ([bos]) + prompt + response ids per row."""

  prompt: list[np.ndarray]
  chosen: list[np.ndarray]
  rejected: list[np.ndarray]  # empty arrays in sft mode
  pair_index: np.ndarray  # int64 [N], position in the TFDS split
  reward: np.ndarray | None  # float32 [N, 2] (chosen, rejected) or None
  score: np.ndarray | None  # float32 [N, 2] or None
  chosen_weights: list[np.ndarray] | None
  rejected_weights: list[np.ndarray] | None
  prefix: np.ndarray  # [bos] or []

  def __len__(self) -> int:
    return len(self.prompt)

  def row_lengths(self) -> np.ndarray:
    """int64 [N, 2]: length of the chosen row and of the rejected row."""
    p = np.array([len(x) for x in self.prompt], np.int64) + len(self.prefix)
    c = np.array([len(x) for x in self.chosen], np.int64)
    r = np.array([len(x) for x in self.rejected], np.int64)
    return np.stack([p + c, p + r], axis=1) if len(p) else np.zeros((0, 2), np.int64)

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    h.update(self.pair_index.tobytes())
    h.update(self.row_lengths().tobytes())
    return h.hexdigest()[:16]


def _render(ex: dict, tok: Tokenizer, sft: bool) -> tuple[str, str, str]:
  if ex["kind"] == "text":
    return ex["prompt"], ex["chosen"], ex["rejected"]
  prompt = json.loads(ex["prompt"])
  prompt_text = tok.apply_chat_template(prompt, add_generation_prompt=True)
  out = [prompt_text]
  for key in ("chosen", "rejected"):
    if not ex[key] or (sft and key == "rejected"):
      out.append("")
      continue
    full = tok.apply_chat_template(prompt + json.loads(ex[key]), add_generation_prompt=False)
    if not full.startswith(prompt_text):
      raise report_lib.BadRow(
        report_lib.TEMPLATE_MISMATCH, f"rendered prompt is not a prefix of prompt+{key}"
      )
    out.append(full[len(prompt_text) :])
  return tuple(out)


def tokenize_split(
  source, indices: np.ndarray, tok: Tokenizer, c, mode: str, rep: report_lib.BadRowReport
) -> TokenizedPairs:
  """Tokenises ``source[i]`` for ``i`` in ``indices``; bad rows go to ``rep``."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  sft = mode == "sft"
  prefix = np.array([tok.bos_id] if c.add_bos else [], np.int32)
  eos = [tok.eos_id] if c.add_eos else []
  room = c.max_length - len(prefix)
  want_weights = c.token_weights == "oracle"
  prompts, chosens, rejecteds, kept, rewards, scores, wcs, wrs = [], [], [], [], [], [], [], []
  for i in indices:
    ex = tfds_builders.decode_example(source[int(i)])
    where, line = ex.get("source", "?"), int(i) + 1
    try:
      prompt_text, c_text, r_text = _render(ex, tok, sft)
      p = list(tok.encode(prompt_text))
      if c.add_bos and p[:1] == [tok.bos_id]:
        raise ValueError(
          f"{where}: the encoded prompt already starts with bos_id {tok.bos_id} (the "
          "chat template writes it?) and config.data.add_bos is on; set add_bos=False"
        )
      cr = [list(tok.encode(c_text))]
      if not sft:
        cr.append(list(tok.encode(r_text)))
      if any(not ids for ids in cr):
        raise report_lib.BadRow(report_lib.EMPTY_RESPONSE, "a response has no tokens")
      if not sft and cr[0] == cr[1]:
        raise report_lib.BadRow(report_lib.IDENTICAL_RESPONSES, "same token ids")
      if want_weights:
        ws = [oracle_token_weights(ex["chosen_token_rewards"], True, c.token_weight_transform)]
        if not sft:
          ws.append(
            oracle_token_weights(ex["rejected_token_rewards"], False, c.token_weight_transform)
          )
        for ids, w in zip(cr, ws):
          if len(ids) != len(w):
            raise ValueError(
              f"{where}: {len(w)} oracle token rewards for {len(ids)} tokens; "
              "oracle weights need the synthetic task's word-level tokenizer"
            )
        neutral = oracle_token_weights(np.zeros(len(eos)), True, c.token_weight_transform)
        ws = [np.concatenate([w, neutral]).astype(np.float32) for w in ws]
      cr = [ids + eos for ids in cr]
      # Truncation.
      if c.max_prompt_length and len(p) > c.max_prompt_length:
        p = p[len(p) - c.max_prompt_length :]
        rep.note("prompt_truncated")
        truncated = True
      else:
        truncated = False
      longest = max(len(ids) for ids in cr)
      if longest > room:
        if not c.truncate_responses:
          raise report_lib.BadRow(report_lib.OVER_LENGTH, f"response of {longest} tokens > {room}")
        keep = room - min(len(p), c.max_prompt_length)
        cr = [ids[:keep] for ids in cr]
        if want_weights:
          ws = [w[:keep] for w in ws]
        rep.note("response_truncated")
        longest = keep
      budget = room - longest
      if len(p) > budget:
        p = p[len(p) - budget :] if budget > 0 else []
        if not truncated:
          rep.note("prompt_truncated")
        if not p:
          rep.note("prompt_emptied")
    except report_lib.BadRow as bad:
      rep.bad(bad.reason, where, line, bad.detail)
      continue
    rep.kept()
    prompts.append(np.asarray(p, np.int32))
    chosens.append(np.asarray(cr[0], np.int32))
    rejecteds.append(np.asarray(cr[1] if not sft else [], np.int32))
    kept.append(int(i))
    if "reward_chosen" in ex:
      rewards.append((ex["reward_chosen"], ex["reward_rejected"]))
    if "score_chosen" in ex:
      scores.append((ex["score_chosen"], ex["score_rejected"]))
    if want_weights:
      wcs.append(ws[0])
      wrs.append(ws[1] if not sft else np.zeros((0,), np.float32))
  n = len(kept)
  reward = np.asarray(rewards, np.float32).reshape(n, 2) if len(rewards) == n and n else None
  score = np.asarray(scores, np.float32).reshape(n, 2) if len(scores) == n and n else None
  cols = slice(0, 1) if sft else slice(0, 2)
  if score is not None and not np.isfinite(score[:, cols]).all():
    score = None  # only kept when every pair has scores
  return TokenizedPairs(
    prompts,
    chosens,
    rejecteds,
    np.asarray(kept, np.int64),
    reward,
    score,
    wcs if want_weights else None,
    wrs if want_weights else None,
    prefix,
  )


# ----------------------------------------------------------------------------------------------
# The iterator.


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
  return float(batch["attention_mask"].mean())


# ----------------------------------------------------------------------------------------------
# From config.data to an iterator.


def builder_from_config(c, build: bool = True):
  """The TFDS builder named by ``config.data`` (built if ``build``)."""
  if c.source == "synthetic":
    s = c.synthetic
    cfg = tfds_builders.synthetic_config(
      seed=s.seed,
      num_sft=s.num_sft,
      num_train=s.num_train,
      num_test=s.num_test,
      temperature=s.temperature,
      label_noise=s.label_noise,
      length_bias=s.length_bias,
      sft_best_of=s.sft_best_of,
      samples_path=s.samples_path,
      pairing=s.pairing,
      labels=s.labels,
      bad_rows=c.bad_rows,
      max_reported=c.max_reported_bad_rows,
    )
    builder = tfds_builders.SyntheticPreferences(
      config=cfg, data_dir=c.data_dir, file_format=tfds_builders.FILE_FORMAT
    )
  else:
    cfg = tfds_builders.files_config(
      c.files.format,
      list(c.files.train_files),
      list(c.files.test_files),
      c.bad_rows,
      c.max_reported_bad_rows,
    )
    builder = tfds_builders.PreferenceFiles(
      config=cfg, data_dir=c.data_dir, file_format=tfds_builders.FILE_FORMAT
    )
  if build:
    tfds_builders.prepare(builder)
  elif not builder.is_prepared():
    raise FileNotFoundError(f"{builder.data_dir} is not built yet (build=False)")
  return builder


def make_iterator(
  c,
  tokenizer: Tokenizer,
  split: str,
  workdir: str | None,
  process_index: int = 0,
  process_count: int = 1,
  mode: str = "pairs",
  build: bool = True,
) -> PreferenceBatchIterator:
  """``config.data`` -> this process's iterator over ``split``; writes ``data_report.json``."""
  validate_config(c)
  builder = builder_from_config(c, build=build)
  source = builder.as_data_source(split=split)
  build_rep = tfds_builders.build_report(builder, split)
  rep = report_lib.BadRowReport(c.bad_rows, c.max_reported_bad_rows)
  indices = shard_indices(len(source), process_index, process_count)
  pairs = tokenize_split(source, indices, tokenizer, c, mode, rep)
  it = PreferenceBatchIterator(
    pairs,
    batch_size=c.batch_size,
    max_length=c.max_length,
    pad_id=tokenizer.pad_id,
    seed=c.seed,
    shuffle=c.shuffle,
    bucket_window=c.bucket_window,
    pad_to_multiple=c.pad_to_multiple,
    num_buckets=c.num_buckets,
    num_epochs=c.num_epochs,
    mode=mode,
    process_index=process_index,
    process_count=process_count,
  )
  if workdir is not None:
    tok_rep = rep.to_dict()
    first = int(indices[0]) if len(indices) else 0
    tok_rep["shard"] = {
      "process_index": process_index,
      "process_count": process_count,
      "rows_in_split": len(source),
      "first": first,
      "stop": first + len(indices),
    }
    it.report_path = report_lib.write_data_report(
      workdir,
      {f"{split}/build": build_rep, f"{split}/tokenize/{mode}": tok_rep},
      batches={f"{split}/{mode}": it.stats()},
      process_index=process_index,
      process_count=process_count,
    )
  return it
