"""BlockMask builders: host side (numpy, from a Mask) and device side (jax.numpy).

Host (`block_mask_from_mask`, also `BlockMask.from_mask`): exact tile kinds from the mask's
own classification (never T x S for computable masks), tight compacted lists, deduplicated
bool tiles for the partial tiles of non-computable masks, cached per Mask object.

Device (`block_mask_from_rule`, `block_mask_from_dense`): pure jax.numpy, jit-traceable,
for traced segment ids and traced bool masks. Lists have length nk (forward) and nq
(backward). Rule classification uses per-block min/max of the segment ids, so it may call
an empty tile PARTIAL (never the reverse); it is exact for sorted segment ids under a causal
or unbounded band.

`block_mask_for` is the single entry point of the Pallas backends; `expand_block_mask`
gives the element mask a kernel applies.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flashjax.masks import masks as masks_lib
from flashjax.masks.block_mask import EMPTY, FULL, PARTIAL, BlockMask
from flashjax.masks.rule import Band, ElementRule, to_numpy_rule

# Tiles of partial blocks are produced in chunks of about this many elements.
_CHUNK_ELEMENTS = 1 << 24

# BlockMasks built from a Mask, per Mask object (weakly held) and build key.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _check_size(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive int")
  return int(value)


def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def _cached(mask: masks_lib.Mask, key: tuple[Any, ...], build) -> BlockMask:
  entry = _CACHE.get(mask)
  if entry is None:
    entry = _CACHE[mask] = {}
  if key not in entry:
    entry[key] = build()
  return entry[key]


# ----------------------------------------------------------------------------- list building


def _host_lists(kinds: np.ndarray, grid: np.ndarray | None):
  """Tight compacted lists of the non-empty tiles of each row of kinds [Bm, Nm, R, C]."""
  lead, cols = kinds.shape[:-1], kinds.shape[-1]
  flat = np.reshape(kinds, (-1, cols))
  nonempty = flat != EMPTY
  count = nonempty.sum(axis=1).astype(np.int32)
  length = max(1, int(count.max(initial=0)))
  rows, cols_nz = np.nonzero(nonempty)  # row-major: ascending columns within a row
  slot = np.arange(rows.size) - (np.cumsum(count) - count)[rows]
  block = np.zeros((flat.shape[0], length), np.int32)
  kind = np.zeros_like(block)
  tile = np.zeros_like(block)
  block[rows, slot] = cols_nz
  kind[rows, slot] = flat[rows, cols_nz]
  if grid is not None:
    tile[rows, slot] = np.reshape(grid, (-1, cols))[rows, cols_nz]
  last = block[np.arange(flat.shape[0]), np.maximum(count - 1, 0)]
  block = np.where(np.arange(length) < count[:, None], block, last[:, None])
  return (count.reshape(lead), block.reshape(*lead, length), kind.reshape(*lead, length),
          tile.reshape(*lead, length))


def _device_lists(kinds: jax.Array, grid: jax.Array | None):
  """Compacted lists of length C (all columns) for each row of kinds [Bm, Nm, R, C]."""
  nonempty = kinds != EMPTY
  count = nonempty.sum(axis=-1, dtype=jnp.int32)
  # A stable sort of the EMPTY flags moves non-empty columns first, in ascending order.
  order = jnp.argsort(jnp.logical_not(nonempty).astype(jnp.int8), axis=-1,
                      stable=True).astype(jnp.int32)
  valid = jnp.arange(kinds.shape[-1], dtype=jnp.int32) < count[..., None]
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  last = jnp.where(count[..., None] > 0, last, 0)
  block = jnp.where(valid, order, last)
  kind = jnp.where(valid, jnp.take_along_axis(kinds, order, axis=-1).astype(jnp.int32), 0)
  if grid is None:
    tile = jnp.zeros_like(block)
  else:
    tile = jnp.where(valid, jnp.take_along_axis(grid, order, axis=-1), 0).astype(jnp.int32)
  return count, block, kind, tile


def _assemble(kinds, grid, rule: ElementRule | None, tiles, density, q_len: int,
              kv_len: int, block_q: int, block_kv: int, host: bool) -> BlockMask:
  """BlockMask from tile kinds [Bm, Nm, nq, nk] and per-tile ids into `tiles`."""
  lists, xp = (_host_lists, np) if host else (_device_lists, jnp)
  fwd = lists(kinds, grid)
  bwd = lists(xp.swapaxes(kinds, 2, 3), None if grid is None else xp.swapaxes(grid, 2, 3))
  block_density = xp.mean(kinds != EMPTY, dtype=np.float32)
  if host:
    kinds = np.ascontiguousarray(kinds)
    density = None if density is None else np.float32(density)
    block_density = np.float32(block_density)
  elif density is not None:
    density = jnp.asarray(density, jnp.float32)
  return BlockMask(tuple(kinds.shape[:2]) + (q_len, kv_len), block_q, block_kv, kinds, *fwd,
                   *bwd, rule=rule, tiles=tiles, density=density,
                   block_density=block_density)


def _dedup_tiles(tile_fn, coords: tuple[np.ndarray, ...], block_q: int, block_kv: int):
  """Deduplicated bool tiles of the given grid tiles.

  Args:
    tile_fn: (b, n, qb, kb) index arrays -> bool tiles [len, block_q, block_kv].
    coords: (b, n, qb, kb) int arrays of the tiles.
    block_q: query tile size.
    block_kv: key tile size.

  Returns:
    (tiles [n_unique, block_q, block_kv] bool in order of first use, or None without tiles;
     int32 [len] index of each requested tile into them; allowed elements over all tiles).
  """
  if coords[0].size == 0:
    return None, np.zeros(0, np.int32), 0
  step = max(1, _CHUNK_ELEMENTS // (block_q * block_kv))
  packed, allowed = [], 0
  for c in range(0, coords[0].size, step):
    tiles = tile_fn(*(x[c:c + step] for x in coords))
    allowed += int(np.count_nonzero(tiles))
    packed.append(np.packbits(tiles.reshape(tiles.shape[0], -1), axis=1))
  packed = np.concatenate(packed)
  keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
  _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
  order = np.argsort(first)
  rank = np.empty_like(order)
  rank[order] = np.arange(order.size)
  tiles = np.unpackbits(packed[first[order]], axis=1, count=block_q * block_kv)
  return (tiles.view(bool).reshape(-1, block_q, block_kv),
          rank[inverse.ravel()].astype(np.int32), allowed)


def _int32_rule(rule: ElementRule) -> ElementRule:
  """Numpy rule with int32 segment ids and bool prefix flags."""
  if not rule.has_segments:
    return ElementRule(rule.band)
  pre = rule.kv_in_prefix
  return ElementRule(rule.band, np.asarray(rule.q_segment_ids, np.int32),
                     np.asarray(rule.kv_segment_ids, np.int32),
                     None if pre is None else np.asarray(pre, bool))


# ----------------------------------------------------------------------------- host builder


def block_mask_from_mask(mask: masks_lib.Mask, block_q: int, block_kv: int, *,
                         reorder: str | None = None) -> BlockMask:
  """Host BlockMask of a Mask (numpy arrays, tight list lengths), cached per Mask object.

  Args:
    mask: a flashjax.masks Mask of shape (T, S) or (B|1, N|1, T, S).
    block_q: query tile size.
    block_kv: key tile size.
    reorder: None, or "rcm" to build the mask of the Reverse Cuthill-McKee reordered
      sequence (self-attention, T == S) and store the permutation in q_perm / kv_perm.

  Returns:
    BlockMask with numpy fields; `rule` is set for computable masks, `tiles` otherwise.
  """
  if not isinstance(mask, masks_lib.Mask):
    raise ValueError(f"{type(mask)=} must be a flashjax.masks.Mask")
  block_q, block_kv = _check_size("block_q", block_q), _check_size("block_kv", block_kv)
  if reorder not in (None, "rcm"):
    raise ValueError(f"{reorder=} must be None or 'rcm'")

  def build():
    if reorder == "rcm":
      from flashjax.masks import rcm  # pylint: disable=g-import-not-at-top
      return rcm.block_mask_rcm(mask, block_q, block_kv)
    return _build_host(mask, block_q, block_kv)

  return _cached(mask, (block_q, block_kv, reorder), build)


def _build_host(mask: masks_lib.Mask, block_q: int, block_kv: int) -> BlockMask:
  kinds = np.ascontiguousarray(mask.block_kinds(block_q, block_kv))
  rule = mask.rule()
  if rule is not None:
    return _assemble(kinds, None, _int32_rule(rule), None, mask.density, mask.q_len,
                     mask.kv_len, block_q, block_kv, host=True)
  coords = np.nonzero(kinds == PARTIAL)
  tile_fn = functools.partial(mask.block_tiles, block_q, block_kv)
  tiles, ids, partial_allowed = _dedup_tiles(tile_fn, coords, block_q, block_kv)
  grid = np.zeros(kinds.shape, np.int32)
  grid[coords] = ids
  allowed = np.count_nonzero(kinds == FULL) * block_q * block_kv + partial_allowed
  density = allowed / (kinds.shape[0] * kinds.shape[1] * mask.q_len * mask.kv_len)
  return _assemble(kinds, grid, None, tiles, density, mask.q_len, mask.kv_len, block_q,
                   block_kv, host=True)


# ----------------------------------------------------------------------------- device builders


def _block_reduce(x: jax.Array, block: int, fill: Any, fn) -> jax.Array:
  """fn over consecutive blocks of the last axis of x [B, L] (padded with fill)."""
  pad = _cdiv(x.shape[-1], block) * block - x.shape[-1]
  x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill)
  return fn(x.reshape(x.shape[0], -1, block), axis=-1)


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


def _device_rule_kinds(rule: ElementRule, q_len: int, kv_len: int, block_q: int,
                       block_kv: int) -> jax.Array:
  """Conservative kinds int8 [B|1, 1, nq, nk] of a rule with jnp arrays (_device_rule)."""
  band = masks_lib.band_block_kinds(rule.band, q_len, kv_len, block_q, block_kv)
  if not rule.has_segments:
    return jnp.asarray(band)[None, None]
  inside = jnp.asarray(_tiles_inside(q_len, kv_len, block_q, block_kv))
  band = jnp.asarray(band)
  big, small = np.iinfo(np.int32).max, np.iinfo(np.int32).min
  qs, ks, pre = rule.q_segment_ids, rule.kv_segment_ids, rule.kv_in_prefix
  qmin = _block_reduce(qs, block_q, big, jnp.min)[:, :, None]
  qmax = _block_reduce(qs, block_q, small, jnp.max)[:, :, None]
  kmin = _block_reduce(ks, block_kv, big, jnp.min)[:, None, :]
  kmax = _block_reduce(ks, block_kv, small, jnp.max)[:, None, :]
  single = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
  nonempty = (qmin <= kmax) & (kmin <= qmax) & (band != EMPTY)
  full = single & (band == FULL)
  if pre is not None:
    # Prefix keys are visible from their whole segment, outside the band too.
    pmin = _block_reduce(jnp.where(pre, ks, big), block_kv, big, jnp.min)[:, None, :]
    pmax = _block_reduce(jnp.where(pre, ks, small), block_kv, small, jnp.max)[:, None, :]
    nonempty = nonempty | ((pmin <= qmax) & (qmin <= pmax))
    all_prefix = _block_reduce(pre, block_kv, True, jnp.all)[:, None, :]
    full = full | (single & all_prefix & inside)
  kinds = jnp.where(full, FULL, jnp.where(nonempty, PARTIAL, EMPTY)).astype(jnp.int8)
  return kinds[:, None]


def _tiles_inside(q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
  """bool [nq, nk]: tiles lying wholly inside T x S."""
  rows = np.arange(1, _cdiv(q_len, block_q) + 1) * block_q <= q_len
  cols = np.arange(1, _cdiv(kv_len, block_kv) + 1) * block_kv <= kv_len
  return rows[:, None] & cols[None, :]


def _device_rule_counts(rule: ElementRule, q_len: int, kv_len: int) -> jax.Array:
  """Allowed keys per query row, int32 [B|1, T], in O((T + S) log S).

  Keys are sorted by (segment id, shifted position) with prefix keys at positions [0, S)
  and the others at [S, 2S); a vectorised lexicographic binary search then counts keys of
  a segment in a position range.
  """
  rows = jnp.arange(q_len, dtype=jnp.int32)
  lo, hi = rule.band.lo, rule.band.hi
  x = jnp.zeros_like(rows) if lo is None else jnp.clip(rows + lo, 0, kv_len)
  y = jnp.full_like(rows, kv_len) if hi is None else jnp.clip(rows + hi + 1, 0, kv_len)
  y = jnp.maximum(x, y)
  if not rule.has_segments:
    return (y - x)[None]
  qs, ks, pre = rule.q_segment_ids, rule.kv_segment_ids, rule.kv_in_prefix
  pos = jnp.arange(kv_len, dtype=jnp.int32)
  shifted = jnp.broadcast_to(pos + kv_len, ks.shape)
  if pre is not None:
    shifted = jnp.where(pre, pos, pos + kv_len)
  order = jnp.lexsort((shifted, ks), axis=-1)
  seg_sorted = jnp.take_along_axis(ks, order, axis=-1)
  pos_sorted = jnp.take_along_axis(shifted, order, axis=-1)

  def count_below(seg, p):
    """Keys (s, q) < (seg, p) lexicographically, per query: [B, T]."""
    def body(_, carry):
      first, last = carry
      mid = (first + last) // 2
      probe = jnp.minimum(mid, kv_len - 1)
      ms = jnp.take_along_axis(seg_sorted, probe, axis=-1)
      mp = jnp.take_along_axis(pos_sorted, probe, axis=-1)
      below = (ms < seg) | ((ms == seg) & (mp < p))
      active = first < last
      return (jnp.where(active & below, mid + 1, first),
              jnp.where(active & ~below, mid, last))
    start = (jnp.zeros_like(seg), jnp.full_like(seg, kv_len))
    return lax.fori_loop(0, kv_len.bit_length() + 1, body, start)[0]

  counts = count_below(qs, y[None] + kv_len) - count_below(qs, x[None] + kv_len)
  if pre is not None:
    counts = counts + count_below(qs, jnp.full_like(qs, kv_len)) - count_below(
        qs, jnp.zeros_like(qs))
  return counts


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
  q_len, kv_len = _check_size("q_len", q_len), _check_size("kv_len", kv_len)
  block_q, block_kv = _check_size("block_q", block_q), _check_size("block_kv", block_kv)
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
  kinds = _device_rule_kinds(rule, q_len, kv_len, block_q, block_kv)
  density = jnp.mean(_device_rule_counts(rule, q_len, kv_len), dtype=jnp.float32) / kv_len
  return _assemble(kinds, None, rule, None, density, q_len, kv_len, block_q, block_kv,
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
  block_q, block_kv = _check_size("block_q", block_q), _check_size("block_kv", block_kv)
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
  return _assemble(kinds, grid, None, tiles.reshape(-1, block_q, block_kv),
                   jnp.mean(m, dtype=jnp.float32), q_len, kv_len, block_q, block_kv,
                   host=False)


# ----------------------------------------------------------------------------- expansion


def _tile_grid(bm: BlockMask, xp) -> Any:
  """Tile index of every grid tile [Bm, Nm, nq, nk] from the forward lists (0 if none)."""
  count, block, tile = (xp.asarray(getattr(bm, f"fwd_{n}")) for n in ("count", "block",
                                                                        "tile"))
  shape = block.shape[:3] + (bm.num_kv_blocks,)
  valid = xp.arange(block.shape[-1]) < count[..., None]
  if xp is np:
    grid = np.zeros(shape, np.int32)
    b, n, q, s = np.nonzero(valid)
    grid[b, n, q, block[b, n, q, s]] = tile[b, n, q, s]
    return grid
  b, n, q = (lax.broadcasted_iota(jnp.int32, block.shape, d) for d in range(3))
  col = jnp.where(valid, block, shape[-1])  # out of range: dropped
  return jnp.zeros(shape, jnp.int32).at[b, n, q, col].set(tile.astype(jnp.int32),
                                                           mode="drop")


def _rule_dense(rule: ElementRule, q_len: int, kv_len: int) -> jax.Array:
  """Element mask of a rule as bool [B|1, 1, T, S]."""
  dense = rule.evaluate(jnp.arange(q_len), jnp.arange(kv_len), xp=jnp)
  return dense.reshape((-1, 1, q_len, kv_len))


@jax.jit
def expand_block_mask(bm: BlockMask) -> jax.Array:
  """The exact element mask a kernel applies for `bm` (kinds, rule, tiles and bounds).

  For an RCM-reordered BlockMask this is the mask of the permuted sequence.

  Args:
    bm: a BlockMask (host or device built; traceable).

  Returns:
    bool [Bm, Nm, T, S].
  """
  bmm, nm, q_len, kv_len = bm.shape
  nq, nk = bm.num_q_blocks, bm.num_kv_blocks
  kinds = jnp.asarray(bm.kinds)
  kinds = jnp.repeat(jnp.repeat(kinds, bm.block_q, axis=2), bm.block_kv, axis=3)
  kinds = kinds[:, :, :q_len, :kv_len]
  allowed = jnp.ones((1, 1, q_len, kv_len), bool)
  if bm.rule is not None:
    allowed = allowed & _rule_dense(bm.rule, q_len, kv_len)
  if bm.tiles is not None:
    tiles = jnp.asarray(bm.tiles)[_tile_grid(bm, jnp)]  # [Bm, Nm, nq, nk, bq, bk]
    tiles = tiles.transpose(0, 1, 2, 4, 3, 5).reshape(
        bmm, nm, nq * bm.block_q, nk * bm.block_kv)
    allowed = allowed & tiles[:, :, :q_len, :kv_len]
  out = (kinds == FULL) | ((kinds == PARTIAL) & allowed)
  return jnp.broadcast_to(out, bm.shape)


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
  rule = _int32_rule(to_numpy_rule(bm.rule))
  rule_mask = masks_lib.RuleMask(q_len, kv_len, rule, batched=True)
  old_tiles = bm.tiles
  old_grid = None if old_tiles is None else _tile_grid(bm, np)

  def tile_fn(b, n, qb, kb):
    rb = b if rule_mask.lead[0] > 1 else np.zeros_like(b)
    tiles = rule_mask.block_tiles(bm.block_q, bm.block_kv, rb, np.zeros_like(n), qb, kb)
    if old_tiles is not None:
      tiles = tiles & old_tiles[old_grid[b, n, qb, kb]]
    return tiles

  coords = np.nonzero(bm.kinds == PARTIAL)
  tiles, ids, _ = _dedup_tiles(tile_fn, coords, bm.block_q, bm.block_kv)
  grid = np.zeros(bm.kinds.shape, np.int32)
  grid[coords] = ids
  return _assemble(bm.kinds, grid, None, tiles, bm.density, q_len, kv_len, bm.block_q,
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
    kinds_b = _device_rule_kinds(rule, q_len, kv_len, block_q, block_kv)
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
    grid = xp.where(kinds_a == FULL, tiles.shape[0], _tile_grid(bm, xp))
    grid = xp.broadcast_to(grid, shape).astype(np.int32)
    tiles = xp.concatenate([tiles, xp.ones((1, block_q, block_kv), bool)])
  density = None
  if rule_only:
    if host:
      density = masks_lib.rule_row_counts(merged, q_len, kv_len).mean() / kv_len
    else:
      merged = _device_rule(merged, q_len, kv_len)
      density = jnp.mean(_device_rule_counts(merged, q_len, kv_len),
                         dtype=jnp.float32) / kv_len
  if host:
    merged = _int32_rule(merged)
  return _assemble(kinds, grid, merged, tiles, density, q_len, kv_len, block_q, block_kv,
                   host)


def _dense_fallback(bm: BlockMask, rule: ElementRule) -> BlockMask:
  """AND through the dense element mask (traced BlockMask whose rule cannot merge)."""
  q_len, kv_len = bm.shape[2:]
  dense = expand_block_mask(bm) & _rule_dense(rule, q_len, kv_len)
  return block_mask_from_dense(dense, bm.block_q, bm.block_kv)


@functools.lru_cache(maxsize=64)
def _plain_block_mask(q_len: int, kv_len: int, block_q: int, block_kv: int,
                      is_causal: bool) -> BlockMask:
  """Host BlockMask of the full or causal mask (cached by shape)."""
  mask = masks_lib.causal(q_len, kv_len) if is_causal else masks_lib.full(q_len, kv_len)
  return _build_host(mask, block_q, block_kv)


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
  q_len, kv_len = _check_size("q_len", q_len), _check_size("kv_len", kv_len)
  block_q, block_kv = _check_size("block_q", block_q), _check_size("block_kv", block_kv)
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
      return _cached(mask, (block_q, block_kv, "is_causal"), lambda: _build_host(
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
  return _build_host(functools.reduce(lambda a, b: a & b, parts), block_q, block_kv)


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
    base = _build_host(masks_lib.from_dense(np.asarray(mask)), block_q, block_kv)
  if rule is None:
    return base
  return _combine(base, _device_rule(rule, q_len, kv_len), host=False)
