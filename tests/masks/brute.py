"""Brute-force numpy definitions of the masks (docs/architecture.md) and of tile kinds.

Everything here is written from the definitions, element by element, independently of
flashjax.masks, so the tests compare two implementations.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flashjax.masks import EMPTY, FULL, PARTIAL


def grid(q_len: int, kv_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Query positions [T, 1] and key positions [1, S]."""
  return np.arange(q_len)[:, None], np.arange(kv_len)[None, :]


def causal(q_len: int, kv_len: int, offset: int = 0) -> np.ndarray:
  i, j = grid(q_len, kv_len)
  return j <= i + offset


def sliding_window(q_len: int, kv_len: int, left: int, right: int) -> np.ndarray:
  i, j = grid(q_len, kv_len)
  return (i - left <= j) & (j <= i + right)


def document(q_ids: np.ndarray, kv_ids: np.ndarray, is_causal: bool) -> np.ndarray:
  """[T], [S] ids -> [T, S]."""
  out = q_ids[:, None] == kv_ids[None, :]
  if is_causal:
    out &= causal(q_ids.size, kv_ids.size)
  return out


def prefix_lm(q_ids: np.ndarray, kv_ids: np.ndarray, prefix_of: Any) -> np.ndarray:
  """[T], [S] ids and prefix_of(segment id) -> [T, S], element by element."""
  out = np.zeros((q_ids.size, kv_ids.size), bool)
  for j in range(kv_ids.size):
    rank = int(np.sum(kv_ids[:j] == kv_ids[j]))
    in_prefix = rank < prefix_of(int(kv_ids[j]))
    for i in range(q_ids.size):
      out[i, j] = q_ids[i] == kv_ids[j] and (j <= i or in_prefix)
  return out


def tree(parents: np.ndarray) -> np.ndarray:
  t = parents.size
  out = np.eye(t, dtype=bool)
  for i, p in enumerate(parents):
    if p >= 0:
      out[i, p] = True
  return out


def dilated(q_len: int, kv_len: int, window: int, dilation: int) -> np.ndarray:
  i, j = grid(q_len, kv_len)
  return (np.abs(i - j) <= window * dilation) & ((i - j) % dilation == 0)


def global_tokens(q_len: int, kv_len: int, window: int, ids) -> np.ndarray:
  i, j = grid(q_len, kv_len)
  return (np.abs(i - j) <= window) | np.isin(i, ids) | np.isin(j, ids)


def padded(dense: np.ndarray, block_q: int, block_kv: int) -> np.ndarray:
  """[..., T, S] zero-padded to block multiples, as 4-D."""
  dense = dense.reshape((1,) * (4 - dense.ndim) + dense.shape)
  t, s = dense.shape[-2:]
  nq, nk = -(-t // block_q), -(-s // block_kv)
  out = np.zeros(dense.shape[:2] + (nq * block_q, nk * block_kv), bool)
  out[..., :t, :s] = dense
  return out


def tile(dense: np.ndarray, block_q: int, block_kv: int, b: int, n: int, qb: int,
         kb: int) -> np.ndarray:
  """One zero-padded tile of the 4-D dense mask."""
  p = padded(dense, block_q, block_kv)
  return p[b, n, qb * block_q:(qb + 1) * block_q, kb * block_kv:(kb + 1) * block_kv]


def kinds(dense: np.ndarray, block_q: int, block_kv: int) -> np.ndarray:
  """Exact kinds [Bm, Nm, nq, nk]: any / all allowed over each zero-padded tile."""
  p = padded(dense, block_q, block_kv)
  t, s = dense.shape[-2:]
  nq, nk = p.shape[2] // block_q, p.shape[3] // block_kv
  tiles = p.reshape(*p.shape[:2], nq, block_q, nk, block_kv)
  inside = ((np.arange(1, nq + 1) * block_q <= t)[:, None] &
            (np.arange(1, nk + 1) * block_kv <= s)[None, :])
  full = tiles.all(axis=(3, 5)) & inside
  return np.where(full, FULL, np.where(tiles.any(axis=(3, 5)), PARTIAL, EMPTY)).astype(
      np.int8)
