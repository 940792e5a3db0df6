"""Bad-row accounting: every row read is either kept or counted under a reason.

A :class:`BadRowReport` belongs to one stage of the data path (``build``: parsing users' files or
model samples into a TFDS dataset; ``tokenize``: turning examples into token ids under a length
limit). Each stage keeps the invariant ``rows_read == rows_kept + sum(bad_rows.values())``, checked
by :meth:`BadRowReport.check` and again when the report is written.

Policy (``config.data.bad_rows``): ``'skip'`` (default) counts the row and drops it; ``'fatal'``
raises :class:`BadRowError` at the first bad row, naming file, line and reason.

``data_report.json`` (written by :func:`write_data_report` into the run's workdir) has the schema::

    {
      "schema_version": 1,
      "writer": str,                             # the process that wrote it (pid-start time)
      "process_index": int, "process_count": int,
      "stages": {
        "<split>/build": STAGE,                  # parsing files / generating (whole split)
        "<split>/tokenize/<mode>": STAGE, ...    # this process's share; mode 'pairs' or 'sft'
      },
      "bad_rows_total": {reason: int, ...},      # summed over stages
      "batches": {"<split>/<mode>": BATCHES, ...}
    }
    BATCHES = {"pairs", "batch_size", "batches_per_epoch", "dropped_pairs_per_epoch",
               "real_token_fraction", "batch_lengths", "epoch", "mode"}   # PreferenceBatchIterator.stats
    STAGE = {
      "rows_read": int, "rows_kept": int,
      "bad_rows": {reason: int, ...},            # only reasons that occurred
      "first_bad_rows": [{"reason": str, "file": str, "line": int, "detail": str}, ...],
      "notes": {name: int, ...},                 # counted events that drop nothing
      "shard": {...}                             # tokenize stages only: process_index,
    }                                            # process_count, rows_in_split, first, stop

``line`` is the 1-based line of a JSONL file, the 1-based item of a JSON list, the 1-based row of
a Parquet file, or the 1-based example position in a TFDS split (tokenize stage).
"""

from __future__ import annotations

import collections
import json
import os
import time
from typing import Any, Iterable, Mapping

from midpo import files

# Reasons a row is dropped. Each has one meaning everywhere.
UNDECODABLE_LINE = "undecodable_line"  # not valid UTF-8 or not valid JSON / not an object
MISSING_FIELD = "missing_field"  # a required field is absent or null
NON_STRING_FIELD = "non_string_field"  # a text field (or a message's content/role) is not a string
NON_NUMERIC_SCORE = "non_numeric_score"  # a score field is present but not a finite number
PROMPT_ONLY = "prompt_only"  # the row has a prompt and no response field at all
EMPTY_RESPONSE = "empty_response"  # chosen or rejected is empty (or whitespace only)
IDENTICAL_RESPONSES = "identical_responses"  # chosen equals rejected
# HH: the transcripts do not share everything up to their last Assistant turn (or have none).
MALFORMED_TRANSCRIPT = "malformed_transcript"
# Message lists: not a list of {role, content}, or no shared prompt before the replies.
MALFORMED_MESSAGES = "malformed_messages"
# The chat template's rendering of the prompt is not a prefix of its prompt+response rendering
# (tokenization 'separate' only; 'trl' splits where the token lists diverge).
TEMPLATE_MISMATCH = "template_mismatch"
TEMPLATE_ERROR = "template_error"  # the chat template raised on this row's messages
UNTOKENIZABLE = "untokenizable"  # the tokenizer raised on this row's text
OVER_LENGTH = "over_length"  # a response does not fit max_length even with an empty prompt

REASONS = (
  UNDECODABLE_LINE,
  MISSING_FIELD,
  NON_STRING_FIELD,
  NON_NUMERIC_SCORE,
  PROMPT_ONLY,
  EMPTY_RESPONSE,
  IDENTICAL_RESPONSES,
  MALFORMED_TRANSCRIPT,
  MALFORMED_MESSAGES,
  TEMPLATE_MISMATCH,
  TEMPLATE_ERROR,
  UNTOKENIZABLE,
  OVER_LENGTH,
)

POLICIES = ("skip", "fatal")
SCHEMA_VERSION = 1
# This process (pid and start time): the report holds what this run read, nothing older.
WRITER = f"{os.getpid()}-{time.time_ns()}"


class DataError(ValueError):
  """The data cannot make a run (too few rows left, a tokenizer that does not fit it); the
  message says why and what to change. Once rows were read, ``data_report.json`` (with what
  was read up to the error) is written before it is raised."""


class BadRowError(DataError):
  """Raised under the 'fatal' policy at the first bad row, naming its file and line."""


class BadRow(Exception):
  """Raised by row parsers; carries the reason. Caught by the caller and passed to a report."""

  def __init__(self, reason: str, detail: str = ""):
    if reason not in REASONS:
      raise ValueError(f"unknown bad-row reason {reason!r}; known: {REASONS}")
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


