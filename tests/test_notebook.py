"""``midpo.analysis`` on synthetic workdirs, and ``notebooks/inspect_runs.ipynb`` end to end.

The unit tests write small workdirs by hand (the files a run writes, with
known values) and check what the analysis functions read back. The notebook
test makes two tiny runs (DPO and SimPO, in parallel), executes the notebook on
them with nbclient and checks its outputs.
"""

import json
import math
import os

import matplotlib
import numpy as np
import pytest

from midpo import analysis
from tests import train_utils as tu

matplotlib.use("Agg")

NOTEBOOK = tu.ROOT / "notebooks" / "inspect_runs.ipynb"

EVAL = {
    "num_prompts": 16,
    "prior": "simpo",
    "policy": {"reward": 0.75, "reward_se": 0.25, "kl": 1.5, "kl_se": 0.125, "length": 9.5,
               "length_se": 0.5, "win_rate": 0.625, "win_rate_se": 0.0625,
               "finished_fraction": 0.5},
    "reference": {"reward": -0.5, "reward_se": 0.375, "kl": 0.0, "kl_se": 0.0, "length": 11.0,
                  "length_se": 0.75, "finished_fraction": 0.25},
    "implicit_reward_accuracy": {"value": 0.6875, "se": 0.12, "num_pairs": 16},
}


def _config(prior="simpo", alpha=2.0, **prior_args):
  return {"loss": {"alpha": alpha}, "prior": {"name": prior, "gamma": None, **prior_args},
          "sft": {"checkpoint": ""}, "model": {"hf_path": ""}}


def _write_run(workdir, *, eval_json=EVAL, config=None, sft_steps=5, pref_steps=7,
               extra_lines=(), samples=3, checkpoints=None):
  """A workdir as ``midpo.main`` leaves it; returns the metrics rows written."""
  os.makedirs(workdir, exist_ok=True)
  rows = []
  for s in range(1, sft_steps + 1):
    rows.append({"stage": "sft", "step": s, "loss": 5.0 - 0.25 * s, "grad_norm": 1.0})
  for s in range(1, pref_steps + 1):
    rows.append({"stage": "preference", "step": s, "loss": 0.7 - 0.01 * s,
                 "rewards/margins": 0.1 * s, "rewards/accuracies": 0.5,
                 "kl/chosen": 0.01 * s, "prior/log_zeta_chosen": -40.0 + s,
                 "prior/log_zeta_rejected": -50.0 + 2 * s})
  if eval_json is not None:
    rows.append({"stage": "eval", "step": 0, "policy/reward": eval_json["policy"]["reward"]})
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
    for line in extra_lines:
      f.write(line + "\n")
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config or _config(gamma=0.5), f)
  if eval_json is not None:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(eval_json, f)
    with open(os.path.join(workdir, "eval_samples.jsonl"), "w") as f:
      for i in range(samples):
        f.write(json.dumps({"prompt": f"prompt {i}", "policy": f"policy says {i}",
                            "reference": f"reference says {i}", "policy_reward": float(i),
                            "reference_reward": -float(i)}) + "\n")
  for d, steps in (checkpoints or {"sft": [3, 5], "checkpoints": [4, 7]}).items():
    for s in steps:
      os.makedirs(os.path.join(workdir, d, str(s)), exist_ok=True)
  return rows


# ---------------------------------------------------------------------------
# Loading and tables.
# ---------------------------------------------------------------------------


def test_load_run_reads_every_file(tmp_path):
  rows = _write_run(tmp_path / "run")
  run = analysis.load_run(tmp_path / "run")
  assert run["name"] == "run" and run["notes"] == []
  assert run["eval"] == EVAL
  assert run["config"]["loss"]["alpha"] == 2.0
  assert len(run["metrics"]) == len(rows)
  assert list(run["metrics"]["stage"].unique()) == ["sft", "preference", "eval"]
  assert len(run["samples"]) == 3 and run["samples"][2]["policy"] == "policy says 2"
  assert run["checkpoints"] == {"sft": [3, 5], "checkpoints": [4, 7]}


