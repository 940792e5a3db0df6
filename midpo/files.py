"""Paths of a run, local or remote, and result files written whole or not at all.

A run's workdir, users' data files, checkpoint directories (``model.hf_path``, ``tokenizer``,
``sft.checkpoint``) and ``pairs_file`` are read and written through here. A plain path uses
``os`` as it always did. A path with a scheme (``gs://bucket/run``) goes through ``fsspec``, with
the filesystem package of its scheme: for Cloud Storage ``gcsfs``, the ``gcs`` extra (``pip
install -e '.[gcs]'``; without it, the error says so). Only ``gs://`` is tested (against a local
emulator); other fsspec schemes (``s3://`` with ``s3fs``, ...) go the same way, untested. Orbax
writes checkpoints to such paths itself (tensorstore for the arrays, ``etils.epath`` for the
rest). Analysis notebooks (``midpo.analysis``) and sweeps read local workdirs only.

What differs on an object store, and how it is handled here:

- There are no directories: ``makedirs`` does nothing, and ``isdir`` is true once something is
  stored under the prefix.
- An object is replaced whole by each upload, never seen half-written: ``atomic_path`` writes a
  local temporary file and uploads it once complete (``copy``: an upload that fails midway
  makes no object).
- There is no append (gcsfs silently overwrites): ``append_text`` reads the object and writes it
  back with the new text; ``open`` refuses mode ``'a'``.
- ``glob`` takes ``*``, ``?`` and ``[...]`` but not ``**`` (one listing per level: the error
  says to name the levels); names starting with ``.`` are left out, as a local glob does.

``write_text`` writes a temporary file next to a local target and renames it over the target
(``os.replace``, atomic on POSIX filesystems), so a kill or a full disk mid-write leaves the
previous file, never a truncated one. Every result file of a run (``config.json``,
``eval.json``, reports, exported configs) goes through here.
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


def _fs(path: str):
  """``(fsspec filesystem, path without its scheme)`` of a remote path."""
  path = os.fspath(path)
  try:
    if path.startswith("gs://"):
      import gcsfs  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import fsspec  # pylint: disable=g-import-not-at-top
    return fsspec.core.url_to_fs(path)
  except ImportError as e:
    extra = GCS_EXTRA if path.startswith("gs://") else "the fsspec filesystem of its scheme"
    raise MissingFilesystem(f"{path}: remote paths are read and written through fsspec, and "
                            f"what this one needs is not installed ({e}): {extra}") from None


def _full(fs, path: str) -> str:
  return fs.unstrip_protocol(path.rstrip("/"))


def abspath(path: str) -> str:
  """``path`` made absolute (``os.path.abspath``); a remote path as it is."""
  return path if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  """Whether a file or directory (a non-empty prefix, remotely) is at ``path``."""
  if not is_remote(path):
    return os.path.exists(path)
  fs, p = _fs(path)
  return fs.exists(p)


def isdir(path: str) -> bool:
  """Whether ``path`` is a directory (remotely: whether anything is stored under it)."""
  if not is_remote(path):
    return os.path.isdir(path)
  fs, p = _fs(path)
  return fs.isdir(p)


def isfile(path: str) -> bool:
  """Whether ``path`` is a file (an object)."""
  if not is_remote(path):
    return os.path.isfile(path)
  fs, p = _fs(path)
  return fs.isfile(p)


def fingerprint(path: str) -> str:
  """A string that changes when file ``path``'s content changes: remotely the object's
  generation or checksum as the store reports it (else its size and time); locally its size
  and modification time in nanoseconds."""
  if not is_remote(path):
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"
  fs, p = _fs(path)
  info = fs.info(p)
  for key in ("generation", "md5Hash", "crc32c", "ETag", "etag"):
    if info.get(key):
      return f"{info.get('size')}:{key}={info[key]}"
  return f"{info.get('size')}:{info.get('mtime') or info.get('updated') or ''}"


def makedirs(path: str) -> None:
  """``os.makedirs(path, exist_ok=True)``; nothing for a remote path (no directories)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """The names of the entries of directory ``path``, sorted."""
  if not is_remote(path):
    return sorted(os.listdir(path))
  fs, p = _fs(path)
  return sorted(name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(p, detail=False)
                if name.rstrip("/") != p.rstrip("/"))


def remove(path: str) -> None:
  """Deletes file ``path``."""
  if not is_remote(path):
    os.remove(path)
    return
  fs, p = _fs(path)
  fs.rm_file(p)


def rename(src: str, dst: str) -> None:
  """Moves file or directory ``src`` to ``dst`` (remotely: object by object)."""
  if not is_remote(src):
    os.rename(src, dst)
    return
  fs, p = _fs(src)
  fs.mv(p, _fs(dst)[1], recursive=True)


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
  fs, p = _fs(path)
  return fs.open(p, mode) if "b" in mode else fs.open(p, mode, encoding=encoding or "utf-8")


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


def _hidden(rel: str) -> bool:
  return any(part.startswith(".") for part in rel.split("/"))


def glob(pattern: str) -> list[str]:
  """The paths matching ``pattern``, sorted (``**`` spans levels locally only; names that
  start with ``.`` match only a pattern that names them, as ``glob.glob`` does).

  Raises:
    ValueError: ``**`` in a remote pattern.
  """
  if not is_remote(pattern):
    return sorted(glob_lib.glob(pattern, recursive=True))
  if "**" in pattern:
    raise ValueError(f"{pattern!r}: '**' is not supported on remote paths (one listing per "
                     "level); name the levels with '*', e.g. 'gs://bucket/data/*/*.jsonl'")
  fs, p = _fs(pattern)
  first = min(p.find(c) for c in _GLOB_CHARS if c in p)
  base = p[:p.rfind("/", 0, first)]
  named_hidden = _hidden(p[len(base) + 1:])
  return sorted(_full(fs, m) for m in fs.glob(p)
                if named_hidden or not _hidden(m[len(base) + 1:]))


def walk(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
  """``os.walk(top)``: ``(directory, subdirectory names, file names)``, top down, the
  directories as full paths (with their scheme); pruning ``dirs`` in place skips them, on
  either kind of path."""
  if not is_remote(top):
    yield from os.walk(top)
    return
  fs, p = _fs(top)
  for root, dirs, names in fs.walk(p, topdown=True):
    yield _full(fs, root), dirs, names  # fsspec walks the list it yielded: pruning works


def copy(src: str, dst: str) -> None:
  """Copies file ``src`` to ``dst``, either of them local or remote. A local file goes to a
  remote ``dst`` by the store's own upload (``put_file``: one request, or a resumable session
  finalised at its end), so a copy that fails midway makes no object."""
  if not is_remote(src) and not is_remote(dst):
    shutil.copyfile(src, dst)
  elif not is_remote(src):
    fs, p = _fs(dst)
    fs.put_file(src, p)
  elif not is_remote(dst):
    fs, p = _fs(src)
    fs.get_file(p, dst)
  else:
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
