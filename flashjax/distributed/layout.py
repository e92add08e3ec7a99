"""Sequence layouts of context parallelism: which positions each device holds.

A layout cuts a length-T sequence into `P * c` equal chunks and gives device d the chunks
`layout_chunks(layout, P)[d]` (concatenated in that order):

  contiguous  c = 1: device d holds chunk d (what sharding dim 1 over P devices gives).
  zigzag      c = 2: device d holds chunks d and 2P - 1 - d. Under a causal mask chunk i
              costs about i + 1/2 chunk-pairs, so every device gets (d + 1/2) +
              (2P - 1 - d + 1/2) = 2P: the same work (contiguous: device P - 1 does
              about 2x the mean).

Host-side helpers permute whole arrays (`layout_permutation`, `to_layout`,
`from_layout`); inside `jax.shard_map` the `*_local` helpers turn a contiguous shard into
its zig-zag shard and back with two `ppermute`s (each device sends its whole shard once,
the traffic of an all-to-all).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LAYOUTS = ("contiguous", "zigzag")


def chunks_per_device(layout: str) -> int:
  if layout not in LAYOUTS:
    raise ValueError(f"{layout=} must be one of {LAYOUTS}")
  return 1 if layout == "contiguous" else 2


def layout_chunks(layout: str, num_shards: int) -> list[list[int]]:
  """Chunk ids held by each device, in the order they are stored.

  Args:
    layout: "contiguous" or "zigzag".
    num_shards: P, the devices along the sequence axis.

  Returns:
    P lists of chunk ids (of P * chunks_per_device(layout) chunks).
  """
  if chunks_per_device(layout) == 1:
    return [[d] for d in range(num_shards)]
  return [[d, 2 * num_shards - 1 - d] for d in range(num_shards)]


def layout_permutation(length: int, num_shards: int, layout: str = "zigzag") -> np.ndarray:
  """Positions in stored order: `x[:, perm]` lays a sequence out for the devices.

  Device d then holds `perm[d * length // P:(d + 1) * length // P]`.

  Args:
    length: T, a multiple of P * chunks_per_device(layout).
    num_shards: P.
    layout: "contiguous" or "zigzag".

  Returns:
    int64 [T], a permutation of range(T).
  """
  pieces = num_shards * chunks_per_device(layout)
  if length % pieces:
    raise ValueError(f"{layout} layout needs T={length} divisible by {pieces} "
                     f"({num_shards} shards x {chunks_per_device(layout)} chunks)")
  size = length // pieces
  order = [c for chunks in layout_chunks(layout, num_shards) for c in chunks]
  return np.concatenate([np.arange(c * size, (c + 1) * size) for c in order])


def to_layout(x: Any, num_shards: int, layout: str = "zigzag", axis: int = 1) -> Any:
  """x with its sequence axis in layout order (a gather; see the module docstring)."""
  perm = layout_permutation(x.shape[axis], num_shards, layout)
  return jnp.take(x, perm, axis=axis)


def from_layout(x: Any, num_shards: int, layout: str = "zigzag", axis: int = 1) -> Any:
  """Inverse of `to_layout`: back to natural sequence order."""
  perm = layout_permutation(x.shape[axis], num_shards, layout)
  return jnp.take(x, np.argsort(perm), axis=axis)


def _dest(chunk: int, num_shards: int) -> int:
  """Device holding `chunk` in the zig-zag layout."""
  return chunk if chunk < num_shards else 2 * num_shards - 1 - chunk


def zigzag_local(x: jax.Array, axis_name: str, num_shards: int, axis: int = 1) -> jax.Array:
  """Inside shard_map: contiguous shard (chunks 2d, 2d + 1) -> zig-zag shard (d, 2P-1-d).

  Even chunks go by one ppermute, odd chunks by another (each a permutation of devices).
  Device r receives chunk r from the even ppermute when r is even, else from the odd one.
  """
  p = num_shards
  h0, h1 = jnp.split(x, 2, axis=axis)
  even = lax.ppermute(h0, axis_name, [(d, _dest(2 * d, p)) for d in range(p)])
  odd = lax.ppermute(h1, axis_name, [(d, _dest(2 * d + 1, p)) for d in range(p)])
  r_even = lax.axis_index(axis_name) % 2 == 0
  first = jnp.where(r_even, even, odd)
  second = jnp.where(r_even, odd, even)
  return jnp.concatenate([first, second], axis=axis)


def unzigzag_local(x: jax.Array, axis_name: str, num_shards: int,
                   axis: int = 1) -> jax.Array:
  """Inverse of `zigzag_local`: chunk c goes back to device c // 2, half c % 2."""
  p = num_shards
  first, second = jnp.split(x, 2, axis=axis)  # chunks r and 2P-1-r (opposite parity)
  r_even = lax.axis_index(axis_name) % 2 == 0
  even_chunk = jnp.where(r_even, first, second)
  odd_chunk = jnp.where(r_even, second, first)
  even_id = [r if r % 2 == 0 else 2 * p - 1 - r for r in range(p)]
  odd_id = [2 * p - 1 - r if r % 2 == 0 else r for r in range(p)]
  h0 = lax.ppermute(even_chunk, axis_name, [(r, even_id[r] // 2) for r in range(p)])
  h1 = lax.ppermute(odd_chunk, axis_name, [(r, odd_id[r] // 2) for r in range(p)])
  return jnp.concatenate([h0, h1], axis=axis)
