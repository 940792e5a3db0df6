"""One wrapper over orbax's CheckpointManager for every stage of a run.

A checkpoint is a set of named pytrees (parameters and optimiser states of the
policy and of the prior, the RNG key data) plus a JSON ``meta`` item (step,
data-iterator state, anything small). Saves are asynchronous; ``wait`` blocks
until the last one is on disk. Restores take abstract targets
(``jax.ShapeDtypeStruct`` with shardings), so every array comes back directly
sharded on the current mesh.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Named pytrees and a JSON ``meta`` per step under ``directory`` (orbax
  ``CheckpointManager``; asynchronous saves, the last ``max_to_keep`` kept,
  and every step that is a multiple of ``keep_period``).
  Empty or None trees are not written, and come back as given on restore."""

  def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = True,
               keep_period: Optional[int] = None):
    self.directory = os.path.abspath(directory)
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
