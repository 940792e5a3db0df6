"""Figures of midpo runs (``matplotlib.figure.Figure``, no ``pyplot``: any backend, no global state)."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from matplotlib.figure import Figure

from midpo.analysis.tables import curve, metric_names, nan0, num, run_label

# The learning curves plotted by default, besides every ``kl/*`` metric a stage logs.
DEFAULT_CURVES = ("loss", "rewards/margins", "rewards/accuracies")
# The learned priors' own stages: the 'mi' prior's rounds, and the held-out
# diagnostics (plus every ``heldout/loss/*``: the learned and the fixed priors).
PRIOR_STAGE_CURVES = {
    "prior/mle": ("nll_per_token", "nll_per_token_fit", "kl_policy_prior"),
    "prior/diagnostics": ("collapse/gap_vs_reference",),
}


def footnote(fig: Figure, notes: Sequence[str]) -> None:
  """Writes ``notes`` (what a figure leaves out) under ``fig``."""
  if notes:
    fig.text(0.01, 0.0, "\n".join(f"note: {n}" for n in notes), ha="left", va="top",
             fontsize=8, color="dimgray", wrap=True)


def figure_notes(fig: Figure) -> list[str]:
  """The footnotes a plotting function wrote under ``fig`` (what it left out)."""
  out = []
  for t in fig.texts:
    out += [line[len("note: "):] for line in t.get_text().split("\n") if line.startswith("note: ")]
  return out


def grid(n: int, ncols: int = 3, size: tuple[float, float] = (4.2, 3.0)):
  """A figure with ``n`` axes in rows of ``ncols`` (each ``size`` inches): ``(fig, axes)``."""
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
    wanted = metric_names(runs, stage, "heldout/loss/") + list(PRIOR_STAGE_CURVES[stage])
    present = [m for m in wanted if any(len(curve(r, m, stage)) for r in runs)]
  elif metrics is None:
    wanted = list(DEFAULT_CURVES) + metric_names(runs, stage, "kl/")
    present = [m for m in wanted if any(len(curve(r, m, stage)) for r in runs)]
  else:
    present = [m for m in metrics if any(len(curve(r, m, stage)) for r in runs)]
    missing = [m for m in metrics if m not in present]
    if missing:
      notes.append(f"not logged at stage {stage!r} by any run: {', '.join(missing)}")
  absent = [r["name"] for r in runs if not (r["metrics"]["stage"] == stage).any()]
  if absent:
    notes.append(f"no {stage!r} rows in: {', '.join(absent)}")
  fig, axes = grid(max(1, len(present)))
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
  footnote(fig, notes)
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
    x, y = num(pol.get("kl")), num(pol.get("reward"))
    if not (math.isfinite(x) and math.isfinite(y)):
      notes.append(f"{run['name']}: eval.json has no finite reward and KL")
      continue
    color = f"C{i % 10}"
    ax.errorbar([x], [y], xerr=[nan0(pol.get("kl_se"))], yerr=[nan0(pol.get("reward_se"))],
                fmt="o", color=color, capsize=3, label=run_label(run))
    plotted += 1
    ry, rse = num(ref.get("reward")), nan0(ref.get("reward_se"))
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
  footnote(fig, notes)
  return fig


def plot_prior_stats(runs: Sequence[Mapping], stage: str) -> Optional[Figure]:
  """Curves of every ``prior/*`` metric of ``stage`` (None when there are none)."""
  names = metric_names(runs, stage, "prior/")
  if not names:
    return None
  fig = plot_curves(runs, stage, names)
  fig.suptitle(f"prior statistics, stage: {stage}")
  without = [r["name"] for r in runs
             if (r["metrics"]["stage"] == stage).any() and not metric_names([r], stage, "prior/")]
  if without:
    footnote(fig, [f"no prior/* metrics in: {', '.join(without)}"])
  return fig
