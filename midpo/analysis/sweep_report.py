r"""A sweep's report: its figures (PNG) and tables (Markdown), for the README.

    python -m midpo.analysis.sweep_report --sweep=workdirs/sweep_quick \
        --out=docs/results/quick

Writes to ``--out``: ``results.csv``, ``summary.csv`` and ``sweep.json`` (copied),
``frontier_kl.png``, ``frontier_mi.png`` (when the mutual information was
estimated), ``length_kl.png``, ``paths.png`` and ``tables.md``: the last
step's mean +- standard error over seeds, the paired differences against the
comparison algorithm, the reward at matched KL with bootstrap intervals, and
the paper's inequality (each policy's final loss under its own prior).
Every number is a function of ``results.csv``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Optional, Sequence

import pandas as pd

from midpo.analysis import sweep as sweep_lib
from midpo.analysis import sweep_plots
from midpo import files


def _pm(mean: float, se: float, digits: int = 2) -> str:
  if mean is None or (isinstance(mean, float) and math.isnan(mean)):
    return "-"
  if se is None or (isinstance(se, float) and math.isnan(se)):
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {se:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A GitHub Markdown table."""
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(out)


def final_table(results: pd.DataFrame, against: str) -> str:
  """The last step of each (task, algorithm, alpha): mean ± SE over seeds."""
  final = sweep_lib.final_rows(sweep_lib.seed_summary(results))
  rows = []
  for r in final.to_dict("records"):
    alpha = "-" if math.isnan(r["alpha"]) else f"{r['alpha']:g}"
    name = sweep_plots.series_name(r["algorithm"], r["model"])
    rows.append([r["task"], name, alpha, r["step"], _pm(r["reward"], r["reward_se"]),
                 _pm(r["kl"], r["kl_se"]),
                 _pm(r.get("mutual_information"), r.get("mutual_information_se")),
                 _pm(r["length"], r["length_se"], 1),
                 _pm(r.get("win_rate_vs"), r.get("win_rate_vs_se"), 3),
                 _pm(r.get("implicit_reward_accuracy"), r.get("implicit_reward_accuracy_se"),
                     3), int(r["n_seeds"])])
  return markdown_table(["task", "algorithm", "alpha", "step", "true reward", "KL to ref.",
                         "MI estimate", "length", f"wins vs {against}", "implicit acc.",
                         "seeds"], rows)


def pm_significance(mean: float, se: float, n: int, digits: int = 2) -> str:
  """``mean ± se``, with ``*`` where the 95% t-interval over the ``n`` seeds
  (``mean ± t(0.975, n-1) se``) excludes 0."""
  text = _pm(mean, se, digits)
  if text == "-" or se is None or math.isnan(se) or n < 2 or se == 0:
    return text
  return text + ("*" if abs(mean) > sweep_lib.t_quantile(n) * se else "")


def difference_table(results: pd.DataFrame, against: str,
                     against_alpha: Optional[float]) -> str:
  """Each algorithm and alpha minus the comparison run, same seed, last step
  (``against_alpha`` None: the comparison at the same alpha)."""
  diffs = sweep_lib.final_rows(sweep_lib.paired_differences(
      results, against=against, against_alpha=against_alpha,
      metrics=("reward", "kl", "mutual_information", "length")))
  rows = []
  for r in diffs.to_dict("records"):
    if r["model"] != "policy" or (against_alpha is None and r["algorithm"] == against):
      continue
    n = int(r["n_seeds"])
    rows.append([r["task"], r["algorithm"], f"{r['alpha']:g}",
                 pm_significance(r["reward_diff"], r["reward_diff_se"], n),
                 pm_significance(r["kl_diff"], r["kl_diff_se"], n),
                 pm_significance(r.get("mutual_information_diff"), r.get("mutual_information_diff_se"), n),
                 pm_significance(r["length_diff"], r["length_diff_se"], n, 1), n])
  return markdown_table(["task", "algorithm", "alpha", "Δ reward", "Δ KL", "Δ MI estimate",
                         "Δ length", "seeds"], rows) + (
      "\n\nMean ± standard error over seeds of the per-seed difference; * where its 95% "
      "t-interval over seeds excludes 0 (with 3 seeds: |mean| > 4.30 SE).")


def mi_targets(results: pd.DataFrame, task: str) -> list[float]:
  """Three MI-estimate values at which to compare ``task``'s frontiers: the
  quartiles of its policies' estimates, rounded to 0.1 nats."""
  mi = results[(results.task == task) & (results.model == "policy")].mutual_information.dropna()
  return sorted({round(float(v), 1) for v in mi.quantile([0.25, 0.5, 0.75])}) if len(mi) else []


def _ci(value: float, low: float, high: float, sign: str) -> str:
  """``value [low, high]``; the value alone where one seed gives no interval."""
  if math.isnan(value):
    return "-"
  if math.isnan(low):
    return f"{value:{sign}.2f} (one seed)"
  return f"{value:{sign}.2f} [{low:{sign}.2f}, {high:{sign}.2f}]"


