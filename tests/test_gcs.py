"""``gs://`` paths against a local Cloud Storage emulator (``tests/gcs_emulator.py``), through
the client code a run on Cloud Storage uses (etils.epath and gcsfs; tensorstore for orbax):
``midpo.files``' operations, users' data files in a bucket, a checkpoint directory in a
bucket, and what is refused. Whole runs with a ``gs://`` workdir: ``test_train_hf.py``
(a checkpoint and workdir in a bucket) and ``test_train.py`` (SIGTERM and resume in a bucket).
"""

import json
import logging
import os
import sys

import pytest

from midpo import files
from midpo.data import report, sources, tfds_builders
from midpo.models import hub
from midpo.training import config as config_lib
from tests import train_utils as tu
from tests.test_data_sources import ROWS, _jsonl, _parquet


def _upload(local_dir, url):
  """Copies local directory ``local_dir`` to ``url``; returns the uploaded relative paths."""
  names = []
  for root, _, fnames in os.walk(local_dir):
    for n in fnames:
      rel = os.path.relpath(os.path.join(root, n), local_dir)
      files.copy(os.path.join(root, n), f"{url}/{rel}")
      names.append(rel)
  return sorted(names)


def test_any_bytes_go_to_a_bucket_and_back_unchanged(gcs, tmp_path):
  """Small files go up as one multipart request: their bytes, line breaks, a final CR and
  the request's own boundary included, come back as they were (the emulator's own parser
  dropped a final CR; tests/gcs_emulator.py)."""
  payloads = [b"ab\r", b"ab\r\n", b"a\r\n\r\nb", b"\n", b"\r", b"", bytes(range(256)),
              b"x\n--==0==\ny\n--==0==--\n\r"]  # the last holds gcsfs's boundary
  for i, data in enumerate(payloads):
    local, back = tmp_path / f"f{i}", tmp_path / f"b{i}"
    local.write_bytes(data)
    files.copy(str(local), f"gs://{gcs}/bytes/f{i}")
    files.copy(f"gs://{gcs}/bytes/f{i}", str(back))
    assert back.read_bytes() == data, data


def test_file_operations_on_a_bucket(gcs):
  root = f"gs://{gcs}/ops"
  assert files.is_remote(root) and not files.is_remote("/tmp/x")
  assert files.abspath(root) == root
  assert not files.exists(root) and not files.isdir(root)
  files.makedirs(root + "/a")  # no directories on an object store: nothing to make
  files.write_json(root + "/a/x.json", {"k": 1})
  assert json.loads(files.read_text(root + "/a/x.json")) == {"k": 1}
  assert files.isdir(root) and files.isdir(root + "/a") and files.isfile(root + "/a/x.json")
  assert not files.isfile(root + "/a")

  # No append on an object store (gcsfs would overwrite): append_text rewrites, 'a' is refused.
  files.append_text(root + "/log.jsonl", "1\n")
  files.append_text(root + "/log.jsonl", "2\n")
  assert files.read_text(root + "/log.jsonl") == "1\n2\n"
  with pytest.raises(ValueError, match="append_text"):
    files.open(root + "/log.jsonl", "a")

  files.write_text(root + "/a/y.txt", "y")
  files.write_text(root + "/a/.hidden.txt", "h")
  files.write_text(root + "/a/sub/z.txt", "z")
  assert files.listdir(root + "/a") == [".hidden.txt", "sub", "x.json", "y.txt"]
  assert files.glob(root + "/a/*.txt") == [root + "/a/y.txt"]  # as a local glob: no dot files
  assert files.glob(root + "/a/.*.txt") == [root + "/a/.hidden.txt"]
  files.remove(root + "/a/.hidden.txt")
  assert files.glob(root + "/*/sub/?.txt") == [root + "/a/sub/z.txt"]
  with pytest.raises(ValueError, match=r"'\*\*' is not supported on remote paths"):
    files.glob(root + "/**/*.txt")
  walked = {r: sorted(n) for r, _, n in files.walk(root)}
  assert walked[root + "/a/sub"] == ["z.txt"]  # the roots keep their scheme
  assert walked[root + "/a"] == ["x.json", "y.txt"]
  pruned = []
  for r, dirs, _ in files.walk(root):
    pruned.append(r)
    dirs[:] = [d for d in dirs if d != "sub"]  # as with os.walk: not visited
  assert root + "/a/sub" not in pruned and root + "/a" in pruned

  files.rename(root + "/a", root + "/b")
  assert not files.exists(root + "/a") and files.read_text(root + "/b/sub/z.txt") == "z"

  with files.atomic_path(root + "/blob.bin") as tmp:
    assert not files.is_remote(tmp)
    with open(tmp, "wb") as f:
      f.write(b"\x00" * 10)
  with files.open(root + "/blob.bin", "rb") as f:
    assert f.read() == b"\x00" * 10
  with pytest.raises(RuntimeError, match="half-written"):
    with files.atomic_path(root + "/never.bin") as tmp:
      with open(tmp, "wb") as f:
        f.write(b"x")
      raise RuntimeError("half-written")
  assert not files.exists(root + "/never.bin")  # a failed write uploads nothing
  files.remove(root + "/blob.bin")
  assert not files.exists(root + "/blob.bin")


