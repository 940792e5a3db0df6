"""Figures of a sweep's ``results.csv`` (``midpo.analysis.sweep``): frontiers
over alphas with their spread over training seeds.

Every figure has one panel per task. Per algorithm (and per baseline model
trained inside a run, under its own name), the mean over seeds at each alpha
of the last evaluated step, with standard-error bars in both directions,
connected across alpha in increasing order; every (run, step) point behind it
as a faint scatter; the seeds' references as grey squares. What a figure
leaves out (a metric no run has, a model with fewer seeds) is a footnote.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from midpo.analysis import sweep as sweep_lib
from midpo.analysis.plots import footnote, grid

LABELS = {"kl": "KL(policy || reference), nats", "reward": "true reward r*",
          "mutual_information": "mutual-information estimate, nats",
          "length": "response length, tokens"}


def series_name(algorithm: str, model: str) -> str:
  """The legend name of an algorithm's policy, or of a baseline in its runs."""
  return algorithm if model in ("policy", "reference") else f"{model} (in {algorithm} runs)"


def plot_frontier(frame: pd.DataFrame, x: str = "kl", y: str = "reward",
                  tasks: Optional[Sequence[str]] = None) -> Figure:
  """``y`` against ``x`` per task: mean +- standard error over seeds at each
  alpha (last step), connected across alpha; every (run, step) as a scatter.

  Raises:
    KeyError: ``frame`` has no column ``x`` or ``y``.
  """
  for col in (x, y):
    if col not in frame.columns:
      raise KeyError(f"results have no column {col!r}")
  tasks = list(tasks or dict.fromkeys(frame.task))
  fig, axes = grid(len(tasks), ncols=2, size=(6.0, 4.2))
  notes = []
  summary = sweep_lib.final_rows(sweep_lib.seed_summary(frame, (x, y)))
  colors = {}
  for ax, task in zip(axes, tasks):
    rows = frame[(frame.task == task)]
    ref = rows[rows.algorithm == "reference"].dropna(subset=[x, y])
    if len(ref):
      ax.scatter(ref[x], ref[y], marker="s", color="grey", s=25, zorder=3,
                 label=f"reference ({len(ref)} seeds)")
    runs = rows[rows.algorithm != "reference"]
    for (algo, model), pts in runs.groupby(["algorithm", "model"], sort=False):
      name = series_name(algo, model)
      color = colors.setdefault(name, f"C{len(colors) % 10}")
      ok = pts.dropna(subset=[x, y])
      if ok.empty:
        notes.append(f"{task}: {name} has no {x} and {y} values")
        continue
      ax.scatter(ok[x], ok[y], color=color, s=8, alpha=0.25, linewidths=0)
      s = summary[(summary.task == task) & (summary.algorithm == algo) &
                  (summary.model == model)].sort_values("alpha").dropna(subset=[x, y])
      if s.empty:
        continue
      ax.errorbar(s[x], s[y], xerr=s[f"{x}_se"].fillna(0), yerr=s[f"{y}_se"].fillna(0),
                  color=color, marker="o", ms=4, capsize=2, lw=1.2,
                  label=f"{name} (n={int(s.n_seeds.min())} seeds)")
      for r in s.itertuples():
        ax.annotate(f"{r.alpha:g}", (getattr(r, x), getattr(r, y)), fontsize=7, color=color,
                    xytext=(3, 3), textcoords="offset points")
      if s.n_seeds.min() < 2:
        notes.append(f"{task}: {name} has fewer than 2 seeds at some alpha (no spread)")
    ax.set_title(f"{task}: mean +- SE over seeds at the last step (labels: alpha)",
                 fontsize=9)
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    ax.legend(fontsize=7)
  footnote(fig, notes)
  return fig


def plot_paths(frame: pd.DataFrame, x: str = "kl", y: str = "reward",
               tasks: Optional[Sequence[str]] = None) -> Figure:
  """Each (algorithm, alpha)'s path along training: the mean over seeds at
  each evaluated step, from the reference (step 0) on, one line per alpha."""
  tasks = list(tasks or dict.fromkeys(frame.task))
  fig, axes = grid(len(tasks), ncols=2, size=(6.0, 4.2))
  summary = sweep_lib.seed_summary(frame, (x, y))
  colors = {}
  for ax, task in zip(axes, tasks):
    ref = summary[(summary.task == task) & (summary.algorithm == "reference")]
    start = (float(ref[x].mean()), float(ref[y].mean())) if len(ref) else None
    s = summary[(summary.task == task) & (summary.algorithm != "reference")]
    for (algo, model, alpha), path in s.groupby(["algorithm", "model", "alpha"], sort=False):
      name = series_name(algo, model)
      color = colors.setdefault(name, f"C{len(colors) % 10}")
      path = path.sort_values("step")
      xs, ys = path[x].to_numpy(), path[y].to_numpy()
      if start is not None and not any(math.isnan(v) for v in start):
        xs, ys = np.r_[start[0], xs], np.r_[start[1], ys]
      ax.plot(xs, ys, color=color, marker=".", lw=1, alpha=0.8,
              label=name if name not in [t.get_label() for t in ax.lines] else None)
      ax.annotate(f"{alpha:g}", (xs[-1], ys[-1]), fontsize=7, color=color, xytext=(3, 0),
                  textcoords="offset points")
    if start is not None:
      ax.scatter([start[0]], [start[1]], marker="s", color="grey", zorder=3, label="reference")
    ax.set_title(f"{task}: along training (mean over seeds; labels: alpha)", fontsize=9)
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    ax.legend(fontsize=7)
  return fig
