"""Where users' preference rows come from: file specs, file types and row readers.

``config.data.files.train_files`` and ``test_files`` name files by any of (:func:`resolve_files`):

- a list of entries (from a config file), or one string of comma-separated entries (from the
  command line: ``--config.data.files.train_files=a.jsonl,b.jsonl``; a path holding a comma must
  be given in a list);
- an entry is a file, a glob (``shards/*.jsonl.gz``; no match is an error), or a directory:

  * a ``datasets`` ``save_to_disk`` directory: a ``Dataset`` (``state.json``: its Arrow files in
    their order) or a ``DatasetDict`` (``dataset_dict.json``: the split named like the key, i.e.
    ``train`` for ``train_files`` and ``test`` for ``test_files``);
  * a Hugging Face Hub snapshot folder or any folder of split files: data files (searched
    recursively, hidden folders left out) named ``<split>.<ext>`` or
    ``<split>-NNNNN-of-NNNNN.<ext>`` (``data/train-00000-of-00001.parquet``,
    ``harmless-base/train.jsonl.gz``) are grouped by split and the key's split is taken; a
    folder without such names is read whole (a directory of shards).

  A directory that holds no data file, or not the key's split, is an error naming what it holds.

Any of them may be remote (``gs://bucket/data/train-*.parquet``; read through ``midpo.files``):
a remote glob takes ``*``, ``?`` and ``[...]`` but not ``**``.

File types (:data:`FILE_TYPES`): ``.jsonl`` and ``.jsonl.gz`` (one object a line; blank lines are
the note ``blank_lines``; a line that is not UTF-8 JSON is the bad row ``undecodable_line``),
``.json`` and ``.json.gz`` (one list of objects; a file that does not parse as a whole is an
error, since its rows cannot be counted), ``.parquet`` and ``.arrow`` (Arrow IPC streams as
``save_to_disk`` writes them), read through pyarrow. A UTF-8 byte-order mark at the start of a
text file is skipped. Row numbers (``line``) are 1-based, as the file has them.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
from typing import Any, Iterator, Sequence

from midpo import files
from midpo.data import report as report_lib
from midpo.data.report import BadRow

FILE_TYPES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".arrow")
# The split each file key reads from a folder of splits.
SPLIT_OF_KEY = {"train_files": "train", "test_files": "test"}
_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")
_SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")
_GLOB_CHARS = ("*", "?", "[")


class FilesSpecError(ValueError):
  """A file key names no usable file; the message names the key and what was found."""


def file_type(path: str) -> str:
  """The file type of ``path`` (one of ``FILE_TYPES``); ValueError otherwise."""
  for ext in sorted(FILE_TYPES, key=len, reverse=True):
    if path.endswith(ext):
      return ext
  raise ValueError(f"{path}: unknown file type; expected one of {FILE_TYPES}")


def _is_data_file(path: str) -> bool:
  return any(path.endswith(ext) for ext in FILE_TYPES)


def _entries(spec: Any) -> list[str]:
  if spec is None:
    return []
  if isinstance(spec, str):
    return [e.strip() for e in spec.split(",") if e.strip()]
  if isinstance(spec, (list, tuple)):
    out = []
    for e in spec:
      if not isinstance(e, str):
        raise FilesSpecError(f"entries must be paths (strings), got {e!r}")
      out.append(e.strip())
    return [e for e in out if e]
  raise FilesSpecError(f"expected a list of paths or a comma-separated string, got {spec!r}")


def _stem(path: str) -> str:
  name = os.path.basename(path)
  return name[: -len(file_type(name))]


def _split_of(path: str) -> str | None:
  stem = _stem(path)
  m = _SHARD.match(stem)
  if m:
    return m.group("split")
  return stem if stem in _SPLIT_NAMES else None


def _save_to_disk_files(directory: str, split: str) -> list[str] | None:
  state = os.path.join(directory, "state.json")
  if files.isfile(state):
    names = [d["filename"] for d in json.loads(files.read_text(state)).get("_data_files", [])]
    if not names:
      raise FilesSpecError(f"{directory}: save_to_disk state.json lists no data files")
    return [os.path.join(directory, n) for n in names]
  index = os.path.join(directory, "dataset_dict.json")
  if files.isfile(index):
    splits = list(json.loads(files.read_text(index)).get("splits", []))
    if split not in splits:
      raise FilesSpecError(
        f"{directory}: a DatasetDict with splits {splits}, no {split!r}; name one split's "
        f"folder, e.g. {os.path.join(directory, splits[0]) if splits else directory}")
    return _save_to_disk_files(os.path.join(directory, split), split)
  return None


def _folder_files(directory: str, split: str) -> list[str]:
  saved = _save_to_disk_files(directory, split)
  if saved is not None:
    return saved
  found = []
  for root, dirs, names in files.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    hidden = any(part.startswith(".") for part in os.path.relpath(root, directory).split(os.sep)
                 if part != ".")
    found += [os.path.join(root, n) for n in sorted(names)
              if not hidden and not n.startswith(".") and _is_data_file(n)]
  if not found:
    raise FilesSpecError(f"{directory}: no data files ({', '.join(FILE_TYPES)}) in it")
  by_split: dict[str, list[str]] = {}
  for p in found:
    by_split.setdefault(_split_of(p) or "", []).append(p)
  if not any(s.startswith(_SPLIT_NAMES) for s in by_split):
    return found  # a folder of shards: all of it
  if split in by_split:
    return by_split[split]
  named = sorted(s for s in by_split if s)
  example = os.path.join(os.path.dirname(by_split[named[0]][0]), f"{named[0]}*")
  raise FilesSpecError(
    f"{directory}: holds the splits {named}, no {split!r}; name one split's files, e.g. "
    f"{example}")


def resolve_files(spec: Any, key: str = "train_files") -> list[str]:
  """The absolute paths of the data files ``spec`` names (rules in the module docstring).

  Args:
    spec: a list of entries, or a comma-separated string of them (``''``: none).
    key: ``'train_files'`` or ``'test_files'``; names the split taken from a folder of splits.

  Raises:
    FilesSpecError: an entry matches nothing, a directory holds no data file or not the split,
      a file has an unknown type; the message begins with ``config.data.files.<key>``.
  """
  split = SPLIT_OF_KEY.get(key, key)
  out: list[str] = []
  try:
    for entry in _entries(spec):
      entry = entry if files.is_remote(entry) else os.path.expanduser(entry)
      if any(ch in entry for ch in _GLOB_CHARS):
        matches = files.glob(entry)
        if not matches:
          raise FilesSpecError(f"{entry!r} matches no file")
      else:
        matches = [entry]
      for m in matches:
        if files.isdir(m):
          out += _folder_files(m, split)
        elif files.isfile(m):
          file_type(m)
          out.append(m)
        else:
          raise FilesSpecError(f"{m}: no such file or directory")
  except (FilesSpecError, ValueError) as e:
    raise FilesSpecError(f"config.data.files.{key}: {e}") from None
  return [files.abspath(p) for p in out]


@contextlib.contextmanager
def _open_text(path: str) -> Iterator[Any]:
  with files.open(path, "rb") as raw:
    if not path.endswith(".gz"):
      yield raw
      return
    with gzip.GzipFile(fileobj=raw) as f:
      yield f


def _decode_line(raw: bytes, first: bool) -> Any:
  text = raw.decode("utf-8-sig" if first else "utf-8")
  return json.loads(text)


def read_rows(path: str, report: report_lib.BadRowReport) -> Iterator[tuple[int, Any]]:
  """Yields ``(line, row)`` of one file; a row that cannot be decoded is yielded as a ``BadRow``.

  Raises:
    ValueError: a ``.json`` file that is not one valid UTF-8 JSON list.
  """
  ext = file_type(path)
  if ext in (".jsonl", ".jsonl.gz"):
    with _open_text(path) as f:
      for line_no, raw in enumerate(f, start=1):
        if not raw.strip():
          report.note("blank_lines")
          continue
        try:
          row = _decode_line(raw, line_no == 1)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
          yield line_no, BadRow(report_lib.UNDECODABLE_LINE, f"{type(e).__name__}: {e}")
          continue
        yield line_no, row
  elif ext in (".json", ".json.gz"):
    with _open_text(path) as f:
      raw = f.read()
    try:
      rows = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      # Not one row but the whole file: nothing can be counted row by row, so stop.
      raise ValueError(
        f"{path}: not a valid UTF-8 JSON file ({e}); use .jsonl for one object a line"
      ) from e
    if not isinstance(rows, list):
      raise ValueError(
        f"{path}: a .json file must hold a list of row objects, got {type(rows).__name__}"
      )
    yield from enumerate(rows, start=1)
  else:
    yield from enumerate(_arrow_rows(path, ext), start=1)


def _arrow_rows(path: str, ext: str) -> Iterator[dict]:
  import pyarrow  # pylint: disable=g-import-not-at-top

  if ext == ".parquet":
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    with files.open(path, "rb") as f:
      for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
        yield from batch.to_pylist()
    return
  with (files.open(path, "rb") if files.is_remote(path) else pyarrow.memory_map(path)) as source:
    try:
      reader = pyarrow.ipc.open_stream(source)
    except pyarrow.ArrowInvalid:
      reader = pyarrow.ipc.open_file(source)
      for i in range(reader.num_record_batches):
        yield from reader.get_batch(i).to_pylist()
      return
    for batch in reader:
      yield from batch.to_pylist()


def check_unicode(strings: Sequence[str]) -> None:
  """Raises ``BadRow('undecodable_line')`` if a string cannot be written as UTF-8 (e.g. a lone
  surrogate such as JSON's ``"\\ud83d"``, which Python's json module accepts)."""
  for s in strings:
    try:
      s.encode("utf-8")
    except UnicodeEncodeError as e:
      raise BadRow(report_lib.UNDECODABLE_LINE, f"text is not valid Unicode ({e.reason})") from None
