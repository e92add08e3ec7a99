"""Benchmark inputs: random attention, (head-sparse) decode and sparse MLP input sets, the
bytes a decode step reads from them, and the chunked error check of a decode output.

Every generator is deterministic in its seed and gives fresh values per input set (set i
draws from the seed and i), so timers can rotate among the sets (flashjax.benchmarking).
Decode caches are generated a batch chunk at a time, and the decode check compares a
chunk of rows at a time against the float32 reference, so neither needs memory
proportional to the whole cache.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from flashjax import benchmarking
from flashjax.ops.decode.reference import decode_reference


def attention_inputs(*, batch: int, q_len: int, kv_len: int, num_heads: int,
                     num_kv_heads: int, head_dim: int, dtype: Any, num_sets: int, seed: int,
                     with_dout: bool = False) -> list[tuple[jax.Array, ...]]:
  """`num_sets` fresh standard-normal (q, k, v[, dout]) attention input sets from `seed`.

  Args:
    batch, q_len, kv_len, num_heads, num_kv_heads, head_dim: B, T, S, Nq, Nkv, D.
    dtype: dtype of every array (drawn in float32, then cast).
    num_sets: how many sets.
    seed: jax.random seed.
    with_dout: also an output cotangent dout [B, T, Nq, D] (for timing the backward).

  Returns:
    List of tuples q [B, T, Nq, D], k / v [B, S, Nkv, D][, dout [B, T, Nq, D]].
  """
  if num_sets < 1:
    raise ValueError(f"{num_sets=} must be >= 1")
  dtype = jnp.dtype(dtype)
  b, t, s, d = batch, q_len, kv_len, head_dim
  shapes = [(b, t, num_heads, d), (b, s, num_kv_heads, d), (b, s, num_kv_heads, d)]
  if with_dout:
    shapes.append(shapes[0])
  key = jax.random.key(seed)
  sets = []
  for set_key in jax.random.split(key, num_sets):
    keys = jax.random.split(set_key, len(shapes))
    sets.append(tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype)
                      for k, shape in zip(keys, shapes)))
  return sets


def num_groups(head_density: float, num_kv_heads: int) -> int:
  """K = round(head_density * Nkv) KV groups per sequence (at least one).

  Args:
    head_density: fraction of groups computed, in (0, 1].
    num_kv_heads: Nkv.

  Returns:
    K in [1, Nkv].
  """
  if not 0 < head_density <= 1:
    raise ValueError(f"{head_density=} must lie in (0, 1]")
  return max(1, math.floor(head_density * num_kv_heads + 0.5))


def sample_lengths(rng: np.random.Generator, batch: int, kv_len: int,
                   ragged: bool) -> np.ndarray:
  """int32 [B]: all S, or (ragged) uniform in [S/2, S]."""
  if not ragged:
    return np.full((batch,), kv_len, np.int32)
  return rng.integers(kv_len // 2, kv_len + 1, size=batch).astype(np.int32)


def sample_head_indices(rng: np.random.Generator, batch: int, num_kv_heads: int,
                        groups: int) -> np.ndarray:
  """int32 [B, K]: K distinct random KV groups per sequence, ascending in each row."""
  if not 1 <= groups <= num_kv_heads:
    raise ValueError(f"{groups=} must lie in [1, {num_kv_heads=}]")
  order = np.argsort(rng.random((batch, num_kv_heads)), axis=1)
  return np.sort(order[:, :groups], axis=1).astype(np.int32)


def chunk_rows(batch: int, row_bytes: float, limit_bytes: float) -> int:
  """Largest divisor of `batch` whose rows take at most `limit_bytes` (at least 1)."""
  fits = [d for d in range(1, batch + 1) if batch % d == 0 and d * row_bytes <= limit_bytes]
  return max(fits, default=1)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "rows"))
def _random_cache(key: jax.Array, *, shape: tuple[int, ...], dtype: str,
                  rows: int) -> jax.Array:
  """Standard normal [B, ...] of `dtype`, generated `rows` batch rows at a time."""
  batch = shape[0]
  chunks = lax.map(lambda k: jax.random.normal(k, (rows, *shape[1:]), dtype),
                   jax.random.split(key, batch // rows))
  return chunks.reshape(shape)


def decode_input_shapes(*, batch: int, kv_len: int, num_heads: int, num_kv_heads: int,
                        head_dim: int, dtype: Any,
                        groups: int | None) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Shapes of one decode input set: (q, k, v, lengths[, head_indices]).

  Args:
    batch, kv_len, num_heads, num_kv_heads, head_dim: B, S (= S_max), Nq, Nkv, D.
    dtype: dtype of the query and the caches.
    groups: K selected KV groups per sequence, or None for dense (no head_indices).

  Returns:
    q [B, Nq, D], k / v [B, S, Nkv, D], lengths int32 [B][, head_indices int32 [B, K]].
  """
  b, s, d = batch, kv_len, head_dim
  dtype = jnp.dtype(dtype)
  cache = jax.ShapeDtypeStruct((b, s, num_kv_heads, d), dtype)
  shapes = (jax.ShapeDtypeStruct((b, num_heads, d), dtype), cache, cache,
            jax.ShapeDtypeStruct((b,), jnp.int32))
  if groups is not None:
    shapes += (jax.ShapeDtypeStruct((b, groups), jnp.int32),)
  return shapes