def test_copies_between_a_disk_and_a_bucket(gcs, tmp_path):
  src = tmp_path / "big.bin"
  src.write_bytes(os.urandom(3 << 20))
  files.copy(str(src), f"gs://{gcs}/copies/big.bin")
  files.copy(f"gs://{gcs}/copies/big.bin", f"gs://{gcs}/copies/again.bin")
  files.copy(f"gs://{gcs}/copies/again.bin", str(tmp_path / "back.bin"))
  assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_metrics_in_a_bucket_are_uploaded_whole_at_flush_and_after_the_interval(gcs):
  from midpo.training import metrics_writer
  workdir = f"gs://{gcs}/metrics"
  writer = metrics_writer.MetricsWriter(workdir, remote_flush_s=3600.0)
  writer.write("preference", 1, {"loss": 0.5})
  assert not files.exists(f"{workdir}/metrics.jsonl")  # within the interval: not yet
  writer.flush()  # what a checkpoint save does
  assert tu.read_metrics(workdir) == [{"stage": "preference", "step": 1, "loss": 0.5}]
  assert [n for n in files.listdir(f"{workdir}/tensorboard") if "tfevents" in n]
  writer.close()
  resumed = metrics_writer.MetricsWriter(workdir, remote_flush_s=0.0)  # a restart
  resumed.write("preference", 2, {"loss": 0.25})  # the interval has passed: uploaded
  assert [r["step"] for r in tu.read_metrics(workdir)] == [1, 2]
  resumed.close()


def test_gs_paths_without_gcsfs_say_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed
  with pytest.raises(files.MissingFilesystem, match=r"pip install -e '\.\[gcs\]'"):
    files.exists("gs://some-bucket/run")
  assert not files.exists("/nonexistent/local/path")  # local paths never need it


def test_users_files_in_a_bucket_resolve_read_and_build_as_local_ones(gcs, tmp_path):
  local = tmp_path / "snapshot"
  _jsonl(local / "data" / "train-00000-of-00002.jsonl", ROWS[:3], bom=True)
  _jsonl(local / "data" / "train-00001-of-00002.jsonl.gz", ROWS[3:], gz=True)
  _parquet(local / "data" / "test-00000-of-00001.parquet", ROWS[:2])
  _jsonl(local / ".cache" / "train.jsonl", ROWS[:1])  # hidden: not data
  url = f"gs://{gcs}/snapshot"
  _upload(local, url)

  train = sources.resolve_files(url, "train_files")
  assert train == [f"{url}/data/train-00000-of-00002.jsonl",
                   f"{url}/data/train-00001-of-00002.jsonl.gz"]
  assert sources.resolve_files(url, "test_files") == [f"{url}/data/test-00000-of-00001.parquet"]
  assert sources.resolve_files(f"{url}/data/train-*", "train_files") == train
  assert sources.resolve_files(f"{train[1]},{train[0]}", "train_files") == train[::-1]
  with pytest.raises(sources.FilesSpecError, match="no such file or directory"):
    sources.resolve_files(f"{url}/data/missing.jsonl", "train_files")
  rows = [row for p in train for _, row in sources.read_rows(p, report.BadRowReport())]
  assert rows == ROWS
  test = sources.resolve_files(url, "test_files")
  assert [row for _, row in sources.read_rows(test[0], report.BadRowReport())] == ROWS[:2]

  # The dataset's cache key is the files' names and bytes: the same as the local copies'.
  local_train = sources.resolve_files(str(local), "train_files")
  assert (tfds_builders.files_config("trl_standard", train, test).name
          == tfds_builders.files_config("trl_standard", local_train,
                                        sources.resolve_files(str(local), "test_files")).name)
  builder = tfds_builders.files_builder(str(tmp_path / "tfds"), "trl_standard", train, test)
  assert builder.info.splits["train"].num_examples == len(ROWS)
  assert builder.info.splits["test"].num_examples == 2


