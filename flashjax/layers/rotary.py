"""Rotary position embeddings (RoPE) and per-document positions of packed rows.

RoPE rotates each pair of features (i, i + H/2) of a query or key head by the angle
position * theta^(-2i/H) (the "rotate half" pairing of the Hugging Face LLaMA code, so
imported checkpoints need no weight permutation). Dot products of rotated queries and keys
then depend on positions only through their difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
  """float32 [head_dim // 2] angular frequencies theta^(-2i / head_dim)."""
  if head_dim % 2:
    raise ValueError(f"{head_dim=} must be even for rotary embeddings")
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (theta ** exponents)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotates the heads of x by their positions.

  Args:
    x: [B, T, N, H] queries or keys (H even).
    positions: int [B, T] position of every token.
    theta: RoPE base.

  Returns:
    [B, T, N, H] array of x's dtype.
  """
  head_dim = x.shape[-1]
  angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, theta)
  sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, H/2]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Position of every token inside its segment (restarting at 0 at each segment start).

  A segment starts at t = 0 and wherever segment_ids[:, t] != segment_ids[:, t - 1].

  Args:
    segment_ids: int [B, T].

  Returns:
    int32 [B, T].
  """
  length = segment_ids.shape[-1]
  index = jnp.arange(length, dtype=jnp.int32)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], dtype=bool),
       segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  # Index of the latest segment start at or before t.
  start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  return index - start_index
