"""KV cache of the decoder-only Transformer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
  """Keys and values of every layer for a batch of sequences.

  Attributes:
    keys: one [B, S_max, Nkv, H] array per layer.
    values: one [B, S_max, Nkv, H] array per layer.
    lengths: int32 [B], filled entries per sequence (the position of the next token).
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  lengths: jax.Array

  @classmethod
  def zeros(cls, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int,
            head_dim: int, dtype: jnp.dtype) -> "KVCache":
    """An empty cache (all lengths 0).

    Args:
      num_layers: number of layers.
      batch_size: sequences B.
      max_len: cache slots S_max per sequence.
      num_kv_heads: key/value heads Nkv.
      head_dim: head width H.
      dtype: dtype of keys and values.

    Returns:
      The cache.
    """
    shape = (batch_size, max_len, num_kv_heads, head_dim)
    return cls(keys=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               values=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               lengths=jnp.zeros((batch_size,), jnp.int32))

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]

  @property
  def max_len(self) -> int:
    return self.keys[0].shape[1]

  def shard(self, mesh: jax.sharding.Mesh, batch_axis: str | tuple[str, ...] | None = "data",
            head_axis: str | None = "model") -> "KVCache":
    """The cache placed on `mesh`: keys / values [B, S_max, Nkv, H] split over B
    (`batch_axis`, one axis or a tuple) and Nkv (`head_axis`), lengths over B; None leaves
    that dimension whole. See flashjax.distributed.ShardedDecoder for decoding with it.

    Raises:
      ValueError: an axis not in the mesh, or B / Nkv not divisible by its axis size.
    """
    from flashjax.distributed import sharding  # pylint: disable=import-outside-toplevel
    specs = sharding.cache_specs(self, mesh, batch_axis, head_axis)
    return jax.device_put(self, jax.tree.map(
        lambda s: jax.sharding.NamedSharding(mesh, s), specs,
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))

