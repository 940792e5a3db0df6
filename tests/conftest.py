"""Suite-wide settings: implicit rank promotion is an error (in this process
and in every ``python -m midpo.main`` a test starts); the one tiny default run
whose SFT checkpoint and TFDS data the trainer's tests reuse (``shared``)."""

import os

import pytest

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
