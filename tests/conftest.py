"""Suite-wide settings: implicit rank promotion is an error (in this process
and in every ``python -m midpo.main`` a test starts)."""

import os

os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_report_header(config):
  del config
  return f"jax {jax.__version__}; jax_numpy_rank_promotion={jax.config.jax_numpy_rank_promotion}"
