"""Runs a set of configs at two commits and compares their results bit for bit.

A restructuring must not change what any config computes. This script exports
each commit's tree (``git archive``), runs every config of the set with the
same short overrides from that tree (``python -m midpo.main``, with the tree
first on ``sys.path``), and compares the files each run wrote:

* ``eval.json``, byte for byte;
* ``metrics.jsonl``, row by row, with wall-clock figures (``perf/*``,
  ``seconds``) left out: every loss, metric and diagnostic must be equal.

Usage (``--head=.`` is the working tree, committed or not)::

    python benchmarks/compare_commits.py --base=HEAD~3 --head=. \
        --workdir=workdirs/compare_commits [--set=short|default] [--only=dpo,mi]

Runs of a commit are kept under ``<workdir>/<sha>/`` and reused when the
script is run again (the working tree is always rerun). It exits 1 if any
config differs and prints each difference. The ``short`` set runs every
algorithm config (and the cached-reference and alternating-update paths) with
``SHORT_OVERRIDES``; ``default`` runs the README's default command as is.
Results are deterministic on one machine and build, not across machines:
compare two commits on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Short runs: every stage and every code path of the config, at a size where a
# run takes about a minute on a 2-core CPU.
SHORT_OVERRIDES = {
    "sft.steps": 60,
    "train.steps": 40,
    "data.synthetic.num_sft": 1024,
    "data.synthetic.num_train": 1024,
    "data.synthetic.num_test": 256,
    "num_pair_prompts": 512,
    "eval.num_prompts": 128,
    "eval.num_pairs": 128,
    "checkpoint_every": 20,
    "log_every": 10,
    "train.policy_steps_per_round": 10,
    "train.prior_warmup_samples": 256,
    "train.prior_warmup_steps": 10,
    "train.prior_samples": 64,
    "train.diagnostics_every": 10,
    "train.prior_eval_pairs": 64,
}

# (label, config file, extra overrides)
SHORT_SET = [
    ("dpo", "dpo", {}),
    ("dpo_cached", "dpo", {"train.reference": "cached"}),
    ("dice", "dice", {}),
    ("hdpo", "hdpo", {}),
    ("rdpo", "rdpo", {}),
    ("simpo", "simpo", {}),
    ("tdpo", "tdpo", {}),
    ("tis_dpo", "tis_dpo", {}),
    ("tis_dpo_oracle", "tis_dpo", {"tis.weights": "oracle", "data.token_weights": "oracle"}),
    ("sparsepo", "sparsepo", {}),
    ("constrained_prior", "constrained_prior", {}),
    ("constrained_alternate", "constrained_prior", {"train.prior_update": "alternate",
                                                    "train.policy_steps_per_round": 3,
                                                    "train.prior_steps_per_round": 2}),
    ("joint_prior", "joint_prior", {}),
    ("ema_prior", "ema_prior", {}),
]

DEFAULT_SET = [("default_run", "joint_prior", None)]

TIMING_KEYS = ("perf/", "seconds", "time")


def export_tree(rev: str, dest: str) -> str:
  """The commit's files under ``dest``; returns the full sha."""
  sha = subprocess.check_output(["git", "rev-parse", rev], cwd=ROOT, text=True).strip()
  os.makedirs(dest, exist_ok=True)
  archive = subprocess.run(["git", "archive", sha], cwd=ROOT, check=True,
                           stdout=subprocess.PIPE).stdout
  with tempfile.TemporaryFile() as f:
    f.write(archive)
    f.seek(0)
    with tarfile.open(fileobj=f) as tar:
      tar.extractall(dest, filter="data")
  return sha


def run_config(tree: str, config: str, overrides: dict | None, workdir: str) -> float:
  args = [sys.executable, "-m", "midpo.main", f"--config=configs/{config}.py",
          f"--workdir={workdir}"]
  if overrides is not None:
    args += [f"--config.{k}={v}" for k, v in {**SHORT_OVERRIDES, **overrides}.items()]
  env = dict(os.environ, PYTHONPATH=tree)
  t0 = time.perf_counter()
  proc = subprocess.run(args, cwd=tree, env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)
  with open(os.path.join(workdir, "run.log"), "w") as f:
    f.write(proc.stdout)
  if proc.returncode != 0:
    raise RuntimeError(f"{config} at {tree} failed (exit {proc.returncode}); "
                       f"log: {workdir}/run.log\n{proc.stdout[-3000:]}")
  return time.perf_counter() - t0


