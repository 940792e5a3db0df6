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
  not ``enabled``: every process but 0)."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pure Python, no TensorFlow
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"stage": stage, "step": int(step)}
    for k, v in metrics.items():
      x = _scalar(v)
      row[k] = x if math.isfinite(x) else str(x)
      if self._tb is not None and math.isfinite(x):
        self._tb.add_scalar(f"{stage}/{k}", x, int(step))
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def write_hparams(self, flat: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    self._tb.add_text("hparams", "\n".join(f"    {k}: {v}" for k, v in sorted(flat.items())), 0)
    files.write_json(os.path.join(os.path.dirname(self.path), "hparams.json"), dict(flat),
                     sort_keys=True, default=str)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
