"""Model-samples files: responses sampled from a model, for the synthetic task to label.

JSONL, one prompt a line (format in ``midpo.data.tfds_builders``): text or
``SyntheticTokenizer`` ids. ``write_samples_file`` writes one,
``parse_samples_row`` reads a line (raising ``BadRow`` for a bad one).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from midpo.data import report as report_lib
from midpo.data import synthetic
from midpo.data.report import BadRow


def _ids_text(ids: Any, tok: synthetic.SyntheticTokenizer, what: str, is_prompt: bool) -> str:
  if not isinstance(ids, (list, tuple)) or not all(
    isinstance(i, int) and not isinstance(i, bool) for i in ids
  ):
    raise BadRow(report_lib.NON_STRING_FIELD, f"{what} is not a list of ints")
  ids = list(ids)
  if any(not 0 <= i < tok.vocab_size for i in ids):
    raise BadRow(report_lib.UNDECODABLE_LINE, f"{what} has ids outside the vocabulary")
  if is_prompt and ids and ids[0] == tok.bos_id:
    ids = ids[1:]
  if not is_prompt and tok.eos_id in ids:
    ids = ids[: ids.index(tok.eos_id)]
  return tok.decode([i for i in ids if i != tok.pad_id])


def parse_samples_row(row: Any, tok: synthetic.SyntheticTokenizer) -> tuple[str, list[str]]:
  """(prompt, responses) of one model-samples line; raises BadRow."""
  if not isinstance(row, dict):
    raise BadRow(report_lib.UNDECODABLE_LINE, "row is not an object")
  if "prompt" in row:
    prompt = row["prompt"]
    if not isinstance(prompt, str):
      raise BadRow(report_lib.NON_STRING_FIELD, "'prompt' is not a string")
  elif "prompt_ids" in row:
    prompt = _ids_text(row["prompt_ids"], tok, "prompt_ids", True)
  else:
    raise BadRow(report_lib.MISSING_FIELD, "no 'prompt' or 'prompt_ids'")
  if "responses" in row:
    responses = row["responses"]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
      raise BadRow(report_lib.NON_STRING_FIELD, "'responses' is not a list of strings")
  elif "response_ids" in row:
    if not isinstance(row["response_ids"], list):
      raise BadRow(report_lib.NON_STRING_FIELD, "'response_ids' is not a list")
    responses = [
      _ids_text(r, tok, f"response_ids[{i}]", False) for i, r in enumerate(row["response_ids"])
    ]
  else:
    raise BadRow(report_lib.PROMPT_ONLY, "no 'responses' or 'response_ids'")
  if len(responses) < 2:
    raise BadRow(report_lib.PROMPT_ONLY, f"{len(responses)} response(s); a pair needs 2")
  # Normalise whitespace as the word-level tokenizer sees it.
  return " ".join(prompt.split()), [" ".join(r.split()) for r in responses]


def write_samples_file(
  path: str, prompts: Sequence[Any], responses: Sequence[Sequence[Any]], extra: dict | None = None
) -> None:
  """Writes a model-samples file: ``prompts[i]`` (text or ids) with ``responses[i]`` (a list
  of texts or of id lists). ``extra`` (e.g. ``{"model": ..., "step": ...}``) goes on every line.
  """
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for p, rs in zip(prompts, responses):
      row = dict(extra or {})
      if isinstance(p, str):
        row["prompt"] = p
      else:
        row["prompt_ids"] = [int(i) for i in p]
      rs = list(rs)
      if all(isinstance(r, str) for r in rs):
        row["responses"] = rs
      else:
        row["response_ids"] = [[int(i) for i in r] for r in rs]
      f.write(json.dumps(row) + "\n")
