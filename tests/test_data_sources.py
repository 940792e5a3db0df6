"""Users' files as they come: from the command line (comma lists, globs, folders), compressed,
as ``datasets.save_to_disk`` directories and Hub snapshot folders, with a byte-order mark or a
lone surrogate; each failure of the issue that asked for them."""

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from midpo.data import pipeline, report, sources, tfds_builders
from midpo.training import run_identity

ROWS = [{"prompt": f"Question {i}?", "chosen": f" good {i}", "rejected": f" bad {i}"}
        for i in range(6)]


def _jsonl(path, rows, *, gz=False, bom=False):
  text = "".join(json.dumps(r) + "\n" for r in rows)
  data = (b"\xef\xbb\xbf" if bom else b"") + text.encode()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
    f.write(data)
  return str(path)


def _parquet(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path)
  return str(path)


def _prompts(paths, key="train_files"):
  rep = report.BadRowReport()
  from midpo.data import formats
  files = sources.resolve_files(paths, key)
  return [p.prompt for _, _, p in formats.iter_pairs("trl_standard", files, rep)], rep


def test_comma_separated_string_glob_and_list(tmp_path):
  a = _jsonl(tmp_path / "a.jsonl", ROWS[:2])
  b = _jsonl(tmp_path / "b.jsonl", ROWS[2:4])
  c = _jsonl(tmp_path / "c.jsonl", ROWS[4:])
  assert sources.resolve_files(f"{a}, {b}") == [a, b]
  assert sources.resolve_files([a, b]) == [a, b]
  assert sources.resolve_files(str(tmp_path / "*.jsonl")) == [a, b, c]
  assert sources.resolve_files("") == [] and sources.resolve_files([]) == []
  with pytest.raises(sources.FilesSpecError, match=r"config.data.files.train_files: .*matches no"):
    sources.resolve_files(str(tmp_path / "*.parquet"))
  with pytest.raises(sources.FilesSpecError, match=r"config.data.files.test_files: .*no such"):
    sources.resolve_files(str(tmp_path / "missing.jsonl"), "test_files")
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(sources.FilesSpecError, match=r"unknown file type"):
    sources.resolve_files(str(tmp_path / "notes.txt"))


def test_folder_of_shards_and_compressed_files(tmp_path):
  _jsonl(tmp_path / "shards" / "part-0.jsonl.gz", ROWS[:3], gz=True)
  _jsonl(tmp_path / "shards" / "part-1.jsonl", ROWS[3:])
  with open(tmp_path / "shards" / "README.md", "w") as f:
    f.write("not data")
  with gzip.open(tmp_path / "shards" / "more.json.gz", "wt") as f:
    json.dump(ROWS[:1], f)
  prompts, rep = _prompts(str(tmp_path / "shards"))
  assert prompts == [r["prompt"] for r in ROWS[:1] + ROWS[:3] + ROWS[3:]]
  assert rep.rows_read == 7 and rep.rows_kept == 7
  os.makedirs(tmp_path / "empty")
  with pytest.raises(sources.FilesSpecError, match=r"empty: no data files"):
    sources.resolve_files(str(tmp_path / "empty"))


def test_hub_snapshot_folder_takes_the_keys_split(tmp_path):
  snap = tmp_path / "snapshot"
  _parquet(snap / "data" / "train-00000-of-00002.parquet", ROWS[:2])
  _parquet(snap / "data" / "train-00001-of-00002.parquet", ROWS[2:4])
  _parquet(snap / "data" / "test-00000-of-00001.parquet", ROWS[4:])
  with open(snap / "README.md", "w") as f:
    f.write("---\nlicense: mit\n---\n")
  assert _prompts(str(snap))[0] == [r["prompt"] for r in ROWS[:4]]
  assert _prompts(str(snap), "test_files")[0] == [r["prompt"] for r in ROWS[4:]]
  # UltraFeedback-binarized names its splits train_prefs, test_prefs, ...: the user picks one.
  uf = tmp_path / "uf"
  _parquet(uf / "data" / "train_prefs-00000-of-00001.parquet", ROWS[:2])
  _parquet(uf / "data" / "test_prefs-00000-of-00001.parquet", ROWS[2:])
  with pytest.raises(sources.FilesSpecError,
                     match=r"holds the splits \['test_prefs', 'train_prefs'\], no 'train'.*"
                           r"data/test_prefs\*"):
    sources.resolve_files(str(uf))
  assert _prompts(str(uf / "data" / "train_prefs-*"))[0] == [r["prompt"] for r in ROWS[:2]]


