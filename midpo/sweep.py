r"""The study: many runs over algorithms, alphas, tasks and training seeds.

``python -m midpo.sweep --config=configs/sweeps/quick.py --workdir=W [--workers=2]``

A sweep config (``configs/sweeps/*.py``) names its axes:

* ``algorithms``: ``{label: {"config": "dpo.py", "alphas": (...), "overrides": {...}}}``;
  ``config`` is an algorithm config file of ``configs/`` (the directory above
  the sweep config's), ``overrides`` nested dicts applied to it;
* ``links`` (optional): ``{name: loss overrides}`` (``{"ipo": {"link": "ipo"},
  "mpo": {"link": "sigmoid,bco_pair,sft", "loss_weights": (0.8, 0.2, 1.0)}}``)
  or a tuple of link names: one more axis, each algorithm run with each link
  and labelled ``<algorithm>+<link>`` (``compare_to`` names such a label); a
  link its algorithm's prior does not define is an error before any run;
* ``tasks``: ``{name: overrides}`` (the known-reward task and its variants);
* ``seeds``: training seeds; ``overrides``: applied to every run (steps,
  evaluation sizes, ``eval.every``); ``compare_to``/``compare_alpha``: the
  algorithm every run is compared with head to head (same seed and step).

A run's config is its algorithm config, then the sweep's ``overrides``, the
task's, the algorithm's, then its ``seed`` and ``loss.alpha``. Per task and
seed the SFT reference, the pairs sampled from it and the dataset build are
made once, in ``W/shared/<task>/seed_<s>``, and every run of that seed reads
them (``sft.checkpoint``, ``pairs_file``, ``data.data_dir``): a paired design.
The reference is evaluated there once too (its mutual-information estimate
included), with the runs' evaluation settings.
Each run is an ordinary midpo workdir, ``W/runs/<task>/<algorithm>/alpha_<a>/
seed_<s>`` (its ``config.json`` reruns it with ``python -m midpo.main``), that
evaluates its policy every ``eval.every`` steps and at the end.

A killed sweep resumes where it stopped: finished runs (``done.json``) are not
redone, an unfinished one resumes from its checkpoints. ``--workers=N`` runs N
runs at once in separate processes. Compilations are cached on disk under
``W/jax_cache`` (JAX's persistent compilation cache).

Writes ``W/results.csv`` (one row per run, model and evaluated step, see
``midpo.analysis.sweep``), ``W/summary.csv`` (mean +- standard error over
seeds) and ``W/sweep.json`` (axes, commit, machine, versions, wall times).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import fcntl
import glob
import json
import multiprocessing
import os
import signal
import time
from typing import Optional

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from midpo import evaluate, files, sampling, train
from midpo.analysis import sweep as sweep_lib
# The plan's names, re-exported: ``midpo.sweep`` is the sweep's one entry point.
from midpo.sweep_plan import (SHARED_KEYS, Plan, SweepError, check_same_config,  # noqa: F401
                              load_config_file)
from midpo.training import config as config_lib
from midpo.training import env as env_lib
from midpo.training import loop, provenance, run_identity, sft

def prepare_shared(config: ml_collections.ConfigDict, root: str) -> dict:
  """The SFT reference, the pairs sampled from it, the datasets and the
  reference's evaluation, made once in ``root``; returns ``{"sft": bool,
  "pairs": bool, "seconds": float}`` (what was made now).

  Raises:
    SweepError: ``root`` was made with another config.
  """
  t0 = time.perf_counter()
  done = os.path.join(root, "shared.json")
  check_same_config(config, os.path.join(root, "config.json"), "the shared reference")
  if os.path.exists(done):
    return {"sft": False, "pairs": False, "seconds": 0.0}
  os.makedirs(root, exist_ok=True)
  config_lib.validate(config)
  env = env_lib.make_env(config, root)
  run_identity.record_resolution(root, env_lib.resolutions(env.model_config))
  files.write_json(os.path.join(root, "config.json"), run_identity.config_json(config))
  env.sigterm.install()  # SIGTERM and SIGINT: stop at the next check, as a run does
  try:
    made_sft = not os.path.isdir(os.path.join(root, "sft"))
    reference = sft.run_sft(env)
    made_pairs, pairs = False, {}
    if config.pairs_from == "reference":
      made_pairs = not os.path.exists(os.path.join(root, "pairs", "reference_samples.jsonl"))
      pairs = {"samples_path": sampling.sample_pairs(env, reference, "reference", 0)}
    # Build the datasets every run reads, before several runs could race to.
    env.batches(env.data_config(**pairs), "train", mode="pairs")
    env.batches(env.data_config(), "test", mode="pairs")
    # The reference's evaluation (with its mutual-information estimate), once.
    evaluate.evaluate_reference(env, reference)
  except env_lib.StopRequested as e:
    logging.warning("%s received during the shared reference's %s: stopped; the sweep "
                    "redoes it on resume.", e.signal_name, e.what)
    raise loop.Preempted(None, e.exit_code) from None
  finally:
    env.sigterm.uninstall()
    env.writer.close()
  out = {"sft": made_sft, "pairs": made_pairs, "seconds": time.perf_counter() - t0,
         "datasets": dataset_dirs(root)}
  files.write_json(done, out)
  return out


def dataset_dirs(root: str) -> list[str]:
  """The TFDS datasets built under ``root/tfds`` (builder/config names)."""
  base = os.path.join(root, "tfds")
  return sorted(os.path.relpath(os.path.dirname(p), base) for p in glob.glob(
      os.path.join(base, "*", "*", "*", "dataset_info.json")))


def run_one(config: ml_collections.ConfigDict, workdir: str, cache_dir: str) -> dict:
  """Runs one run of the sweep (resuming it if it was started); writes
  ``done.json``. Returns ``{"seconds": ...}`` (0 when it was already done).

  Holds an exclusive lock on ``workdir/run.lock`` while it runs.

  Raises:
    SweepError: another process runs it (a worker left over from a killed
      sweep), or it was started with another config.
  """
  done = os.path.join(workdir, "done.json")
  check_same_config(config, os.path.join(workdir, "config.json"), f"run {workdir}")
  if os.path.exists(done):
    return {"seconds": 0.0, "skipped": True}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "run.lock"), "w") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise SweepError(f"run {workdir} is being run by another process (a worker of an "
                       "earlier sweep still running?); stop it first") from None
    use_compilation_cache(cache_dir)
    t0 = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    out = {"seconds": time.perf_counter() - t0}
    files.write_json(done, out)
  return out


def _worker_init() -> None:
  """A worker ends with the sweep's process: SIGTERM when its parent dies (so
  it saves its checkpoint and stops instead of running on as an orphan)."""
  try:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass  # not Linux: the per-run lock still refuses a second runner


def use_compilation_cache(cache_dir: str) -> None:
  """JAX's persistent compilation cache in ``cache_dir`` (every compilation)."""
  import jax
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _prepare_shared_cached(config: ml_collections.ConfigDict, root: str, cache_dir: str) -> dict:
  """``prepare_shared`` with the sweep's compilation cache (in a worker too)."""
  use_compilation_cache(cache_dir)
  return prepare_shared(config, root)


