"""Loading midpo runs: a workdir's files into plain dicts (missing files become notes)."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping, Optional

import pandas as pd

NO_EVAL_NOTE = "no eval.json: evaluation columns are NaN (the run has not finished its 'eval' stage)"
NO_METRICS_NOTE = "no metrics.jsonl: no learning curves"
NO_CONFIG_NOTE = "no config.json: prior and alpha unknown"
NO_SAMPLES_NOTE = "no eval_samples.jsonl: no sampled responses"


def _read_json(path: str, notes: list[str], what: str):
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    notes.append(f"{what} unreadable ({type(e).__name__}: {e})")
    return None


def _to_float(v):
  """``metrics.jsonl`` writes non-finite values as strings ("nan", "inf")."""
  if isinstance(v, str):
    try:
      return float(v)
    except ValueError:
      return v
  return v


def read_metrics(path: str) -> tuple[pd.DataFrame, list[str]]:
  """``metrics.jsonl`` as a DataFrame (columns ``stage``, ``step``, then metric names).

  Returns ``(frame, notes)``. Non-finite values become float NaN/inf. Lines that
  are not JSON (a run killed mid-write) are skipped and counted in a note. A
  ``(stage, step)`` logged twice (a run resumed from a checkpoint before the
  step it was killed at) keeps its last row, also with a note.
  """
  notes: list[str] = []
  rows, bad = [], 0
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError:
        bad += 1
        continue
      if not isinstance(row, dict) or "stage" not in row or "step" not in row:
        bad += 1
        continue
      rows.append({k: _to_float(v) for k, v in row.items()})
  if bad:
    notes.append(f"metrics.jsonl: {bad} unreadable line(s) skipped")
  if not rows:
    notes.append("metrics.jsonl has no rows")
    return pd.DataFrame({"stage": pd.Series(dtype=str), "step": pd.Series(dtype=int)}), notes
  frame = pd.DataFrame.from_records(rows)
  frame["step"] = frame["step"].astype(int)
  dup = frame.duplicated(["stage", "step"], keep="last")
  if dup.any():
    notes.append(f"metrics.jsonl: {int(dup.sum())} repeated (stage, step) row(s), e.g. from a "
                 "resumed run; kept the last of each")
    frame = frame[~dup]
  return frame.reset_index(drop=True), notes


def _step_dirs(directory: str) -> tuple[list[int], list[str]]:
  steps, partial = [], []
  for name in os.listdir(directory):
    if not os.path.isdir(os.path.join(directory, name)):
      continue
    if name.isdigit():
      steps.append(int(name))
    elif re.match(r"^\d+\..*tmp", name):
      partial.append(name)
  return sorted(steps), sorted(partial)


def checkpoint_steps(workdir: str) -> dict[str, list[int]]:
  """Checkpoint steps by directory name: ``{"sft": [...], "checkpoints": [...]}``.

  Runs with several rounds have ``checkpoints/round<r>/<step>``, listed as
  ``"checkpoints/round<r>"``. A directory that is absent is absent from the
  result. Nothing is restored.
  """
  out: dict[str, list[int]] = {}
  for sub in ("sft", "checkpoints"):
    d = os.path.join(workdir, sub)
    if not os.path.isdir(d):
      continue
    steps, _ = _step_dirs(d)
    rounds = sorted((n for n in os.listdir(d) if re.fullmatch(r"round\d+", n)),
                    key=lambda n: int(n[5:]))
    if steps or not rounds:
      out[sub] = steps
    for r in rounds:
      out[f"{sub}/{r}"] = _step_dirs(os.path.join(d, r))[0]
  return out


def _partial_checkpoints(workdir: str) -> list[str]:
  found = []
  for sub in ("sft", "checkpoints"):
    d = os.path.join(workdir, sub)
    if not os.path.isdir(d):
      continue
    found += [f"{sub}/{n}" for n in _step_dirs(d)[1]]
    for r in os.listdir(d):
      if re.fullmatch(r"round\d+", r) and os.path.isdir(os.path.join(d, r)):
        found += [f"{sub}/{r}/{n}" for n in _step_dirs(os.path.join(d, r))[1]]
  return sorted(found)


def load_run(workdir: str, name: Optional[str] = None) -> dict:
  """Reads one run's workdir.

  Returns a dict with ``workdir``, ``name`` (the directory's base name unless
  given), ``config`` (dict or None), ``metrics`` (DataFrame, possibly empty),
  ``eval`` (dict or None), ``samples`` (list of dicts), ``checkpoints`` (see
  ``checkpoint_steps``) and ``notes``: one sentence per missing or unreadable
  piece. A workdir that does not exist gives a run with only that note.
  """
  workdir = os.fspath(workdir)
  run: dict[str, Any] = {
      "workdir": workdir, "name": name or os.path.basename(os.path.normpath(workdir)),
      "config": None, "metrics": pd.DataFrame({"stage": pd.Series(dtype=str),
                                               "step": pd.Series(dtype=int)}),
      "eval": None, "samples": [], "checkpoints": {}, "notes": []}
  notes = run["notes"]
  if not os.path.isdir(workdir):
    notes.append(f"workdir does not exist: {workdir}")
    return run

  run["config"] = _read_json(os.path.join(workdir, "config.json"), notes, "config.json")
  if run["config"] is None and not any(n.startswith("config.json") for n in notes):
    notes.append(NO_CONFIG_NOTE)

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    run["metrics"], metric_notes = read_metrics(metrics_path)
    notes.extend(metric_notes)
  else:
    notes.append(NO_METRICS_NOTE)

  run["eval"] = _read_json(os.path.join(workdir, "eval.json"), notes, "eval.json")
  if run["eval"] is None:
    if not any(n.startswith("eval.json") for n in notes):
      notes.append(NO_EVAL_NOTE)
  else:
    ira = run["eval"].get("implicit_reward_accuracy")
    if isinstance(ira, Mapping) and "skipped" in ira:
      notes.append(f"implicit-reward accuracy skipped: {ira['skipped']}")
    if "reward" not in (run["eval"].get("policy") or {}):
      notes.append("eval.json has no true reward (only the synthetic task has one)")

  samples_path = os.path.join(workdir, "eval_samples.jsonl")
  if os.path.exists(samples_path):
    with open(samples_path) as f:
      for line in f:
        if line.strip():
          try:
            run["samples"].append(json.loads(line))
          except ValueError:
            notes.append("eval_samples.jsonl: an unreadable line skipped")
  elif run["eval"] is not None:
    notes.append(NO_SAMPLES_NOTE)

  run["checkpoints"] = checkpoint_steps(workdir)
  partial = _partial_checkpoints(workdir)
  if partial:
    notes.append("unfinished checkpoint write(s): " + ", ".join(partial))
  return run


def load_runs(workdirs: Iterable[str]) -> list[dict]:
  """``load_run`` of each workdir; names made unique by their parent directories."""
  workdirs = [os.fspath(w) for w in workdirs]
  parts = [os.path.normpath(w).split(os.sep) for w in workdirs]
  names = []
  for p in parts:
    depth = 1
    while depth < len(p) and sum(q[-depth:] == p[-depth:] for q in parts) > 1:
      depth += 1
    names.append("/".join(x for x in p[-depth:] if x))
  return [load_run(w, n) for w, n in zip(workdirs, names)]