def nbytes(arrays: Sequence[Any]) -> int:
  """Total bytes of arrays or ShapeDtypeStructs (anything with .shape and .dtype)."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in arrays)


def decode_inputs(*, batch: int, kv_len: int, num_heads: int, num_kv_heads: int,
                  head_dim: int, dtype: Any, groups: int | None, num_sets: int, seed: int,
                  ragged: bool, chunk_bytes: float) -> list[tuple[jax.Array, ...]]:
  """`num_sets` fresh decode input sets (q, k, v, lengths[, head_indices]) from `seed`.

  Args:
    batch, kv_len, num_heads, num_kv_heads, head_dim: B, S (= S_max), Nq, Nkv, D.
    dtype: dtype of the query and the caches (standard normal values).
    groups: K selected KV groups per sequence, or None for dense (no head_indices).
    num_sets: how many sets.
    seed: the seed (set i draws from [seed, i]).
    ragged: False: every length is S; True: lengths uniform in [S/2, S] (per set).
    chunk_bytes: the caches are generated in batch chunks of at most about this size.

  Returns:
    List of tuples: q [B, Nq, D], k / v [B, S, Nkv, D], lengths int32 [B] and, with
    groups, head_indices int32 [B, K] (distinct per row).
  """
  q_shape, cache = decode_input_shapes(
      batch=batch, kv_len=kv_len, num_heads=num_heads, num_kv_heads=num_kv_heads,
      head_dim=head_dim, dtype=dtype, groups=groups)[:2]
  row_bytes = math.prod(cache.shape[1:]) * jnp.dtype(cache.dtype).itemsize
  rows = chunk_rows(batch, row_bytes, chunk_bytes)
  sets = []
  for index in range(num_sets):
    rng = np.random.default_rng([seed, index])
    kq, kk, kv = jax.random.split(jax.random.fold_in(jax.random.key(seed), index), 3)
    inputs = (jax.random.normal(kq, q_shape.shape, q_shape.dtype),
              _random_cache(kk, shape=cache.shape, dtype=dtype, rows=rows),
              _random_cache(kv, shape=cache.shape, dtype=dtype, rows=rows),
              jnp.asarray(sample_lengths(rng, batch, kv_len, ragged)))
    if groups is not None:
      inputs += (jnp.asarray(sample_head_indices(rng, batch, num_kv_heads, groups)),)
    sets.append(inputs)
  return sets


def decode_kv_bytes_of_sets(sets: Sequence[tuple[Any, ...]], num_kv_heads: int,
                            head_dim: int, dtype: Any) -> tuple[float, float]:
  """(bytes read, bytes a dense step reads) per decode step, averaged over the input sets.

  Args:
    sets: decode input sets (q, k, v, lengths[, head_indices]).
    num_kv_heads, head_dim: Nkv, D of the caches.
    dtype: cache dtype.

  Returns:
    The two means of `benchmarking.decode_kv_bytes` (with and without head_indices).
  """
  read, dense = [], []
  for inputs in sets:
    lengths = np.asarray(inputs[3])
    heads = np.asarray(inputs[4]) if len(inputs) > 4 else None
    args = (num_kv_heads, head_dim, dtype)
    read.append(benchmarking.decode_kv_bytes(lengths, *args, head_indices=heads))
    dense.append(benchmarking.decode_kv_bytes(lengths, *args))
  return float(np.mean(read)), float(np.mean(dense))


def check_row_ids(batch: int, check_rows: int | None) -> tuple[int, ...] | None:
  """Batch rows an error check compares: None (all) or `check_rows` spread-out rows.

  Args:
    batch: B.
    check_rows: None or a positive number of rows.

  Returns:
    None when every row is checked, else ascending row ids spread evenly from 0 to B - 1
    (both included from two rows on).
  """
  if check_rows is None:
    return None
  if isinstance(check_rows, bool) or not isinstance(check_rows, int) or check_rows < 1:
    raise ValueError(f"{check_rows=} must be None or a positive int")
  if check_rows >= batch:
    return None
  return tuple(int(i) for i in spread_rows(batch, check_rows))


def spread_rows(batch: int, count: int) -> np.ndarray:
  """Ascending ids of min(count, batch) rows spread evenly over [0, B - 1] (both ends from
  two rows on): the rows a check that cannot afford every row reads."""
  if batch < 1 or count < 1:
    raise ValueError(f"need batch >= 1 and count >= 1: {batch=}, {count=}")
  return np.unique(np.linspace(0, batch - 1, min(batch, count)).round().astype(int))


@functools.partial(jax.jit, static_argnames=("rows", "select"))
def decode_max_abs_err(out: jax.Array, inputs: tuple[jax.Array, ...], *, rows: int,
                       select: tuple[int, ...] | None = None) -> jax.Array:
  """max |out - reference| of a decode output over the `select`ed batch rows.

  Args:
    out: [B, Nq, D] decode output on `inputs`.
    inputs: its input set (q, k, v, lengths[, head_indices]).
    rows: the float32 reference is computed this many (selected) rows at a time; must
      divide the number of selected rows.
    select: batch row ids to compare (see `check_row_ids`), None for all.

  Returns:
    float32 scalar (NaN when an output is NaN).
  """
  if select is not None:
    ids = jnp.asarray(select)
    out, inputs = out[ids], tuple(x[ids] for x in inputs)
  query, key_cache, value_cache, lengths, *heads = inputs
  if rows < 1 or query.shape[0] % rows:
    raise ValueError(f"{rows=} must divide the {query.shape[0]} checked rows")

  def chunk(index):
    take = lambda x: lax.dynamic_slice_in_dim(x, index * rows, rows)
    f32 = lambda x: take(x).astype(jnp.float32)
    want = decode_reference(f32(query), f32(key_cache), f32(value_cache), take(lengths),
                            head_indices=take(heads[0]) if heads else None)
    return jnp.max(jnp.abs(take(out).astype(jnp.float32) - want))

  return jnp.max(lax.map(chunk, jnp.arange(query.shape[0] // rows)))


def sparse_mlp_num_selected(density: float, d_ff: int, bucket: int = 128) -> int:
  """k = density * F neurons rounded up to a multiple of `bucket`, at most F."""
  if not 0 < density <= 1:
    raise ValueError(f"{density=} must be in (0, 1]")
  return min(d_ff, -(-int(np.ceil(density * d_ff)) // bucket) * bucket)


def sparse_mlp_weights(*, d_model: int, d_ff: int, dtype: Any,
                       seed: int) -> dict[str, jax.Array]:
  """Random neuron-major MLP weights with outputs of scale O(1).

  Args:
    d_model, d_ff: d and F.
    dtype: dtype of every array (drawn in float32, then cast).
    seed: jax.random seed.

  Returns:
    {"w1": [F, d] ~ N(0, 1/d), "w2": [F, d] ~ N(0, 1/F), "b1": [F], "b2": [d] ~ N(0, 0.01)}.
  """
  d, f = d_model, d_ff
  dtype = jnp.dtype(dtype)
  keys = jax.random.split(jax.random.key(seed), 4)
  return dict(
      w1=(jax.random.normal(keys[0], (f, d), jnp.float32) / np.sqrt(d)).astype(dtype),
      w2=(jax.random.normal(keys[1], (f, d), jnp.float32) / np.sqrt(f)).astype(dtype),
      b1=(0.1 * jax.random.normal(keys[2], (f,), jnp.float32)).astype(dtype),
      b2=(0.1 * jax.random.normal(keys[3], (d,), jnp.float32)).astype(dtype),
  )


def sparse_mlp_input(*, batch: int, d_model: int, dtype: Any, seed: int,
                     index: int) -> jax.Array:
  """Standard normal x [B, d] of input set `index` (drawn from seed + 1000 + index, apart
  from `sparse_mlp_weights`' draws)."""
  key = jax.random.key(seed + 1000 + index)
  return jax.random.normal(key, (batch, d_model), jnp.float32).astype(dtype)
