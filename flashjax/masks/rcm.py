"""Reverse Cuthill-McKee (RCM) reordering of very sparse, irregular self-attention masks.

Binary block masking skips empty tiles; a sparse mask whose allowed elements are scattered
over the whole T x S square touches almost every tile. Renumbering the tokens with RCM
(on the symmetrised sparsity pattern) pulls the allowed elements towards the diagonal, so
fewer tiles are non-empty. Attention is permutation-equivariant: with P the permutation,

  attend(q, k, v, M) = unpermute(attend(q[P], k[P], v[P], M[P][:, P]))

`flashjax.masks.block_mask.block_mask_rcm` builds the BlockMask of the permuted mask and
stores P as q_perm / kv_perm; `permute_qkv` and `unpermute_output` apply it around any backend
(the one route every backend takes), `unpermute_dense_mask` brings its expanded element mask
back to the original order. `rcm_report` says what the reordering does to a mask (density,
bandwidth and tile density before and after). They read only q_perm / kv_perm of the BlockMask, so this module
sits below flashjax.masks.block_mask.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
from scipy.sparse import csgraph

from flashjax.masks import masks as masks_lib


def _square_mask(mask: Any) -> masks_lib.Mask:
  if not isinstance(mask, masks_lib.Mask):
    mask = masks_lib.from_dense(np.asarray(mask))
  if mask.lead != (1, 1):
    raise ValueError(f"{mask.shape=}: RCM needs one (T, S) mask (leading dims of 1)")
  if mask.q_len != mask.kv_len:
    raise ValueError(f"{mask.shape=}: RCM needs self-attention, T == S")
  return mask


def _pattern(mask: masks_lib.Mask) -> tuple[np.ndarray, np.ndarray]:
  """(rows, cols) of the allowed elements of a square mask."""
  idx = mask.nonzero()
  return idx[-2], idx[-1]


def rcm_permutation(mask: Any) -> tuple[np.ndarray, np.ndarray]:
  """Reverse Cuthill-McKee order of a self-attention mask.

  Args:
    mask: a flashjax.masks Mask or bool array of shape (T, T) (or (1, 1, T, T)).

  Returns:
    (perm, inv_perm), int32 [T] each: position p of the reordered sequence holds token
    perm[p]; inv_perm[perm[p]] == p.
  """
  mask = _square_mask(mask)
  t = mask.q_len
  rows, cols = _pattern(mask)
  graph = scipy.sparse.csr_matrix((np.ones(rows.size, np.int8), (rows, cols)), shape=(t, t))
  graph = (graph + graph.T).tocsr()
  perm = np.asarray(csgraph.reverse_cuthill_mckee(graph, symmetric_mode=True), np.int32)
  inv = np.empty_like(perm)
  inv[perm] = np.arange(t, dtype=np.int32)
  return perm, inv


def permute_mask(mask: Any, perm: np.ndarray) -> masks_lib.Mask:
  """The mask of the reordered sequence, M'[p, r] = M[perm[p], perm[r]].

  Args:
    mask: a flashjax.masks Mask or bool array (T, T).
    perm: int [T] permutation.

  Returns:
    A sparse (coordinate) Mask of shape (T, T).
  """
  mask = _square_mask(mask)
  perm = np.asarray(perm)
  t = mask.q_len
  if perm.shape != (t,) or not np.array_equal(np.sort(perm), np.arange(t)):
    raise ValueError(f"perm (shape {perm.shape}) must be a permutation of range({t})")
  inv = np.empty_like(perm)
  inv[perm] = np.arange(t)
  rows, cols = _pattern(mask)
  return masks_lib.CoordinateMask(t, t, inv[rows], inv[cols])


def _permute(x: jax.Array, perm: Any, axis: int) -> jax.Array:
  return jnp.take(x, jnp.asarray(perm), axis=axis)


def _unpermute(x: jax.Array, perm: Any, axis: int) -> jax.Array:
  return jnp.take(x, jnp.argsort(jnp.asarray(perm)), axis=axis)


def permute_qkv(query: jax.Array, key: jax.Array, value: jax.Array,
                bm: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Reorders the sequence axes for an RCM BlockMask (identity when it has none).

  Args:
    query: [B, T, N, D].
    key: [B, S, Nkv, D].
    value: [B, S, Nkv, D].
    bm: BlockMask with q_perm [T] and kv_perm [S] (or None).

  Returns:
    (query[:, q_perm], key[:, kv_perm], value[:, kv_perm]).
  """
  if bm.q_perm is not None:
    query = _permute(query, bm.q_perm, 1)
  if bm.kv_perm is not None:
    key, value = _permute(key, bm.kv_perm, 1), _permute(value, bm.kv_perm, 1)
  return query, key, value