def test_summary_table_numbers_are_eval_json_numbers(tmp_path):
  _write_run(tmp_path / "a")
  other = json.loads(json.dumps(EVAL))
  other["prior"] = "dpo"
  other["policy"]["reward"], other["policy"]["kl"] = -0.125, 0.25
  _write_run(tmp_path / "b", eval_json=other, config=_config("dpo", alpha=0.1))
  table = analysis.summary_table(analysis.load_runs([tmp_path / "a", tmp_path / "b"]))
  assert list(table.index) == ["a", "b"]
  assert tuple(table.columns) == analysis.SUMMARY_COLUMNS
  a = table.loc["a"]
  assert a["prior"] == "simpo(gamma=0.5)" and a["alpha"] == 2.0
  pol, ref, ira = EVAL["policy"], EVAL["reference"], EVAL["implicit_reward_accuracy"]
  expected = {
      "policy_reward": pol["reward"], "policy_reward_se": pol["reward_se"],
      "reference_reward": ref["reward"], "reference_reward_se": ref["reward_se"],
      "kl": pol["kl"], "kl_se": pol["kl_se"], "length": pol["length"],
      "length_se": pol["length_se"], "reference_length": ref["length"],
      "reference_length_se": ref["length_se"], "win_rate": pol["win_rate"],
      "win_rate_se": pol["win_rate_se"], "implicit_reward_accuracy": ira["value"],
      "implicit_reward_accuracy_se": ira["se"], "num_prompts": 16}
  for col, value in expected.items():
    assert a[col] == value, col
  b = table.loc["b"]
  assert b["prior"] == "dpo" and b["alpha"] == 0.1
  assert b["policy_reward"] == -0.125 and b["kl"] == 0.25
  shown = analysis.format_summary(table)
  assert shown.loc["a", "policy reward"] == "0.750 ± 0.250"
  assert shown.loc["a", "KL"] == "1.500 ± 0.125"
  assert shown.loc["b", "prior"] == "dpo"


def test_baselines_trained_in_a_run_are_rows_of_the_summary(tmp_path):
  ev = json.loads(json.dumps(EVAL))
  ev["prior"] = "mi"
  ev["baselines"] = {"dpo": {"reward": 0.5, "reward_se": 0.1, "kl": 0.75, "kl_se": 0.05,
                             "implicit_reward_accuracy": {"value": 0.625, "se": 0.125}}}
  _write_run(tmp_path / "joint", eval_json=ev, config=_config("mi", alpha=0.1))
  table = analysis.summary_table(analysis.load_runs([tmp_path / "joint"]))
  assert list(table.index) == ["joint", "joint / dpo"]
  b = table.loc["joint / dpo"]
  assert b["prior"] == "dpo (baseline)" and b["alpha"] == 0.1
  assert (b["policy_reward"], b["kl"], b["implicit_reward_accuracy"]) == (0.5, 0.75, 0.625)
  # The reference is the run's: the same row for both.
  assert b["reference_reward"] == table.loc["joint", "reference_reward"] == \
      EVAL["reference"]["reward"]
  assert np.isnan(b["win_rate"])  # not in this baseline's eval.json entry
  assert table.loc["joint", "policy_reward"] == EVAL["policy"]["reward"]


def test_missing_eval_json_gives_nan_row_and_note(tmp_path):
  _write_run(tmp_path / "done")
  _write_run(tmp_path / "unfinished", eval_json=None)
  runs = analysis.load_runs([tmp_path / "done", tmp_path / "unfinished"])
  assert runs[1]["eval"] is None
  assert runs[1]["notes"] == [analysis.NO_EVAL_NOTE]
  table = analysis.summary_table(runs)
  row = table.loc["unfinished"]
  numeric = [c for c in analysis.SUMMARY_COLUMNS if c not in ("prior", "notes", "alpha")]
  assert all(math.isnan(row[c]) for c in numeric)
  assert row["notes"] == analysis.NO_EVAL_NOTE
  assert row["prior"] == "simpo(gamma=0.5)" and row["alpha"] == 2.0   # from config.json
  assert table.loc["done", "notes"] == ""
  assert analysis.format_summary(table).loc["unfinished", "policy reward"] == "n/a"
  notes = analysis.notes_table(runs)
  assert notes.values.tolist() == [["done", "ok"], ["unfinished", analysis.NO_EVAL_NOTE]]
  fig = analysis.plot_reward_vs_kl(runs)
  assert analysis.figure_notes(fig) == ["unfinished: no eval.json"]