@contextlib.contextmanager
def _pool(workers: int):
  """``workers`` spawned processes that end with this one, or None (inline)."""
  if workers <= 1:
    yield None
    return
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx,
                                              initializer=_worker_init) as pool:
    yield pool


def _run_all(pool, fn, jobs: list, done, name=str) -> list:
  """``fn(*args)`` for every ``(key, args)`` of ``jobs``, calling ``done(key,
  result)`` as each finishes. Inline (``pool`` None) the first exception
  propagates; in a pool every job runs and the failures are logged (as
  ``name(key)``) and returned as ``[(key, exception)]``."""
  if pool is None:
    for key, args in jobs:
      done(key, fn(*args))
    return []
  failures = []
  futures = {pool.submit(fn, *args): key for key, args in jobs}
  for fut in concurrent.futures.as_completed(futures):
    key = futures[fut]
    try:
      done(key, fut.result())
    except Exception as e:  # noqa: BLE001  (returned: reported after the results)
      logging.error("sweep: %s failed: %s: %s", name(key), type(e).__name__, e)
      failures.append((key, e))
  return failures


def run_sweep(sweep: ml_collections.ConfigDict, sweep_file: str, workdir: str,
              workers: int = 1, max_runs: Optional[int] = None) -> dict:
  """Runs (or resumes) every run of the sweep, then writes the results files.

  ``max_runs`` stops after that many runs were run now (for tests and
  staged use). Returns ``sweep.json``'s contents.
  """
  t_start = time.perf_counter()
  if files.is_remote(workdir):
    raise SweepError(f"--workdir={workdir}: a sweep's workers lock and share files in its "
                     "workdir, which must be local (or a mounted filesystem); single runs "
                     "take a gs:// workdir (python -m midpo.main)")
  plan = Plan(sweep, sweep_file, workdir)
  if workers > 1 and jax.default_backend() != "cpu":
    raise SweepError(f"--workers={workers} on {jax.default_backend()}: each worker would "
                     "need the accelerator this process holds; use --workers=1 (one run "
                     "at a time uses the device)")
  os.makedirs(plan.workdir, exist_ok=True)
  cache_dir = os.path.join(plan.workdir, "jax_cache")
  use_compilation_cache(cache_dir)
  info_path = os.path.join(plan.workdir, "sweep.json")
  info = {}
  if os.path.exists(info_path):
    with open(info_path) as f:
      info = json.load(f)
  info.update(name=sweep.name, axes=plan.axes(), num_runs=len(plan.runs),
              sweep_config=json.loads(sweep.to_json_best_effort()), **provenance.record())
  info.setdefault("seconds", {"shared": {}, "runs": {}, "sessions": []})
  info.setdefault("built", {"sft": 0, "pairs": 0})
  files.write_json(info_path, info)

  def shared_made(key, made):
    task, seed = key
    info["built"]["sft"] += int(made["sft"])
    info["built"]["pairs"] += int(made["pairs"])
    if made["seconds"]:
      info["seconds"]["shared"][f"{task}/seed_{seed}"] = made["seconds"]
    files.write_json(info_path, info)

  def finished(run, out):
    key = os.path.relpath(run["workdir"], os.path.join(plan.workdir, "runs"))
    info["seconds"]["runs"][key] = out["seconds"]
    files.write_json(info_path, info)
    logging.info("sweep: finished %s in %.1f s", key, out["seconds"])

  with _pool(workers) as pool:
    # Every seed's reference first (several at once with workers), then the runs.
    shared = [(key, (sh["config"], sh["workdir"], cache_dir)) for key, sh in plan.shared.items()]
    label = lambda key: plan.shared[key]["workdir"]
    failures = _run_all(pool, _prepare_shared_cached, shared, shared_made, label)
    if failures:
      raise SweepError(f"{len(failures)} shared reference(s) failed, so no run was started: " +
                       "; ".join(f"{label(k)}: {type(e).__name__}: {e}" for k, e in failures[:3]))
    todo = [r for r in plan.runs if not os.path.exists(os.path.join(r["workdir"], "done.json"))]
    if max_runs is not None:
      todo = todo[:max_runs]
    logging.info("sweep %s: %d runs, %d to run, %d worker(s)", sweep.name, len(plan.runs),
                 len(todo), workers)
    jobs = [(i, (r["config"], r["workdir"], cache_dir)) for i, r in enumerate(todo)]
    failures = _run_all(pool, run_one, jobs, lambda i, out: finished(todo[i], out),
                        lambda i: todo[i]["workdir"])
    failures = [(todo[i]["workdir"], e) for i, e in failures]
  complete = all(os.path.exists(os.path.join(r["workdir"], "done.json")) for r in plan.runs)
  runs = [{k: r[k] for k in ("task", "algorithm", "alpha", "seed", "workdir")}
          for r in plan.runs if os.path.exists(os.path.join(r["workdir"], "done.json"))]
  references = [{"task": t, "seed": s, "workdir": sh["workdir"]}
                for (t, s), sh in plan.shared.items()]
  results = sweep_lib.collect(runs, references=references, compare_to=sweep.compare_to,
                              compare_alpha=float(sweep.compare_alpha))
  sweep_lib.write_csv(results, os.path.join(plan.workdir, "results.csv"))
  summary = sweep_lib.seed_summary(results)
  sweep_lib.write_csv(summary, os.path.join(plan.workdir, "summary.csv"))
  unmatched = results[(results.algorithm != "reference") & results.reward.notna() &
                      results.win_rate_vs.isna()] if not results.empty else results
  if len(unmatched):
    logging.warning("sweep: %d row(s) have no %s run at alpha %g at the same task, seed and "
                    "step (their win_rate_vs is empty): its evaluated steps differ",
                    len(unmatched), sweep.compare_to, float(sweep.compare_alpha))
  info["complete"] = complete
  info["seconds"]["sessions"].append(time.perf_counter() - t_start)
  files.write_json(info_path, info)
  if failures:
    raise SweepError(f"{len(failures)} run(s) failed (the others' results are written): " +
                     "; ".join(f"{w}: {type(e).__name__}: {e}" for w, e in failures[:3]))
  if not summary.empty:
    logging.info("sweep %s (%s): mean +- standard error over seeds at the last step\n%s",
                 sweep.name, "complete" if complete else "partial",
                 sweep_lib.format_final(summary))
  return info


_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the sweep's runs and results.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Runs to run at once (separate processes).")
_MAX_RUNS = flags.DEFINE_integer("max_runs", None, "Stop after this many runs (then resume).")


def main(argv):
  """Runs the sweep of ``--config`` in ``--workdir``."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  sweep_file = config_flags.get_config_filename(flags.FLAGS["config"])
  try:
    run_sweep(_CONFIG.value, sweep_file, _WORKDIR.value, _WORKERS.value, _MAX_RUNS.value)
  except (SweepError, config_lib.ConfigError) as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
