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

``mode='sft'`` gives ``tokens``, ``attention_mask``, ``response_mask`` (and ``token_weights``)
of shape ``[B, T]`` and ``pair_index``, ``reward``/``score`` of shape ``[B]``, with the chosen
response only.

Tokenisation (``config.data.tokenization``; ``'auto'``: ``'trl'`` for users' files,
``'separate'`` for the synthetic task):

- ``'trl'``, as TRL 1.16's ``DPOTrainer._prepare_dataset`` does. Text rows: the prompt and
  prompt+completion are each tokenised whole with the tokenizer's own special tokens (so BOS as
  its post-processor says, none for ChatML-style tokenizers), and the EOS id is appended to a
  completion (``add_eos``) unless its ids already end with it. Message rows: the chat template
  renders the prompt (``add_generation_prompt=True``) and prompt+completion, each tokenised
  without added special tokens; no EOS is appended (the template ends the turn). The completion
  starts where the prompt's ids and prompt+completion's ids diverge (the minimum over chosen and
  rejected), so ``'Answer: '`` + ``'yes'`` gives ``'Answer', ':' | 'Ġyes'``; a prompt whose ids
  are not such a prefix is counted as the note ``prompt_not_a_token_prefix``. ``add_bos`` is not
  used. One difference is documented: a tokenizer whose post-processor itself appends EOS gets
  one EOS here, two in TRL.
- ``'separate'``: the prompt and each response are encoded apart (``encode`` adds nothing), the
  pipeline adds ``bos_id`` before the prompt (``add_bos``) and ``eos_id`` after each response
  (``add_eos``). If the encoded prompt already starts with ``bos_id`` and ``add_bos`` is on,
  that is an error. Message rows: the response is the rest of the rendered prompt+response,
  which must start with the rendered prompt (else the bad row ``template_mismatch``).

A chat template that raises on a row is the bad row ``template_error``; a tokenizer that raises,
``untokenizable``. A tokenizer without BOS gets none; one without a pad token pads with EOS (as
TRL). The first 100 rows' tokens may be at most ``max_unk_fraction`` unknown tokens, else
``report.DataError`` names ``config.tokenizer``.