def test_a_datasets_save_to_disk_folder_in_a_bucket(gcs, tmp_path):
  datasets = pytest.importorskip("datasets")
  datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"), num_shards=2)
  url = f"gs://{gcs}/saved"
  _upload(tmp_path / "saved", url)
  paths = sources.resolve_files(url, "train_files")
  assert [p.rsplit("/", 1)[1] for p in paths] == [
      "data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
  rows = [row for p in paths for _, row in sources.read_rows(p, report.BadRowReport())]
  assert [r["prompt"] for r in rows] == [r["prompt"] for r in ROWS]


def test_a_checkpoint_directory_in_a_bucket_is_copied_once_and_again_when_it_changes(
    gcs, tmp_path, monkeypatch, caplog):
  from tests import test_trl_tokenization as ttt
  from midpo.training import env as env_lib
  monkeypatch.setenv("MIDPO_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(hub, "_resolved", {})
  src = tmp_path / "model"
  ttt._build(str(src), "chatml")  # tokenizer.json, tokenizer_config.json
  (src / "config.json").write_text('{"model_type": "llama"}')
  (src / "model.safetensors").write_bytes(os.urandom(4096))
  (src / "README.md").write_text("not part of a checkpoint")
  (src / "tokenizer_extras").mkdir()  # a folder whose name matches a checkpoint pattern
  (src / "tokenizer_extras" / "notes.txt").write_text("not a checkpoint file")
  wanted = sorted(n for n in os.listdir(src) if n not in ("README.md", "tokenizer_extras"))
  url = f"gs://{gcs}/models/tiny"
  _upload(src, url)
  with caplog.at_level(logging.INFO):
    local = hub.local_dir(url)
  assert not files.is_remote(local) and local.startswith(str(tmp_path / "cache"))
  assert sorted(os.listdir(local)) == wanted
  for name in wanted:
    assert (src / name).read_bytes() == open(os.path.join(local, name), "rb").read()
  assert f"({len(wanted)} files)" in caplog.text
  monkeypatch.setattr(hub, "_resolved", {})  # a new process: nothing is copied again
  caplog.clear()
  with caplog.at_level(logging.INFO):
    assert hub.local_dir(url) == local
  assert "unchanged since its copy" in caplog.text
  # Rewritten in place with the same size (a new export): a new copy, not the stale one.
  (src / "model.safetensors").write_bytes(os.urandom(4096))
  files.copy(str(src / "model.safetensors"), f"{url}/model.safetensors")
  monkeypatch.setattr(hub, "_resolved", {})
  changed = hub.local_dir(url)
  assert changed != local
  assert open(os.path.join(changed, "model.safetensors"), "rb").read() == (
      src / "model.safetensors").read_bytes()
  # config.tokenizer may name the bucket directory too.
  config = tu.tiny_config("dpo", **{"tokenizer": url})
  assert env_lib.make_tokenizer(config).vocab_size == (
      env_lib.make_tokenizer(tu.tiny_config("dpo", **{"tokenizer": str(src)})).vocab_size)

  with pytest.raises(hub.HubError, match="config.model.hf_path: .*no such directory"):
    hub.local_dir(f"gs://{gcs}/models/none")
  files.write_text(f"gs://{gcs}/models/empty/notes.txt", "x")
  with pytest.raises(hub.HubError, match="holds no checkpoint file"):
    hub.local_dir(f"gs://{gcs}/models/empty")


def test_what_cannot_live_in_a_bucket_is_refused_by_name(gcs, tmp_path):
  config = tu.tiny_config("dpo", **{"data.data_dir": f"gs://{gcs}/tfds"})
  with pytest.raises(config_lib.ConfigError, match="config.data.data_dir: .*array_record"):
    config_lib.validate(config)
  from midpo import sweep
  with pytest.raises(sweep.SweepError, match="must be local"):
    sweep.run_sweep(None, "configs/sweeps/quick.py", f"gs://{gcs}/sweep")
