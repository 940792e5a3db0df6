"""A sweep's results: one tidy table, and statistics over training seeds.

``collect`` reads the runs' ``eval/<model>/step_<n>.json`` files (written by
the eval stage with ``eval.every``) into one row per run, model and evaluated
step. A result is a distribution over training seeds, so the statistics here
are across seeds (the ``_se`` columns of a single row are only the
evaluation's noise for that one trained model):

* ``seed_summary``: mean, standard error and count over seeds per (task,
  algorithm, model, alpha, step);
* ``paired_differences``: each run minus the comparison run (DPO by default)
  of the same task, seed and step, then mean and standard error over seeds;
* ``pareto``/``reward_at_kl``: each seed's reward-vs-KL frontier (the
  reference at KL 0 and every evaluated point of every alpha), interpolated
  at given KLs (the best reward within that KL budget), or the same on the
  mutual-information estimate's axis (``x="mutual_information"``); mean over seeds with
  a t-interval over seeds (and a bootstrap one), and the paired difference
  against the comparison algorithm the same way.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd

KEYS = ["task", "algorithm", "model", "prior", "alpha", "seed", "step"]
# Columns summarised over seeds by default.
SUMMARY_METRICS = ("reward", "kl", "mutual_information", "length", "reward_per_token",
                   "win_rate",
                   "implicit_reward_accuracy", "heldout_loss", "train_loss", "win_rate_vs")


def _win(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """Mean and standard error of ``a > b`` (ties one half), prompt by prompt."""
  w = (a > b) + 0.5 * (a == b)
  return float(w.mean()), float(w.std(ddof=1) / math.sqrt(w.size)) if w.size > 1 else math.nan


def _accuracy(d, prefix: str) -> dict:
  if not isinstance(d, dict) or "value" not in d:
    return {f"{prefix}implicit_reward_accuracy": math.nan,
            f"{prefix}implicit_reward_accuracy_se": math.nan, f"{prefix}loss": math.nan}
  return {f"{prefix}implicit_reward_accuracy": d["value"],
          f"{prefix}implicit_reward_accuracy_se": d["se"], f"{prefix}loss": d["loss"]}


def step_rows(workdir: str) -> list[tuple[dict, dict]]:
  """``(row, per-prompt values)`` of each ``eval/<model>/step_<n>.json`` of a
  run, models then steps in order."""
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, "eval", "*", "step_*.json"))):
    with open(path) as f:
      d = json.load(f)
    s = dict(d["summary"])
    row = {"model": d["model"], "step": int(d["step"])}
    for k in ("reward", "kl", "length", "reward_per_token", "win_rate"):
      row[k] = s.get(k, math.nan)
      row[f"{k}_se"] = s.get(f"{k}_se", math.nan)
    row["finished_fraction"] = s.get("finished_fraction", math.nan)
    mi = s.get("mutual_information")
    ok = isinstance(mi, dict) and "value" in mi
    row["mutual_information"] = mi["value"] if ok else math.nan
    row["mutual_information_se"] = mi["se"] if ok else math.nan
    acc = _accuracy(s.get("implicit_reward_accuracy"), "")
    row["implicit_reward_accuracy"] = acc["implicit_reward_accuracy"]
    row["implicit_reward_accuracy_se"] = acc["implicit_reward_accuracy_se"]
    row["heldout_loss"] = acc["loss"]
    train = _accuracy(s.get("train_implicit_reward_accuracy"), "train_")
    row["train_loss"] = train["train_loss"]
    row["train_implicit_reward_accuracy"] = train["train_implicit_reward_accuracy"]
    out.append((row, {k: np.asarray(v, np.float64) for k, v in d["per_prompt"].items()}))
  return out


def collect(runs: Sequence[dict], *, references: Sequence[dict] = (), compare_to: str,
            compare_alpha: float) -> pd.DataFrame:
  """One row per run, model and evaluated step (``KEYS`` first), with the
  reference of each (task, seed) as model ``reference`` at step 0.

  ``runs``: dicts with ``task``, ``algorithm``, ``alpha``, ``seed`` and
  ``workdir``; ``references``: dicts with ``task``, ``seed`` and the
  ``workdir`` whose ``eval/reference`` evaluated that seed's reference (else
  the first run of the seed's). ``win_rate_vs`` (and its ``_se``): how often the row's sample
  beats the ``compare_to`` run's (at ``compare_alpha``, same task, seed and
  step) on the same prompt under the true reward, ties one half.
  """
  rows, rewards = [], {}
  seen_reference = set()
  for ref in references:
    for row, per_prompt in step_rows(ref["workdir"]):
      if row["model"] == "reference" and (ref["task"], ref["seed"]) not in seen_reference:
        seen_reference.add((ref["task"], int(ref["seed"])))
        rows.append({"task": ref["task"], "algorithm": "reference", "model": "reference",
                     "prior": "", "alpha": math.nan, "seed": int(ref["seed"]), "step": 0,
                     **{k: v for k, v in row.items() if k not in ("model", "step")}})
  for run in runs:
    with open(os.path.join(run["workdir"], "config.json")) as f:
      config = json.load(f)
    prior = dict(config["prior"])
    hyper = {f"prior.{k}": v for k, v in sorted(prior.items()) if k != "name" and v is not None}
    for row, per_prompt in step_rows(run["workdir"]):
      is_ref = row["model"] == "reference"
      key = (run["task"], int(run["seed"]))
      if is_ref and key in seen_reference:
        continue
      if is_ref:
        seen_reference.add(key)
      model = ("reference" if is_ref else "policy" if row["model"] == prior["name"]
               else row["model"])
      full = {"task": run["task"], "algorithm": "reference" if is_ref else run["algorithm"],
              "model": model, "prior": "" if is_ref else row["model"],
              "alpha": math.nan if is_ref else float(run["alpha"]), "seed": int(run["seed"]),
              "step": row["step"]}
      full.update({k: v for k, v in row.items() if k not in ("model", "step")})
      if not is_ref and model == "policy":
        full.update(hyper)
      rows.append(full)
      if "reward" in per_prompt:
        rewards[(full["task"], full["algorithm"], full["model"], full["alpha"], full["seed"],
                 full["step"])] = per_prompt["reward"]
  # The references first, then the runs in the given order.
  rows = ([r for r in rows if r["algorithm"] == "reference"] +
          [r for r in rows if r["algorithm"] != "reference"])
  frame = pd.DataFrame.from_records(rows)
  if frame.empty:
    return frame
  wins, ses = [], []
  for r in frame.itertuples(index=False):
    mine = rewards.get((r.task, r.algorithm, r.model, r.alpha, r.seed, r.step))
    theirs = rewards.get((r.task, compare_to, "policy", float(compare_alpha), r.seed, r.step))
    if r.algorithm == "reference" or mine is None or theirs is None:
      wins.append(math.nan)
      ses.append(math.nan)
    else:
      w, se = _win(mine, theirs)
      wins.append(w)
      ses.append(se)
  frame["win_rate_vs"] = wins
  frame["win_rate_vs_se"] = ses
  frame["compare_to"] = f"{compare_to}@{compare_alpha:g}"
  hyper_cols = sorted(c for c in frame.columns if c.startswith("prior."))
  rest = [c for c in frame.columns if c not in KEYS and c not in hyper_cols]
  return frame[KEYS + hyper_cols + rest]


def write_csv(frame: pd.DataFrame, path: str) -> None:
  """``frame`` to ``path`` atomically (full float precision)."""
  tmp = f"{path}.tmp{os.getpid()}"
  frame.to_csv(tmp, index=False)
  os.replace(tmp, path)


def _group_keys(frame: pd.DataFrame) -> list[str]:
  return [k for k in ("task", "algorithm", "model", "alpha", "step") if k in frame.columns]


def seed_summary(frame: pd.DataFrame,
                 metrics: Iterable[str] = SUMMARY_METRICS) -> pd.DataFrame:
  """Mean, standard error (``_se``, ddof 1) and number of seeds (``n_seeds``)
  of each metric per (task, algorithm, model, alpha, step)."""
  if frame.empty:
    return frame
  metrics = [m for m in metrics if m in frame.columns]
  keys = _group_keys(frame)
  g = frame.groupby(keys, dropna=False, sort=False)
  out = g[metrics].mean()
  se = g[metrics].std(ddof=1) / np.sqrt(g[metrics].count())
  out = out.join(se.add_suffix("_se"))
  out["n_seeds"] = g["seed"].nunique()
  return out.reset_index()


def paired_differences(frame: pd.DataFrame, *, against: str, against_alpha: Optional[float],
                       metrics: Iterable[str] = ("reward", "kl", "length")) -> pd.DataFrame:
  """Per (task, algorithm, model, alpha, step): the mean over seeds of the
  row's metric minus the ``against`` policy's (at ``against_alpha``; None:
  at the row's own alpha, rows without that alpha dropped) of the same task,
  seed and step, with its standard error and ``n_seeds``."""
  metrics = [m for m in metrics if m in frame.columns]
  base = frame[(frame.algorithm == against) & (frame.model == "policy")]
  keys = ["task", "seed", "step"]
  if against_alpha is None:
    keys.append("alpha")
  else:
    base = base[np.isclose(base.alpha, against_alpha)]
  base = base[[*keys, *metrics]].rename(columns={m: f"_{m}" for m in metrics})
  merged = frame[frame.algorithm != "reference"].merge(base, on=keys)
  for m in metrics:
    merged[f"{m}_diff"] = merged[m] - merged[f"_{m}"]
  return seed_summary(merged, [f"{m}_diff" for m in metrics])


def pareto(kl: np.ndarray, reward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The points of ``(kl, reward)`` no other point beats with a lower or equal
  KL and a higher reward, by increasing KL."""
  order = np.lexsort((-np.asarray(reward), np.asarray(kl)))
  xs, ys, best = [], [], -np.inf
  for i in order:
    if reward[i] > best:
      xs.append(float(kl[i]))
      ys.append(float(reward[i]))
      best = reward[i]
  return np.array(xs), np.array(ys)


def _frontier_at(points: pd.DataFrame, reference: Optional[tuple[float, float]], targets,
                 x: str = "kl") -> np.ndarray:
  points = points.dropna(subset=[x, "reward"])
  cost, reward = points[x].to_numpy(), points["reward"].to_numpy()
  if reference is not None and not any(math.isnan(v) for v in reference):
    cost, reward = np.append(cost, reference[0]), np.append(reward, reference[1])
  if cost.size == 0:
    return np.full(len(targets), np.nan)
  xs, ys = pareto(cost, reward)
  out = np.interp(targets, xs, ys)  # flat beyond the last point: the best within the budget
  out[np.asarray(targets) < xs[0]] = np.nan
  return out


# Two-sided 95% quantiles of Student's t by degrees of freedom (1.96 beyond 30).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(n: int) -> float:
  """The two-sided 95% quantile of Student's t for the mean of ``n`` values
  (``n - 1`` degrees of freedom; 1.96 beyond 31 values)."""
  if n < 2:
    raise ValueError(f"a t-interval needs 2 or more values; got {n}")
  return _T975[n - 2] if n - 1 <= len(_T975) else 1.96


def t_interval(values: np.ndarray) -> tuple[float, float, float, float, int]:
  """Mean, standard error and 95% t-interval over ``values`` (NaNs dropped):
  ``(mean, se, low, high, n)``; NaN interval for fewer than 2 values."""
  values = np.asarray(values, np.float64)
  values = values[~np.isnan(values)]
  n = int(values.size)
  if n == 0:
    return math.nan, math.nan, math.nan, math.nan, 0
  mean = float(values.mean())
  if n < 2:
    return mean, math.nan, math.nan, math.nan, n
  se = float(values.std(ddof=1) / math.sqrt(n))
  t = t_quantile(n)
  return mean, se, mean - t * se, mean + t * se, n


def _bootstrap(values: np.ndarray, n_boot: int, rng: np.random.Generator):
  """A 95% percentile interval of the mean from resampled seeds (with 3 seeds
  it is the range of the seeds: about a 75% interval, hence the t-interval)."""
  values = values[~np.isnan(values)]
  if values.size == 0:
    return math.nan, math.nan
  idx = rng.integers(0, values.size, size=(n_boot, values.size))
  lo, hi = np.percentile(values[idx].mean(axis=1), [2.5, 97.5])
  return float(lo), float(hi)


def reward_at_kl(frame: pd.DataFrame, targets: Sequence[float], *, against: str,
                 n_boot: int = 2000, seed: int = 0, x: str = "kl") -> pd.DataFrame:
  """The true reward of each seed's frontier at each value of ``targets`` of
  the cost ``x`` (``"kl"``, or ``"mutual_information"``: the MI estimate).

  Per (task, algorithm, model, seed) the frontier is the Pareto set of the
  reference (at KL 0, or at its own MI estimate) and every evaluated
  (cost, reward) point of every alpha and step where the cost was measured,
  linearly interpolated, NaN below its first point and flat beyond its last:
  the best reward reached within that budget. Returns (column ``x``: the
  target) per target the mean over
  seeds with its standard error and 95% t-interval (``reward_ci_low/high``)
  and bootstrap percentile interval over seeds (``reward_boot_low/high``),
  and the same for the paired difference against algorithm ``against``'s
  policy at the same seed (``reward_minus_<against>``, ``diff_*``).
  """
  rng = np.random.default_rng(seed)
  ref_rows = frame[frame.algorithm == "reference"]
  refs = {(t, s): (0.0 if x == "kl" else float(r[x]), float(r["reward"]))
          for t, s, r in zip(ref_rows.task, ref_rows.seed, ref_rows.to_dict("records"))}
  curves = {}
  for (task, algo, model, s), pts in frame[frame.algorithm != "reference"].groupby(
      ["task", "algorithm", "model", "seed"], sort=False):
    curves[(task, algo, model, s)] = _frontier_at(pts, refs.get((task, s)), targets, x)
  rows = []
  for task, algo, model in dict.fromkeys(k[:3] for k in curves):
    seeds = [k[3] for k in curves if k[:3] == (task, algo, model)]
    mine = np.stack([curves[(task, algo, model, s)] for s in seeds])
    theirs = np.stack([curves.get((task, against, "policy", s), np.full(len(targets), np.nan))
                       for s in seeds])
    for j, k in enumerate(targets):
      m, se, lo, hi, n = t_interval(mine[:, j])
      blo, bhi = _bootstrap(mine[:, j], n_boot, rng)
      d, dse, dlo, dhi, dn = t_interval(mine[:, j] - theirs[:, j])
      dblo, dbhi = _bootstrap(mine[:, j] - theirs[:, j], n_boot, rng)
      rows.append({"task": task, "algorithm": algo, "model": model, x: float(k),
                   "reward": m, "reward_se": se, "reward_ci_low": lo, "reward_ci_high": hi,
                   "reward_boot_low": blo, "reward_boot_high": bhi, "n_seeds": n,
                   f"reward_minus_{against}": d, "diff_se": dse, "diff_ci_low": dlo,
                   "diff_ci_high": dhi, "diff_boot_low": dblo, "diff_boot_high": dbhi,
                   "n_paired_seeds": dn})
  return pd.DataFrame.from_records(rows)


def final_rows(summary: pd.DataFrame) -> pd.DataFrame:
  """The last evaluated step of each (task, algorithm, model, alpha)."""
  keys = [k for k in ("task", "algorithm", "model", "alpha") if k in summary.columns]
  last = summary.groupby(keys, dropna=False, sort=False)["step"].transform("max")
  return summary[summary.step == last].reset_index(drop=True)


def format_final(summary: pd.DataFrame) -> str:
  """The last step's mean +- standard error over seeds, as fixed-width text."""
  final = final_rows(summary)
  cols = [c for c in ("reward", "kl", "length", "win_rate_vs") if c in final.columns]
  head = f"{'task':<12}{'algorithm':<14}{'model':<9}{'alpha':>7}{'step':>6}" + "".join(
      f"{c:>20}" for c in cols) + f"{'seeds':>7}"
  lines = [head, "-" * len(head)]
  for r in final.to_dict("records"):
    cells = "".join(f"{r[c]:>11.3f} +- {r[c + '_se']:<5.3f}" if not math.isnan(r[c]) else
                    f"{'-':>20}" for c in cols)
    alpha = f"{r['alpha']:>7g}" if not math.isnan(r["alpha"]) else f"{'-':>7}"
    lines.append(f"{r['task']:<12}{r['algorithm']:<14}{r['model']:<9}{alpha}{r['step']:>6}"
                 f"{cells}{r['n_seeds']:>7}")
  return "\n".join(lines)
