"""Paths of a run, local or remote, and result files written whole or not at all.

Every path midpo reads or writes (the workdir, users' data files, checkpoint
directories) goes through here. A plain path uses ``os`` as it always did. A
path with a scheme (``gs://bucket/run``, or any other that ``etils.epath``
handles) goes through ``etils.epath``; Cloud Storage needs ``gcsfs``, the
``gcs`` extra: ``pip install -e '.[gcs]'`` (without it, the error says so).
Orbax writes checkpoints to such paths itself (through tensorstore).

What differs on an object store, and how it is handled here:

- There are no directories: ``makedirs`` does nothing, and ``isdir`` is true
  once something is stored under the prefix.
- An object is replaced whole by each upload, never seen half-written; so
  ``atomic_path`` writes a local temporary file and uploads it once complete.
- There is no append (gcsfs silently overwrites): ``append_text`` reads the
  object and writes it back with the new text; ``open`` refuses mode ``'a'``.
- ``glob`` takes ``*``, ``?`` and ``[...]`` but not ``**`` (one listing per
  level: the error says to name the levels).

``write_text`` writes a temporary file next to a local target and renames it
over the target (``os.replace``, atomic on POSIX filesystems), so a kill or a
full disk mid-write leaves the previous file, never a truncated one. Every
result file of a run (``config.json``, ``eval.json``, reports, exported
configs) goes through here.
"""

from __future__ import annotations

import builtins
import contextlib
import glob as glob_lib
import json
import os
import shutil
import tempfile
from typing import Any, IO, Iterator

# What a user installs for gs:// paths.
GCS_EXTRA = "pip install -e '.[gcs]'"
_GLOB_CHARS = ("*", "?", "[")


class MissingFilesystem(ImportError):
  """A remote path whose filesystem package is not installed (the message says what to
  install)."""


def is_remote(path: str) -> bool:
  """Whether ``path`` has a scheme (``gs://``, ...) rather than being a local path."""
  return "://" in os.fspath(path)


def _epath(path: str):
  path = os.fspath(path)
  if path.startswith("gs://"):
    try:
      import gcsfs  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise MissingFilesystem(
          f"{path}: gs:// paths are read and written through gcsfs, which is not installed: "
          f"{GCS_EXTRA}") from None
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path)


def abspath(path: str) -> str:
  """``path`` made absolute (``os.path.abspath``); a remote path as it is."""
  return path if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  """Whether a file or directory (a non-empty prefix, remotely) is at ``path``."""
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  """Whether ``path`` is a directory (remotely: whether anything is stored under it)."""
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  """Whether ``path`` is a file (an object)."""
  return _epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def makedirs(path: str) -> None:
  """``os.makedirs(path, exist_ok=True)``; nothing for a remote path (no directories)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """The names of the entries of directory ``path``, sorted."""
  if is_remote(path):
    return sorted(p.name for p in _epath(path).iterdir())
  return sorted(os.listdir(path))


def remove(path: str) -> None:
  """Deletes file ``path``."""
  if is_remote(path):
    _epath(path).unlink()
  else:
    os.remove(path)


def rename(src: str, dst: str) -> None:
  """Moves file or directory ``src`` to ``dst`` (remotely: copies, then deletes)."""
  if is_remote(src):
    _epath(src).rename(_epath(dst))
  else:
    os.rename(src, dst)


def open(path: str, mode: str = "r", encoding: str | None = None) -> IO:  # pylint: disable=redefined-builtin
  """``path`` opened like the built-in ``open`` (text or ``'b'`` modes).

  Raises:
    ValueError: mode ``'a'`` on a remote path (object stores have no append; use
      ``append_text``).
  """
  if not is_remote(path):
    return builtins.open(path, mode, encoding=encoding)
  if "a" in mode or "+" in mode:
    raise ValueError(f"{path}: mode {mode!r}: objects cannot be appended to; use append_text")
  return _epath(path).open(mode, encoding=encoding) if "b" not in mode else _epath(path).open(mode)


def read_text(path: str) -> str:
  """The UTF-8 text of file ``path``."""
  with open(path, encoding="utf-8") as f:
    return f.read()


def append_text(path: str, text: str) -> None:
  """Appends ``text`` to file ``path`` (created if missing). Remotely the object is read and
  written back whole, so it is for small files (``restarts.jsonl``)."""
  if not is_remote(path):
    with builtins.open(path, "a", encoding="utf-8") as f:
      f.write(text)
    return
  old = read_text(path) if exists(path) else ""
  write_text(path, old + text)


def glob(pattern: str) -> list[str]:
  """The paths matching ``pattern``, sorted (``**`` spans levels locally only).

  Raises:
    ValueError: ``**`` in a remote pattern.
  """
  if not is_remote(pattern):
    return sorted(glob_lib.glob(pattern, recursive=True))
  if "**" in pattern:
    raise ValueError(f"{pattern!r}: '**' is not supported on remote paths (one listing per "
                     "level); name the levels with '*', e.g. 'gs://bucket/data/*/*.jsonl'")
  first = min(pattern.find(c) for c in _GLOB_CHARS if c in pattern)
  base = pattern[:pattern.rfind("/", 0, first)]
  return sorted(str(p) for p in _epath(base).glob(pattern[len(base) + 1:]))


def walk(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
  """``os.walk(top)``: ``(directory, subdirectory names, file names)``, top down; the
  directories are full paths (with their scheme) either way."""
  if not is_remote(top):
    yield from os.walk(top)
    return
  scheme = top[:top.index("://") + 3]
  for root, dirs, names in _epath(top).walk():
    root = str(root)
    yield (root if is_remote(root) else scheme + root), list(dirs), list(names)


def copy(src: str, dst: str) -> None:
  """Copies file ``src`` to ``dst``, either of them local or remote."""
  if not is_remote(src) and not is_remote(dst):
    shutil.copyfile(src, dst)
    return
  with open(src, "rb") as fin, open(dst, "wb") as fout:
    shutil.copyfileobj(fin, fout, 1 << 24)


def cache_dir(*parts: str) -> str:
  """A local directory for copies of remote inputs and for what cannot live on an object
  store: ``$MIDPO_CACHE`` or ``$XDG_CACHE_HOME/midpo`` (default ``~/.cache/midpo``), then
  ``parts``. Created if missing."""
  root = os.environ.get("MIDPO_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "midpo")
  path = os.path.join(root, *parts)
  os.makedirs(path, exist_ok=True)
  return path


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """A local temporary path to write ``path``'s new content to. When the block ends
  without error it is renamed over a local ``path``, or uploaded whole to a remote one; it
  is removed otherwise."""
  if is_remote(path):
    with tempfile.TemporaryDirectory() as d:
      tmp = os.path.join(d, os.path.basename(path))
      yield tmp
      copy(tmp, path)
    return
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
    with builtins.open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


def write_json(path: str, obj: Any, *, indent: int | None = 1, **dump_kwargs) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically; ``dump_kwargs`` go to
  ``json.dumps``."""
  write_text(path, json.dumps(obj, indent=indent, **dump_kwargs))
