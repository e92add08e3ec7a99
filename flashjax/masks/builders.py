"""BlockMask builders: host side (numpy, from a Mask) and device side (jax.numpy).

Host (`block_mask_from_mask`, also `BlockMask.from_mask`; defined in
flashjax.masks.block_mask, re-exported here): exact tile kinds from the mask's own
classification (never T x S for computable masks), tight compacted lists, deduplicated bool
tiles for the partial tiles of non-computable masks, cached per Mask object.

Device (`block_mask_from_rule`, `block_mask_from_dense`): pure jax.numpy, jit-traceable,
for traced segment ids and traced bool masks. Lists have length nk (forward) and nq
(backward). Rule classification uses per-block min/max of the segment ids, so it may call
an empty tile PARTIAL (never the reverse); it is exact for sorted segment ids under a causal
or unbounded band.

`block_mask_for` is the single entry point of the Pallas backends; `expand_block_mask`
(flashjax.masks.block_mask, re-exported) gives the element mask a kernel applies. This module
is the top of flashjax.masks (rule -> masks -> rcm -> block_mask -> builders); the rule
classification it runs on device is the jax.numpy twin in flashjax.masks.masks.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.masks import masks as masks_lib
from flashjax.masks.block_mask import (EMPTY, FULL, PARTIAL, BlockMask, assemble,
                                       block_mask_from_mask, build_from_mask, cached,
                                       check_size, dedup_tiles, expand_block_mask, tile_grid)
from flashjax.masks.masks import device_rule_block_kinds, device_rule_row_counts
from flashjax.masks.rule import Band, ElementRule, dense_rule_mask, int32_rule, to_numpy_rule

# Defined in flashjax.masks.block_mask (the host side), kept here for callers of builders.
__all__ = ["block_mask_for", "block_mask_from_dense", "block_mask_from_mask",
           "block_mask_from_rule", "expand_block_mask"]

def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


# ----------------------------------------------------------------------------- device builders


def _device_rule(rule: ElementRule, q_len: int, kv_len: int) -> ElementRule:
  """The rule with jnp arrays (int32 ids, bool prefix) of one batch size, shapes checked."""
  if not rule.has_segments:
    return ElementRule(rule.band)
  qs = jnp.asarray(rule.q_segment_ids, jnp.int32)
  ks = jnp.asarray(rule.kv_segment_ids, jnp.int32)
  pre = None if rule.kv_in_prefix is None else jnp.asarray(rule.kv_in_prefix, bool)
  if qs.ndim != 2 or qs.shape[1] != q_len:
    raise ValueError(f"q_segment_ids.shape={qs.shape} must be [B|1, {q_len=}]")
  for name, arr in (("kv_segment_ids", ks), ("kv_in_prefix", pre)):
    if arr is not None and (arr.ndim != 2 or arr.shape[1] != kv_len):
      raise ValueError(f"{name}.shape={arr.shape} must be [B|1, {kv_len=}]")
  sizes = {a.shape[0] for a in (qs, ks, pre) if a is not None}
  batch = max(sizes)
  if not sizes <= {1, batch}:
    raise ValueError(f"rule batch sizes {sorted(sizes)} do not broadcast")
  qs = jnp.broadcast_to(qs, (batch, q_len))
  ks = jnp.broadcast_to(ks, (batch, kv_len))
  pre = None if pre is None else jnp.broadcast_to(pre, (batch, kv_len))
  return ElementRule(rule.band, qs, ks, pre)


def block_mask_from_rule(rule: ElementRule, q_len: int, kv_len: int, block_q: int,
                         block_kv: int) -> BlockMask:
  """Device BlockMask of a computable mask (jit-traceable; lists of length nk / nq).

  Args:
    rule: ElementRule; segment ids int [B|1, T] / [B|1, S] and prefix flags bool [B|1, S]
      may be traced jax arrays.
    q_len: T.
    kv_len: S.
    block_q: query tile size.
    block_kv: key tile size.

  Returns:
    BlockMask of shape (B|1, 1, T, S) with jnp arrays, `rule` set and no tiles.
  """
  q_len, kv_len = check_size("q_len", q_len), check_size("kv_len", kv_len)
  block_q, block_kv = check_size("block_q", block_q), check_size("block_kv", block_kv)
  return _rule_block_mask(rule.q_segment_ids, rule.kv_segment_ids, rule.kv_in_prefix,
                          band=(rule.band.lo, rule.band.hi), q_len=q_len, kv_len=kv_len,
                          block_q=block_q, block_kv=block_kv)


@functools.partial(jax.jit, static_argnames=("band", "q_len", "kv_len", "block_q",
                                             "block_kv"))
def _rule_block_mask(q_segment_ids, kv_segment_ids, kv_in_prefix, *, band, q_len, kv_len,
                     block_q, block_kv) -> BlockMask:
  """block_mask_from_rule as one jitted computation (fast when called eagerly)."""
  rule = _device_rule(ElementRule(Band(*band), q_segment_ids, kv_segment_ids, kv_in_prefix),
                      q_len, kv_len)
  kinds = device_rule_block_kinds(rule, q_len, kv_len, block_q, block_kv)
  density = jnp.mean(device_rule_row_counts(rule, q_len, kv_len), dtype=jnp.float32) / kv_len
  return assemble(kinds, None, rule, None, density, q_len, kv_len, block_q, block_kv,
                  host=False)


def block_mask_from_dense(mask_array: jax.Array, block_q: int, block_kv: int) -> BlockMask:
  """Device BlockMask of a bool array (jit-traceable; exact kinds).

  Args:
    mask_array: bool [B|1, N|1, T, S] (or [T, S]), numpy or jax, possibly traced.
    block_q: query tile size.
    block_kv: key tile size.

  Returns:
    BlockMask with jnp arrays; `tiles` is the zero-padded mask cut into
    [Bm * Nm * nq * nk, block_q, block_kv] and a tile's index is its flat tile id
    ((b * Nm + n) * nq + qb) * nk + kb.
  """
  block_q, block_kv = check_size("block_q", block_q), check_size("block_kv", block_kv)
  dtype, ndim = jnp.result_type(mask_array), jnp.ndim(mask_array)
  if dtype != jnp.bool_:
    raise ValueError(f"mask_array.dtype={dtype} must be bool")
  if ndim not in (2, 4):
    raise ValueError(f"mask_array.shape={jnp.shape(mask_array)} must be [B|1, N|1, T, S] "
                     "or [T, S]")
  return _dense_block_mask(mask_array, block_q=block_q, block_kv=block_kv)


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv"))
def _dense_block_mask(mask_array, *, block_q: int, block_kv: int) -> BlockMask:
  """block_mask_from_dense as one jitted computation."""
  m = jnp.asarray(mask_array)
  if m.ndim == 2:
    m = m[None, None]
  bm, nm, q_len, kv_len = m.shape
  nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
  padded = jnp.pad(m, ((0, 0), (0, 0), (0, nq * block_q - q_len), (0, nk * block_kv - kv_len)))
  tiles = padded.reshape(bm, nm, nq, block_q, nk, block_kv).transpose(0, 1, 2, 4, 3, 5)
  counts = tiles.sum(axis=(4, 5), dtype=jnp.int32)
  kinds = jnp.where(counts == 0, EMPTY,
                    jnp.where(counts == block_q * block_kv, FULL, PARTIAL)).astype(jnp.int8)
  grid = jnp.arange(bm * nm * nq * nk, dtype=jnp.int32).reshape(bm, nm, nq, nk)
  return assemble(kinds, grid, None, tiles.reshape(-1, block_q, block_kv),
                  jnp.mean(m, dtype=jnp.float32), q_len, kv_len, block_q, block_kv,
                  host=False)


# ----------------------------------------------------------------------------- entry point


def _broadcast_lead(a: tuple[int, ...], b: tuple[int, ...], what: str) -> tuple[int, int]:
  out = []
  for x, y in zip(a, b):
    if x != y and 1 not in (x, y):
      raise ValueError(f"leading dims {tuple(a)} and {tuple(b)} of {what} do not broadcast")
    out.append(max(x, y))
  return tuple(out)


def _rule_into_tiles(bm: BlockMask) -> BlockMask:
  """Concrete BlockMask whose rule is folded into stored tiles (host, numpy)."""
  bm = jax.tree_util.tree_map(np.asarray, bm)
  q_len, kv_len = bm.shape[2:]
  rule = int32_rule(to_numpy_rule(bm.rule))
  rule_mask = masks_lib.RuleMask(q_len, kv_len, rule, batched=True)
  old_tiles = bm.tiles
  old_grid = None if old_tiles is None else tile_grid(bm, np)

  def tile_fn(b, n, qb, kb):
    rb = b if rule_mask.lead[0] > 1 else np.zeros_like(b)
    tiles = rule_mask.block_tiles(bm.block_q, bm.block_kv, rb, np.zeros_like(n), qb, kb)
    if old_tiles is not None:
      tiles = tiles & old_tiles[old_grid[b, n, qb, kb]]
    return tiles

  coords = np.nonzero(bm.kinds == PARTIAL)
  tiles, ids, _ = dedup_tiles(tile_fn, coords, bm.block_q, bm.block_kv)
  grid = np.zeros(bm.kinds.shape, np.int32)
  grid[coords] = ids
  return assemble(bm.kinds, grid, None, tiles, bm.density, q_len, kv_len, bm.block_q,
                  bm.block_kv, host=True)


def _combine(bm: BlockMask, rule: ElementRule, host: bool) -> BlockMask:
  """AND of a BlockMask and a rule: kinds intersected, rules merged, lists rebuilt.

  Args:
    bm: BlockMask (concrete or traced).
    rule: ElementRule (numpy when host, else jnp arrays from _device_rule).
    host: build with numpy (everything concrete) or with jax.numpy.

  Returns:
    BlockMask; its density is set when the result is rule-only, else None.
  """
  if bm.q_perm is not None or bm.kv_perm is not None:
    raise ValueError("an RCM-reordered BlockMask cannot be combined with is_causal or "
                     "segment ids (they refer to the original order)")
  q_len, kv_len = bm.shape[2:]
  block_q, block_kv = bm.block_q, bm.block_kv
  merged = rule
  rule_only = bm.rule is not None and bm.tiles is None
  if bm.rule is not None:
    merged = masks_lib.and_rules(bm.rule, rule)
    if merged is None:
      if any(_is_traced(x) for x in jax.tree_util.tree_leaves(bm)):
        return _dense_fallback(bm, rule)
      bm, merged, rule_only = _rule_into_tiles(bm), rule, False
  xp = np if host else jnp
  if host:
    kinds_b = masks_lib.rule_block_kinds(rule, q_len, kv_len, block_q, block_kv)
  else:
    kinds_b = device_rule_block_kinds(rule, q_len, kv_len, block_q, block_kv)
  kinds_a = xp.asarray(bm.kinds)
  shape = _broadcast_lead(kinds_a.shape[:2], kinds_b.shape[:2], "mask and segment ids")
  shape = shape + kinds_a.shape[2:]
  ka, kb = xp.broadcast_to(kinds_a, shape), xp.broadcast_to(kinds_b, shape)
  kinds = xp.where((ka == EMPTY) | (kb == EMPTY), EMPTY,
                   xp.where((ka == FULL) & (kb == FULL), FULL, PARTIAL)).astype(np.int8)
  tiles = grid = None
  if bm.tiles is not None:
    # Tiles FULL in bm but PARTIAL here need a stored tile: an appended all-True one.
    tiles = xp.asarray(bm.tiles, bool)
    grid = xp.where(kinds_a == FULL, tiles.shape[0], tile_grid(bm, xp))
    grid = xp.broadcast_to(grid, shape).astype(np.int32)
    tiles = xp.concatenate([tiles, xp.ones((1, block_q, block_kv), bool)])
  density = None
  if rule_only:
    if host:
      density = masks_lib.rule_row_counts(merged, q_len, kv_len).mean() / kv_len
    else:
      merged = _device_rule(merged, q_len, kv_len)
      density = jnp.mean(device_rule_row_counts(merged, q_len, kv_len),
                         dtype=jnp.float32) / kv_len
  if host:
    merged = int32_rule(merged)
  return assemble(kinds, grid, merged, tiles, density, q_len, kv_len, block_q, block_kv,
                  host)


def _dense_fallback(bm: BlockMask, rule: ElementRule) -> BlockMask:
  """AND through the dense element mask (traced BlockMask whose rule cannot merge)."""
  q_len, kv_len = bm.shape[2:]
  dense = expand_block_mask(bm) & dense_rule_mask(rule, q_len, kv_len)
  return block_mask_from_dense(dense, bm.block_q, bm.block_kv)


@functools.lru_cache(maxsize=64)
def _plain_block_mask(q_len: int, kv_len: int, block_q: int, block_kv: int,
                      is_causal: bool) -> BlockMask:
  """Host BlockMask of the full or causal mask (cached by shape)."""
  mask = masks_lib.causal(q_len, kv_len) if is_causal else masks_lib.full(q_len, kv_len)
  return build_from_mask(mask, block_q, block_kv)


def _check_mask_array(mask: Any, q_len: int, kv_len: int) -> Any:
  if not hasattr(mask, "ndim") or not hasattr(mask, "dtype"):
    raise ValueError(f"{type(mask)=} must be None, a Mask, a BlockMask or a bool array")
  if mask.dtype != np.bool_:
    raise ValueError(f"mask.dtype={mask.dtype} must be bool")
  if mask.ndim == 2:
    mask = mask[None, None]
  if mask.ndim != 4 or tuple(mask.shape[2:]) != (q_len, kv_len):
    raise ValueError(f"mask.shape={tuple(mask.shape)} must be [B|1, N|1, {q_len=}, "
                     f"{kv_len=}]")
  return mask


def block_mask_for(*, q_len: int, kv_len: int, block_q: int, block_kv: int, mask: Any = None,
                   is_causal: bool = False, q_segment_ids: Any = None,
                   kv_segment_ids: Any = None) -> BlockMask:
  """The BlockMask of all mask inputs of an attention call, ANDed (backend entry point).

  Everything concrete (numpy-convertible) is built on the host: tight lists, cached per
  Mask object (and per shape for plain full / causal masks). Anything traced (segment ids,
  a bool mask, a BlockMask passed through jit) goes through the device builders.

  Args:
    q_len: T.
    kv_len: S.
    block_q: query tile size.
    block_kv: key tile size.
    mask: None | flashjax.masks.Mask | BlockMask (its block sizes must be block_q,
      block_kv) | bool array [B|1, N|1, T, S] (numpy or jax, maybe traced).
    is_causal: AND j <= i.
    q_segment_ids: None or int [B, T] (numpy or jax, maybe traced).
    kv_segment_ids: None or int [B, S]; given iff q_segment_ids is.

  Returns:
    BlockMask of shape (Bm, Nm, T, S).
  """
  q_len, kv_len = check_size("q_len", q_len), check_size("kv_len", kv_len)
  block_q, block_kv = check_size("block_q", block_q), check_size("block_kv", block_kv)
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together: "
                     f"{q_segment_ids is None=}, {kv_segment_ids is None=}")
  leaves = []
  if q_segment_ids is not None:
    q_shape, kv_shape = tuple(np.shape(q_segment_ids)), tuple(np.shape(kv_segment_ids))
    if (len(q_shape) != 2 or len(kv_shape) != 2 or q_shape[1] != q_len
        or kv_shape[1] != kv_len or q_shape[0] != kv_shape[0]):
      raise ValueError(f"segment ids shapes {q_shape=}, {kv_shape=} must be [B, {q_len=}] "
                       f"and [B, {kv_len=}]")
    leaves += [q_segment_ids, kv_segment_ids]
  if isinstance(mask, BlockMask):
    if tuple(mask.shape[2:]) != (q_len, kv_len):
      raise ValueError(f"BlockMask {mask.shape=} does not match {q_len=}, {kv_len=}")
    if (mask.block_q, mask.block_kv) != (block_q, block_kv):
      raise ValueError(f"BlockMask blocks ({mask.block_q=}, {mask.block_kv=}) differ from "
                       f"the requested ({block_q=}, {block_kv=})")
    leaves += jax.tree_util.tree_leaves(mask)
  elif isinstance(mask, masks_lib.Mask):
    if (mask.q_len, mask.kv_len) != (q_len, kv_len):
      raise ValueError(f"{mask.shape=} does not match {q_len=}, {kv_len=}")
  elif mask is not None:
    mask = _check_mask_array(mask, q_len, kv_len)
    leaves.append(mask)
  if any(_is_traced(x) for x in leaves):
    return _device_block_mask_for(q_len, kv_len, block_q, block_kv, mask, is_causal,
                                  q_segment_ids, kv_segment_ids)
  return _host_block_mask_for(q_len, kv_len, block_q, block_kv, mask, is_causal,
                              q_segment_ids, kv_segment_ids)


def _extra_rule(is_causal: bool, q_segment_ids: Any, kv_segment_ids: Any, xp):
  if not is_causal and q_segment_ids is None:
    return None
  band = Band(None, 0) if is_causal else Band()
  if q_segment_ids is None:
    return ElementRule(band)
  return ElementRule(band, xp.asarray(q_segment_ids, np.int32),
                     xp.asarray(kv_segment_ids, np.int32))


def _host_block_mask_for(q_len, kv_len, block_q, block_kv, mask, is_causal, q_segment_ids,
                         kv_segment_ids) -> BlockMask:
  if isinstance(mask, BlockMask):
    rule = _extra_rule(is_causal, q_segment_ids, kv_segment_ids, np)
    if rule is None:
      return mask
    return _combine(jax.tree_util.tree_map(np.asarray, mask), rule, host=True)
  if q_segment_ids is None:
    if mask is None:
      return _plain_block_mask(q_len, kv_len, block_q, block_kv, bool(is_causal))
    if isinstance(mask, masks_lib.Mask):
      if not is_causal:
        return block_mask_from_mask(mask, block_q, block_kv)
      return cached(mask, (block_q, block_kv, "is_causal"), lambda: build_from_mask(
          mask & masks_lib.causal(q_len, kv_len), block_q, block_kv))
  parts = []
  if mask is not None:
    parts.append(mask if isinstance(mask, masks_lib.Mask) else
                 masks_lib.from_dense(np.asarray(mask)))
  if is_causal:
    parts.append(masks_lib.causal(q_len, kv_len))
  if q_segment_ids is not None:
    parts.append(masks_lib.document((np.asarray(q_segment_ids), np.asarray(kv_segment_ids)),
                                    causal=False))
  return build_from_mask(functools.reduce(lambda a, b: a & b, parts), block_q, block_kv)


def _device_block_mask_for(q_len, kv_len, block_q, block_kv, mask, is_causal, q_segment_ids,
                           kv_segment_ids) -> BlockMask:
  rule = _extra_rule(is_causal, q_segment_ids, kv_segment_ids, jnp)
  if mask is None:
    return block_mask_from_rule(rule, q_len, kv_len, block_q, block_kv)
  if isinstance(mask, BlockMask):
    base = mask
  elif isinstance(mask, masks_lib.Mask):
    base = block_mask_from_mask(mask, block_q, block_kv)
  elif _is_traced(mask):
    base = block_mask_from_dense(mask, block_q, block_kv)
  else:
    base = build_from_mask(masks_lib.from_dense(np.asarray(mask)), block_q, block_kv)
  if rule is None:
    return base
  return _combine(base, _device_rule(rule, q_len, kv_len), host=False)
