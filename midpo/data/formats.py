"""Users' preference files: reading JSONL / JSON / Parquet and parsing the common row formats.

Every row becomes a :class:`Pair` or raises :class:`midpo.data.report.BadRow` with a reason.

Formats (``config.data.files.format``):

- ``trl_standard``: ``{"prompt": str, "chosen": str, "rejected": str}``; the response strings are
  what follows the prompt. The prompt is required (it may be the empty string).
- ``trl_conversational``: ``{"prompt": [msg...], "chosen": [msg...], "rejected": [msg...]}`` with
  ``msg = {"role": str, "content": str}``. Without ``prompt`` ("implicit prompt"), ``chosen`` and
  ``rejected`` are whole conversations and their longest common message prefix is the prompt.
- ``hh_rlhf`` (Anthropic HH-RLHF): ``{"chosen": str, "rejected": str}``, whole
  ``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` transcripts. The prompt is the shared text up to and
  including the last ``"\\n\\nAssistant:"`` marker of both transcripts; the responses are what
  follows it (leading space kept, as the data has it). A pair whose transcripts differ before that
  marker, or that has no such marker, is ``malformed_transcript``.
- ``ultrafeedback`` (UltraFeedback-binarized): ``{"prompt": str, "chosen": [msg...],
  "rejected": [msg...], "score_chosen": float, "score_rejected": float}``; both message lists end
  with the assistant's reply and share everything before it (the prompt). Scores are kept (NaN when
  absent).

Message-list pairs are stored as JSON text (``kind == "messages"``) and rendered with the
tokenizer's chat template at tokenisation time (``pipeline.py``), so one built dataset serves any
tokenizer.

Files, their types and how they are named (globs, folders, ``save_to_disk`` directories, Hub
snapshots) are ``sources.py``'s. A row holding text that cannot be written as UTF-8 (a lone
surrogate) is the bad row ``undecodable_line``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterator

from midpo.data import report as report_lib
from midpo.data import sources
from midpo.data.report import BadRow

FORMATS = ("trl_standard", "trl_conversational", "hh_rlhf", "ultrafeedback")
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


@dataclasses.dataclass(frozen=True)
class Pair:
  """One preference pair. For ``kind == 'messages'`` the three texts are JSON message lists."""

  prompt: str
  chosen: str
  rejected: str
  kind: str = "text"
  score_chosen: float = math.nan
  score_rejected: float = math.nan


# ----------------------------------------------------------------------------------------------
# Field checks.


def _text(row: dict, key: str) -> str:
  if key not in row or row[key] is None:
    raise BadRow(report_lib.MISSING_FIELD, f"no {key!r}")
  value = row[key]
  if not isinstance(value, str):
    raise BadRow(report_lib.NON_STRING_FIELD, f"{key!r} is {type(value).__name__}")
  return value


def _score(row: dict, key: str) -> float:
  value = row.get(key)
  if value is None:
    return math.nan
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise BadRow(report_lib.NON_NUMERIC_SCORE, f"{key!r} = {value!r}")
  return float(value)


def _messages(row: dict, key: str) -> list[dict[str, str]]:
  if key not in row or row[key] is None:
    raise BadRow(report_lib.MISSING_FIELD, f"no {key!r}")
  value = row[key]
  if isinstance(value, str):
    raise BadRow(report_lib.MALFORMED_MESSAGES, f"{key!r} is a string, not a message list")
  if not isinstance(value, (list, tuple)):
    raise BadRow(report_lib.MALFORMED_MESSAGES, f"{key!r} is {type(value).__name__}")
  out = []
  for i, m in enumerate(value):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise BadRow(report_lib.MALFORMED_MESSAGES, f"{key}[{i}] is not a {{role, content}}")
    if not isinstance(m["role"], str) or not isinstance(m["content"], str):
      raise BadRow(report_lib.NON_STRING_FIELD, f"{key}[{i}] role/content not a string")
    out.append({"role": m["role"], "content": m["content"]})
  return out


def _check_responses(chosen: str, rejected: str) -> None:
  if not chosen.strip() or not rejected.strip():
    raise BadRow(report_lib.EMPTY_RESPONSE, "chosen or rejected is empty")
  if chosen == rejected:
    raise BadRow(report_lib.IDENTICAL_RESPONSES, "chosen == rejected")


def _check_message_responses(chosen: list[dict], rejected: list[dict]) -> None:
  def empty(msgs):
    return not msgs or all(not m["content"].strip() for m in msgs)

  if empty(chosen) or empty(rejected):
    raise BadRow(report_lib.EMPTY_RESPONSE, "chosen or rejected has no content")
  if chosen == rejected:
    raise BadRow(report_lib.IDENTICAL_RESPONSES, "chosen == rejected")


def _require_object(row: Any) -> dict:
  if not isinstance(row, dict):
    raise BadRow(report_lib.UNDECODABLE_LINE, f"row is {type(row).__name__}, not an object")
  return row


def _prompt_only(row: dict) -> None:
  if row.get("chosen") is None and row.get("rejected") is None:
    raise BadRow(report_lib.PROMPT_ONLY, "no chosen and no rejected response")


def _dumps(messages: list[dict]) -> str:
  return json.dumps(messages, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# Row parsers.


def parse_trl_standard(row: Any) -> Pair:
  """A TRL standard row (``prompt``, ``chosen``, ``rejected`` texts) -> ``Pair``; raises ``BadRow``."""
  row = _require_object(row)
  _prompt_only(row)
  prompt = _text(row, "prompt")
  chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
  _check_responses(chosen, rejected)
  return Pair(prompt, chosen, rejected)


def split_hh_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
  """Returns ``(prompt, chosen_response, rejected_response)`` of two HH transcripts."""
  cut_c = chosen.rfind(HH_ASSISTANT)
  cut_r = rejected.rfind(HH_ASSISTANT)
  if cut_c < 0 or cut_r < 0:
    raise BadRow(report_lib.MALFORMED_TRANSCRIPT, "no '\\n\\nAssistant:' turn")
  end_c, end_r = cut_c + len(HH_ASSISTANT), cut_r + len(HH_ASSISTANT)
  if chosen[:end_c] != rejected[:end_r]:
    raise BadRow(
      report_lib.MALFORMED_TRANSCRIPT,
      "transcripts differ before their last Assistant turn",
    )
  return chosen[:end_c], chosen[end_c:], rejected[end_r:]


def parse_hh_rlhf(row: Any) -> Pair:
  """An HH-RLHF row (two whole transcripts) -> ``Pair`` split at their common
  prefix (``split_hh_transcripts``); raises ``BadRow``."""
  row = _require_object(row)
  if row.get("chosen") is None and row.get("rejected") is None:
    raise BadRow(report_lib.MISSING_FIELD, "no 'chosen' and no 'rejected'")
  chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
  if chosen == rejected:
    raise BadRow(report_lib.IDENTICAL_RESPONSES, "chosen == rejected")
  prompt, c, r = split_hh_transcripts(chosen, rejected)
  _check_responses(c, r)
  return Pair(prompt, c, r)


def _common_prefix(a: list, b: list) -> int:
  n = 0
  while n < len(a) and n < len(b) and a[n] == b[n]:
    n += 1
  return n


def parse_trl_conversational(row: Any) -> Pair:
  """A TRL conversational row (message lists; the prompt implicit or explicit)
  -> ``Pair`` of messages; raises ``BadRow``."""
  row = _require_object(row)
  _prompt_only(row)
  chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
  if row.get("prompt") is not None:
    prompt = _messages(row, "prompt")
  else:
    if chosen == rejected:
      raise BadRow(report_lib.IDENTICAL_RESPONSES, "chosen == rejected")
    n = _common_prefix(chosen, rejected)
    # The prompt ends before the first differing message, which must be the assistant's.
    if n == 0 or (n < len(chosen) and chosen[n]["role"] != "assistant"):
      raise BadRow(report_lib.MALFORMED_MESSAGES, "no shared prompt before the replies")
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
  _check_message_responses(chosen, rejected)
  return Pair(_dumps(prompt), _dumps(chosen), _dumps(rejected), kind="messages")


def parse_ultrafeedback(row: Any) -> Pair:
  """An UltraFeedback-binarized row (message lists ending with the assistant
  turn, with ``score_chosen`` and ``score_rejected``) -> ``Pair``; raises ``BadRow``."""
  row = _require_object(row)
  _prompt_only(row)
  chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
  score_c, score_r = _score(row, "score_chosen"), _score(row, "score_rejected")
  for name, msgs in (("chosen", chosen), ("rejected", rejected)):
    if not msgs or msgs[-1]["role"] != "assistant":
      raise BadRow(report_lib.MALFORMED_MESSAGES, f"{name} does not end with an assistant turn")
  if chosen[:-1] != rejected[:-1]:
    raise BadRow(report_lib.MALFORMED_MESSAGES, "chosen and rejected prompts differ")
  prompt = chosen[:-1]
  if not prompt:
    prompt = [{"role": "user", "content": _text(row, "prompt")}]
  c, r = chosen[-1:], rejected[-1:]
  _check_message_responses(c, r)
  return Pair(
    _dumps(prompt),
    _dumps(c),
    _dumps(r),
    kind="messages",
    score_chosen=score_c,
    score_rejected=score_r,
  )


PARSERS = {
  "trl_standard": parse_trl_standard,
  "trl_conversational": parse_trl_conversational,
  "hh_rlhf": parse_hh_rlhf,
  "ultrafeedback": parse_ultrafeedback,
}


def iter_pairs(
  fmt: str, paths: list[str], report: report_lib.BadRowReport
) -> Iterator[tuple[str, int, Pair]]:
  """Yields ``(file, line, pair)`` for the good rows of ``paths``; counts the rest."""
  if fmt not in PARSERS:
    raise ValueError(f"config.data.files.format must be one of {FORMATS}, got {fmt!r}")
  parse = PARSERS[fmt]
  names = [os.path.basename(p) for p in paths]
  if len(set(names)) < len(names):  # e.g. a Hub snapshot's */train.jsonl.gz: name by folder
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    names = [os.path.relpath(p, root) for p in paths]
  for path, name in zip(paths, names):
    for line, row in sources.read_rows(path, report):
      try:
        if isinstance(row, BadRow):
          raise row
        pair = parse(row)
        sources.check_unicode((pair.prompt, pair.chosen, pair.rejected))
      except BadRow as bad:
        report.bad(bad.reason, name, line, bad.detail)
        continue
      report.kept()
      yield name, line, pair