def metric_rows(workdir: str) -> list[dict]:
  rows = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      rows.append({k: v for k, v in r.items() if not any(t in k for t in TIMING_KEYS)})
  return rows


def compare(a: str, b: str) -> list[str]:
  """Differences between two runs' results (empty: identical)."""
  diffs = []
  ea = open(os.path.join(a, "eval.json"), "rb").read()
  eb = open(os.path.join(b, "eval.json"), "rb").read()
  if ea != eb:
    ja, jb = json.loads(ea), json.loads(eb)
    diffs.append("eval.json differs: " + first_difference(ja, jb))
  ra, rb = metric_rows(a), metric_rows(b)
  if len(ra) != len(rb):
    diffs.append(f"metrics.jsonl has {len(ra)} rows against {len(rb)}")
  for i, (x, y) in enumerate(zip(ra, rb)):
    if x != y:
      diffs.append(f"metrics.jsonl row {i} (stage {x.get('stage')}, step {x.get('step')}): "
                   + first_difference(x, y))
      break
  return diffs


def first_difference(x, y, path="") -> str:
  if isinstance(x, dict) and isinstance(y, dict):
    for k in sorted(set(x) | set(y)):
      if k not in x or k not in y:
        return f"{path}/{k} present in one only"
      if x[k] != y[k]:
        return first_difference(x[k], y[k], f"{path}/{k}")
    return "(no difference)"
  if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
    for i, (u, v) in enumerate(zip(x, y)):
      if u != v:
        return first_difference(u, v, f"{path}[{i}]")
  return f"{path}: {x!r} != {y!r}"


def results_of(rev: str, label_set, workdir: str, only) -> tuple[str, dict[str, str]]:
  """Runs (or reuses) every config of the set at ``rev``; returns the
  directories of the runs by label."""
  tmp = None
  if rev == ".":
    tree, sha, reuse = ROOT, "worktree", False
  else:
    tmp = tempfile.mkdtemp(prefix="midpo_tree_")
    sha = export_tree(rev, tmp)
    tree, reuse = tmp, True
  out = {}
  try:
    for label, config, overrides in label_set:
      if only and label not in only:
        continue
      run_dir = os.path.join(workdir, sha, label)
      if reuse and os.path.exists(os.path.join(run_dir, "eval.json")):
        out[label] = run_dir
        continue
      shutil.rmtree(run_dir, ignore_errors=True)
      os.makedirs(run_dir)
      seconds = run_config(tree, config, overrides, run_dir)
      print(f"  {sha[:10]} {label}: {seconds:.0f} s", flush=True)
      out[label] = run_dir
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  return sha, out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--base", required=True, help="a commit, or '.' for the working tree")
  p.add_argument("--head", default=".", help="a commit, or '.' for the working tree")
  p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "compare_commits"))
  p.add_argument("--set", choices=("short", "default"), default="short")
  p.add_argument("--only", default="", help="comma-separated labels")
  args = p.parse_args(argv)
  label_set = SHORT_SET if args.set == "short" else DEFAULT_SET
  only = set(filter(None, args.only.split(",")))
  workdir = os.path.abspath(args.workdir)
  print(f"base {args.base}:", flush=True)
  base_sha, base = results_of(args.base, label_set, workdir, only)
  print(f"head {args.head}:", flush=True)
  head_sha, head = results_of(args.head, label_set, workdir, only)
  failed = 0
  print(f"\n{'config':<24} result  ({base_sha[:10]} vs {head_sha[:10]})")
  for label in base:
    diffs = compare(base[label], head[label])
    print(f"{label:<24} {'identical' if not diffs else 'DIFFERS'}")
    for d in diffs:
      print(f"    {d}")
    failed += bool(diffs)
  print(f"\n{len(base) - failed} of {len(base)} configs identical (eval.json byte for byte, "
        "metrics.jsonl without timings)")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
