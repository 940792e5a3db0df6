"""One workdir, one run: a restart must use the config the workdir was started with.

``train_and_evaluate`` writes the resolved config to ``<workdir>/config.json``
at the first start. A restart (a resume after preemption, a rerun to add the
eval stage) compares its config with that file before any work: a change in
a key that changes results (the prior, alpha, the seed, the data, the model,
``sft.steps``, ...) is a ``ConfigError`` listing every changed key; keys in
``RESUMABLE`` may change:

* ``stages``: run some stages again or add one (e.g. ``("eval",)`` later);
* ``log_every``, ``checkpoint_every``, ``max_checkpoints``,
  ``train.diagnostics_every``: bookkeeping only;
* ``eval.*``: what the eval stage measures (it is rerun, ``eval.json``
  rewritten);
* ``divergence.*``: the divergence guard's thresholds;
* ``train.steps``: train longer (or stop earlier, but not below a step a
  checkpoint already holds: ``run_loop`` refuses that) from the latest checkpoint.
  The learning-rate schedule (warmup, then cosine decay to a tenth over
  ``train.steps``) is recomputed for the new length, so the steps after the
  restart differ from an uninterrupted run of the new length; a warning says
  so;
* ``train.learning_rate`` and ``train.grad_clip``: to go on after a
  divergence at a saner rate (or clip) from the last good checkpoint. The
  steps after the restart use the new value: the run is no longer one
  config's run, which a warning says.

``config.json`` is then rewritten with the restart's values of those keys,
and ``restarts.jsonl`` gets a row (time, every changed key with its old and
new value), so a run's history of changes is on disk. Every checkpoint also
holds the config it was saved with: resuming it with another config is
refused (``check_checkpoint``) even when ``config.json`` was lost.

``workdir_lock`` keeps a second run off a workdir in use: process 0 holds an
exclusive ``flock`` on ``<workdir>/workdir.lock`` (which names the holder: pid,
host, start time) for the whole run. The kernel drops the lock when its
process dies, so a lock file left by a killed run is taken over. It needs a
filesystem with ``flock`` (local disks, NFS).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from typing import Any, Iterator

from absl import logging

from midpo import files
from midpo.training import config as config_lib
from midpo.training import metrics_writer

# Dotted keys (a trailing ".*": every key under it) a restart may change.
RESUMABLE = ("stages", "log_every", "checkpoint_every", "max_checkpoints",
             "train.diagnostics_every", "eval.*", "divergence.*", "train.steps",
             "train.learning_rate", "train.grad_clip")
# Of those, the keys whose change alters the results of the steps that follow.
CHANGES_RESULTS = ("train.steps", "train.learning_rate", "train.grad_clip")


def config_json(config) -> dict:
  """A config as ``config.json`` holds it (for comparisons)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


# Keys added to the config after workdirs were written without them: missing
# from an old config, they hold the value that leaves results as they were.
ADDED_KEYS = {"loss.loss_weights": [], "loss.f_divergence_type": "reverse_kl",
              "loss.f_alpha_divergence_coef": 0.5, "loss.use_weighting": False,
              "loss.ld_alpha": None,
              # 'auto' is the old tokenisation for the synthetic task ('separate'); a files
              # run from before it tokenised apart too, and its data state then refuses.
              "data.tokenization": "auto", "data.max_unk_fraction": 0.01,
              "data.truncation_mode": "keep_prompt_end", "train.fused_lm_head": False,
              "train.prior_packing": False, "train.prior_pack_width": 128,
              # 'auto' is 'xla', as before, off GPUs and in float32.
              "model.attention_impl": "auto", "train.padding_free": False,
              "eval.mi_packing": False, "tis.cache_weights": False}


# Where a run records what its 'auto' values resolved to when it started (a
# restart on another backend keeps them), and what they were for a run whose
# ``config.json`` predates the key: 'xla' attention was the only default.
RESOLVED_FILE = "resolved.json"
RESOLVED_BEFORE_KEY = {"model.attention_impl": "xla"}
# Unset options that began to resolve by backend after runs had started: a run that
# began without recording one (its ``config.json`` exists, its ``resolved.json`` lacks
# the key) resolved it as this value says. 'model default': the model's own
# ``scan_layers`` (checkpoints scanned, built-in tiny/micro unrolled).
MODEL_DEFAULT = "model default"
RESOLVED_BEFORE_RECORD = {"model.scan_layers": MODEL_DEFAULT}


def recorded_resolution(workdir: str, key: str) -> Any:
  """What ``key`` (an 'auto' option, e.g. ``model.attention_impl``) resolved to
  when the run in ``workdir`` started: its value in ``<workdir>/resolved.json``;
  for a run whose ``config.json`` lacks the key, ``RESOLVED_BEFORE_KEY``'s value
  (what every run used before the key existed); for a started run that did not
  record the key, ``RESOLVED_BEFORE_RECORD``'s value; None for a new workdir, or a
  run that recorded nothing (it then resolves as a new run does).

  Raises:
    ConfigError: one of those files is not readable JSON.
  """
  path = os.path.join(workdir, RESOLVED_FILE)
  if files.exists(path):
    recorded = _read_json(path)
    if key in recorded:
      return recorded[key]
  config_path = os.path.join(workdir, "config.json")
  if key in RESOLVED_BEFORE_KEY and files.exists(config_path):
    if key not in metrics_writer.flatten(_read_json(config_path)):
      return RESOLVED_BEFORE_KEY[key]
  if key in RESOLVED_BEFORE_RECORD and files.exists(config_path):
    return RESOLVED_BEFORE_RECORD[key]
  return None


