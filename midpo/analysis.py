"""Loading and plotting the results of midpo runs (used by ``notebooks/inspect_runs.ipynb``).

A run's workdir holds ``metrics.jsonl`` (one row per logged step and stage),
``eval.json`` and ``eval_samples.jsonl`` (the evaluation), ``config.json`` and
orbax checkpoints under ``sft/`` and ``checkpoints/``. Everything here is a
pure function of those files:

* ``load_run(workdir)`` / ``load_runs(workdirs)`` read one or several runs into
  plain dicts; whatever is missing or unreadable becomes an entry of the run's
  ``notes`` (never a silent gap).
* ``summary_table(runs)`` compares the evaluations (NaN where a run has none,
  with the reason in its ``notes`` column); ``format_summary`` writes
  ``mean ± se`` strings for display.
* ``curve``, ``curve_stages``, ``plot_curves``: learning curves per stage.
* ``plot_reward_vs_kl``: the true reward against KL(policy || reference), one
  point per run and the references at KL 0, with standard errors.
* ``prior_table``, ``plot_prior_stats``: the ``prior/*`` metrics.
* ``samples_table``: sampled responses of the policy and the reference.
* ``checkpoint_steps``, ``checkpoint_table``: checkpoint steps found on disk.

Figures are ``matplotlib.figure.Figure`` objects built without ``pyplot``, so
the module works under any backend (Agg included) and keeps no global figure
state. Whatever a figure leaves out is written under it as a footnote.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import pandas as pd
from matplotlib.figure import Figure

NO_EVAL_NOTE = "no eval.json: evaluation columns are NaN (the run has not finished its 'eval' stage)"
NO_METRICS_NOTE = "no metrics.jsonl: no learning curves"
NO_CONFIG_NOTE = "no config.json: prior and alpha unknown"
NO_SAMPLES_NOTE = "no eval_samples.jsonl: no sampled responses"

# The learning curves plotted by default, besides every ``kl/*`` metric a stage logs.
DEFAULT_CURVES = ("loss", "rewards/margins", "rewards/accuracies")
# The learned priors' own stages: the 'mi' prior's rounds, and the held-out
# diagnostics (plus every ``heldout/loss/*``: the learned and the fixed priors).
PRIOR_STAGE_CURVES = {
    "prior/mle": ("nll_per_token", "nll_per_token_fit", "kl_policy_prior"),
    "prior/diagnostics": ("collapse/gap_vs_reference",),
}

SUMMARY_COLUMNS = (
    "prior", "alpha", "policy_reward", "policy_reward_se", "reference_reward",
    "reference_reward_se", "kl", "kl_se", "length", "length_se", "reference_length",
    "reference_length_se", "win_rate", "win_rate_se", "implicit_reward_accuracy",
    "implicit_reward_accuracy_se", "num_prompts", "notes")


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------


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


def _get(d, *keys, default=float("nan")):
  for k in keys:
    if not isinstance(d, Mapping) or k not in d:
      return default
    d = d[k]
  return d


def _num(v) -> float:
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
      "alpha": _num(_get(cfg, "loss", "alpha")),
      "policy_reward": _num(pol.get("reward")),
      "policy_reward_se": _num(pol.get("reward_se")),
      "reference_reward": _num(ref.get("reward")),
      "reference_reward_se": _num(ref.get("reward_se")),
      "kl": _num(pol.get("kl")),
      "kl_se": _num(pol.get("kl_se")),
      "length": _num(pol.get("length")),
      "length_se": _num(pol.get("length_se")),
      "reference_length": _num(ref.get("length")),
      "reference_length_se": _num(ref.get("length_se")),
      "win_rate": _num(pol.get("win_rate")),
      "win_rate_se": _num(pol.get("win_rate_se")),
      "implicit_reward_accuracy": _num(ira.get("value")),
      "implicit_reward_accuracy_se": _num(ira.get("se")),
      "num_prompts": _num(ev.get("num_prompts")),
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


def _metric_names(runs: Sequence[Mapping], stage: str, prefix: str) -> list[str]:
  names: list[str] = []
  for run in runs:
    m = run["metrics"]
    rows = m[m["stage"] == stage]
    for c in rows.columns:
      if c.startswith(prefix) and c not in names and rows[c].notna().any():
        names.append(c)
  return sorted(names)


def _footnote(fig: Figure, notes: Sequence[str]) -> None:
  if notes:
    fig.text(0.01, 0.0, "\n".join(f"note: {n}" for n in notes), ha="left", va="top",
             fontsize=8, color="dimgray", wrap=True)


def figure_notes(fig: Figure) -> list[str]:
  """The footnotes a plotting function wrote under ``fig`` (what it left out)."""
  out = []
  for t in fig.texts:
    out += [line[len("note: "):] for line in t.get_text().split("\n") if line.startswith("note: ")]
  return out


def _grid(n: int, ncols: int = 3, size: tuple[float, float] = (4.2, 3.0)):
  ncols = max(1, min(ncols, n))
  nrows = max(1, -(-n // ncols))
  fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax in axes[n:]:
    ax.set_visible(False)
  return fig, axes[:n]


def plot_curves(runs: Sequence[Mapping], stage: str,
                metrics: Optional[Sequence[str]] = None) -> Figure:
  """Learning curves of ``stage``: a panel per metric, a line per run.

  ``metrics`` defaults to ``DEFAULT_CURVES`` plus every ``kl/*`` metric the
  stage logged (for the learned priors' stages, ``PRIOR_STAGE_CURVES`` plus
  every ``heldout/loss/*``), keeping those that some run logged at this stage;
  metrics asked for by name but logged by no run, and runs without this stage,
  are named in the figure's footnote.
  """
  notes = []
  if metrics is None and stage in PRIOR_STAGE_CURVES:
    wanted = _metric_names(runs, stage, "heldout/loss/") + list(PRIOR_STAGE_CURVES[stage])
    present = [m for m in wanted if any(len(curve(r, m, stage)) for r in runs)]
  elif metrics is None:
    wanted = list(DEFAULT_CURVES) + _metric_names(runs, stage, "kl/")
    present = [m for m in wanted if any(len(curve(r, m, stage)) for r in runs)]
  else:
    present = [m for m in metrics if any(len(curve(r, m, stage)) for r in runs)]
    missing = [m for m in metrics if m not in present]
    if missing:
      notes.append(f"not logged at stage {stage!r} by any run: {', '.join(missing)}")
  absent = [r["name"] for r in runs if not (r["metrics"]["stage"] == stage).any()]
  if absent:
    notes.append(f"no {stage!r} rows in: {', '.join(absent)}")
  fig, axes = _grid(max(1, len(present)))
  if not present:
    axes[0].set_axis_off()
    axes[0].text(0.5, 0.5, f"nothing to plot for stage {stage!r}", ha="center", va="center")
  for ax, metric in zip(axes, present):
    for run in runs:
      s = curve(run, metric, stage)
      if len(s):
        ax.plot(s.index, s.to_numpy(), marker="." if len(s) < 50 else None,
                label=run_label(run))
    ax.set_title(metric)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  if present:
    axes[0].legend(fontsize=8)
  fig.suptitle(f"stage: {stage}")
  _footnote(fig, notes)
  return fig


def plot_reward_vs_kl(runs: Sequence[Mapping]) -> Figure:
  """True reward against KL(policy || reference): one point per run, references at KL 0.

  Error bars are the evaluation's standard errors over prompts. Runs without
  ``eval.json`` or without a true reward are named in the footnote.
  """
  fig = Figure(figsize=(6.5, 4.5), layout="constrained")
  ax = fig.subplots()
  notes = []
  refs_drawn: list[tuple[float, float]] = []
  plotted = 0
  for i, run in enumerate(runs):
    ev = run.get("eval")
    if ev is None:
      notes.append(f"{run['name']}: no eval.json")
      continue
    pol, ref = ev.get("policy") or {}, ev.get("reference") or {}
    x, y = _num(pol.get("kl")), _num(pol.get("reward"))
    if not (math.isfinite(x) and math.isfinite(y)):
      notes.append(f"{run['name']}: eval.json has no finite reward and KL")
      continue
    color = f"C{i % 10}"
    ax.errorbar([x], [y], xerr=[_nan0(pol.get("kl_se"))], yerr=[_nan0(pol.get("reward_se"))],
                fmt="o", color=color, capsize=3, label=run_label(run))
    plotted += 1
    ry, rse = _num(ref.get("reward")), _nan0(ref.get("reward_se"))
    if math.isfinite(ry) and (ry, rse) not in refs_drawn:
      ax.errorbar([0.0], [ry], yerr=[rse], fmt="s", mfc="none", color="gray", capsize=3,
                  label="reference" if not refs_drawn else None)
      refs_drawn.append((ry, rse))
  if plotted:
    ax.axvline(0.0, color="gray", lw=0.5, ls=":")
    ax.legend(fontsize=8)
  else:
    ax.text(0.5, 0.5, "no run has an evaluation with reward and KL", ha="center", va="center",
            transform=ax.transAxes)
  ax.set_xlabel("KL(policy || reference), nats per response")
  ax.set_ylabel("true reward r*")
  ax.set_title("reward vs KL (mean ± se over prompts)")
  ax.grid(alpha=0.3)
  _footnote(fig, notes)
  return fig


def _nan0(v) -> float:
  x = _num(v)
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
      for metric in _metric_names([run], stage, "prior/"):
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


def plot_prior_stats(runs: Sequence[Mapping], stage: str) -> Optional[Figure]:
  """Curves of every ``prior/*`` metric of ``stage`` (None when there are none)."""
  names = _metric_names(runs, stage, "prior/")
  if not names:
    return None
  fig = plot_curves(runs, stage, names)
  fig.suptitle(f"prior statistics, stage: {stage}")
  without = [r["name"] for r in runs
             if (r["metrics"]["stage"] == stage).any() and not _metric_names([r], stage, "prior/")]
  if without:
    _footnote(fig, [f"no prior/* metrics in: {', '.join(without)}"])
  return fig


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
                   "policy_reward": _num(s.get("policy_reward")),
                   "reference": s.get("reference"),
                   "reference_reward": _num(s.get("reference_reward"))})
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
    given = _get(cfg, "sft", "checkpoint", default="")
    hf = _get(cfg, "model", "hf_path", default="")
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


__all__ = [
    "DEFAULT_CURVES", "NO_CONFIG_NOTE", "NO_EVAL_NOTE", "NO_METRICS_NOTE", "NO_SAMPLES_NOTE",
    "SUMMARY_COLUMNS", "checkpoint_steps", "checkpoint_table", "curve", "curve_stages",
    "figure_notes", "format_summary", "load_run", "load_runs", "notes_table",
    "plot_curves", "plot_prior_stats", "plot_reward_vs_kl", "prior_label", "prior_table",
    "read_metrics", "run_label", "samples_table", "summary_table",
]
