"""Runs every algorithm config on the known-reward task and tabulates the results.

Each config runs with its defaults (the README's CPU-sized experiment), or is
read from an existing workdir: ``WORKDIR/<config>`` is reused when it already
holds an ``eval.json``. Prints a markdown table of true reward, KL to the
reference, length and win rate (means +- standard errors over 512 held-out
prompts) and the implicit-reward accuracy, from each run's ``eval.json``
(``midpo.analysis.summary_table``).

    python benchmarks/compare_priors.py --workdir=workdirs/compare
    python benchmarks/compare_priors.py --workdir=workdirs/compare --configs=dpo,simpo
"""

import argparse
import os
import subprocess
import sys
import time

from midpo import analysis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("dpo", "dice", "hdpo", "rdpo", "simpo", "tdpo", "tis_dpo", "sparsepo",
           "constrained_prior", "joint_prior", "ema_prior")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--configs", default=",".join(CONFIGS))
  args = parser.parse_args()
  names = [c for c in args.configs.split(",") if c]
  seconds = {}
  for name in names:
    workdir = os.path.join(args.workdir, name)
    if os.path.exists(os.path.join(workdir, "eval.json")):
      continue
    start = time.time()
    cmd = [sys.executable, "-m", "midpo.main", f"--config={ROOT}/configs/{name}.py",
           f"--workdir={workdir}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    seconds[name] = time.time() - start
  runs = analysis.load_runs([os.path.join(args.workdir, n) for n in names])
  table = analysis.summary_table(runs)
  pm = lambda m, s, d: f"{m:.{d}f} +- {s:.{d}f}"
  print("| config | prior | reward | KL | length | win rate | implicit acc. |")
  print("|---|---|---|---|---|---|---|")
  for i, (name, run) in enumerate(zip(names, runs)):
    row = table.iloc[i]
    print(f"| {name} | {analysis.prior_label(run)} | {pm(row.policy_reward, row.policy_reward_se, 2)}"
          f" | {pm(row.kl, row.kl_se, 2)} | {pm(row.length, row.length_se, 1)}"
          f" | {pm(row.win_rate, row.win_rate_se, 3)}"
          f" | {pm(row.implicit_reward_accuracy, row.implicit_reward_accuracy_se, 3)} |")
  ref = table.iloc[0]
  print(f"| (reference) | | {pm(ref.reference_reward, ref.reference_reward_se, 2)} | 0 | "
        f"{ref.reference_length:.1f} | | |")
  for name, s in seconds.items():
    print(f"# {name}: {s:.0f} s")


if __name__ == "__main__":
  main()
