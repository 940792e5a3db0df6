"""One wrapper over orbax's CheckpointManager for every stage of a run.

A checkpoint is a set of named pytrees (parameters and optimiser states of the
policy and of the prior, the RNG key data) plus a JSON ``meta`` item (step,
data-iterator state, anything small). Saves are asynchronous; ``wait`` blocks
until the last one is on disk. Restores take abstract targets
(``jax.ShapeDtypeStruct`` with shardings), so every array comes back directly
sharded on the current mesh.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from midpo import files


class CheckpointError(RuntimeError):
  """No checkpoint of a directory can be read (each one's problem named)."""


def _on_every_process(flag: bool) -> bool:
  """Whether ``flag`` holds on every process (a collective with several)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.min(multihost_utils.process_allgather(np.array(int(flag)))))


class Checkpointer:
  """Named pytrees and a JSON ``meta`` per step under ``directory`` (orbax
  ``CheckpointManager``; asynchronous saves, the last ``max_to_keep`` kept,
  and every step that is a multiple of ``keep_period``).
  Empty or None trees are not written, and come back as given on restore."""

  def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = True,
               keep_period: Optional[int] = None):
    self.directory = files.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           keep_period=keep_period,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    """The newest saved step (None when there is none)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every saved step."""
    return list(self._manager.all_steps())

  def save(self, step: int, trees: dict[str, Any], meta: dict, *, force: bool = False) -> None:
    """Saves ``trees`` and ``meta`` as ``step`` (``force``: whatever the save policy)."""
    items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()
             if tree is not None and jax.tree.leaves(tree)}
    items["meta"] = ocp.args.JsonSave(meta)
    self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_trees: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """``(trees, meta)`` of ``step``, each tree restored onto its abstract
    target's shapes, dtypes and shardings."""
    items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_trees.items()
             if tree is not None and jax.tree.leaves(tree)}
    items["meta"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    trees = {name: (restored[name] if name in items else abstract_trees[name])
             for name in abstract_trees}
    return trees, dict(restored["meta"])

  def read_meta(self, step: int) -> dict:
    """The JSON ``meta`` item of ``step``, read directly.

    Raises:
      CheckpointError: the file is missing, empty or not JSON (named).
    """
    path = os.path.join(self.directory, str(step), "meta", "metadata")
    try:
      return json.loads(files.read_text(path))
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{path}: {type(e).__name__}: {e}") from None

  def restore_latest_intact(self, abstract_trees: dict[str, Any],
                            check_meta: Optional[Callable[[dict, str], None]] = None
                            ) -> Optional[tuple[int, dict[str, Any], dict]]:
    """``(step, trees, meta)`` of the newest checkpoint that reads whole (None
    when the directory holds none).

    A checkpoint that does not read (an emptied or truncated file) is moved to
    ``<directory>/damaged.<step>`` (kept for inspection) with a warning naming
    the file and the error, and the next older one is tried. ``check_meta(meta,
    step directory)`` runs on each candidate's ``meta`` before its arrays are
    read; what it raises (a config that changed) is not damage and propagates.

    Raises:
      CheckpointError: checkpoints exist but none is intact (each one's
        problem named).
    """
    problems = []
    for step in sorted(self.all_steps(), reverse=True):
      where = os.path.join(self.directory, str(step))
      try:
        meta = self.read_meta(step)
      except CheckpointError as e:
        problems.append((step, str(e)))
        continue
      if check_meta is not None:
        check_meta(meta, where)
      problem = None
      try:
        trees, meta = self.restore(step, abstract_trees)
      except (ValueError, OSError, KeyError) as e:  # what orbax and tensorstore raise on a
        problem = f"{where}: {type(e).__name__}: {e}"  # damaged or missing file
      # Each process reads its own shards: every process takes the same decision.
      if not _on_every_process(problem is None):
        problems.append((step, problem or f"{where}: unreadable on another process"))
        continue
      if problems:
        moved = self._set_aside([s for s, _ in problems])
        logging.warning("%s", "; ".join(f"checkpoint step {s} is damaged ({p})"
                                        for s, p in problems)
                        + f"; set aside as {', '.join(moved)}. Resuming from step {step}, the "
                        "latest intact checkpoint.")
      return step, trees, meta
    if problems:
      raise CheckpointError(
          f"no intact checkpoint in {self.directory}: "
          + "; ".join(f"step {s}: {p}" for s, p in problems)
          + ". Delete the directory to start the stage over.")
    return None

  def _set_aside(self, steps: list[int]) -> list[str]:
    """Moves damaged step directories out of orbax's sight (process 0);
    returns their new names."""
    self._manager.wait_until_finished()
    names = []
    for step in steps:
      name, suffix = f"damaged.{step}", 0
      while files.exists(os.path.join(self.directory, name)):
        suffix += 1
        name = f"damaged.{step}.{suffix}"
      names.append(name)
    if jax.process_index() == 0:
      for step, name in zip(steps, names):
        files.rename(os.path.join(self.directory, str(step)), os.path.join(self.directory, name))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("midpo_checkpoint_set_aside")
    self._manager.reload()
    return names

  def delete(self, step: int) -> None:
    """Deletes checkpoint ``step`` (after pending saves finish)."""
    self._manager.wait_until_finished()
    self._manager.delete(step)

  def check_for_errors(self) -> None:
    """Raises the error of a failed asynchronous save, if any, once that save
    has ended (so a failure surfaces at the next step, not at the next save).
    Does not block while a save is in progress."""
    self._manager.check_for_errors()
    if not self._manager.is_saving_in_progress():
      self._manager.wait_until_finished()  # returns at once; re-raises a failure

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """``ShapeDtypeStruct`` targets (with the arrays' shardings) for a restore."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
