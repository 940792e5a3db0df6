"""Logical-axis sharding: rules map the model's logical axis names to mesh axes.

Every parameter carries logical names in its NNX `out_sharding` metadata
(see `midpo.models.transformer`). `DEFAULT_RULES` give FSDP over the mesh axis
'fsdp', tensor parallelism over 'tensor' and the batch over 'data' and 'fsdp':

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = transformer.create_sharded_model(config, mesh)  # never whole on one device
    tokens = jax.device_put(tokens, batch_sharding(mesh))

Rules are plain configuration: a tuple of (logical name, mesh axis | tuple of
mesh axes | None). Mesh axes a rule names that the mesh lacks are skipped, so
one rule set serves a data-only mesh too.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # Activations (constrained inside the forward pass once the model is on a
    # mesh): batch over data+fsdp as above, weights gathered (FSDP), heads,
    # MLP and vocab split over 'tensor'.
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axis types."""
  devices = list(devices if devices is not None else jax.devices())
  if data * fsdp * tensor != len(devices):
    raise ValueError(
        f"Mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} "
        f"devices, but {len(devices)} are given.")
  return jax.make_mesh((data, fsdp, tensor), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_mesh(names: Sequence[str | None], rules: Rules, mesh: Mesh,
                    shape: Sequence[int] | None = None, what: str = "array") -> PartitionSpec:
  """PartitionSpec for an array with logical axis `names` under `rules`.

  Raises ValueError for a logical name without a rule, a mesh axis used twice
  in one array, or (given `shape`) a dimension the mesh axes do not divide.
  """
  table: dict[str, MeshAxes] = {}
  for logical, axes in rules:
    table.setdefault(logical, axes)
  spec, used = [], set()
  for i, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f"No sharding rule for logical axis {name!r} of {what}; rules: {rules}.")
    axes = table[name]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a in mesh.shape)
    for a in axes:
      if a in used:
        raise ValueError(f"Mesh axis {a!r} is used twice in the sharding of {what} {tuple(names)}.")
      used.add(a)
    if shape is not None and axes:
      size = int(np.prod([mesh.shape[a] for a in axes]))
      if shape[i] % size:
        raise ValueError(
            f"Dimension {i} ({name!r}, size {shape[i]}) of {what} is not divisible by mesh "
            f"axes {axes} (size {size}); change the rules or the mesh.")
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def state_shardings(state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """NamedShardings for an NNX state (abstract or concrete), same structure."""

  def one(path, v):
    if not isinstance(v, nnx.Variable):
      raise TypeError(f"Expected nnx.Variable leaves, got {type(v)} at {_path_name(path)}.")
    names = v.get_metadata().get("out_sharding")
    if names is None:
      if v.shape:
        raise ValueError(f"Parameter {_path_name(path)} has no logical axis names.")
      names = ()
    spec = logical_to_mesh(names, rules, mesh, v.shape, what=_path_name(path))
    return v.replace(NamedSharding(mesh, spec))

  return jax.tree.map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Moves an existing model's parameters onto `mesh` by `rules` (in place)."""
  state = nnx.state(model)
  state = jax.device_put(state, state_shardings(state, mesh, rules))
  nnx.update(model, state)
  model.activation_sharding = (mesh, tuple(rules))
  return model


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
  """Sharding for [B, ...] inputs: batch by the 'batch' rule, the rest replicated."""
  names = ("batch",) + (None,) * (ndim - 1)
  return NamedSharding(mesh, logical_to_mesh(names, rules, mesh, what="batch"))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every array whole on every device of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())