def test_missing_workdir_and_files_are_noted(tmp_path):
  run = analysis.load_run(tmp_path / "nowhere")
  assert run["notes"] == [f"workdir does not exist: {tmp_path / 'nowhere'}"]
  (tmp_path / "empty").mkdir()
  run = analysis.load_run(tmp_path / "empty")
  assert run["notes"] == [analysis.NO_CONFIG_NOTE, analysis.NO_METRICS_NOTE,
                          analysis.NO_EVAL_NOTE]
  assert run["metrics"].empty and run["checkpoints"] == {}
  table = analysis.summary_table([run])
  assert table.loc["empty", "prior"] == "?" and math.isnan(table.loc["empty", "alpha"])


def test_skipped_implicit_reward_accuracy_is_noted(tmp_path):
  ev = json.loads(json.dumps(EVAL))
  ev["implicit_reward_accuracy"] = {"skipped": "no test files (config.data.files.test_files)"}
  _write_run(tmp_path / "run", eval_json=ev)
  run = analysis.load_run(tmp_path / "run")
  assert run["notes"] == ["implicit-reward accuracy skipped: no test files "
                          "(config.data.files.test_files)"]
  table = analysis.summary_table([run])
  assert math.isnan(table.loc["run", "implicit_reward_accuracy"])
  assert table.loc["run", "policy_reward"] == 0.75


def test_metrics_nonfinite_truncated_and_repeated_rows(tmp_path):
  extra = [json.dumps({"stage": "preference", "step": 7, "loss": "nan",
                       "rewards/margins": "inf"}),   # step 7 again, after a resume
           '{"stage": "preference", "step": 8, "lo']  # killed mid-write
  _write_run(tmp_path / "run", eval_json=None, extra_lines=extra)
  run = analysis.load_run(tmp_path / "run")
  assert "metrics.jsonl: 1 unreadable line(s) skipped" in run["notes"]
  assert any(n.startswith("metrics.jsonl: 1 repeated (stage, step)") for n in run["notes"])
  loss = analysis.curve(run, "loss", "preference")
  margins = analysis.curve(run, "rewards/margins", "preference")
  assert list(loss.index) == [1, 2, 3, 4, 5, 6]          # the last step 7 has a NaN loss
  assert list(margins.index) == [1, 2, 3, 4, 5, 6, 7] and margins[7] == np.inf
  m = run["metrics"]
  assert len(m[m["stage"] == "preference"]) == 7


def test_curves_have_one_point_per_logged_step(tmp_path):
  _write_run(tmp_path / "a", sft_steps=5, pref_steps=7)
  _write_run(tmp_path / "b", sft_steps=3, pref_steps=4)
  runs = analysis.load_runs([tmp_path / "a", tmp_path / "b"])
  assert analysis.curve_stages(runs) == ["sft", "preference"]
  s = analysis.curve(runs[0], "loss", "sft")
  assert list(s.index) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose(s.to_numpy(), [4.75, 4.5, 4.25, 4.0, 3.75])
  assert analysis.curve(runs[0], "rewards/margins", "sft").empty
  assert analysis.curve(runs[0], "no/such/metric", "preference").empty

  fig = analysis.plot_curves(runs, "preference")
  titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
  assert titles == ["loss", "rewards/margins", "rewards/accuracies", "kl/chosen"]
  for ax in fig.axes[:4]:
    assert [len(line.get_xdata()) for line in ax.get_lines()] == [7, 4]
  np.testing.assert_allclose(fig.axes[1].get_lines()[0].get_ydata(), 0.1 * np.arange(1, 8))
  assert analysis.figure_notes(fig) == []

  fig = analysis.plot_curves(runs, "sft")
  assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["loss"]
  assert [len(line.get_xdata()) for line in fig.axes[0].get_lines()] == [5, 3]

  fig = analysis.plot_curves(runs, "preference", ["loss", "grad_norm/prior"])
  assert analysis.figure_notes(fig) == [
      "not logged at stage 'preference' by any run: grad_norm/prior"]


def test_stage_missing_in_one_run_is_noted(tmp_path):
  _write_run(tmp_path / "a")
  _write_run(tmp_path / "b", pref_steps=0, eval_json=None)
  fig = analysis.plot_curves(analysis.load_runs([tmp_path / "a", tmp_path / "b"]), "preference")
  assert analysis.figure_notes(fig) == ["no 'preference' rows in: b"]


