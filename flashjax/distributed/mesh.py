"""Device meshes from spec strings: "data:2,model:2" -> jax.sharding.Mesh.

Mesh axes flashjax's sharding rules know (flashjax.distributed.sharding):

  data    data parallel: the batch is split, parameters are replicated
  fsdp    fully sharded data parallel: the batch is split and parameters / optimizer state
          are split along their model width (d_model), gathered per use by XLA
  model   tensor parallel: attention heads, KV heads, MLP units and the vocabulary are split

Any subset, in any order; sizes multiply to the number of devices used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")
# Mesh axes that split the batch (in this order: the batch dimension's PartitionSpec entry).
BATCH_AXES = ("data", "fsdp")

_ENTRY = re.compile(r"^\s*(?P<name>[A-Za-z_]\w*)\s*:\s*(?P<size>[0-9]+)\s*$")


def parse_mesh_spec(spec: str) -> tuple[tuple[str, int], ...]:
  """"data:2,model:2" -> (("data", 2), ("model", 2)).

  Raises:
    ValueError: not a string, an entry not `name:size`, a size < 1, an unknown or repeated
      axis name (the message names the spec and the entry).
  """
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"mesh spec {spec!r} must be a non-empty string like 'data:2,model:2'")
  axes: list[tuple[str, int]] = []
  for entry in spec.split(","):
    match = _ENTRY.match(entry)
    if not match:
      raise ValueError(f"mesh spec {spec!r}: entry {entry.strip()!r} is not 'axis:size' "
                       f"(e.g. 'data:2,model:2')")
    name, size = match["name"], int(match["size"])
    if name not in MESH_AXES:
      raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r} (known axes: "
                       f"{', '.join(MESH_AXES)})")
    if size < 1:
      raise ValueError(f"mesh spec {spec!r}: axis {name!r} has size {size}, must be >= 1")
    if name in dict(axes):
      raise ValueError(f"mesh spec {spec!r}: axis {name!r} appears twice")
    axes.append((name, size))
  return tuple(axes)


def make_mesh(spec: str, devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh of `devices` (default: all of jax.devices()) shaped by a spec string.

  Args:
    spec: "axis:size,..." with axes from MESH_AXES, e.g. "data:2,model:2" or "fsdp:8".
    devices: the devices to lay out (row-major in spec order); their number must equal the
      product of the sizes.

  Returns:
    jax.sharding.Mesh with the spec's axis names and sizes.

  Raises:
    ValueError: a bad spec (see parse_mesh_spec) or a product != the number of devices.
  """
  axes = parse_mesh_spec(spec)
  devices = list(jax.devices() if devices is None else devices)
  product = int(np.prod([size for _, size in axes]))
  if product != len(devices):
    raise ValueError(f"mesh spec {spec!r} has {product} devices (product of the sizes) but "
                     f"{len(devices)} devices are given")
  shape = tuple(size for _, size in axes)
  return Mesh(np.array(devices, dtype=object).reshape(shape),
              tuple(name for name, _ in axes))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes that split the batch (those of BATCH_AXES present in the mesh)."""
  return tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)


def batch_size_divisor(mesh: Mesh) -> int:
  """Number of batch shards: the product of the batch axes' sizes."""
  return int(np.prod([mesh.shape[axis] for axis in batch_axes(mesh)], dtype=np.int64))


def batch_spec(mesh: Mesh, ndim: int = 2) -> PartitionSpec:
  """PartitionSpec of an array whose leading dimension is the batch (other dims whole)."""
  axes = batch_axes(mesh)
  lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(lead, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """NamedSharding of a batch-leading array (batch split over the mesh's batch axes)."""
  return NamedSharding(mesh, batch_spec(mesh, ndim))


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated NamedSharding on the mesh."""
  return NamedSharding(mesh, PartitionSpec())
