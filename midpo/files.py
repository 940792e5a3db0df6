"""Result files written whole or not at all.

``write_text`` writes a temporary file next to the target and renames it over
the target (``os.replace``, atomic on POSIX filesystems), so a kill or a full
disk mid-write leaves the previous file, never a truncated one. Every result
file of a run (``config.json``, ``eval.json``, reports, exported configs) goes
through here.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """A temporary path to write ``path``'s new content to; renamed over
  ``path`` when the block ends without error, removed otherwise."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)  # a full disk or a kill: no half-written file left behind
    raise


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (``atomic_path``)."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


def write_json(path: str, obj: Any, *, indent: int | None = 1, **dump_kwargs) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically; ``dump_kwargs`` go to
  ``json.dumps``."""
  write_text(path, json.dumps(obj, indent=indent, **dump_kwargs))