def matched_table(results: pd.DataFrame, against: str, targets, x: str = "kl") -> str:
  """Reward at matched KL (or MI estimate, ``x``), with 95% t-intervals over
  seeds. ``targets``: the values, or a function of the task giving them."""
  policies = results[results.model.isin(["policy", "reference"])]
  tables = []
  for task in dict.fromkeys(policies.task):
    at = targets(task) if callable(targets) else targets
    if len(at):
      tables.append(sweep_lib.reward_at_kl(policies[policies.task == task], at,
                                           against=against, x=x))
  table = pd.concat(tables) if tables else pd.DataFrame()
  rows = [[r["task"], r["algorithm"], f"{r[x]:g}",
           _ci(r["reward"], r["reward_ci_low"], r["reward_ci_high"], ""),
           _ci(r[f"reward_minus_{against}"], r["diff_ci_low"], r["diff_ci_high"], "+"),
           f"{r['n_seeds']}/{r['n_paired_seeds']}"]
          for r in table.to_dict("records")]
  return markdown_table(["task", "algorithm", "KL" if x == "kl" else "MI estimate",
                         "reward [95% CI]",
                         f"minus {against} [95% CI]", "seeds (all/paired)"], rows)


def inequality_table(results: pd.DataFrame) -> str:
  """Each algorithm's final MI-DPO loss under its own prior (training and held-out pairs)."""
  own = results[results.model == "policy"]
  final = sweep_lib.final_rows(sweep_lib.seed_summary(own, ("train_loss", "heldout_loss")))
  rows = [[r["task"], r["algorithm"], f"{r['alpha']:g}", _pm(r["train_loss"], r["train_loss_se"],
                                                            3),
           _pm(r["heldout_loss"], r["heldout_loss_se"], 3), int(r["n_seeds"])]
          for r in final.to_dict("records")]
  return markdown_table(["task", "algorithm", "alpha", "training loss (own prior)",
                         "held-out loss (own prior)", "seeds"], rows)


def write_report(sweep_dir: str, out: str, kl_targets: Sequence[float] = (2.0, 4.0, 6.0)) -> list:
  """Writes the report of ``sweep_dir`` to ``out``; returns the files written."""
  os.makedirs(out, exist_ok=True)
  for name in ("results.csv", "summary.csv", "sweep.json"):
    shutil.copyfile(os.path.join(sweep_dir, name), os.path.join(out, name))
  results = pd.read_csv(os.path.join(sweep_dir, "results.csv"))
  with open(os.path.join(sweep_dir, "sweep.json")) as f:
    info = json.load(f)
  against, against_alpha = info["axes"]["compare_to"], info["axes"]["compare_alpha"]
  written = ["results.csv", "summary.csv", "sweep.json"]
  figures = {"frontier_kl.png": sweep_plots.plot_frontier(results, "kl", "reward"),
             "length_kl.png": sweep_plots.plot_frontier(results, "kl", "length"),
             "paths.png": sweep_plots.plot_paths(results, "kl", "reward")}
  if "mutual_information" in results and results.mutual_information.notna().any():
    figures["frontier_mi.png"] = sweep_plots.plot_frontier(
        results.dropna(subset=["mutual_information"]), "mutual_information", "reward")
  for name, fig in figures.items():
    with files.atomic_path(os.path.join(out, name)) as tmp:
      fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png")
    written.append(name)
  m = info["machine"]
  parts = [
      f"# Sweep `{info['name']}`\n",
      f"Commit `{info['commit']}`; {m['cpu']} ({m['cpu_count']} cores, {m['device_kind']}), "
      f"{m['system']}; "
      f"jax {info['versions']['jax']}, Python {info['versions']['python']}. "
      f"Seeds {info['axes']['seeds']}; complete: {info.get('complete')}. "
      "Every mean is over training seeds, ± its standard error over seeds.\n",
      "## The last step\n", final_table(results, against), "",
      f"## Paired differences against {against} (alpha {against_alpha:g}), same seed and step\n",
      difference_table(results, against, against_alpha), "",
      f"## Paired differences against {against} at the same alpha, same seed and step\n",
      difference_table(results, against, None), "",
      "## Reward at matched KL (each seed's frontier interpolated; 95% t-interval over seeds)\n",
      matched_table(results, against, kl_targets), "",
      "## Reward at matched MI estimate (the same, on the mutual-information axis; the "
      "reference at its own estimate; at each task's quartiles of the policies' estimates)\n",
      matched_table(results, against, lambda task: mi_targets(results, task),
                    "mutual_information"), "",
      "## The paper's inequality: final loss under each policy's own prior\n",
      inequality_table(results), ""]
  files.write_text(os.path.join(out, "tables.md"), "\n".join(parts))
  written.append("tables.md")
  return written


def main(argv=None) -> None:
  """``--sweep`` (a sweep's workdir) and ``--out`` (the report's directory)."""
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sweep", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--kl", type=float, nargs="*", default=[2.0, 4.0, 6.0],
                      help="KL values (nats) at which to read the frontiers")
  args = parser.parse_args(argv)
  for name in write_report(args.sweep, args.out, args.kl):
    print(os.path.join(args.out, name))


if __name__ == "__main__":
  main()
