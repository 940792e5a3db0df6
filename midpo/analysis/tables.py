"""Tables of midpo runs: evaluations, learning curves, prior statistics, samples, checkpoints."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import pandas as pd


SUMMARY_COLUMNS = (
    "prior", "alpha", "policy_reward", "policy_reward_se", "reference_reward",
    "reference_reward_se", "kl", "kl_se", "length", "length_se", "reference_length",
    "reference_length_se", "win_rate", "win_rate_se", "implicit_reward_accuracy",
    "implicit_reward_accuracy_se", "num_prompts", "notes")


def prior_label(run: Mapping) -> str:
  """``name(hyperparameter=value, ...)`` of the run's prior, from its config."""
  cfg = run.get("config") or {}
  prior = dict(cfg.get("prior") or {})
  name = prior.pop("name", None) or (run.get("eval") or {}).get("prior")
  if name is None:
    return "?"
  args = ", ".join(f"{k}={v}" for k, v in sorted(prior.items()) if v is not None)
  return f"{name}({args})" if args else str(name)


def run_label(run: Mapping) -> str:
  """The run's name, followed by its prior when the name does not already say it."""
  prior = prior_label(run)
  return run["name"] if prior in ("?", run["name"]) else f"{run['name']} ({prior})"


def get(d, *keys, default=float("nan")):
  """``d[k0][k1]...``, or ``default`` where a key is missing."""
  for k in keys:
    if not isinstance(d, Mapping) or k not in d:
      return default
    d = d[k]
  return d


def num(v) -> float:
  """``v`` as a float; NaN for None or anything that is not a number."""
  if v is None:
    return float("nan")
  try:
    return float(v)
  except (TypeError, ValueError):
    return float("nan")


def summary_table(runs: Sequence[Mapping]) -> pd.DataFrame:
  """One row per run (indexed by name): prior, alpha and the evaluation's numbers.

  Columns are ``SUMMARY_COLUMNS``: the policy's true reward, KL, length and win
  rate with their standard errors, the reference's reward and length, and the
  implicit-reward accuracy, copied from ``eval.json``; NaN where a run has no
  such number, and the reason in ``notes``. A run that trained baselines
  (``config.baselines``) adds a row ``<run> / <prior>`` for each.
  """
  rows = []
  for run in runs:
    ev = run.get("eval") or {}
    cfg = run.get("config") or {}
    rows.append(_summary_row(run["name"], prior_label(run), cfg, ev, ev.get("policy") or {},
                             ev.get("implicit_reward_accuracy") or {},
                             "; ".join(run.get("notes") or [])))
    # Fixed priors trained in the same run (config.baselines): one row each.
    for name, b in (ev.get("baselines") or {}).items():
      rows.append(_summary_row(f"{run['name']} / {name}", f"{name} (baseline)", cfg, ev, b,
                               b.get("implicit_reward_accuracy") or {},
                               f"trained in run {run['name']!r}: same reference, pairs, steps "
                               "and seed"))
  frame = pd.DataFrame(rows, columns=("run",) + SUMMARY_COLUMNS)
  return frame.set_index("run")


def _summary_row(name, prior, cfg, ev, pol, ira, notes) -> dict:
  ref = ev.get("reference") or {}
  return {
      "run": name,
      "prior": prior,
      "alpha": num(get(cfg, "loss", "alpha")),
      "policy_reward": num(pol.get("reward")),
      "policy_reward_se": num(pol.get("reward_se")),
      "reference_reward": num(ref.get("reward")),
      "reference_reward_se": num(ref.get("reward_se")),
      "kl": num(pol.get("kl")),
      "kl_se": num(pol.get("kl_se")),
      "length": num(pol.get("length")),
      "length_se": num(pol.get("length_se")),
      "reference_length": num(ref.get("length")),
      "reference_length_se": num(ref.get("length_se")),
      "win_rate": num(pol.get("win_rate")),
      "win_rate_se": num(pol.get("win_rate_se")),
      "implicit_reward_accuracy": num(ira.get("value")),
      "implicit_reward_accuracy_se": num(ira.get("se")),
      "num_prompts": num(ev.get("num_prompts")),
      "notes": notes,
  }


def _pm(mean: float, se: float, digits: int) -> str:
  if not math.isfinite(mean):
    return "n/a"
  if not math.isfinite(se):
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {se:.{digits}f}"


