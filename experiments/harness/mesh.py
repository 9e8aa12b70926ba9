"""Device mesh `(data, fsdp, tensor)` and the one logical-axis rules table (DMC and SDC share it).

Parameters and activations carry logical names (`nn.with_logical_partitioning`, `nn.with_logical_constraint`);
`RULES` maps them to mesh axes. A name absent from the table is replicated. Axis types are Auto: jax 0.11's
default (Explicit) makes `nn.with_logical_constraint` assert.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.harness.errors import MeshError

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("activation_batch", BATCH),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_height", None),
    ("activation_width", None),
    ("activation_channels", None),
    # weights
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> jax.sharding.Mesh:
  """A `(data, fsdp, tensor)` mesh; one -1 entry takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != 3:
    raise MeshError(f"mesh.shape: expected 3 sizes (data, fsdp, tensor), got {shape}")
  if any(isinstance(s, bool) or not isinstance(s, int) or (s < 1 and s != -1) for s in shape):
    raise MeshError(f"mesh.shape: sizes must be positive integers (or one -1), got {shape}")
  if shape.count(-1) > 1:
    raise MeshError(f"mesh.shape: at most one -1, got {shape}")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise MeshError(f"mesh.shape {shape}: {len(devices)} devices are not divisible by {known}")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise MeshError(f"mesh.shape {shape} needs {int(np.prod(shape))} devices, have {len(devices)}")
  return jax.make_mesh(tuple(shape), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def mesh_shape(mesh_cfg) -> tuple[int, int, int]:
  """(data, fsdp, tensor) from an experiment config's `mesh` block (fields `data`, `fsdp`, `tensor`)."""
  return (int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor))


def logical_shardings(abstract_boxed_tree, mesh, rules=RULES):
  """NamedShardings for a tree whose leaves may be `nn.Partitioned` (unboxed leaves are replicated)."""
  specs = nn.get_partition_spec(abstract_boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension over (data, fsdp); the rest replicated."""
  return NamedSharding(mesh, P(BATCH))


def global_batch(host_batch, sharding: NamedSharding):
  """Numpy arrays of the global batch (the same on every process) → global arrays; each process places only the
  rows its own devices hold (jax.device_put would compare the whole batch across processes every step)."""
  return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx]), host_batch)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
