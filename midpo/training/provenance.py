"""Where a result comes from: the commit, the machine and the versions.

Results are deterministic per machine and build only, so every result file
(``eval.json``, a sweep's ``sweep.json``) records these.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from importlib import metadata

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


@functools.cache
def commit() -> str:
  """The git commit of the midpo checkout (``+dirty`` when it has uncommitted
  changes to tracked files), or ``"unknown"`` outside a git checkout."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return head + ("+dirty" if dirty.strip() else "")


def machine() -> dict:
  """The processor, core count, OS and accelerator of this process's machine."""
  import jax
  devices = jax.devices()
  return {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "system": platform.platform(),
          "platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "device_count": len(devices), "process_count": jax.process_count()}


def versions() -> dict:
  """Python's and the numerical packages' versions."""
  out = {"python": sys.version.split()[0]}
  for name in _PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def record() -> dict:
  """``{"commit", "machine", "versions"}``."""
  return {"commit": commit(), "machine": machine(), "versions": versions()}