def unpermute_output(out: jax.Array, bm: Any) -> jax.Array:
  """Undoes `permute_qkv` on the attention output.

  Args:
    out: [B, T, N, D] output for the permuted queries.
    bm: the BlockMask given to `permute_qkv`.

  Returns:
    [B, T, N, D] in the original token order.
  """
  if bm.q_perm is None:
    return out
  return _unpermute(out, bm.q_perm, 1)


def unpermute_dense_mask(dense: jax.Array, bm: Any) -> jax.Array:
  """The expanded element mask of an RCM BlockMask in the original token order.

  Args:
    dense: bool [..., T, S], the element mask of the permuted sequences
      (mask[q_perm][:, kv_perm], e.g. `expand_block_mask(bm)`).
    bm: the BlockMask it was expanded from.

  Returns:
    bool [..., T, S] referring to the caller's q / k / v.
  """
  if bm.q_perm is not None:
    dense = _unpermute(dense, bm.q_perm, -2)
  if bm.kv_perm is not None:
    dense = _unpermute(dense, bm.kv_perm, -1)
  return dense


def bandwidth(mask: Any) -> int:
  """max |i - j| over the allowed (query i, key j) elements of a square mask (0 if none)."""
  rows, cols = _pattern(_square_mask(mask))
  return int(np.max(np.abs(rows - cols))) if rows.size else 0


def _block_density(mask: masks_lib.Mask, block_q: int, block_kv: int) -> float:
  kinds = np.asarray(mask.block_kinds(block_q, block_kv))
  return float(np.mean(kinds != masks_lib.EMPTY))


def rcm_report(mask: Any, block_q: int, block_kv: int) -> dict[str, Any]:
  """What RCM reordering does to a self-attention mask, before and after.

  Args:
    mask: a flashjax.masks Mask or bool array (T, T) (or (1, 1, T, T)).
    block_q: tile rows of the block densities.
    block_kv: tile columns of the block densities.

  Returns:
    density (fraction of allowed elements; a permutation keeps it), bandwidth_before /
    bandwidth_after (max |i - j| of the allowed elements), block_density_before /
    block_density_after (fraction of non-empty block_q x block_kv tiles), rcm_ms (host
    time of the RCM ordering) and permute_ms (host time to build the reordered mask).
  """
  for name, value in (("block_q", block_q), ("block_kv", block_kv)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive int")
  mask = _square_mask(mask)
  start = time.perf_counter()
  perm, _ = rcm_permutation(mask)
  rcm_s = time.perf_counter() - start
  start = time.perf_counter()
  reordered = permute_mask(mask, perm)
  permute_s = time.perf_counter() - start
  return {"density": float(mask.density),
          "bandwidth_before": bandwidth(mask), "bandwidth_after": bandwidth(reordered),
          "block_density_before": _block_density(mask, block_q, block_kv),
          "block_density_after": _block_density(reordered, block_q, block_kv),
          "rcm_ms": 1e3 * rcm_s, "permute_ms": 1e3 * permute_s}
