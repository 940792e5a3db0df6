r"""midpo's entry point: ``python -m midpo.main --config=configs/<algo>.py --workdir=W``.

Flags, logging and (on several hosts) ``jax.distributed``; everything else is
``midpo.train.train_and_evaluate``. Override any config field on the command
line, e.g. ``--config.prior.name=simpo --config.prior.gamma=1.0``; a typo in a
key is an error (the config is locked).

Multi-host: on Cloud TPU VMs JAX finds its peers itself; elsewhere set
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
(``launch/slurm.sh`` does). CPU-only multi-process runs (tests) use gloo.
"""

import difflib
import errno
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

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
  """Drops orbax's and TFDS's INFO chatter (per array, per file); keeps warnings,
  but for TFDS's "Using custom data configuration" (a warning for every dataset
  midpo builds, whose configs it names on purpose; 600 characters each)."""

  NOISY = ("/orbax/", "/tensorflow_datasets/", "/etils/")

  def filter(self, record) -> bool:
    noisy = any(n in record.pathname for n in self.NOISY)
    if noisy and str(record.msg).startswith("Using custom data configuration"):
      return False
    if noisy and record.exc_info:
      # orbax logs a failed background save once per thread, each with its
      # traceback: one line each here; the error itself ends the run below.
      record.exc_info, record.exc_text = None, None
    return record.levelno >= 30 or not noisy


def _fail(message: str, code: int, *, now: bool = False):
  """One line on stderr, no traceback: for errors the user can fix. ``now``:
  exit at once, without the interpreter's shutdown (after a failed write,
  orbax's background threads would otherwise log after this line)."""
  print(f"midpo: error: {message}", file=sys.stderr, flush=True)
  if now:
    sys.stdout.flush()
    os._exit(code)
  sys.exit(code)


def unknown_override(argv: list[str], config) -> str | None:
  """The first ``--config.<key>`` of ``argv`` that ``config`` lacks, as an
  error naming the full dotted key and the closest existing one (None when
  every key exists)."""
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    key = arg[2:].split("=", 1)[0]
    parts, node = key.split(".")[1:], config
    for i, part in enumerate(parts):
      if isinstance(node, config_dict.ConfigDict) and part in node:
        node = node[part]
        continue
      parent = ".".join(["config", *parts[:i]])
      names = list(node.keys()) if isinstance(node, config_dict.ConfigDict) else []
      close = difflib.get_close_matches(part, names, n=1)
      hint = f"; did you mean {parent}.{close[0]}?" if close else ""
      what = f"{parent} has no key {part!r}" if names else f"{parent} is not a config block"
      return f"{key}: unknown key ({what}{hint})"
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an unknown config key named in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e}. Pass --helpshort or --helpfull to see help on flags.", 2)
  except (AttributeError, KeyError) as e:
    message = None
    paths = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    if paths:
      try:
        message = unknown_override(argv, flags.FLAGS["config"].parser.parse(paths[-1]))
      except Exception:  # the config file itself fails: absl's own message below
        message = None
    _fail(message or f"{type(e).__name__}: {e}", 2)


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def write_failure(exc: BaseException) -> str | None:
  """A failed write in ``exc``'s chain (causes and contexts): no space left, a
  quota or file-size limit, a read-only filesystem; as one line (None if
  there is none). Also finds those errors in the text of orbax's and
  tensorstore's errors (``[os_error_code='28']``)."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
      where = f" writing {exc.filename}" if exc.filename else ""
      return f"{exc.strerror or os.strerror(exc.errno)}{where}"
    match = re.search(r"os_error_code='(\d+)'", str(exc))
    if match and int(match.group(1)) in _WRITE_ERRNOS:
      path = re.search(r'Failed writing: "([^"]+)"', str(exc))
      where = f" writing {path.group(1)}" if path else ""
      return f"{os.strerror(int(match.group(1)))}{where}"
    exc = exc.__cause__ or exc.__context__
  return None


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
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.USER_ERRORS as e:
    _fail(str(e), 2)
  except train.RUN_ERRORS as e:
    _fail(str(e), 1)
  except Exception as e:
    line = write_failure(e)
    if line is None:
      raise
    _fail(f"{line}. The run stopped there; its earlier checkpoints are intact: free some "
          "space (or lower --config.max_checkpoints) and rerun the same command.", 1, now=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
