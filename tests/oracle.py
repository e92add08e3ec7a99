"""float64 numpy oracles for attention and decode, independent of flashjax's references.

Masks here are built from their definitions (docs/architecture.md), not from flashjax.masks,
so a test that compares a backend against these oracles also checks the mask library.
"""

from __future__ import annotations

import numpy as np


def _f64(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float32).astype(np.float64)


def _softmax_rows(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
  """Softmax over the last axis restricted to `allowed`; rows with none allowed give 0."""
  masked = np.where(allowed, logits, -np.inf)
  row_max = masked.max(axis=-1, keepdims=True)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  e = np.where(allowed, np.exp(np.where(allowed, logits, 0.0) - row_max), 0.0)
  denom = e.sum(axis=-1, keepdims=True)
  return e / np.where(denom == 0.0, 1.0, denom)


def _to_4d(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  return x.reshape((1,) * (4 - x.ndim) + x.shape)


def attention_oracle(query, key, value, *, allowed=None, bias=None, scale=None,
                     logits_soft_cap=None) -> np.ndarray:
  """Grouped-query attention in float64.

  Args:
    query: [B, T, Nq, D].
    key: [B, S, Nkv, D].
    value: [B, S, Nkv, D].
    allowed: None or bool broadcastable to [B, Nq, T, S] (rank 2 to 4).
    bias: None or float broadcastable to [B, Nq, T, S], added after the soft cap.
    scale: None for 1 / sqrt(D).
    logits_soft_cap: None or cap: logits = cap * tanh(logits / cap).

  Returns:
    float64 [B, T, Nq, D].
  """
  q, k, v = _f64(query), _f64(key), _f64(value)
  b, t, nq, d = q.shape
  s, nkv = k.shape[1], k.shape[2]
  kv_head = np.arange(nq) // (nq // nkv)  # query head n reads kv head n // G
  k, v = k[:, :, kv_head], v[:, :, kv_head]
  scale = 1.0 / np.sqrt(d) if scale is None else scale
  logits = np.einsum("btnd,bsnd->bnts", q, k) * scale
  if logits_soft_cap is not None:
    logits = logits_soft_cap * np.tanh(logits / logits_soft_cap)
  if bias is not None:
    logits = logits + _to_4d(_f64(bias))
  if allowed is None:
    allowed = np.ones((1, 1, t, s), dtype=bool)
  allowed = np.broadcast_to(_to_4d(allowed), logits.shape)
  return np.einsum("bnts,bsnd->btnd", _softmax_rows(logits, allowed), v)


def decode_oracle(query, key_cache, value_cache, lengths, *, head_indices=None, scale=None,
                  logits_soft_cap=None) -> np.ndarray:
  """Decode attention in float64 (see flashjax.decode_attention for the semantics).

  Args:
    query: [B, Nq, D].
    key_cache: [B, S_max, Nkv, D].
    value_cache: [B, S_max, Nkv, D].
    lengths: int [B].
    head_indices: None or int [B, K] KV groups computed per sequence.
    scale: None for 1 / sqrt(D).
    logits_soft_cap: None or cap.

  Returns:
    float64 [B, Nq, D].
  """
  b, nq, _ = query.shape
  s_max, nkv = key_cache.shape[1], key_cache.shape[2]
  allowed = np.arange(s_max)[None, None, None, :] < np.asarray(lengths)[:, None, None, None]
  out = attention_oracle(np.asarray(query, np.float32)[:, None], key_cache, value_cache,
                         allowed=allowed, scale=scale, logits_soft_cap=logits_soft_cap)[:, 0]
  if head_indices is not None:
    group = np.arange(nq) // (nq // nkv)
    keep = np.zeros((b, nq), dtype=bool)
    for row in range(b):
      keep[row] = np.isin(group, np.asarray(head_indices)[row])
    out = np.where(keep[:, :, None], out, 0.0)
  return out


# Mask definitions (query i may attend key j), numpy bool arrays.


def causal_mask(q_len: int, kv_len: int, offset: int = 0) -> np.ndarray:
  """[T, S]: j <= i + offset."""
  i, j = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
  return j <= i + offset


def sliding_window_mask(q_len: int, kv_len: int, left: int, right: int = 0) -> np.ndarray:
  """[T, S]: i - left <= j <= i + right."""
  i, j = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
  return (j >= i - left) & (j <= i + right)


def segment_mask(q_segment_ids, kv_segment_ids) -> np.ndarray:
  """[B, 1, T, S]: equal segment ids."""
  q_ids, kv_ids = np.asarray(q_segment_ids), np.asarray(kv_segment_ids)
  return (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]


def tree_mask(parents) -> np.ndarray:
  """[T, T]: j == i or j == parents[i] (-1: root)."""
  parents = np.asarray(parents)
  n = parents.shape[0]
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  return (j == i) | (j == parents[:, None])


def prefix_lm_mask(segment_ids, prefix_length: int) -> np.ndarray:
  """[B, 1, T, T]: same segment and (j <= i or j is among its segment's first tokens)."""
  ids = np.asarray(segment_ids)
  b, t = ids.shape
  out = np.zeros((b, 1, t, t), dtype=bool)
  for row in range(b):
    for i in range(t):
      same = np.flatnonzero(ids[row] == ids[row, i])  # positions of i's segment, ascending
      visible = same[(same <= i) | (np.arange(same.size) < prefix_length)]
      out[row, 0, i, visible] = True
  return out


def dilated_mask(q_len: int, kv_len: int, window: int, dilation: int) -> np.ndarray:
  """[T, S]: |i - j| <= window * dilation and (i - j) % dilation == 0."""
  diff = np.arange(q_len)[:, None] - np.arange(kv_len)[None, :]
  return (np.abs(diff) <= window * dilation) & (diff % dilation == 0)


def global_tokens_mask(q_len: int, kv_len: int, window: int, global_ids) -> np.ndarray:
  """[T, S]: |i - j| <= window, or i or j is a global position."""
  i, j = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
  return (np.abs(i - j) <= window) | np.isin(i, global_ids) | np.isin(j, global_ids)