def format_summary(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
  """``summary_table``'s numbers as ``mean ± se`` strings, for display."""
  out = pd.DataFrame(index=table.index)
  out["prior"] = table["prior"]
  out["alpha"] = table["alpha"].map(lambda a: "n/a" if not math.isfinite(a) else f"{a:g}")
  for label, col in (("policy reward", "policy_reward"), ("reference reward", "reference_reward"),
                     ("KL", "kl"), ("length", "length"),
                     ("reference length", "reference_length"), ("win rate", "win_rate"),
                     ("implicit-reward acc.", "implicit_reward_accuracy")):
    out[label] = [_pm(m, s, digits) for m, s in zip(table[col], table[f"{col}_se"])]
  out["notes"] = table["notes"]
  return out


def notes_table(runs: Sequence[Mapping]) -> pd.DataFrame:
  """Every note of every run, one row each (``run``, ``note``); ``"ok"`` for a complete run."""
  rows = []
  for run in runs:
    for note in run.get("notes") or ["ok"]:
      rows.append({"run": run["name"], "note": note})
  return pd.DataFrame(rows, columns=["run", "note"])


def curve_stages(runs: Sequence[Mapping]) -> list[str]:
  """The training stages the runs logged, in order of appearance (``eval`` left out)."""
  seen: list[str] = []
  for run in runs:
    for stage in run["metrics"]["stage"].drop_duplicates():
      if stage != "eval" and stage not in seen:
        seen.append(stage)
  return seen


def curve(run: Mapping, metric: str, stage: str) -> pd.Series:
  """One metric of one stage as a Series indexed by step (steps without it dropped)."""
  m = run["metrics"]
  if metric not in m.columns:
    return pd.Series(dtype=float, name=metric)
  rows = m[m["stage"] == stage]
  s = pd.to_numeric(rows[metric], errors="coerce")
  s.index = rows["step"].to_numpy()
  s.index.name = "step"
  return s.dropna().sort_index().rename(metric)


def metric_names(runs: Sequence[Mapping], stage: str, prefix: str) -> list[str]:
  """The metrics named ``prefix...`` that some run logged in ``stage``, sorted."""
  names: list[str] = []
  for run in runs:
    m = run["metrics"]
    rows = m[m["stage"] == stage]
    for c in rows.columns:
      if c.startswith(prefix) and c not in names and rows[c].notna().any():
        names.append(c)
  return sorted(names)


def nan0(v) -> float:
  """``num(v)``, with 0 for NaN (error bars that are unknown)."""
  x = num(v)
  return x if math.isfinite(x) else 0.0


def prior_table(runs: Sequence[Mapping]) -> pd.DataFrame:
  """The ``prior/*`` metrics per run and stage: the last logged value and the mean.

  Rows are indexed by ``(run, stage)``; columns ``(metric, "last" | "mean")``.
  Empty when no run logged a ``prior/*`` metric.
  """
  rows = {}
  for run in runs:
    for stage in curve_stages([run]):
      vals = {}
      for metric in metric_names([run], stage, "prior/"):
        s = curve(run, metric, stage)
        if len(s):
          vals[(metric, "last")] = float(s.iloc[-1])
          vals[(metric, "mean")] = float(s.mean())
      if vals:
        rows[(run["name"], stage)] = vals
  if not rows:
    return pd.DataFrame()
  frame = pd.DataFrame.from_dict(rows, orient="index")
  frame.index = pd.MultiIndex.from_tuples(frame.index, names=["run", "stage"])
  frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["metric", "stat"])
  return frame.sort_index(axis=1)


def samples_table(runs: Sequence[Mapping], n: int = 4) -> pd.DataFrame:
  """The first ``n`` rows of each run's ``eval_samples.jsonl``, policy and reference side by side.

  Columns: ``run``, ``prompt``, ``policy``, ``policy_reward``, ``reference``,
  ``reference_reward`` (NaN rewards when the task has no true reward).
  """
  cols = ["run", "prompt", "policy", "policy_reward", "reference", "reference_reward"]
  rows = []
  for run in runs:
    for s in (run.get("samples") or [])[:n]:
      rows.append({"run": run["name"], "prompt": s.get("prompt"), "policy": s.get("policy"),
                   "policy_reward": num(s.get("policy_reward")),
                   "reference": s.get("reference"),
                   "reference_reward": num(s.get("reference_reward"))})
  return pd.DataFrame(rows, columns=cols)


def checkpoint_table(runs: Sequence[Mapping]) -> pd.DataFrame:
  """Checkpoint steps per run and directory, with where the reference came from.

  One row per run; a column per checkpoint directory (``sft``, ``checkpoints``,
  ``checkpoints/round<r>``) listing its steps, ``"none"`` where absent; and
  ``reference``: ``sft/`` of this workdir, or the ``sft.checkpoint`` /
  ``model.hf_path`` the config names.
  """
  dirs: list[str] = ["sft", "checkpoints"]
  for run in runs:
    dirs += [d for d in run.get("checkpoints", {}) if d not in dirs]
  rows = []
  for run in runs:
    ck = run.get("checkpoints") or {}
    row = {"run": run["name"]}
    for d in dirs:
      row[d] = ", ".join(map(str, ck[d])) if ck.get(d) else "none"
    cfg = run.get("config") or {}
    given = get(cfg, "sft", "checkpoint", default="")
    hf = get(cfg, "model", "hf_path", default="")
    if given:
      row["reference"] = f"sft.checkpoint: {given}"
    elif hf:
      row["reference"] = f"model.hf_path: {hf}"
    elif ck.get("sft"):
      row["reference"] = "sft/ of this workdir"
    else:
      row["reference"] = "unknown (no sft/ checkpoint and no config)"
    rows.append(row)
  return pd.DataFrame(rows, columns=["run", *dirs, "reference"]).set_index("run")