def _read_json(path: str) -> dict:
  try:
    return json.loads(files.read_text(path))
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(
        f"{path} is not readable JSON ({type(e).__name__}: {e}): it records how the run in "
        "this workdir began; restore it, or use another workdir") from None


def record_resolution(workdir: str, values: dict[str, Any]) -> None:
  """Writes ``<workdir>/resolved.json``: ``{dotted key: resolved value}``."""
  files.write_json(os.path.join(workdir, RESOLVED_FILE), dict(sorted(values.items())))


# Keys whose spelling changed but not their meaning: these values are the same.
SAME_VALUES = {"data.files.train_files": ([], ""), "data.files.test_files": ([], "")}


def _same(key: str, a: Any, b: Any) -> bool:
  return a == b or (key in SAME_VALUES and a in SAME_VALUES[key] and b in SAME_VALUES[key])


def differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
  """``(dotted key, old value, new value)`` of every key that differs
  (a key missing on one side has value None there; one of ``ADDED_KEYS``
  missing from the old side only, its value there; the empty file lists
  ``[]`` and ``''`` are one value), sorted by key."""
  a, b = metrics_writer.flatten(old), metrics_writer.flatten(new)
  a = {**{k: v for k, v in ADDED_KEYS.items() if k not in a and k in b}, **a}
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if not _same(k, a.get(k), b.get(k))]


def resumable(key: str) -> bool:
  """Whether a restart may change ``key`` (see ``RESUMABLE``)."""
  return any(key == r or (r.endswith(".*") and key.startswith(r[:-1])) for r in RESUMABLE)


def _shown(diff: list[tuple[str, Any, Any]]) -> str:
  return ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff)


def check_restart(config, workdir: str) -> list[tuple[str, Any, Any]]:
  """Compares ``config`` with the ``config.json`` of ``workdir`` (if any).

  Returns the changed keys that a restart may change (logged, with what a
  changed ``train.steps`` does).

  Raises:
    ConfigError: a key outside ``RESUMABLE`` changed (all of them named).
  """
  path = os.path.join(workdir, "config.json")
  if not files.exists(path):
    return []
  try:
    old = json.loads(files.read_text(path))
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(
        f"{path} is not a readable config ({type(e).__name__}: {e}): it records what this "
        "workdir was started with; restore it, or use another workdir") from None
  diff = differences(old, config_json(config))
  refused = [d for d in diff if not resumable(d[0])]
  if refused:
    raise config_lib.ConfigError(
        f"workdir {workdir} was started with another config; changed: {_shown(refused)}. "
        "One workdir holds one run: use the same config to resume (keys a restart may "
        f"change: {', '.join(RESUMABLE)}), or another --workdir")
  for key, a, b in diff:
    if key == "train.steps":
      logging.warning(
          "train.steps changed from %s to %s on restart: preference training goes on from "
          "its latest checkpoint, with the learning-rate schedule recomputed for %s steps "
          "(not the same as an uninterrupted %s-step run)", a, b, b, b)
    elif key in CHANGES_RESULTS:
      logging.warning(
          "%s changed from %s to %s on restart: training goes on from the latest checkpoint "
          "with %s; the steps after it differ from an uninterrupted run with either value "
          "(recorded in restarts.jsonl)", key, a, b, b)
  if diff:
    logging.info("restart with changed keys a restart may change: %s", _shown(diff))
  return diff


def record_restart(workdir: str, diff: list[tuple[str, Any, Any]]) -> None:
  """Appends a row to ``<workdir>/restarts.jsonl``: the time and every key a
  restart changed, ``{key: [old, new]}`` (nothing when ``diff`` is empty)."""
  if not diff:
    return
  row = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
         "changed": {k: [a, b] for k, a, b in diff}}
  files.append_text(os.path.join(workdir, "restarts.jsonl"), json.dumps(row, default=str) + "\n")


def check_checkpoint(saved: dict | None, current: dict, where: str) -> None:
  """Compares the config a checkpoint was saved with (its ``meta``; None for
  checkpoints that predate it) with the current one (``config_json``).

  Raises:
    ConfigError: a key outside ``RESUMABLE`` differs (every one named, with
      the checkpoint's directory).
  """
  if saved is None:
    return
  refused = [d for d in differences(saved, current) if not resumable(d[0])]
  if refused:
    raise config_lib.ConfigError(
        f"checkpoint {where} was saved by a run with another config; changed: "
        f"{_shown(refused)}. Resume with the config it was saved with, or use another "
        "--workdir")


class WorkdirInUse(RuntimeError):
  """Another process runs in this workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: str, *, hold: bool = True) -> Iterator[None]:
  """Holds ``<workdir>/workdir.lock`` for the duration (``hold=False``: a
  no-op, for processes other than 0). A remote workdir (``gs://``) has no
  lock: object stores have no ``flock``, and a lock object would outlive a
  killed run; a warning says so once.

  Raises:
    WorkdirInUse: another process holds it (named by pid, host and start).
  """
  if not hold:
    yield
    return
  if files.is_remote(workdir):
    logging.warning("workdir %s is remote: it is not locked, so nothing stops a second run "
                    "from writing into it at the same time; start one run per workdir", workdir)
    yield
    return
  path = os.path.join(workdir, "workdir.lock")
  with open(path, "a+", encoding="utf-8") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      raise WorkdirInUse(f"workdir {workdir} is in use by another run ({holder}); wait for it "
                         "or stop it, or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": datetime.datetime.now().isoformat(timespec="seconds")}))
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)