def test_snapshot_with_one_file_name_in_several_folders(tmp_path):
  """HH-RLHF's layout: <subset>/train.jsonl.gz; bad rows are named by folder and file."""
  snap = tmp_path / "hh"
  _jsonl(snap / "harmless-base" / "train.jsonl.gz", ROWS[:2] + [{"prompt": "x"}], gz=True)
  _jsonl(snap / "helpful-base" / "train.jsonl.gz", ROWS[2:4], gz=True)
  _jsonl(snap / "helpful-base" / "test.jsonl.gz", ROWS[4:], gz=True)
  prompts, rep = _prompts(str(snap))
  assert prompts == [r["prompt"] for r in ROWS[:4]]
  bad = rep.to_dict()["first_bad_rows"]
  assert [(b["file"], b["line"]) for b in bad] == [("harmless-base/train.jsonl.gz", 3)]


def test_datasets_save_to_disk_directories(tmp_path):
  datasets = pytest.importorskip("datasets")
  ds = datasets.Dataset.from_list(ROWS)
  ds.save_to_disk(str(tmp_path / "one"), num_shards=2)
  assert _prompts(str(tmp_path / "one"))[0] == [r["prompt"] for r in ROWS]
  dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]),
                             "validation": datasets.Dataset.from_list(ROWS[4:])})
  dd.save_to_disk(str(tmp_path / "dict"))
  assert _prompts(str(tmp_path / "dict"))[0] == [r["prompt"] for r in ROWS[:4]]
  with pytest.raises(sources.FilesSpecError, match=r"splits \['train', 'validation'\], no 'test'"):
    sources.resolve_files(str(tmp_path / "dict"), "test_files")
  assert _prompts(str(tmp_path / "dict" / "validation"), "test_files")[0] == [
      r["prompt"] for r in ROWS[4:]]


def test_byte_order_mark_keeps_the_first_row(tmp_path):
  prompts, rep = _prompts(_jsonl(tmp_path / "bom.jsonl", ROWS[:3], bom=True))
  assert prompts == [r["prompt"] for r in ROWS[:3]] and rep.rows_kept == 3
  path = tmp_path / "bom.json"
  path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[:2]).encode())
  assert _prompts(str(path))[0] == [r["prompt"] for r in ROWS[:2]]


def test_lone_surrogate_is_a_counted_bad_row_not_a_crash(tmp_path):
  path = tmp_path / "s.jsonl"
  lines = [json.dumps(ROWS[0]), '{"prompt": "hi \\ud83d", "chosen": "a", "rejected": "b"}',
           json.dumps(ROWS[1])]
  path.write_text("\n".join(lines) + "\n")
  b = tfds_builders.files_builder(str(tmp_path / "tfds"), "trl_standard", [str(path)])
  rep = tfds_builders.build_report(b, "train")
  assert rep["rows_kept"] == 2 and rep["bad_rows"] == {"undecodable_line": 1}
  assert rep["first_bad_rows"][0]["line"] == 2
  with pytest.raises(report.BadRowError, match=r"s.jsonl.*line 2|s.jsonl:2"):
    tfds_builders.files_builder(str(tmp_path / "tfds"), "trl_standard", [str(path)],
                                bad_rows="fatal")


def test_fatal_is_part_of_the_datasets_cache_key(tmp_path):
  """A dataset built under 'skip' is not reused under 'fatal' (which then fails)."""
  path = _jsonl(tmp_path / "d.jsonl", ROWS[:2] + [{"prompt": "only"}])
  tfds_builders.files_builder(str(tmp_path / "tfds"), "trl_standard", [path])
  with pytest.raises(report.BadRowError):
    tfds_builders.files_builder(str(tmp_path / "tfds"), "trl_standard", [path], bad_rows="fatal")


def test_file_keys_are_strings_a_command_line_can_set(tmp_path):
  c = pipeline.default_config()
  c.data_dir = str(tmp_path / "tfds")
  c.source = "files"
  c.files.train_files = "a.jsonl,b.jsonl"  # as --config.data.files.train_files=... sets it
  c.files.train_files = ["a.jsonl"]  # as a config file may
  a = _jsonl(tmp_path / "a.jsonl", ROWS)
  c.files.train_files = a
  pipeline.validate_config(c)
  c.files.train_files = ""
  with pytest.raises(ValueError, match=r"config.data.files.train_files: names no file"):
    pipeline.validate_config(c)
  c.files.train_files = a
  c.files.test_files = str(tmp_path / "nope*.jsonl")
  with pytest.raises(ValueError, match=r"config.data.files.test_files: .* matches no file"):
    pipeline.validate_config(c)
  # A workdir written when the keys were lists resumes: [] and '' are one value.
  old = {"data": {"files": {"train_files": [], "test_files": []}}}
  new = {"data": {"files": {"train_files": "", "test_files": ""}}}
  assert run_identity.differences(old, new) == []