Truncation (``truncation_mode``). ``'keep_start'`` is TRL 1.16's default: a row whose prompt
alone fills ``max_length`` is the bad row ``over_length`` (TRL's dataset filter drops it), and
each prompt+completion keeps its first ``max_length`` tokens (note ``response_truncated``);
``max_prompt_length`` and ``truncate_responses`` are not used. ``'keep_prompt_end'`` (the
default) never drops a response silently; ``len(bos)`` is the BOS the row starts with, which is
never cut:

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
                           label_noise, length_bias, prompt_specificity, sft_best_of,
                           samples_path, pairing, labels)
    files.format           see formats.py
    files.train_files, files.test_files   a list, or a comma-separated string, of files, globs
                           or folders (sources.py)
    bad_rows               'skip' | 'fatal'
    max_reported_bad_rows  how many bad rows are listed with file and line
    batch_size             pairs per batch per process
    max_length             longest row, in tokens
    max_prompt_length      0 = only max_length limits the prompt
    truncate_responses     see "Truncation"
    truncation_mode        'keep_prompt_end' | 'keep_start' (TRL's), see "Truncation"
    tokenization           'auto' | 'trl' | 'separate' (see "Tokenisation")
    add_bos, add_eos
    max_unk_fraction       largest fraction of unknown tokens in the first 100 rows (0.01)
    bucket_window, num_buckets, pad_to_multiple    see "Batching"
    shuffle, seed          per-epoch shuffling
    num_epochs             0 = repeat forever
    token_weights          'none' | 'oracle' (synthetic task only)
    token_weight_transform 'threshold_and_scale' (TIS-DPO's: clamp to [-1.5, 1.5], map to
                           [0.7, 1.3]) | 'raw' (the per-token reward itself, negated on rejected)
"""

from __future__ import annotations

import collections

from absl import logging
import ml_collections
import numpy as np

from midpo.data import formats
from midpo.data import report as report_lib
from midpo.data import sources
from midpo.data import tfds_builders
from midpo.data.iterator import PreferenceBatchIterator, real_token_fraction, round_up
from midpo.data.tokenize import (MODES, TOKENIZATIONS, TRANSFORMS, TokenizedPairs, Tokenizer,
                                 oracle_token_weights, resolve_tokenization, tokenize_split)

SOURCES = ("synthetic", "files")
TRUNCATION_MODES = ("keep_prompt_end", "keep_start")
TOKEN_WEIGHTS = ("none", "oracle")


def default_config() -> ml_collections.ConfigDict:
  """The ``config.data`` section with its defaults (fields documented in the module docstring)."""
  c = ml_collections.ConfigDict(
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
        "prompt_specificity": 0.0,
        "sft_best_of": 4,
        "samples_path": "",
        "pairing": "disjoint",
        "labels": "annotator",
      },
      "bad_rows": "skip",
      "max_reported_bad_rows": 5,
      "batch_size": 16,
      "max_length": 128,
      "max_prompt_length": 0,
      "truncate_responses": False,
      "truncation_mode": "keep_prompt_end",
      "tokenization": "auto",
      "add_bos": True,
      "add_eos": True,
      "max_unk_fraction": 0.01,
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
  # Not type-locked: a list from a config file, a comma-separated string (or glob, or folder)
  # from the command line (sources.resolve_files).
  c.files = ml_collections.ConfigDict(
    {"format": "trl_standard", "train_files": "", "test_files": ""}, type_safe=False
  )
  return c


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
  check(c.tokenization in TOKENIZATIONS, "tokenization", f"must be one of {TOKENIZATIONS}")
  check(
    c.tokenization != "trl" or c.source == "files",
    "tokenization",
    "'trl' joins prompt and completion texts; the synthetic task's rows need 'separate'",
  )
  check(0 <= c.max_unk_fraction <= 1, "max_unk_fraction", "must be in [0, 1]")
  check(
    c.truncation_mode in TRUNCATION_MODES,
    "truncation_mode",
    f"must be one of {TRUNCATION_MODES} (TRL's 'keep_end' would cut chosen and rejected "
    "rows' shared prompt differently)",
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
  if c.source == "files":
    check(
      c.files.format in formats.FORMATS,
      "files.format",
      f"must be one of {formats.FORMATS}, got {c.files.format!r}",
    )
    check(
      bool(sources.resolve_files(c.files.train_files, "train_files")),
      "files.train_files",
      "names no file: set it to your preference file(s) (a comma-separated list, a glob or "
      "a folder)",
    )
    sources.resolve_files(c.files.test_files, "test_files")  # raises naming the key


# ----------------------------------------------------------------------------------------------
# Sharding.


def shard_indices(n: int, process_index: int, process_count: int) -> np.ndarray:
  """The contiguous block of ``range(n)`` that process ``process_index`` reads."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  bounds = [(n * p) // process_count for p in range(process_count + 1)]
  return np.arange(bounds[process_index], bounds[process_index + 1], dtype=np.int64)


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
      prompt_specificity=s.prompt_specificity,
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
      sources.resolve_files(c.files.train_files, "train_files"),
      sources.resolve_files(c.files.test_files, "test_files"),
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
  if tokenizer.pad_id is None:
    raise report_lib.DataError(
      "config.tokenizer: the tokenizer has neither a pad token nor an EOS token to pad with")
  builder = build_dataset(c, workdir, process_index, process_count, build=build)
  source = builder.as_data_source(split=split)
  build_rep = tfds_builders.build_report(builder, split)
  rep = report_lib.BadRowReport(c.bad_rows, c.max_reported_bad_rows)
  indices = shard_indices(len(source), process_index, process_count)
  try:
    pairs = tokenize_split(source, indices, tokenizer, c, mode, rep)
  except report_lib.DataError:
    if workdir is not None:  # what was read up to the error, for this run
      report_lib.write_data_report(
        workdir, {f"{split}/build": build_rep, f"{split}/tokenize/{mode}": rep.to_dict()},
        process_index=process_index, process_count=process_count)
    raise
  stages = {f"{split}/build": build_rep, f"{split}/tokenize/{mode}": rep.to_dict()}
  first = int(indices[0]) if len(indices) else 0
  stages[f"{split}/tokenize/{mode}"]["shard"] = {
    "process_index": process_index,
    "process_count": process_count,
    "rows_in_split": len(source),
    "first": first,
    "stop": first + len(indices),
  }
  logging.info("%s", summary_line(split, mode, stages, process_index, process_count))
  report_path = None
  if workdir is not None:
    report_path = report_lib.write_data_report(
      workdir, stages, process_index=process_index, process_count=process_count)
  if len(pairs) < c.batch_size:
    where = f" on process {process_index} of {process_count}" if process_count > 1 else ""
    raise report_lib.DataError(
      f"{split!r}: {len(pairs)} rows left{where}, fewer than one batch "
      f"(config.data.batch_size={c.batch_size}); {_top_reasons(stages, c)} "
      f"(details: {report_path or 'data_report.json'})")
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
    it.report_path = report_lib.write_data_report(
      workdir,
      stages,
      batches={f"{split}/{mode}": it.stats()},
      process_index=process_index,
      process_count=process_count,
    )
  return it


def build_dataset(c, workdir: str | None, process_index: int = 0, process_count: int = 1, *,
                  build: bool = True):
  """``builder_from_config``; a split where no row is kept becomes a ``DataError`` naming the
  main reasons (and what to change), after its report is written to ``workdir``."""
  try:
    return builder_from_config(c, build=build)
  except tfds_builders.EmptySplitError as e:
    if workdir is not None:
      report_lib.write_data_report(workdir, {f"{e.split}/build": e.report},
                                   process_index=process_index, process_count=process_count)
    raise report_lib.DataError(
      f"{e.split!r}: no row of {e.report['rows_read']} was kept; "
      f"{_top_reasons({'b': e.report}, c)}") from None


# What to change when most rows are skipped for a reason (the error message's hint).
_HINTS = {r: "check config.data.files.format" for r in (
  report_lib.MISSING_FIELD, report_lib.NON_STRING_FIELD, report_lib.MALFORMED_MESSAGES,
  report_lib.MALFORMED_TRANSCRIPT, report_lib.PROMPT_ONLY)}
_HINTS[report_lib.OVER_LENGTH] = ("raise config.data.max_length, or set config.data."
                                  "truncation_mode=keep_start (TRL's) or truncate_responses=True")


def _top_reasons(stages: dict, c=None, k: int = 3) -> str:
  counts = collections.Counter()
  for stage in stages.values():
    counts.update(stage["bad_rows"])
  if not counts:
    return "no row was skipped"
  top = ", ".join(f"{n} {reason}" for reason, n in counts.most_common(k))
  out = f"skipped {sum(counts.values())} rows, most for: {top}"
  hint = _HINTS.get(counts.most_common(1)[0][0])
  if hint and c is not None:
    hint = hint.replace("config.data.files.format", f"config.data.files.format (now "
                        f"{c.files.format!r}; first bad rows in data_report.json)")
    out += f"; {hint}"
  return out


def summary_line(split: str, mode: str, stages: dict, process_index: int = 0,
                 process_count: int = 1) -> str:
  """One console line for a split: rows read, kept, skipped by reason, truncated."""
  build, tok = stages[f"{split}/build"], stages[f"{split}/tokenize/{mode}"]
  skipped = collections.Counter(build["bad_rows"]) + collections.Counter(tok["bad_rows"])
  notes = collections.Counter(build.get("notes", {})) + collections.Counter(tok.get("notes", {}))
  where = f" (process {process_index} of {process_count})" if process_count > 1 else ""
  line = (f"data {split}/{mode}{where}: read {build['rows_read']} rows, kept "
          f"{tok['rows_kept']}; skipped {sum(skipped.values())}")
  if skipped:
    line += " (" + ", ".join(f"{r} {n}" for r, n in sorted(skipped.items())) + ")"
  trunc = {k: notes[k] for k in ("prompt_truncated", "response_truncated") if notes[k]}
  line += "; truncated: " + (", ".join(f"{k.split('_')[0]} {n}" for k, n in trunc.items())
                             if trunc else "none")
  if notes["prompt_not_a_token_prefix"]:
    line += (f"; {notes['prompt_not_a_token_prefix']} prompts are not a token prefix of "
             "prompt+completion (split where they diverge, as TRL does)")
  return line


__all__ = [
    "MODES", "PreferenceBatchIterator", "SOURCES", "TOKENIZATIONS", "TOKEN_WEIGHTS", "TRANSFORMS",
    "TRUNCATION_MODES",
    "TokenizedPairs", "Tokenizer", "builder_from_config", "default_config", "make_iterator",
    "oracle_token_weights", "real_token_fraction", "resolve_tokenization", "round_up",
    "shard_indices", "summary_line", "build_dataset",
    "tokenize_split", "validate_config",
]