def test_reward_vs_kl_points_and_error_bars(tmp_path):
  _write_run(tmp_path / "a")
  other = json.loads(json.dumps(EVAL))
  other["policy"].update(reward=0.25, reward_se=0.5, kl=3.0, kl_se=0.25)
  _write_run(tmp_path / "b", eval_json=other, config=_config("dpo", alpha=0.1))
  runs = analysis.load_runs([tmp_path / "a", tmp_path / "b"])
  fig = analysis.plot_reward_vs_kl(runs)
  ax = fig.axes[0]
  points = [(c.lines[0].get_xdata()[0], c.lines[0].get_ydata()[0]) for c in ax.containers]
  # Both runs, then one reference square (the two share one reference).
  assert sorted(points) == [(0.0, -0.5), (1.5, 0.75), (3.0, 0.25)]
  labels = ax.get_legend_handles_labels()[1]
  assert labels == ["a (simpo(gamma=0.5))", "reference", "b (dpo)"]
  bars = {lab: c for c, lab in zip(ax.containers, labels)}
  ybar = bars["b (dpo)"].lines[2][-1].get_segments()[0]
  np.testing.assert_allclose([ybar[0][1], ybar[1][1]], [0.25 - 0.5, 0.25 + 0.5])
  xbar = bars["b (dpo)"].lines[2][0].get_segments()[0]
  np.testing.assert_allclose([xbar[0][0], xbar[1][0]], [3.0 - 0.25, 3.0 + 0.25])
  assert analysis.figure_notes(fig) == []


def test_prior_table_and_plot(tmp_path):
  _write_run(tmp_path / "a", pref_steps=4)
  runs = analysis.load_runs([tmp_path / "a"])
  table = analysis.prior_table(runs)
  assert list(table.index) == [("a", "preference")]
  assert table.loc[("a", "preference"), ("prior/log_zeta_chosen", "last")] == -36.0
  assert table.loc[("a", "preference"), ("prior/log_zeta_chosen", "mean")] == -37.5
  assert table.loc[("a", "preference"), ("prior/log_zeta_rejected", "last")] == -42.0
  fig = analysis.plot_prior_stats(runs, "preference")
  assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == [
      "prior/log_zeta_chosen", "prior/log_zeta_rejected"]
  assert analysis.plot_prior_stats(runs, "sft") is None
  (tmp_path / "empty").mkdir()
  assert analysis.prior_table(analysis.load_runs([tmp_path / "empty"])).empty


def test_samples_and_checkpoints(tmp_path):
  _write_run(tmp_path / "a", samples=6,
             checkpoints={"sft": [12, 8], "checkpoints/round0": [5], "checkpoints/round1": [2, 10]})
  _write_run(tmp_path / "b", samples=2, checkpoints={"checkpoints": [10]},
             config=dict(_config("dpo"), sft={"checkpoint": "shared/sft"}))
  os.makedirs(tmp_path / "b" / "checkpoints" / "12.orbax-checkpoint-tmp-1")
  runs = analysis.load_runs([tmp_path / "a", tmp_path / "b"])
  samples = analysis.samples_table(runs, n=4)
  assert samples["run"].tolist() == ["a"] * 4 + ["b"] * 2
  assert samples.iloc[3][["prompt", "policy", "reference"]].tolist() == [
      "prompt 3", "policy says 3", "reference says 3"]
  assert samples["policy_reward"].tolist() == [0.0, 1.0, 2.0, 3.0, 0.0, 1.0]
  assert runs[0]["checkpoints"] == {"sft": [8, 12], "checkpoints/round0": [5],
                                    "checkpoints/round1": [2, 10]}
  assert runs[1]["checkpoints"] == {"checkpoints": [10]}
  assert runs[1]["notes"] == ["unfinished checkpoint write(s): "
                              "checkpoints/12.orbax-checkpoint-tmp-1"]
  table = analysis.checkpoint_table(runs)
  assert table.loc["a"].tolist() == ["8, 12", "none", "5", "2, 10", "sft/ of this workdir"]
  assert table.loc["b"].tolist() == ["none", "10", "none", "none",
                                     "sft.checkpoint: shared/sft"]


