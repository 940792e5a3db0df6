"""What a learned prior costs, from a finished run that trained a baseline beside it.

Reads ``metrics.jsonl`` of a run like the default one
(``configs/joint_prior.py``: the 'mi' prior and a DPO baseline trained in the
same process, on the same machine, the same pairs and the same number of
steps) and reports the wall time of each preference stage, the part of the
'mi' stage spent in its maximum-likelihood rounds (sampling the policy and
fitting ``zeta_phi``), and the rest (policy steps with the extra prior forward
pass, and the held-out diagnostics).

    python -m midpo.main --config=configs/joint_prior.py --workdir=workdirs/joint_prior
    python benchmarks/learned_prior_cost.py --workdir=workdirs/joint_prior

Stage times are summed from the logged throughput of every ``log_every``
window (``perf/steps_per_sec``), which includes everything the step function
did, so the first window also holds the compilations.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from midpo import analysis


def stage_seconds(metrics, stage: str) -> tuple[float, int]:
  rows = metrics[metrics["stage"] == stage].sort_values("step")
  if rows.empty or "perf/steps_per_sec" not in rows:
    raise SystemExit(f"no {stage!r} rows with perf/steps_per_sec in metrics.jsonl")
  steps = rows["step"].to_numpy()
  windows = steps - [0, *steps[:-1]]
  return float((windows / rows["perf/steps_per_sec"].to_numpy()).sum()), int(steps[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args()
  run = analysis.load_run(args.workdir)
  metrics = run["metrics"]
  config = run["config"] or {}
  prior = (config.get("prior") or {}).get("name", "?")
  baselines = list(config.get("baselines") or [])
  total, steps = stage_seconds(metrics, "preference")
  print(f"# {args.workdir}: prior {prior!r}, {steps} policy steps")
  print(f"preference ({prior}): {total:7.1f} s")
  rounds = metrics[metrics["stage"] == "prior/mle"]
  if len(rounds):
    fit = float(rounds["seconds"].sum())
    print(f"  maximum-likelihood rounds: {len(rounds)} rounds, {fit:6.1f} s "
          f"({fit / total:.0%}; first round {rounds['seconds'].iloc[0]:.1f} s, then "
          f"{rounds['seconds'].iloc[1:].mean():.1f} s each)")
    if "sampling_seconds" in rounds:
      sampled = float(rounds["sampling_seconds"].sum())
      print(f"    of which sampling the policy: {sampled:6.1f} s; fitting zeta_phi (and its "
            f"log-likelihoods before and after): {fit - sampled:6.1f} s")
    print(f"  policy steps and diagnostics: {total - fit:6.1f} s")
  for name in baselines:
    seconds, _ = stage_seconds(metrics, f"baseline/{name}")
    print(f"baseline {name}: {seconds:7.1f} s  (the learned prior's stage took "
          f"{total / seconds:.2f}x)")


if __name__ == "__main__":
  main()
