"""Metrics to ``metrics.jsonl`` and TensorBoard event files, from process 0 only.

Each line of ``metrics.jsonl`` is ``{"stage": ..., "step": ..., <name>: value}``
with namespaced names (``rewards/chosen``, ``logps/chosen``, ...), so runs can
be compared with other tools and loaded in notebooks with ``pandas.read_json(...,
lines=True)``. TensorBoard tags are ``<stage>/<name>``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Any, Mapping

import numpy as np

from midpo import files


def _scalar(v) -> float:
  return float(np.asarray(v))


def flatten(d: Mapping[str, Any], sep: str = ".", *, scalars_only: bool = False,
            prefix: str = "") -> dict[str, Any]:
  """A nested dict -> ``{"a<sep>b": value}``; ``scalars_only`` keeps the
  numbers (not booleans) and drops everything else."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, sep, scalars_only=scalars_only, prefix=key + sep))
    elif not scalars_only or (isinstance(v, (int, float)) and not isinstance(v, bool)):
      out[key] = v
  return out


class MetricsWriter:
  """Appends rows to ``<workdir>/metrics.jsonl`` and TensorBoard (no-op when
  not ``enabled``: every process but 0).

  In a remote workdir (``gs://``), where objects cannot be appended to, the
  rows are kept in memory and the TensorBoard event file is written to a
  local temporary directory; ``metrics.jsonl`` and the event file are
  uploaded whole to the workdir at most every ``remote_flush_s`` seconds, on
  ``flush`` (every checkpoint save, the end of each stage) and on ``close``."""

  def __init__(self, workdir: str, *, enabled: bool = True, remote_flush_s: float = 30.0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._remote = files.is_remote(workdir)
    self._remote_flush_s = remote_flush_s
    self._lines: list[str] = []
    self._uploaded = time.monotonic()
    if enabled:
      files.makedirs(workdir)
      if self._remote and files.exists(self.path):
        self._lines = [files.read_text(self.path)]
      from tensorboardX import SummaryWriter  # pure Python, no TensorFlow
      self._tb_dir = os.path.join(workdir, "tensorboard")
      self._tb_local = (tempfile.mkdtemp(prefix="midpo-tensorboard-") if self._remote
                        else self._tb_dir)
      self._tb = SummaryWriter(self._tb_local)

  def write(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"stage": stage, "step": int(step)}
    for k, v in metrics.items():
      x = _scalar(v)
      row[k] = x if math.isfinite(x) else str(x)
      if self._tb is not None and math.isfinite(x):
        self._tb.add_scalar(f"{stage}/{k}", x, int(step))
    if not self._remote:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
      return
    self._lines.append(json.dumps(row) + "\n")
    if time.monotonic() - self._uploaded >= self._remote_flush_s:
      self._upload()

  def _upload(self) -> None:
    files.write_text(self.path, "".join(self._lines))
    if self._tb is not None:
      self._tb.flush()
    for name in sorted(os.listdir(self._tb_local)) if os.path.isdir(self._tb_local) else ():
      files.copy(os.path.join(self._tb_local, name), f"{self._tb_dir}/{name}")
    self._uploaded = time.monotonic()

  def write_hparams(self, flat: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    self._tb.add_text("hparams", "\n".join(f"    {k}: {v}" for k, v in sorted(flat.items())), 0)
    files.write_json(os.path.join(os.path.dirname(self.path), "hparams.json"), dict(flat),
                     sort_keys=True, default=str)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
    if self.enabled and self._remote:
      self._upload()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self.enabled and self._remote:
      self._upload()
      shutil.rmtree(self._tb_local, ignore_errors=True)