class BadRowReport:
  """Counts rows read, kept and dropped (by reason) for one stage."""

  def __init__(self, policy: str = "skip", max_reported: int = 5):
    if policy not in POLICIES:
      raise ValueError(f"config.data.bad_rows must be one of {POLICIES}, got {policy!r}")
    self.policy = policy
    self.max_reported = int(max_reported)
    self.rows_read = 0
    self.rows_kept = 0
    self.bad_rows: collections.Counter[str] = collections.Counter()
    self.first_bad_rows: list[dict[str, Any]] = []
    self.notes: collections.Counter[str] = collections.Counter()

  def kept(self) -> None:
    self.rows_read += 1
    self.rows_kept += 1

  def bad(self, reason: str, file: str, line: int, detail: str = "") -> None:
    """Counts one dropped row; raises BadRowError under the 'fatal' policy."""
    if reason not in REASONS:
      raise ValueError(f"unknown bad-row reason {reason!r}; known: {REASONS}")
    self.rows_read += 1
    self.bad_rows[reason] += 1
    detail = str(detail)[:200]
    if len(self.first_bad_rows) < self.max_reported:
      self.first_bad_rows.append(
        {"reason": reason, "file": str(file), "line": int(line), "detail": detail}
      )
    if self.policy == "fatal":
      raise BadRowError(f"{file}:{line}: bad row ({reason}): {detail}")

  def note(self, name: str, count: int = 1) -> None:
    """Counts an event that drops nothing (e.g. a prompt truncated from the left)."""
    self.notes[name] += count

  def check(self) -> None:
    total_bad = sum(self.bad_rows.values())
    if self.rows_read != self.rows_kept + total_bad:
      raise AssertionError(
        f"bad-row accounting broken: read {self.rows_read} != kept {self.rows_kept} "
        f"+ bad {total_bad}"
      )

  def to_dict(self) -> dict[str, Any]:
    self.check()
    return {
      "rows_read": self.rows_read,
      "rows_kept": self.rows_kept,
      "bad_rows": dict(sorted(self.bad_rows.items())),
      "first_bad_rows": list(self.first_bad_rows),
      "notes": dict(sorted(self.notes.items())),
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], policy: str = "skip") -> "BadRowReport":
    r = cls(policy=policy)
    r.rows_read = int(d["rows_read"])
    r.rows_kept = int(d["rows_kept"])
    r.bad_rows.update({k: int(v) for k, v in d["bad_rows"].items()})
    r.first_bad_rows = list(d["first_bad_rows"])
    r.notes.update({k: int(v) for k, v in d.get("notes", {}).items()})
    r.check()
    return r


def data_report_filename(process_index: int = 0, process_count: int = 1) -> str:
  """`data_report.json` for one process; one file per process when there are several."""
  if process_count == 1:
    return "data_report.json"
  return f"data_report.process-{process_index:05d}-of-{process_count:05d}.json"


def write_data_report(
  workdir: str,
  stages: Mapping[str, Mapping[str, Any]],
  batches: Mapping[str, Any] | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> str:
  """Writes or updates the report (schema in the module docstring); returns its path.

  Stages and batch statistics this process wrote before under other names are kept (a run
  that loads 'train' and then 'test' has both in one report); the same names are replaced. A
  report written by another process (an earlier run in the same workdir) is replaced whole.
  """
  files.makedirs(workdir)
  path = os.path.join(workdir, data_report_filename(process_index, process_count))
  old_stages, old_batches = {}, {}
  if files.exists(path):
    old = json.loads(files.read_text(path))
    # A report left by an earlier run (an earlier process) is replaced, not added to.
    if old.get("schema_version") == SCHEMA_VERSION and old.get("writer") == WRITER:
      old_stages, old_batches = old["stages"], old["batches"]
  stages = {**old_stages, **{k: dict(v) for k, v in stages.items()}}
  total: collections.Counter[str] = collections.Counter()
  for stage in stages.values():
    BadRowReport.from_dict(stage)  # re-checks the invariant
    total.update(stage["bad_rows"])
  report = {
    "schema_version": SCHEMA_VERSION,
    "writer": WRITER,
    "process_index": int(process_index),
    "process_count": int(process_count),
    "stages": dict(sorted(stages.items())),
    "bad_rows_total": dict(sorted(total.items())),
    "batches": dict(sorted({**old_batches, **dict(batches or {})}.items())),
  }
  files.write_json(path, report, indent=2, sort_keys=True)
  return path


def sum_counts(reports: Iterable[Mapping[str, Any]]) -> dict[str, int]:
  """Bad-row counts by reason, summed over reports."""
  total: collections.Counter[str] = collections.Counter()
  for r in reports:
    total.update(r["bad_rows"])
  return dict(total)
