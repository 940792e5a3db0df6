"""The sweep driver (``python -m midpo.sweep``) and its statistics.

On ``configs/sweeps/tiny.py`` (2 seeds, DPO at two alphas and SimPO): a
sweep killed mid-way and resumed with two workers writes the same
``results.csv``, byte for byte, as an uninterrupted one with one worker; the
SFT reference, the pairs and the datasets are made once per seed.
"""

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from midpo import sweep as sweep_driver
from midpo.analysis import sweep as sweep_lib
from tests import train_utils as tu

TINY = str(tu.ROOT / "configs" / "sweeps" / "tiny.py")


def _sweep(workdir, *extra, wait=True):
  cmd = [sys.executable, "-m", "midpo.sweep", f"--config={TINY}", f"--workdir={workdir}", *extra]
  log = open(os.path.join(workdir, f"log{len(os.listdir(workdir))}.txt"), "w+")
  proc = subprocess.Popen(cmd, cwd=tu.ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
  proc.log = log
  if not wait:
    return proc
  proc.wait(timeout=900)
  log.seek(0)
  out = log.read()
  assert proc.returncode == 0, out[-4000:]
  return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sweep_a")
  out = _sweep(workdir)
  return workdir, out


def test_sweep_writes_one_row_per_run_model_and_step(uninterrupted):
  workdir, out = uninterrupted
  frame = pd.read_csv(workdir / "results.csv")
  # 2 seeds x (3 runs x steps 4 and 8 + the reference at step 0).
  assert len(frame) == 2 * (3 * 2 + 1)
  runs = frame[frame.algorithm != "reference"]
  assert sorted(set(zip(runs.algorithm, runs.alpha))) == [("dpo", 0.1), ("dpo", 0.3),
                                                            ("simpo", 2.0)]
  assert sorted(runs.step.unique()) == [4, 8]
  assert frame[frame.algorithm == "reference"].step.tolist() == [0, 0]
  for col in ("reward", "kl", "kl_se", "length", "reward_per_token", "win_rate",
              "implicit_reward_accuracy", "heldout_loss", "train_loss", "win_rate_vs"):
    assert runs[col].notna().all(), col
  # The mutual-information estimate at the last step (eval.mutual_information='final').
  assert runs[runs.step == 8].mutual_information.notna().all()
  assert runs[runs.step == 4].mutual_information.isna().all()
  assert frame[frame.algorithm == "reference"].mutual_information.notna().all()
  # DPO at the comparison alpha against itself: every prompt a tie.
  assert (runs[(runs.algorithm == "dpo") & (runs.alpha == 0.1)].win_rate_vs == 0.5).all()
  assert runs[runs.algorithm == "simpo"]["prior.gamma"].eq(0.5).all()
  info = json.load(open(workdir / "sweep.json"))
  assert info["complete"] and info["num_runs"] == 6
  assert info["commit"] and info["machine"]["cpu_count"] and info["versions"]["jax"]
  assert len(info["seconds"]["runs"]) == 6 and len(info["seconds"]["shared"]) == 2
  summary = pd.read_csv(workdir / "summary.csv")
  final = summary[(summary.algorithm == "dpo") & (summary.alpha == 0.1) & (summary.step == 8)]
  assert final.n_seeds.tolist() == [2]
  rewards = runs[(runs.algorithm == "dpo") & (runs.alpha == 0.1) & (runs.step == 8)].reward
  assert final.reward.iloc[0] == pytest.approx(rewards.mean())
  assert final.reward_se.iloc[0] == pytest.approx(rewards.std(ddof=1) / math.sqrt(2))
  assert "mean +- standard error over seeds" in out


def test_reference_pairs_and_data_are_built_once_per_seed(uninterrupted):
  workdir, _ = uninterrupted
  info = json.load(open(workdir / "sweep.json"))
  assert info["built"] == {"sft": 2, "pairs": 2}
  for seed in (0, 1):
    root = workdir / "shared" / "sentiment" / f"seed_{seed}"
    made = json.load(open(root / "shared.json"))
    # No run built a dataset of its own: the shared ones are all there is.
    assert sweep_driver.dataset_dirs(str(root)) == made["datasets"]
    assert len(made["datasets"]) == 2  # the task's own splits and the sampled pairs
  for run in glob.glob(str(workdir / "runs" / "*" / "*" / "*" / "*")):
    assert not {"sft", "pairs", "tfds"} & set(os.listdir(run)), run
    config = json.load(open(os.path.join(run, "config.json")))
    seed_root = workdir / "shared" / "sentiment" / f"seed_{config['seed']}"
    assert config["sft"]["checkpoint"] == str(seed_root / "sft")
    assert config["pairs_file"] == str(seed_root / "pairs" / "reference_samples.jsonl")


def test_killed_sweep_resumed_with_two_workers_gives_the_same_results(uninterrupted,
                                                                       tmp_path):
  workdir, _ = uninterrupted
  proc = _sweep(tmp_path, wait=False)
  deadline = time.time() + 600
  # Kill it (SIGKILL: nothing saved on the way out) once the first run is done.
  while not glob.glob(str(tmp_path / "runs" / "*" / "*" / "*" / "*" / "done.json")):
    assert proc.poll() is None, open(proc.log.name).read()[-4000:]
    assert time.time() < deadline
    time.sleep(0.2)
  time.sleep(1.0)  # into the next run
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = glob.glob(str(tmp_path / "runs" / "*" / "*" / "*" / "*" / "done.json"))
  assert 1 <= len(done) < 6
  _sweep(tmp_path, "--workers=2")
  assert (tmp_path / "results.csv").read_bytes() == (workdir / "results.csv").read_bytes()
  assert (tmp_path / "summary.csv").read_bytes() == (workdir / "summary.csv").read_bytes()
  info = json.load(open(tmp_path / "sweep.json"))
  assert info["complete"] and len(info["seconds"]["sessions"]) == 1  # the killed one wrote none


def test_sweep_config_errors_name_the_problem(tmp_path):
  sweep = sweep_driver.load_config_file(TINY)
  sweep.compare_to = "ipo"
  with pytest.raises(sweep_driver.SweepError, match="compare_to 'ipo' is not one of"):
    sweep_driver.Plan(sweep, TINY, str(tmp_path))
  sweep = sweep_driver.load_config_file(TINY)
  sweep.overrides.train.stpes = 3
  with pytest.raises(sweep_driver.SweepError, match=r"sweep.overrides.train: unknown config "
                                                    r"key 'stpes'"):
    sweep_driver.Plan(sweep, TINY, str(tmp_path))
  sweep = sweep_driver.load_config_file(TINY)
  sweep.algorithms.dpo.overrides = {"sft": {"steps": 3}}
  with pytest.raises(sweep_driver.SweepError, match="algorithm 'dpo' sets 'sft' differently"):
    sweep_driver.Plan(sweep, TINY, str(tmp_path))
  sweep = sweep_driver.load_config_file(TINY)
  sweep.algorithms.dpo.alphas = (0.1, 0.10000000001)
  with pytest.raises(sweep_driver.SweepError, match="'dpo' lists an alpha twice"):
    sweep_driver.Plan(sweep, TINY, str(tmp_path))
  sweep = sweep_driver.load_config_file(TINY)
  sweep.overrides.eval.every = 0
  with pytest.raises(sweep_driver.SweepError, match="eval.every is 0; a sweep evaluates"):
    sweep_driver.Plan(sweep, TINY, str(tmp_path))


def test_resuming_with_another_config_or_a_run_in_use_is_refused(tmp_path):
  import fcntl

  plan = sweep_driver.Plan(sweep_driver.load_config_file(TINY), TINY, str(tmp_path))
  run = plan.runs[0]
  os.makedirs(run["workdir"])
  with open(os.path.join(run["workdir"], "config.json"), "w") as f:
    f.write(run["config"].to_json_best_effort(indent=1, sort_keys=True))  # as the trainer does
  sweep_driver.check_same_config(run["config"], os.path.join(run["workdir"], "config.json"),
                                 "run")  # the same config: fine
  changed = sweep_driver.load_config_file(TINY)
  changed.overrides.train.steps = 9
  other = sweep_driver.Plan(changed, TINY, str(tmp_path)).runs[0]
  with pytest.raises(sweep_driver.SweepError, match=r"made with another config \(train.steps: "
                                                    r"8 -> 9\)"):
    sweep_driver.run_one(other["config"], other["workdir"], str(tmp_path / "cache"))
  with open(os.path.join(run["workdir"], "run.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process runs it
    with pytest.raises(sweep_driver.SweepError, match="is being run by another process"):
      sweep_driver.run_one(run["config"], run["workdir"], str(tmp_path / "cache"))


def test_a_link_is_one_more_axis_of_the_sweep(tmp_path):
  """``links`` crosses every algorithm with every link (names or loss
  overrides), labelled ``<algorithm>+<link>``, with its own workdir; a link
  an algorithm's prior does not define stops the plan before any work."""
  sweep = sweep_driver.load_config_file(TINY)
  sweep.links = {"sigmoid": {}, "ipo": {"link": "ipo"},
                 "mpo": {"link": "sigmoid,bco_pair,sft", "loss_weights": (0.8, 0.2, 1.0)}}
  sweep.algorithms = {"dpo": sweep.algorithms.dpo}
  sweep.compare_to = "dpo+sigmoid"
  plan = sweep_driver.Plan(sweep, TINY, str(tmp_path))
  labels = sorted({r["algorithm"] for r in plan.runs})
  assert labels == ["dpo+ipo", "dpo+mpo", "dpo+sigmoid"]
  assert len(plan.runs) == 3 * 2 * 2  # links x alphas x seeds
  by_label = {r["algorithm"]: r for r in plan.runs if r["seed"] == 0 and r["alpha"] == 0.1}
  assert by_label["dpo+ipo"]["config"].loss.link == "ipo"
  assert tuple(by_label["dpo+mpo"]["config"].loss.loss_weights) == (0.8, 0.2, 1.0)
  assert by_label["dpo+sigmoid"]["config"].loss.link == "sigmoid"
  assert len({r["workdir"] for r in plan.runs}) == len(plan.runs)
  assert plan.axes()["algorithms"]["dpo+mpo"]["prior"] == "dpo"
  # A tuple of names is the short form; SimPO's split margin refuses a per-side link.
  sweep = sweep_driver.load_config_file(TINY)
  sweep.links = ("sigmoid", "bco_pair")
  sweep.compare_to = "dpo+sigmoid"
  sweep.algorithms = {"dpo": {"config": "dpo.py", "alphas": (0.1,)},
                      "simpo": {"config": "simpo.py", "alphas": (2.0,)}}
  with pytest.raises(sweep_driver.SweepError,
                     match=r"algorithm 'simpo\+bco_pair': the bco_pair link reads each "
                           r"response's reward .* prior 'simpo' splits"):
    sweep_driver.Plan(sweep, TINY, str(tmp_path))


# -- statistics (no training) ---------------------------------------------------------


def _frame(points):
  """Rows ``(algorithm, seed, alpha, step, kl, reward)`` plus references."""
  rows = [{"task": "t", "algorithm": a, "model": "policy", "alpha": al, "seed": s, "step": st,
           "kl": kl, "reward": r} for a, s, al, st, kl, r in points]
  rows += [{"task": "t", "algorithm": "reference", "model": "reference", "alpha": math.nan,
            "seed": s, "step": 0, "kl": 0.0, "reward": 0.0} for s in (0, 1, 2)]
  return pd.DataFrame.from_records(rows)


def test_pareto_keeps_the_points_nothing_beats():
  kl = np.array([0.0, 1.0, 2.0, 1.5, 3.0])
  reward = np.array([0.0, 2.0, 1.0, 3.0, 3.0])
  x, y = sweep_lib.pareto(kl, reward)
  np.testing.assert_array_equal(x, [0.0, 1.0, 1.5])
  np.testing.assert_array_equal(y, [0.0, 2.0, 3.0])


def test_reward_at_kl_interpolates_each_seed_and_pairs_against_the_comparison():
  # DPO's frontier: reward = kl (seed 0), 2 kl (seed 1), 3 kl (seed 2) up to KL 2;
  # the other algorithm: 1 more than DPO at every KL of its points, up to KL 1 only.
  points = []
  for s in (0, 1, 2):
    points += [("dpo", s, 0.1, 10, k, (s + 1) * k) for k in (0.5, 1.0, 2.0)]
    points += [("other", s, 0.1, 10, k, (s + 1) * k + 1.0) for k in (0.5, 1.0)]
  table = sweep_lib.reward_at_kl(_frame(points), [0.75, 1.5], against="dpo", n_boot=200)
  dpo = table[table.algorithm == "dpo"].set_index("kl")
  values = np.array([0.75, 1.5, 2.25])
  assert dpo.loc[0.75, "reward"] == pytest.approx(values.mean())
  assert dpo.loc[0.75, "n_seeds"] == 3
  # The t-interval over 3 seeds: mean -+ t(0.975, 2) * SE.
  half = 4.303 * values.std(ddof=1) / math.sqrt(3)
  assert dpo.loc[0.75, "reward_ci_low"] == pytest.approx(values.mean() - half, rel=1e-4)
  assert dpo.loc[0.75, "reward_ci_high"] == pytest.approx(values.mean() + half, rel=1e-4)
  # The bootstrap interval of 3 seeds lies within their range.
  assert 0.75 <= dpo.loc[0.75, "reward_boot_low"] <= dpo.loc[0.75, "reward_boot_high"] <= 2.25
  assert dpo.loc[0.75, "reward_minus_dpo"] == 0.0
  other = table[table.algorithm == "other"].set_index("kl")
  assert other.loc[0.75, "reward_minus_dpo"] == pytest.approx(1.0)
  assert other.loc[0.75, "diff_ci_low"] == pytest.approx(1.0)  # the same in every seed
  # KL 1.5 is beyond 'other''s last point (KL 1): its best reward within that budget.
  np.testing.assert_allclose(other.loc[1.5, "reward"], np.mean([2.0, 3.0, 4.0]))
  assert other.loc[1.5, "reward_minus_dpo"] == pytest.approx(np.mean([2.0, 3.0, 4.0]) -
                                                             np.mean([1.5, 3.0, 4.5]))


def test_reward_at_mutual_information_uses_the_reference_at_its_own_estimate():
  # The MI axis: the reference (reward 10) sits at its own estimate (4.0), not
  # at 0 as on the KL axis; points without an estimate are left out.
  rows = []
  for s in (0, 1, 2):
    rows += [{"task": "t", "algorithm": "mi", "model": "policy", "alpha": 0.1, "seed": s,
              "step": st, "kl": 1.0, "reward": r, "mutual_information": m}
             for st, r, m in ((5, 99.0, math.nan), (10, 2.0 + s, 3.0), (10, 4.0 + s, 5.0))]
    rows.append({"task": "t", "algorithm": "reference", "model": "reference",
                 "alpha": math.nan, "seed": s, "step": 0, "kl": 0.0, "reward": 10.0,
                 "mutual_information": 4.0})
  table = sweep_lib.reward_at_kl(pd.DataFrame.from_records(rows), [2.0, 3.0, 3.5, 6.0],
                                 against="mi", x="mutual_information", n_boot=50)
  got = table.set_index("mutual_information").reward
  assert math.isnan(got[2.0])  # below the frontier's first point (3.0)
  assert got[3.0] == pytest.approx(3.0)  # the points at 3.0: rewards 2, 3, 4
  # Halfway to the reference at (4.0, 10): ((2 + s) + 10) / 2 on average.
  assert got[3.5] == pytest.approx(np.mean([(2.0 + s + 10.0) / 2 for s in (0, 1, 2)]))
  assert got[6.0] == pytest.approx(10.0)  # nothing beats the reference within 6 nats


def test_t_interval_matches_the_t_quantiles():
  m, se, lo, hi, n = sweep_lib.t_interval(np.array([1.0, 2.0, 4.0, np.nan]))
  assert n == 3 and m == pytest.approx(7 / 3)
  assert hi - m == pytest.approx(4.303 * se) and m - lo == pytest.approx(4.303 * se)
  assert math.isnan(sweep_lib.t_interval(np.array([1.0]))[2])


def test_paired_differences_are_per_seed_then_averaged():
  points = [("dpo", s, 0.1, 10, 1.0, float(s)) for s in (0, 1, 2)]
  points += [("other", s, 0.3, 10, 1.0, float(s) + d) for s, d in ((0, 1.0), (1, 2.0),
                                                                   (2, 3.0))]
  diffs = sweep_lib.paired_differences(_frame(points), against="dpo", against_alpha=0.1,
                                       metrics=("reward",))
  other = diffs[diffs.algorithm == "other"].iloc[0]
  assert other.reward_diff == pytest.approx(2.0)
  assert other.reward_diff_se == pytest.approx(1.0 / math.sqrt(3))
  assert other.n_seeds == 3


def test_sweep_notebook_plots_every_figure_with_data(uninterrupted, tmp_path, monkeypatch):
  from midpo.analysis import sweep_plots
  from midpo.analysis.plots import figure_notes

  workdir, _ = uninterrupted
  monkeypatch.setenv("MIDPO_SWEEP", str(workdir))
  code = tu.execute_notebook(tu.ROOT / "notebooks" / "sweep.ipynb", tmp_path)
  images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
  assert len(images) == 4  # reward-KL, reward-MI, length-KL, paths
  # The figures themselves: every panel has the runs' points, the means and the references.
  frame = pd.read_csv(workdir / "results.csv")
  for x, y in (("kl", "reward"), ("mutual_information", "reward"), ("kl", "length")):
    fig = sweep_plots.plot_frontier(frame.dropna(subset=[x]), x=x, y=y)
    (ax,) = [a for a in fig.axes if a.get_visible()]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["reference (2 seeds)", "dpo (n=2 seeds)", "simpo (n=2 seeds)"], labels
    points = sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets"))
    assert points >= 2 + 6, (x, y, points)  # the references and the runs' points
    assert not figure_notes(fig)


def test_sweep_report_writes_figures_and_tables_from_results(uninterrupted, tmp_path):
  from midpo.analysis import sweep_report

  workdir, _ = uninterrupted
  written = sweep_report.write_report(str(workdir), str(tmp_path), kl_targets=(0.01,))
  assert {"frontier_kl.png", "frontier_mi.png", "length_kl.png", "paths.png",
          "tables.md"} <= set(written)
  tables = (tmp_path / "tables.md").read_text()
  frame = pd.read_csv(workdir / "results.csv")
  final = frame[(frame.algorithm == "dpo") & (frame.alpha == 0.1) & (frame.step == 8)]
  mean, se = final.reward.mean(), final.reward.std(ddof=1) / math.sqrt(len(final))
  assert f"| sentiment | dpo | 0.1 | 8 | {mean:.2f} ± {se:.2f} |" in tables
  for section in ("## Paired differences against dpo at the same alpha",
                  "## Reward at matched MI estimate", "## The paper's inequality"):
    assert section in tables


def test_significance_marks_follow_the_t_interval():
  from midpo.analysis import sweep_report

  assert sweep_lib.t_quantile(3) == pytest.approx(4.303)
  assert sweep_lib.t_quantile(100) == 1.96
  assert sweep_report.pm_significance(0.44, 0.1, 3) == "0.44 ± 0.10*"  # 0.44 > 4.303 * 0.1
  assert sweep_report.pm_significance(0.43, 0.1, 3) == "0.43 ± 0.10"
  assert sweep_report.pm_significance(-0.21, 0.1, 30) == "-0.21 ± 0.10*"  # t(29) = 2.045
  assert sweep_report.pm_significance(0.5, math.nan, 1) == "0.50"
