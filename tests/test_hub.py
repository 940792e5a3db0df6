"""``config.model.hf_path`` as a Hub id goes through ``huggingface_hub.snapshot_download``, the
ordinary way: a cached snapshot is used in offline mode, and without one the error says how to
get it (one line, exit 2, before any training)."""

import json
import os
import subprocess
import sys

from midpo.models import hub
from tests import train_utils as tu

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _run(code, env):
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=tu.ROOT, env=dict(os.environ, **env), timeout=120)
  return proc.returncode, proc.stdout + proc.stderr


def test_hub_ids_offline(tmp_path):
  cache = tmp_path / "hub"
  snap = cache / "models--org--tiny" / "snapshots" / COMMIT
  os.makedirs(snap)
  (snap / "config.json").write_text(json.dumps({"model_type": "llama"}))
  os.makedirs(cache / "models--org--tiny" / "refs")
  (cache / "models--org--tiny" / "refs" / "main").write_text(COMMIT)
  env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
  rc, out = _run("from midpo.models import hub; print(hub.local_dir('org/tiny'))", env)
  assert rc == 0 and out.strip().splitlines()[-1] == str(snap), out
  rc, out = _run("from midpo.models import hub; hub.local_dir('org/other')", env)
  assert rc != 0 and "no snapshot of it is cached" in out and "hf download org/other" in out
  rc, out = tu.run_main("configs/dpo.py", str(tmp_path / "w"),
                        {"model.hf_path": "org/other", "stages": ("preference",)}, env=env)
  assert rc == 2 and "Traceback" not in out, out[-3000:]
  assert out.strip().splitlines()[-1].startswith(
      "midpo: error: config.model.hf_path: 'org/other' is not a local directory"), out[-2000:]


def test_what_is_a_hub_id(tmp_path):
  assert hub.is_hub_id("meta-llama/Llama-3.2-1B") and hub.is_hub_id("org/name@v1.0")
  assert not hub.is_hub_id(str(tmp_path))  # a directory is a directory
  assert not hub.is_hub_id("a/b/c") and not hub.is_hub_id("gs://bucket/ckpt")
  assert hub.local_dir(str(tmp_path)) == str(tmp_path)
