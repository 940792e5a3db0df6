"""Optimisers: AdamW with warmup and cosine decay, placed on the mesh."""

from __future__ import annotations

from typing import Any, Optional

import jax
import optax

from midpo.models import sharding


def schedule(lr: float, warmup: int, steps: int) -> optax.Schedule:
  """Linear warmup from 0 (when ``warmup > 0``), then cosine decay to lr / 10."""
  if steps <= 1:
    return optax.constant_schedule(lr)
  if warmup <= 0:
    return optax.cosine_decay_schedule(lr, steps, alpha=0.1)
  warmup = min(warmup, steps - 1)
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=0.1 * lr)


def adamw(lr: float, warmup: int, steps: int, weight_decay: float,
          clip: Optional[float]) -> optax.GradientTransformation:
  """Global-norm clipping (when ``clip``) then AdamW on ``schedule``."""
  chain = [optax.clip_by_global_norm(clip)] if clip else []
  chain.append(optax.adamw(schedule(lr, warmup, steps), weight_decay=weight_decay))
  return optax.chain(*chain)


def constant_adamw(lr: float, weight_decay: float,
                   clip: Optional[float]) -> optax.GradientTransformation:
  """Global-norm clipping (when ``clip``) then AdamW at a constant rate."""
  chain = [optax.clip_by_global_norm(clip)] if clip else []
  chain.append(optax.adamw(lr, weight_decay=weight_decay))
  return optax.chain(*chain)


def init_opt(tx: optax.GradientTransformation, params: Any, mesh: jax.sharding.Mesh) -> Any:
  """The optimiser state, on the mesh: moments sharded like their parameters,
  anything else (step counts) replicated."""
  state = jax.jit(tx.init)(params)

  def place(x):
    s = getattr(x, "sharding", None)
    if isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh:
      return x
    return jax.device_put(x, sharding.replicated(mesh))

  return jax.tree.map(place, state)
