r"""midpo's entry point: ``python -m midpo.main --config=configs/<algo>.py --workdir=W``.

Flags, logging and (on several hosts) ``jax.distributed``; everything else is
``midpo.train.train_and_evaluate``. Override any config field on the command
line, e.g. ``--config.prior.name=simpo --config.prior.gamma=1.0``; a typo in a
key is an error (the config is locked).

Multi-host: on Cloud TPU VMs JAX finds its peers itself; elsewhere set
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
(``launch/slurm.sh`` does). CPU-only multi-process runs (tests) use gloo.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def _maybe_initialize_distributed():
  import jax

  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()  # Cloud TPU pod slice: JAX detects everything.


class _QuietLibraries:
  """Drops orbax's and TFDS's INFO chatter (per array, per file); keeps warnings."""

  NOISY = ("/orbax/", "/tensorflow_datasets/", "/etils/")

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(n in record.pathname for n in self.NOISY)


def main(argv):
  """Logging, ``jax.distributed`` when several hosts, then the stage runner."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  _maybe_initialize_distributed()
  import jax

  from midpo import train

  logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
