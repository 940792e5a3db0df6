"""Suite-wide settings: implicit rank promotion is an error (in this process
and in every ``python -m midpo.main`` a test starts); the one tiny default run
whose SFT checkpoint and TFDS data the trainer's tests reuse (``shared``)."""

import atexit
import os
import shutil
import tempfile

import pytest

# One JAX persistent compilation cache for the session, shared by every
# ``python -m midpo.main`` a test starts and by pytest-xdist's workers (they
# inherit this process's environment): the tiny runs compile the same
# programs again and again (a cache hit loads the same executable).
_CACHE = tempfile.mkdtemp(prefix="midpo-tests-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_report_header(config):
  del config
  return f"jax {jax.__version__}; jax_numpy_rank_promotion={jax.config.jax_numpy_rank_promotion}"


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
  """One tiny default run (SFT, DPO, eval) in-process: its SFT checkpoint and
  TFDS data are every other trainer test's reference and data."""
  from midpo import train
  from tests import train_utils as tu
  root = tmp_path_factory.mktemp("shared")
  data_dir = str(root / "tfds")
  config = tu.tiny_config("dpo", **{"data.data_dir": data_dir})
  workdir = str(root / "sft_run")
  results = train.train_and_evaluate(config, workdir)
  return {"data_dir": data_dir, "sft": os.path.join(workdir, "sft"), "workdir": workdir,
          "results": results}


@pytest.fixture(scope="session")
def gcs():
  """A local Cloud Storage emulator for the session (``tests/gcs_emulator.py``): its
  bucket's name, with this process's environment (inherited by every ``python -m
  midpo.main`` a test starts) pointing gcsfs, google-cloud-storage and tensorstore at it."""
  from tests import gcs_emulator
  server, env = gcs_emulator.start()
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield gcs_emulator.BUCKET
  server.stop()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
