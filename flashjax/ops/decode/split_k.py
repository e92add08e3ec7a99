"""Bookkeeping shared by the split-K decode kernels: group selection and the split merge.

A split-K decode program (sequence b, selected KV group k, split s) keeps a float32 partial
softmax state (row max m, row sum l, unnormalised output o) over the G = Nq / Nkv query rows
of its group, packed into an [R, D] tile; `merge_splits` combines the splits of a (b, k)
with log-sum-exp weights and `scatter_groups` places the K computed groups into the Nq heads.
How the splits are laid out and how many there are: block_sizes.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_ids(head_indices: jax.Array | None, batch: int, num_kv_heads: int) -> jax.Array:
  """KV group computed by each (sequence, slot): int32 [B, K] (K = Nkv when None)."""
  if head_indices is None:
    return jnp.broadcast_to(jnp.arange(num_kv_heads, dtype=jnp.int32), (batch, num_kv_heads))
  return head_indices.astype(jnp.int32)


def select_queries(
    query: jax.Array, head_indices: jax.Array | None, num_kv_heads: int, rows: int
) -> jax.Array:
  """Query heads of the selected groups, packed one group per tile.

  Args:
    query: [B, Nq, D].
    head_indices: None or int32 [B, K] selected KV groups.
    num_kv_heads: Nkv.
    rows: tile height >= G = Nq // Nkv; rows past G are zero.

  Returns:
    [B, K, rows, D]: row g < G holds query head head_indices[b, k] * G + g.
  """
  batch, num_heads, head_dim = query.shape
  grouped = query.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
  if head_indices is not None:
    grouped = jnp.take_along_axis(grouped, head_indices[:, :, None, None], axis=1)
  return jnp.pad(grouped, ((0, 0), (0, 0), (0, rows - grouped.shape[2]), (0, 0)))


def merge_splits(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
  """Merges per-split softmax states with log-sum-exp weights.

  Args:
    o: float32 [B, K, splits, R, D] unnormalised partial outputs.
    m: float32 [B, K, splits, R] partial row maxima (-inf for splits that read nothing).
    l: float32 [B, K, splits, R] partial row sums (0 for splits that read nothing).

  Returns:
    float32 [B, K, R, D] normalised outputs; rows of a sequence with no key are 0.
  """
  m_max = jnp.max(m, axis=2, keepdims=True)
  m_max = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
  weight = jnp.exp(m - m_max)  # [B, K, splits, R], 0 for dead splits
  total = jnp.sum(weight * l, axis=2)
  # A weighted sum over the (few) splits: elementwise, exact in float32, no matmul.
  out = jnp.sum(weight[..., None] * o, axis=2)
  return out / jnp.where(total > 0, total, 1.0)[..., None]


def scatter_groups(
    out: jax.Array, head_indices: jax.Array | None, num_kv_heads: int, num_heads: int
) -> jax.Array:
  """Places the computed groups into the full head axis, zeros elsewhere.

  Args:
    out: [B, K, R, D] per selected group, rows [0, G) valid.
    head_indices: None or int32 [B, K].
    num_kv_heads: Nkv.
    num_heads: Nq.

  Returns:
    [B, Nq, D].
  """
  batch, _, _, head_dim = out.shape
  group = num_heads // num_kv_heads
  out = out[:, :, :group]
  if head_indices is not None:
    full = jnp.zeros((batch, num_kv_heads, group, head_dim), out.dtype)
    out = full.at[jnp.arange(batch)[:, None], head_indices].set(out)
  return out.reshape(batch, num_heads, head_dim)
