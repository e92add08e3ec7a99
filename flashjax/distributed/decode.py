"""Decode attention sharded over batch and KV heads (`flashjax.decode_attention` per shard).

Batch rows and KV groups are independent in one-token decode, so no collective is needed:
each device runs `decode_attention` on its rows and its contiguous range of KV groups (and
the query heads reading them). Head-sparse `head_indices` hold global KV-group ids; each
device keeps the ids of its own groups (renumbered locally, the others marked -1, which
`decode_attention` ignores when traced), so a device whose groups a row did not select
outputs zeros for that row, as the unsharded call does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from flashjax.ops.decode.api import decode_attention


def _local_head_indices(head_indices: jax.Array, first: jax.Array, local_kv: int) -> jax.Array:
  """Global ids [B, K] -> local ids [B, min(K, local_kv)] of groups first..first+local_kv-1.

  The selected local groups come first (ascending); unused slots are -1 (ignored).
  """
  groups = first + jnp.arange(local_kv)
  selected = jnp.any(head_indices[:, :, None] == groups[None, None, :], axis=1)  # [B, Gl]
  order = jnp.argsort(~selected, axis=1, stable=True)  # selected groups first
  width = min(head_indices.shape[1], local_kv)
  ids = order[:, :width]
  return jnp.where(jnp.take_along_axis(selected, ids, axis=1), ids, -1).astype(jnp.int32)


def sharded_decode_attention(query: jax.Array, key_cache: jax.Array, value_cache: jax.Array,
                             lengths: jax.Array, *, mesh: Mesh,
                             batch_axis: str | None = None, head_axis: str | None = None,
                             head_indices: jax.Array | None = None,
                             scale: float | None = None,
                             implementation: str | Sequence[str] | None = None,
                             interpret: bool = False) -> jax.Array:
  """`flashjax.decode_attention` with the batch and / or the KV heads sharded over a mesh.

  Args:
    query: [B, Nq, D].
    key_cache: [B, S_max, Nkv, D]; value_cache: the same shape.
    lengths: int [B].
    mesh: a jax.sharding.Mesh.
    batch_axis: mesh axis sharding B (None: not sharded); B must divide by its size.
    head_axis: mesh axis sharding the KV heads (None: not sharded); Nkv must divide by its
      size. Query heads follow their KV group (head n reads group n // (Nq // Nkv)).
    head_indices: None or int [B, K] of global KV-group ids (head-sparse decode).
    scale, implementation, interpret: as in decode_attention (scale: a Python float).

  Returns:
    [B, Nq, D], sharded as PartitionSpec(batch_axis, head_axis).

  Raises:
    ValueError: an axis not in the mesh, or B / Nkv not divisible by its axis size.
  """
  sizes = {}
  for name, axis, dim, what in (("batch_axis", batch_axis, query.shape[0], "B"),
                                ("head_axis", head_axis, key_cache.shape[2], "Nkv")):
    if axis is None:
      continue
    if axis not in mesh.axis_names:
      raise ValueError(f"{name}={axis!r} is not an axis of the mesh (axes {mesh.axis_names})")
    if dim % mesh.shape[axis]:
      raise ValueError(f"{what}={dim} must be divisible by the {mesh.shape[axis]} devices of "
                       f"{name}={axis!r}")
    sizes[name] = int(mesh.shape[axis])
  if batch_axis is not None and batch_axis == head_axis:
    raise ValueError(f"{batch_axis=} and {head_axis=} must differ")
  local_kv = key_cache.shape[2] // sizes.get("head_axis", 1)
  if head_indices is not None:
    try:  # concrete ids are checked as decode_attention checks them; traced ones are not
      host = np.asarray(head_indices)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
      host = None
    if host is not None and host.size and (host.min() < 0 or host.max() >= key_cache.shape[2]):
      raise ValueError(f"head_indices={host.tolist()} must lie in [0, Nkv={key_cache.shape[2]})")

  def per_device(q, k, v, lens, *ids):
    local_ids = None
    if ids:
      first = 0 if head_axis is None else lax.axis_index(head_axis) * local_kv
      local_ids = _local_head_indices(ids[0].astype(jnp.int32), first, local_kv)
    return decode_attention(q, k, v, lens, head_indices=local_ids, scale=scale,
                            implementation=implementation, interpret=interpret)

  specs = (PartitionSpec(batch_axis, head_axis),
           PartitionSpec(batch_axis, None, head_axis), PartitionSpec(batch_axis, None,
                                                                     head_axis),
           PartitionSpec(batch_axis))
  args: tuple[Any, ...] = (query, key_cache, value_cache, lengths)
  if head_indices is not None:
    specs += (PartitionSpec(batch_axis),)
    args += (jnp.asarray(head_indices),)
  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=specs,
                               out_specs=PartitionSpec(batch_axis, head_axis),
                               check_vma=False))(*args)
