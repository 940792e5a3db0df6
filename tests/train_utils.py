"""Shared helpers for the trainer's tests: tiny configs and subprocess runs."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Small enough that a whole run (data build, SFT, preference, eval) takes
# seconds of compute on a CPU; compilation dominates.
TINY_OVERRIDES = {
    "data.synthetic.num_sft": 256,
    "data.synthetic.num_train": 256,
    "data.synthetic.num_test": 64,
    "data.batch_size": 8,
    "data.max_length": 64,
    "data.num_buckets": 1,
    "sft.steps": 12,
    "train.steps": 10,
    "pairs_from": "dataset",
    "eval.num_prompts": 16,
    "eval.batch_size": 16,
    "eval.max_new_tokens": 12,
    "eval.num_pairs": 16,
    # The mutual-information estimate samples and fits a model of its own:
    # off here, on (at a tiny size) where a test checks it.
    "eval.mutual_information": "none",
    "log_every": 1,
    "checkpoint_every": 4,
}


# The 'mi' prior's rounds at the same scale: 2 policy steps per round, 16
# samples, a few maximum-likelihood steps.
MI_TINY = {
    "train.policy_steps_per_round": 2,
    "train.prior_samples": 16,
    "train.prior_warmup_samples": 16,
    "train.prior_batch_size": 8,
    "train.prior_warmup_steps": 3,
    "train.prior_steps_per_round": 2,
    "train.prior_eval_pairs": 16,
    "train.diagnostics_every": 2,
}


# The estimate at a tiny size.
MI_ESTIMATE_TINY = {"eval.mutual_information": "final", "eval.mi_samples": 32,
                    "eval.mi_steps": 4, "eval.mi_batch_size": 8}


def apply_overrides(config, overrides):
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    node = config
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def tiny_config(name="dpo", **extra):
  import importlib
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config()
  return apply_overrides(config, {**TINY_OVERRIDES, **extra})


def cli_args(overrides):
  def fmt(v):
    if isinstance(v, (tuple, list)):
      return "(" + ",".join(f"'{x}'" for x in v) + ("," if len(v) == 1 else "") + ")"
    return str(v)
  return [f"--config.{k}={fmt(v)}" for k, v in overrides.items()]


def run_main(config_file, workdir, overrides, *, env=None, timeout=600, wait=True):
  cmd = [sys.executable, "-m", "midpo.main", f"--config={config_file}", f"--workdir={workdir}",
         *cli_args({**TINY_OVERRIDES, **overrides})]
  full_env = dict(os.environ, **(env or {}))
  proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def lines_until(proc, text, timeout=300):
  """Reads ``proc``'s output line by line until a line contains ``text``;
  returns the lines read (fails if the process ends or time runs out first)."""
  lines, deadline = [], time.time() + timeout
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      raise AssertionError(f"ended before {text!r}:\n" + "".join(lines[-40:]))
    lines.append(line)
    if text in line:
      return lines
  raise AssertionError(f"no {text!r} within {timeout} s:\n" + "".join(lines[-40:]))


def read_metrics(workdir, stage=None):
  from midpo import files
  rows = [json.loads(l) for l in files.read_text(os.path.join(workdir, "metrics.jsonl"))
          .splitlines()]
  return [r for r in rows if stage is None or r["stage"] == stage]


def latest_params(directory, items=("policy", "policy_opt")):
  """The latest checkpoint's named items, restored onto this process's first
  device whatever mesh wrote them (no model needed)."""
  import jax
  import orbax.checkpoint as ocp
  from midpo import files
  directory = files.abspath(directory)
  mngr = ocp.CheckpointManager(directory)
  step = mngr.latest_step()
  mngr.close()
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  checkpointer = ocp.StandardCheckpointer()
  out = {}
  for name in items:
    path = os.path.join(directory, str(step), name)
    meta = checkpointer.metadata(path).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), meta)
    out[name] = jax.device_get(checkpointer.restore(path, target))
    assert jax.tree.leaves(out[name]), f"nothing restored for {name!r} in {directory}"
  return step, out


def tree_equal(a, b) -> bool:
  import jax
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert la, "comparing empty trees proves nothing"
  return len(la) == len(lb) and all(
      np.asarray(x).shape == np.asarray(y).shape and np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(la, lb))


def execute_notebook(path, out_dir) -> list:
  """Executes the committed notebook at ``path`` (its outputs must be cleared)
  with its own folder as the working directory; writes the executed copy to
  ``out_dir/executed.ipynb`` (for a look when a test fails) and asserts no cell
  raised. Returns the code cells, with their outputs."""
  import nbclient
  import nbformat

  nb = nbformat.read(path, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
      "commit the notebook with its outputs cleared"
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(Path(path).parent)}})
  try:
    client.execute()
  finally:
    nbformat.write(nb, Path(out_dir) / "executed.ipynb")
  code = [c for c in nb.cells if c.cell_type == "code"]
  errors = [o for c in code for o in c.outputs if o.output_type == "error"]
  assert not errors, errors
  return code

