"""Reverse Cuthill-McKee (RCM) reordering of very sparse, irregular self-attention masks.

Binary block masking skips empty tiles; a sparse mask whose allowed elements are scattered
over the whole T x S square touches almost every tile. Renumbering the tokens with RCM
(on the symmetrised sparsity pattern) pulls the allowed elements towards the diagonal, so
fewer tiles are non-empty. Attention is permutation-equivariant: with P the permutation,

  attend(q, k, v, M) = unpermute(attend(q[P], k[P], v[P], M[P][:, P]))

`block_mask_rcm` builds the BlockMask of the permuted mask and stores P as q_perm / kv_perm;
`permute_qkv` and `unpermute_output` apply it around any backend.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
from scipy.sparse import csgraph

from flashjax.masks import builders
from flashjax.masks import masks as masks_lib
from flashjax.masks.block_mask import BlockMask


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


def block_mask_rcm(mask: Any, block_q: int, block_kv: int) -> BlockMask:
  """Host BlockMask of the RCM-reordered mask, with q_perm = kv_perm = the RCM order.

  Also reached through `BlockMask.from_mask(mask, block_q, block_kv, reorder="rcm")`
  (cached per Mask object).

  Args:
    mask: a flashjax.masks Mask or bool array (T, T).
    block_q: query tile size.
    block_kv: key tile size.

  Returns:
    BlockMask of the permuted mask; use with `permute_qkv` / `unpermute_output`.
  """
  perm, _ = rcm_permutation(mask)
  bm = builders.block_mask_from_mask(permute_mask(mask, perm), block_q, block_kv)
  return dataclasses.replace(bm, q_perm=perm, kv_perm=perm)


def permute_qkv(query: jax.Array, key: jax.Array, value: jax.Array,
                bm: BlockMask) -> tuple[jax.Array, jax.Array, jax.Array]:
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
    query = jnp.take(query, jnp.asarray(bm.q_perm), axis=1)
  if bm.kv_perm is not None:
    perm = jnp.asarray(bm.kv_perm)
    key, value = jnp.take(key, perm, axis=1), jnp.take(value, perm, axis=1)
  return query, key, value


def unpermute_output(out: jax.Array, bm: BlockMask) -> jax.Array:
  """Undoes `permute_qkv` on the attention output.

  Args:
    out: [B, T, N, D] output for the permuted queries.
    bm: the BlockMask given to `permute_qkv`.

  Returns:
    [B, T, N, D] in the original token order.
  """
  if bm.q_perm is None:
    return out
  return jnp.take(out, jnp.argsort(jnp.asarray(bm.q_perm)), axis=1)