def test_run_names_are_unique(tmp_path):
  for d in ("x/run", "y/run", "z"):
    _write_run(tmp_path / d)
  names = [r["name"] for r in analysis.load_runs([tmp_path / "x/run", tmp_path / "y/run",
                                                  tmp_path / "z"])]
  assert names == ["x/run", "y/run", "z"]


def test_run_label_names_the_prior_unless_the_name_does(tmp_path):
  _write_run(tmp_path / "dpo", config=_config("dpo"))
  _write_run(tmp_path / "ablation", config=_config("simpo", gamma=1.0))
  runs = analysis.load_runs([tmp_path / "dpo", tmp_path / "ablation"])
  assert [analysis.run_label(r) for r in runs] == ["dpo", "ablation (simpo(gamma=1.0))"]


# ---------------------------------------------------------------------------
# The notebook, end to end on two tiny runs.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
  """The default run (the 'mi' prior with a DPO baseline) and a SimPO run, with
  the tiny overrides, made in parallel (one core each)."""
  root = tmp_path_factory.mktemp("notebook_runs")
  procs = {name: tu.run_main(f"configs/{name}.py", str(root / name),
                             tu.MI_TINY if name == "joint_prior" else {}, wait=False)
           for name in ("joint_prior", "simpo")}
  try:
    for name, proc in procs.items():
      out, _ = proc.communicate(timeout=600)
      assert proc.returncode == 0, f"{name} run failed:\n{out[-4000:]}"
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return [str(root / name) for name in procs]


def _outputs_text(cell) -> str:
  parts = []
  for out in cell.get("outputs", []):
    parts.append(out.get("text", ""))
    for mime in ("text/plain", "text/html"):
      parts.append(out.get("data", {}).get(mime, ""))
  return "\n".join(parts)


def test_notebook_runs_end_to_end(tiny_runs, tmp_path, monkeypatch):
  import nbformat

  assert nbformat.read(NOTEBOOK, as_version=4).cells[2].source.startswith(
      "import os\n\nWORKDIRS = [")
  monkeypatch.setenv("MIDPO_WORKDIRS", ":".join(tiny_runs))
  code = tu.execute_notebook(NOTEBOOK, tmp_path)
  texts = [_outputs_text(c) for c in code]
  assert all(w in texts[0] for w in tiny_runs)          # WORKDIRS came from the environment

  summary_cell = next(t for c, t in zip(code, texts) if "format_summary" in c.source)
  assert "simpo(gamma=0.5)" in summary_cell and "dpo (baseline)" in summary_cell
  for run in tiny_runs:
    ev = json.load(open(os.path.join(run, "eval.json")))
    assert f"{ev['policy']['reward']:.3f} ± {ev['policy']['reward_se']:.3f}" in summary_cell
  base = json.load(open(os.path.join(tiny_runs[0], "eval.json")))["baselines"]["dpo"]
  assert f"{base['reward']:.3f} ± {base['reward_se']:.3f}" in summary_cell

  images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
  # sft, preference, baseline/dpo, prior/mle and prior/diagnostics curves, reward
  # vs KL, prior statistics.
  assert len(images) >= 7
  samples_cell = next(t for c, t in zip(code, texts) if "samples_table" in c.source)
  first = json.loads(open(os.path.join(tiny_runs[0], "eval_samples.jsonl")).readline())
  assert first["prompt"] in samples_cell
  checkpoints_cell = texts[-1]
  assert "sft/ of this workdir" in checkpoints_cell

  # The same numbers straight from the module, for the record.
  runs = analysis.load_runs(tiny_runs)
  table = analysis.summary_table(runs)
  assert table["prior"].tolist() == ["mi(conditional=False, network=micro)", "dpo (baseline)",
                                     "simpo(gamma=0.5)"]
  assert table["notes"].tolist()[0::2] == ["", ""]
  # The learned prior's own stages get their own default panels.
  fig = analysis.plot_curves(runs, "prior/mle")
  assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == [
      "nll_per_token", "nll_per_token_fit", "kl_policy_prior"]
  fig = analysis.plot_curves(runs, "prior/diagnostics")
  titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
  assert {"heldout/loss/mi", "heldout/loss/dpo", "heldout/loss/simpo",
          "collapse/gap_vs_reference"} <= set(titles)
