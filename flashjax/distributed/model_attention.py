"""The models' attention op split per device under a mesh (a shard_map over batch and heads).

XLA's SPMD partitioner cannot split a Pallas kernel's custom call: under a jit with mesh
shardings it would gather q / k / v and run the whole kernel on every device. So while
`attention_mesh(mesh)` is active (Trainer(mesh=...) and ShardedDecoder trace their steps
inside it), every flashjax.layers.Attention calls its attention op through the functions
below (the layer's op wrapper, `layers.attention.wrap_attention_ops`): the projections,
RoPE, cache writes and output projection stay the layer's code under XLA's partitioner, and
only the attention op (`causal_self_attention` for training / prefill,
`cached_decode_attention` for decode) runs inside a `jax.shard_map` over

  batch: the mesh's batch axes ("data", "fsdp") when B divides by their product, else whole;
  heads: "model" when the mesh has it and it divides Nkv (Nq follows: query head n reads
         KV group n // (Nq // Nkv), so contiguous head ranges stay together), else whole.

Each device then calls the backend (any backend: XLA or Pallas) on its rows and heads; no
collective is needed (attention has no cross-row or cross-group reduction). Without an
active mesh nothing here runs and the models are unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec

from flashjax.distributed import sharding
from flashjax.layers import attention as attention_layer

_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
    "flashjax_model_attention_mesh", default=None)


@contextlib.contextmanager
def attention_mesh(mesh: Mesh):
  """Within this context (while tracing), models' attention ops run per shard of `mesh`
  (installed as flashjax.layers.attention's op wrapper)."""
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  token = _MESH.set(mesh)
  try:
    with attention_layer.wrap_attention_ops(_per_shard_op):
      yield mesh
  finally:
    _MESH.reset(token)


def _per_shard_op(op: Any, *args: Any, **kwargs: Any) -> jax.Array:
  """The layer's attention op `op` run by its per-shard counterpart below."""
  sharded = {attention_layer.causal_self_attention: causal_self_attention,
             attention_layer.cached_decode_attention: cached_decode_attention}.get(op)
  if sharded is None:
    raise NotImplementedError(f"no per-shard form of the attention op {op!r}")
  return sharded(*args, **kwargs)


def active_mesh() -> Mesh | None:
  """The mesh of the enclosing `attention_mesh`, or None."""
  return _MESH.get()


def with_attention_mesh(fn: Any, mesh: Mesh) -> Any:
  """fn with `attention_mesh(mesh)` active while it runs (i.e. while a jit traces it)."""
  def wrapped(*args, **kwargs):
    with attention_mesh(mesh):
      return fn(*args, **kwargs)
  return wrapped


def _specs(mesh: Mesh, batch: int, num_kv_heads: int) -> tuple[Any, Any]:
  batch_axis, head_axis = sharding.default_cache_axes(mesh, num_kv_heads, batch)
  if isinstance(batch_axis, tuple) and len(batch_axis) == 1:
    batch_axis = batch_axis[0]
  return batch_axis, head_axis


def _per_shard(fn: Any, mesh: Mesh, in_specs: tuple, out_spec: PartitionSpec, *args: Any):
  # check_vma=False: Pallas calls carry no varying-axes annotations; the specs are exact.
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec,
                       check_vma=False)(*args)


def causal_self_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          segment_ids: jax.Array | None = None, **kwargs: Any) -> jax.Array:
  """layers.attention.causal_self_attention, per (batch, head) shard of the active mesh
  (directly without one). Arguments as there."""
  mesh = active_mesh()
  if mesh is None:
    return attention_layer.causal_self_attention(query, key, value, segment_ids=segment_ids,
                                                 **kwargs)
  batch_axis, head_axis = _specs(mesh, query.shape[0], key.shape[2])
  heads = PartitionSpec(batch_axis, None, head_axis, None)
  if segment_ids is None:
    fn = lambda q, k, v: attention_layer.causal_self_attention(q, k, v, **kwargs)
    return _per_shard(fn, mesh, (heads,) * 3, heads, query, key, value)
  fn = lambda q, k, v, ids: attention_layer.causal_self_attention(q, k, v, segment_ids=ids,
                                                                  **kwargs)
  return _per_shard(fn, mesh, (heads,) * 3 + (PartitionSpec(batch_axis, None),), heads,
                    query, key, value, segment_ids)


def cached_decode_attention(query: jax.Array, key_cache: jax.Array, value_cache: jax.Array,
                            lengths: jax.Array, *, head_indices: jax.Array | None = None,
                            **kwargs: Any) -> jax.Array:
  """layers.attention.cached_decode_attention, per (batch, head) shard of the active mesh
  (directly without one). Arguments as there.

  Raises:
    NotImplementedError: head_indices while the mesh splits the KV heads (global group ids
      would need renumbering per device; flashjax.distributed.sharded_decode_attention does
      that for a direct call).
  """
  mesh = active_mesh()
  if mesh is None:
    return attention_layer.cached_decode_attention(query, key_cache, value_cache, lengths,
                                                   head_indices=head_indices, **kwargs)
  batch_axis, head_axis = _specs(mesh, query.shape[0], key_cache.shape[2])
  if head_indices is not None and head_axis is not None:
    raise NotImplementedError(
        f"head_indices (sparse decode) with the KV heads split over mesh axis {head_axis!r} "
        f"(mesh {dict(mesh.shape)}) is not supported; use a mesh without 'model' or dense "
        "decode")
  q_spec = PartitionSpec(batch_axis, head_axis, None)
  cache_spec = PartitionSpec(batch_axis, None, head_axis, None)
  rows = PartitionSpec(batch_axis)
  if head_indices is None:
    fn = lambda q, kc, vc, n: attention_layer.cached_decode_attention(q, kc, vc, n, **kwargs)
    return _per_shard(fn, mesh, (q_spec, cache_spec, cache_spec, rows), q_spec, query,
                      key_cache, value_cache, lengths)
  fn = lambda q, kc, vc, n, idx: attention_layer.cached_decode_attention(
      q, kc, vc, n, head_indices=idx, **kwargs)
  return _per_shard(fn, mesh, (q_spec, cache_spec, cache_spec, rows,
                               PartitionSpec(batch_axis, None)), q_spec, query, key_cache,
                    value_cache, lengths, head_indices)
