"""Host-side attention masks (numpy).

A `Mask` says which keys each query may attend: query i may attend key j when
`mask.to_dense()[..., i, j]` is True. Shapes are (T, S) or (B|1, N|1, T, S) (per batch row
and/or per head; broadcast axes are 1).

Masks built from positions and segment ids (full, causal, sliding_window, document,
prefix_lm, and `&` of those with at most one segment source) are *computable*: `.rule()`
returns an `ElementRule` and neither this module nor the BlockMask builders ever
materialise T x S for them. The others (tree, dilated, global_tokens, random_banded,
from_dense, most unions) return None from `.rule()`; they classify their tiles from sparse
coordinates or closed-form geometry where they can, and produce bool tiles on demand.

Every mask knows its exact tile classification (`block_kinds`): a tile is EMPTY with no
allowed element, FULL when all block_q x block_kv elements are allowed (so a tile that
overhangs T or S is never FULL), PARTIAL otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flashjax.masks.rule import Band, ElementRule, element_mask

# Tile kinds (the values of Mask.block_kinds and BlockMask.kinds).
EMPTY, PARTIAL, FULL = 0, 1, 2

# Upper bound on elements materialised at once by the chunked helpers.
_CHUNK_ELEMENTS = 1 << 22
_INT32 = np.iinfo(np.int32)
# Sentinels beyond any position or int32 segment id (differences of them cannot overflow).
_BIG, _SMALL = 1 << 40, -(1 << 40)


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


_TRACED = ("; it is traced under jax.jit, and masks are built on the host from concrete "
           "values: build the mask outside jit, or pass the value as a static argument")


def _is_traced(value: Any) -> bool:
  """True for a jax value with no concrete host value (an argument traced under jit)."""
  if not isinstance(value, jax.Array):
    return False
  try:
    np.asarray(value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return True
  return False


def _host_array(name: str, value: Any) -> np.ndarray:
  """np.asarray(value), refusing a traced jax value with an error that names `name`."""
  if _is_traced(value):
    raise ValueError(f"{name} (shape {value.shape}, dtype {value.dtype}) has no concrete value"
                     + _TRACED)
  return np.asarray(value)


def _check_int(name: str, value: Any, minimum: int | None = None) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name}={value!r} must be an int" + (_TRACED if _is_traced(value) else ""))
  if minimum is not None and value < minimum:
    raise ValueError(f"{name}={value!r} must be >= {minimum}")
  return int(value)


def _positions(start: np.ndarray, size: int, length: int):
  """Positions start..start+size-1 per request: (pos, clipped pos, in-range) [n, size]."""
  pos = np.asarray(start, np.int64)[:, None] + np.arange(size, dtype=np.int64)
  valid = (pos >= 0) & (pos < length)
  return pos, np.clip(pos, 0, length - 1), valid


def _block_reduce(x: Any, block: int, fill: Any, fn, xp: Any = np) -> Any:
  """fn over consecutive blocks of the last axis of x [..., L] (padded with fill)."""
  pad = _cdiv(x.shape[-1], block) * block - x.shape[-1]
  x = xp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=fill)
  return fn(x.reshape(*x.shape[:-1], -1, block), axis=-1)


def _kinds_from_counts(counts: np.ndarray, block_q: int, block_kv: int) -> np.ndarray:
  """Exact kinds from allowed-element counts per tile (overhanging tiles never reach FULL)."""
  full = counts == block_q * block_kv
  return np.where(counts == 0, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)


def _tile_grid_geometry(q_len: int, kv_len: int, block_q: int, block_kv: int):
  """Per tile: min and max of j - i over its in-bounds elements, and whether it is inside."""
  r0 = np.arange(_cdiv(q_len, block_q), dtype=np.int64) * block_q
  c0 = np.arange(_cdiv(kv_len, block_kv), dtype=np.int64) * block_kv
  r1 = np.minimum(r0 + block_q, q_len) - 1
  c1 = np.minimum(c0 + block_kv, kv_len) - 1
  dmin = c0[None, :] - r1[:, None]
  dmax = c1[None, :] - r0[:, None]
  inside = (r0 + block_q <= q_len)[:, None] & (c0 + block_kv <= kv_len)[None, :]
  return dmin, dmax, inside


def band_block_kinds(band: Band, q_len: int, kv_len: int, block_q: int,
                     block_kv: int) -> np.ndarray:
  """Exact kinds of the band `lo <= j - i <= hi` (plus bounds) on every tile.

  The in-bounds part of a tile is a rectangle, so j - i takes every value between its
  extremes; the tile is empty when that range misses the band and full when it lies inside
  the band and the tile lies inside T x S.

  Args:
    band: the static band.
    q_len: T.
    kv_len: S.
    block_q: query tile size.
    block_kv: key tile size.

  Returns:
    int8 [nq, nk].
  """
  dmin, dmax, inside = _tile_grid_geometry(q_len, kv_len, block_q, block_kv)
  nonempty = np.ones(dmin.shape, bool)
  full = inside
  if band.lo is not None:
    nonempty = nonempty & (dmax >= band.lo)
    full = full & (dmin >= band.lo)
  if band.hi is not None:
    nonempty = nonempty & (dmin <= band.hi)
    full = full & (dmax <= band.hi)
  return np.where(nonempty, np.where(full, FULL, PARTIAL), EMPTY).astype(np.int8)


def _band_limits(band: Band, rows: np.ndarray, kv_len: int):
  """Allowed key range [x, y) of the band for query rows (clipped to [0, S])."""
  x = np.zeros_like(rows) if band.lo is None else np.clip(rows + band.lo, 0, kv_len)
  y = np.full_like(rows, kv_len) if band.hi is None else np.clip(rows + band.hi + 1, 0,
                                                                  kv_len)
  return x, np.maximum(x, y)


def _numpy_segments(rule: ElementRule):
  """Segment arrays of a rule broadcast to one batch size: int64 q, kv and bool prefix."""
  qs = np.asarray(rule.q_segment_ids, np.int64)
  ks = np.asarray(rule.kv_segment_ids, np.int64)
  pre = None if rule.kv_in_prefix is None else np.asarray(rule.kv_in_prefix, bool)
  batch = max(qs.shape[0], ks.shape[0], 1 if pre is None else pre.shape[0])
  qs = np.broadcast_to(qs, (batch, qs.shape[1]))
  ks = np.broadcast_to(ks, (batch, ks.shape[1]))
  if pre is not None:
    pre = np.broadcast_to(pre, (batch, pre.shape[1]))
  return qs, ks, pre


class _SegmentIndex:
  """Counts keys of one batch row by segment id and position range.

  Keys are sorted by (segment id, position) into one int64 key; prefix-LM keys sit at
  positions [0, S) of their segment's key range and the others at [S, 2S), so both kinds of
  range counts are two binary searches.
  """

  def __init__(self, kv_seg: np.ndarray, kv_in_prefix: np.ndarray | None):
    self.kv_len = kv_len = kv_seg.shape[0]
    self.stride = 2 * kv_len + 1
    pos = np.arange(kv_len, dtype=np.int64)
    shifted = pos + kv_len if kv_in_prefix is None else np.where(kv_in_prefix, pos,
                                                                 pos + kv_len)
    self.keys = np.sort(kv_seg * self.stride + shifted)

  def _range(self, seg, start, stop):
    base = seg * self.stride
    return (np.searchsorted(self.keys, base + stop) -
            np.searchsorted(self.keys, base + start))

  def regular(self, seg, start, stop):
    """Non-prefix keys of segment seg at positions [start, stop)."""
    return self._range(seg, start + self.kv_len, stop + self.kv_len)

  def prefix(self, seg, start, stop):
    """Prefix keys of segment seg at positions [start, stop)."""
    return self._range(seg, start, stop)


# ----------------------------------------------------------------------------- rule tiles
# The tile classification of a rule exists twice: numpy on the host (`rule_row_counts`,
# `rule_block_kinds`: exact, used by Mask and the host BlockMask builder) and jax.numpy on the
# device (`device_rule_row_counts`, `device_rule_block_kinds`: traceable, used by
# flashjax.masks.builders for traced segment ids). They must agree: row counts exactly,
# kinds up to the device's documented conservatism. Change them together;
# tests/masks/test_builders.py (TwinsTest) checks them on random rules.


def rule_row_counts(rule: ElementRule, q_len: int, kv_len: int) -> np.ndarray:
  """Allowed keys per query row of a rule (exact, O((T + S) log S)).

  Args:
    rule: ElementRule with numpy (or numpy-convertible) arrays.
    q_len: T.
    kv_len: S.

  Returns:
    int64 [B|1, T].
  """
  rows = np.arange(q_len, dtype=np.int64)
  x, y = _band_limits(rule.band, rows, kv_len)
  if not rule.has_segments:
    return (y - x)[None]
  qs, ks, pre = _numpy_segments(rule)
  out = np.empty(qs.shape, np.int64)
  for b in range(qs.shape[0]):
    index = _SegmentIndex(ks[b], None if pre is None else pre[b])
    out[b] = index.regular(qs[b], x, y)
    if pre is not None:
      out[b] += index.prefix(qs[b], 0, kv_len)
  return out


def device_rule_row_counts(rule: ElementRule, q_len: int, kv_len: int) -> jax.Array:
  """jax.numpy twin of `rule_row_counts` (exact, jit-traceable): int32 [B|1, T].

  Keys are sorted by (segment id, shifted position) with prefix keys at positions [0, S)
  and the others at [S, 2S); a vectorised lexicographic binary search then counts keys of
  a segment in a position range, O((T + S) log S).

  Args:
    rule: ElementRule with jnp int32 ids and bool prefix flags of one batch size.
    q_len: T.
    kv_len: S.

  Returns:
    int32 [B|1, T].
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


def rule_block_kinds(rule: ElementRule, q_len: int, kv_len: int, block_q: int,
                     block_kv: int) -> np.ndarray:
  """Exact kinds of a computable mask on every tile, without materialising T x S.

  Band geometry decides masks without segments. With segments, per-block min/max of the
  ids rules out most tiles, tiles with one shared id inside the band are full, and the
  remaining candidates are counted exactly with `_SegmentIndex` (one binary search per
  query row and candidate tile).

  Args:
    rule: ElementRule with numpy arrays.
    q_len: T.
    kv_len: S.
    block_q: query tile size.
    block_kv: key tile size.

  Returns:
    int8 [B|1, 1, nq, nk].
  """
  band_kinds = band_block_kinds(rule.band, q_len, kv_len, block_q, block_kv)
  if not rule.has_segments:
    return band_kinds[None, None]
  qs, ks, pre = _numpy_segments(rule)
  big, small = _BIG, _SMALL
  inside = _tile_grid_geometry(q_len, kv_len, block_q, block_kv)[2]
  out = np.empty((qs.shape[0], 1) + band_kinds.shape, np.int8)
  for b in range(qs.shape[0]):
    qmin = _block_reduce(qs[b], block_q, big, np.min)[:, None]
    qmax = _block_reduce(qs[b], block_q, small, np.max)[:, None]
    kmin = _block_reduce(ks[b], block_kv, big, np.min)[None, :]
    kmax = _block_reduce(ks[b], block_kv, small, np.max)[None, :]
    candidate = (qmin <= kmax) & (kmin <= qmax) & (band_kinds != EMPTY)
    single = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
    full = single & (band_kinds == FULL)
    if pre is not None:
      # A prefix key is visible from its whole segment, whatever the band says.
      pmin = _block_reduce(np.where(pre[b], ks[b], big), block_kv, big, np.min)[None, :]
      pmax = _block_reduce(np.where(pre[b], ks[b], small), block_kv, small, np.max)[None, :]
      candidate |= (pmin <= qmax) & (qmin <= pmax)
      all_prefix = _block_reduce(pre[b], block_kv, True, np.all)[None, :]
      full |= single & all_prefix & inside
    kinds = np.where(full, FULL, EMPTY).astype(np.int8)
    qi, ki = np.nonzero(candidate & ~full)
    index = _SegmentIndex(ks[b], None if pre is None else pre[b])
    step = max(1, (1 << 20) // block_q)
    for c in range(0, qi.size, step):
      counts = _candidate_counts(rule.band, index, qs[b], qi[c:c + step], ki[c:c + step],
                                 q_len, kv_len, block_q, block_kv, pre is not None)
      kinds[qi[c:c + step], ki[c:c + step]] = _kinds_from_counts(counts, block_q, block_kv)
    out[b, 0] = kinds
  return out


def _candidate_counts(band: Band, index: _SegmentIndex, q_seg: np.ndarray, qi: np.ndarray,
                      ki: np.ndarray, q_len: int, kv_len: int, block_q: int, block_kv: int,
                      has_prefix: bool) -> np.ndarray:
  """Allowed elements in tiles (qi, ki) of one batch row, by per-row range counts."""
  rows, rows_c, valid = _positions(qi * block_q, block_q, q_len)
  seg = q_seg[rows_c]
  k0 = (ki * block_kv)[:, None]
  k1 = np.minimum(k0 + block_kv, kv_len)
  x, y = _band_limits(band, rows, kv_len)
  start = np.maximum(x, k0)
  counts = index.regular(seg, start, np.maximum(start, np.minimum(y, k1)))
  if has_prefix:
    counts = counts + index.prefix(seg, k0, k1)
  return np.where(valid, counts, 0).sum(axis=1)


def device_rule_block_kinds(rule: ElementRule, q_len: int, kv_len: int, block_q: int,
                       block_kv: int) -> jax.Array:
  """jax.numpy twin of `rule_block_kinds` (jit-traceable): int8 [B|1, 1, nq, nk].

  Conservative: per-block min/max of the ids decide, with no exact count, so a tile may be
  PARTIAL where `rule_block_kinds` says EMPTY or FULL (never EMPTY or FULL where it says
  otherwise); equal for sorted ids under a causal or unbounded band without prefix flags.
  Arguments and result as for `rule_block_kinds`, except that the rule holds jnp int32 ids
  and bool prefix flags of one batch size (flashjax.masks.builders broadcasts them).
  """
  band = band_block_kinds(rule.band, q_len, kv_len, block_q, block_kv)
  if not rule.has_segments:
    return jnp.asarray(band)[None, None]
  inside = jnp.asarray(_tile_grid_geometry(q_len, kv_len, block_q, block_kv)[2])
  band = jnp.asarray(band)
  big, small = np.iinfo(np.int32).max, np.iinfo(np.int32).min
  qs, ks, pre = rule.q_segment_ids, rule.kv_segment_ids, rule.kv_in_prefix
  qmin = _block_reduce(qs, block_q, big, jnp.min, jnp)[:, :, None]
  qmax = _block_reduce(qs, block_q, small, jnp.max, jnp)[:, :, None]
  kmin = _block_reduce(ks, block_kv, big, jnp.min, jnp)[:, None, :]
  kmax = _block_reduce(ks, block_kv, small, jnp.max, jnp)[:, None, :]
  single = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
  nonempty = (qmin <= kmax) & (kmin <= qmax) & (band != EMPTY)
  full = single & (band == FULL)
  if pre is not None:
    # Prefix keys are visible from their whole segment, outside the band too.
    pmin = _block_reduce(jnp.where(pre, ks, big), block_kv, big, jnp.min, jnp)[:, None, :]
    pmax = _block_reduce(jnp.where(pre, ks, small), block_kv, small, jnp.max, jnp)[:, None, :]
    nonempty = nonempty | ((pmin <= qmax) & (qmin <= pmax))
    all_prefix = _block_reduce(pre, block_kv, True, jnp.all, jnp)[:, None, :]
    full = full | (single & all_prefix & inside)
  kinds = jnp.where(full, FULL, jnp.where(nonempty, PARTIAL, EMPTY)).astype(jnp.int8)
  return kinds[:, None]


# ----------------------------------------------------------------------------- rule algebra


def _band_and(a: Band, b: Band) -> Band | None:
  lo = max((v for v in (a.lo, b.lo) if v is not None), default=None)
  hi = min((v for v in (a.hi, b.hi) if v is not None), default=None)
  if lo is not None and hi is not None and lo > hi:
    return None
  return Band(lo, hi)


def _band_or(a: Band, b: Band) -> Band | None:
  """Union of two bands when it is again one band (overlapping or adjacent), else None."""
  lo = lambda v: -math.inf if v is None else v
  hi = lambda v: math.inf if v is None else v
  if max(lo(a.lo), lo(b.lo)) > min(hi(a.hi), hi(b.hi)) + 1:
    return None
  new_lo = None if a.lo is None or b.lo is None else min(a.lo, b.lo)
  new_hi = None if a.hi is None or b.hi is None else max(a.hi, b.hi)
  return Band(new_lo, new_hi)


def _same_segments(a: ElementRule, b: ElementRule) -> bool:
  """Whether two rules carry equal concrete numpy segment ids."""
  arrays = (a.q_segment_ids, b.q_segment_ids, a.kv_segment_ids, b.kv_segment_ids)
  if not all(isinstance(x, np.ndarray) for x in arrays):
    return False
  return bool(np.array_equal(arrays[0], arrays[1]) and np.array_equal(arrays[2], arrays[3]))


def and_rules(a: ElementRule, b: ElementRule) -> ElementRule | None:
  """One rule equal to `a AND b`, or None when ElementRule cannot express it.

  Expressible: at most one side has segment ids (or both have the same ones), the bands
  intersect, and a prefix-LM side meets only an unbounded band (a prefix key is visible
  outside the band, so intersecting bands would drop it).

  Args:
    a: ElementRule.
    b: ElementRule.

  Returns:
    ElementRule or None.
  """
  if a.has_segments and b.has_segments and not _same_segments(a, b):
    return None
  if b.has_segments and not a.has_segments:
    a, b = b, a
  for x, y in ((a, b), (b, a)):
    if x.kv_in_prefix is not None:
      if not y.band.unbounded:
        return None
      if y.kv_in_prefix is None:
        return x
  if a.kv_in_prefix is not None:
    return None
  band = _band_and(a.band, b.band)
  if band is None:
    return None
  return ElementRule(band, a.q_segment_ids, a.kv_segment_ids)


def _or_rules(a: ElementRule, b: ElementRule) -> ElementRule | None:
  """One rule equal to `a OR b` (same segments, no prefix, bands forming one band)."""
  if a.kv_in_prefix is not None or b.kv_in_prefix is not None:
    return None
  if a.has_segments != b.has_segments:
    return None
  if a.has_segments and not _same_segments(a, b):
    return None
  band = _band_or(a.band, b.band)
  if band is None:
    return None
  return ElementRule(band, a.q_segment_ids, a.kv_segment_ids)


def _broadcast_lead(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
  """Result shape of an elementwise op on two mask shapes."""
  if a[-2:] != b[-2:]:
    raise ValueError(f"mask shapes {a=} and {b=} differ in (T, S)")
  if len(a) == len(b) == 2:
    return a
  la = a[:2] if len(a) == 4 else (1, 1)
  lb = b[:2] if len(b) == 4 else (1, 1)
  lead = []
  for x, y in zip(la, lb):
    if x != y and 1 not in (x, y):
      raise ValueError(f"mask shapes {a=} and {b=} do not broadcast")
    lead.append(max(x, y))
  return tuple(lead) + a[-2:]


class Mask:
  """Base class of host-side masks; see the module docstring.

  Subclasses implement `_tiles` (bool tiles at given corners) and, when `rule()` is None,
  `_compute_kinds` (exact tile kinds) and optionally `_count` (allowed elements).
  """

  def __init__(self, shape: tuple[int, ...]):
    self._shape = tuple(int(d) for d in shape)
    self._memo: dict[Any, Any] = {}

  @property
  def shape(self) -> tuple[int, ...]:
    """(T, S) or (B|1, N|1, T, S)."""
    return self._shape

  @property
  def q_len(self) -> int:
    return self._shape[-2]

  @property
  def kv_len(self) -> int:
    return self._shape[-1]

  @property
  def lead(self) -> tuple[int, int]:
    """(Bm, Nm): the leading dims, (1, 1) for a 2-D mask."""
    return self._shape[:2] if len(self._shape) == 4 else (1, 1)

  def rule(self) -> ElementRule | None:
    """ElementRule (numpy arrays) when the mask is computable from positions, else None."""
    return None

  def to_dense(self) -> np.ndarray:
    """numpy bool array of `.shape`."""
    return self.dense_tile(0, self.q_len, 0, self.kv_len)

  def dense_tile(self, q0: int, q1: int, k0: int, k1: int) -> np.ndarray:
    """Queries q0..q1-1 against keys k0..k1-1; positions past T or S are False.

    Args:
      q0: first query row (>= 0).
      q1: end query row (>= q0, may exceed T).
      k0: first key column (>= 0).
      k1: end key column (>= k0, may exceed S).

    Returns:
      numpy bool [q1 - q0, k1 - k0] for a 2-D mask, else [Bm, Nm, q1 - q0, k1 - k0].
    """
    q0 = _check_int("q0", q0, 0)
    k0 = _check_int("k0", k0, 0)
    q1 = _check_int("q1", q1, q0)
    k1 = _check_int("k1", k1, k0)
    bm, nm = self.lead
    b, n = (x.ravel() for x in np.meshgrid(np.arange(bm), np.arange(nm), indexing="ij"))
    out = self._tiles(b, n, np.full(b.size, q0), np.full(b.size, k0), q1 - q0, k1 - k0)
    out = out.reshape(bm, nm, q1 - q0, k1 - k0)
    return out[0, 0] if len(self._shape) == 2 else out

  @property
  def density(self) -> float:
    """Fraction of allowed elements of T x S, averaged over the leading dims."""
    if "density" not in self._memo:
      bm, nm = self.lead
      self._memo["density"] = float(self._count() / (bm * nm * self.q_len * self.kv_len))
    return self._memo["density"]

  def block_kinds(self, block_q: int, block_kv: int) -> np.ndarray:
    """Exact tile kinds (0 empty, 1 partial, 2 full), cached per block size.

    Args:
      block_q: query tile size.
      block_kv: key tile size.

    Returns:
      int8 [Bm, Nm, cdiv(T, block_q), cdiv(S, block_kv)] (read-only).
    """
    block_q = _check_int("block_q", block_q, 1)
    block_kv = _check_int("block_kv", block_kv, 1)
    key = ("kinds", block_q, block_kv)
    if key not in self._memo:
      rule = self.rule()
      if rule is None:
        kinds = self._compute_kinds(block_q, block_kv)
      else:
        kinds = rule_block_kinds(rule, self.q_len, self.kv_len, block_q, block_kv)
      kinds = np.broadcast_to(kinds, self.lead + kinds.shape[2:])
      self._memo[key] = kinds
    return self._memo[key]

  def block_tiles(self, block_q: int, block_kv: int, b: np.ndarray, n: np.ndarray,
                  qb: np.ndarray, kb: np.ndarray) -> np.ndarray:
    """Bool tiles of grid tiles, zero past T and S (what BlockMask.tiles stores).

    Args:
      block_q: query tile size.
      block_kv: key tile size.
      b: int [M] batch indices (0 on a broadcast axis).
      n: int [M] head indices (0 on a broadcast axis).
      qb: int [M] query block ids.
      kb: int [M] key block ids.

    Returns:
      bool [M, block_q, block_kv].
    """
    return self._block_tiles(block_q, block_kv, *(np.asarray(x, np.int64)
                                                  for x in (b, n, qb, kb)))

  def nonzero(self) -> tuple[np.ndarray, ...]:
    """Indices of the allowed elements, as np.nonzero(self.to_dense()) gives them.

    The order is np.nonzero's for 2-D masks; 4-D masks are scanned in chunks of rows.

    Returns:
      (rows, cols) for a 2-D mask, else (b, n, rows, cols); int arrays.
    """
    return self._nonzero()

  def __and__(self, other: Mask) -> Mask:
    if not isinstance(other, Mask):
      return NotImplemented
    return AndMask(self, other)

  def __or__(self, other: Mask) -> Mask:
    if not isinstance(other, Mask):
      return NotImplemented
    return OrMask(self, other)

  def __repr__(self) -> str:
    return f"{type(self).__name__}(shape={self._shape})"

  def _tiles(self, b: np.ndarray, n: np.ndarray, q0: np.ndarray, k0: np.ndarray, tq: int,
             tk: int) -> np.ndarray:
    """Bool tiles [len(b), tq, tk] with corners (q0, k0) for leading indices (b, n).

    b and n index this mask's own leading dims (0 on a broadcast axis).
    """
    raise NotImplementedError

  def _block_tiles(self, block_q: int, block_kv: int, b: np.ndarray, n: np.ndarray,
                   qb: np.ndarray, kb: np.ndarray) -> np.ndarray:
    """Bool tiles [len(b), block_q, block_kv] of grid tiles (qb, kb)."""
    return self._tiles(b, n, qb * block_q, kb * block_kv, block_q, block_kv)

  def _compute_kinds(self, block_q: int, block_kv: int) -> np.ndarray:
    """Exact kinds [Bm|1, Nm|1, nq, nk] of a mask without a rule."""
    raise NotImplementedError

  def _count(self) -> int:
    """Allowed elements over all leading indices (generic: rows in chunks)."""
    rule = self.rule()
    if rule is not None:
      counts = rule_row_counts(rule, self.q_len, self.kv_len)
      return int(counts.sum()) * (int(np.prod(self.lead)) // counts.shape[0])
    bm, nm = self.lead
    rows = max(1, _CHUNK_ELEMENTS // (self.kv_len * bm * nm))
    return sum(int(np.count_nonzero(self.dense_tile(q0, min(self.q_len, q0 + rows), 0,
                                                    self.kv_len)))
               for q0 in range(0, self.q_len, rows))

  def _nonzero(self) -> tuple[np.ndarray, ...]:
    """np.nonzero of the dense mask, computed over chunks of rows."""
    bm, nm = self.lead
    rows = max(1, _CHUNK_ELEMENTS // (self.kv_len * bm * nm))
    parts = []
    for q0 in range(0, self.q_len, rows):
      idx = list(np.nonzero(self.dense_tile(q0, min(self.q_len, q0 + rows), 0, self.kv_len)))
      idx[-2] = idx[-2] + q0
      parts.append(idx)
    return tuple(np.concatenate(p) for p in zip(*parts))


def _sub_index(mask: Mask, b: np.ndarray, n: np.ndarray):
  """Maps leading indices of a broadcast result onto `mask`'s own leading dims."""
  bm, nm = mask.lead
  return (b if bm > 1 else np.zeros_like(b)), (n if nm > 1 else np.zeros_like(n))


class RuleMask(Mask):
  """A computable mask: an ElementRule over T x S (full, causal, windows, documents)."""

  def __init__(self, q_len: int, kv_len: int, rule: ElementRule, batched: bool = False):
    batch = rule.q_segment_ids.shape[0] if rule.has_segments else 1
    super().__init__((batch, 1, q_len, kv_len) if batched else (q_len, kv_len))
    self._rule = rule

  def rule(self) -> ElementRule:
    return self._rule

  def _tiles(self, b, n, q0, k0, tq, tk):
    qp, qc, qv = _positions(q0, tq, self.q_len)
    kp, kc, kv = _positions(k0, tk, self.kv_len)
    rule = self._rule
    if rule.has_segments:
      rb = b[:, None] if rule.q_segment_ids.shape[0] > 1 else 0
      pre = None
      if rule.kv_in_prefix is not None:
        pre = rule.kv_in_prefix[rb, kc][:, None, :]
      ok = element_mask(qp[:, :, None], kp[:, None, :], rule.band,
                        rule.q_segment_ids[rb, qc][:, :, None],
                        rule.kv_segment_ids[rb, kc][:, None, :], pre, xp=np)
    else:
      ok = element_mask(qp[:, :, None], kp[:, None, :], rule.band, xp=np)
    return ok & qv[:, :, None] & kv[:, None, :]


class DenseMask(Mask):
  """A mask given as a bool array (T, S) or (B|1, N|1, T, S)."""

  def __init__(self, array: np.ndarray):
    super().__init__(array.shape)
    self._array = array.reshape(self.lead + array.shape[-2:])

  def to_dense(self) -> np.ndarray:
    return self._array.reshape(self._shape).copy()

  def _tiles(self, b, n, q0, k0, tq, tk):
    _, qc, qv = _positions(q0, tq, self.q_len)
    _, kc, kv = _positions(k0, tk, self.kv_len)
    b, n = _sub_index(self, b, n)
    out = self._array[b[:, None, None], n[:, None, None], qc[:, :, None], kc[:, None, :]]
    return out & qv[:, :, None] & kv[:, None, :]

  def _compute_kinds(self, block_q, block_kv):
    nq, nk = _cdiv(self.q_len, block_q), _cdiv(self.kv_len, block_kv)
    arr = np.pad(self._array, ((0, 0), (0, 0), (0, nq * block_q - self.q_len),
                               (0, nk * block_kv - self.kv_len)))
    counts = arr.reshape(*self.lead, nq, block_q, nk, block_kv).sum(axis=(3, 5))
    return _kinds_from_counts(counts, block_q, block_kv)

  def _count(self):
    return int(np.count_nonzero(self._array))


class TreeMask(Mask):
  """MEDUSA tree attention: node i attends itself and its parent (parents[i], -1 = root)."""

  def __init__(self, parents: np.ndarray, batched: bool):
    t = parents.shape[-1]
    super().__init__((parents.shape[0], 1, t, t) if batched else (t, t))
    self._parents = parents  # int64 [B|1, T]

  def _coords(self):
    """Unique allowed (b, i, j) as flat keys b * T * T + i * T + j, sorted."""
    t = self.q_len
    batch = self._parents.shape[0]
    i = np.broadcast_to(np.arange(t, dtype=np.int64), (batch, t))
    b = np.broadcast_to(np.arange(batch, dtype=np.int64)[:, None], (batch, t))
    has_parent = self._parents >= 0
    keys = np.concatenate([
        ((b * t + i) * t + i).ravel(),
        ((b * t + i) * t + self._parents)[has_parent]])
    return np.unique(keys)

  def _tiles(self, b, n, q0, k0, tq, tk):
    qp, qc, qv = _positions(q0, tq, self.q_len)
    kp, _, kv = _positions(k0, tk, self.kv_len)
    b, _ = _sub_index(self, b, n)
    parent = self._parents[b[:, None], qc]
    ok = (kp[:, None, :] == qp[:, :, None]) | (kp[:, None, :] == parent[:, :, None])
    return ok & qv[:, :, None] & kv[:, None, :]

  def _compute_kinds(self, block_q, block_kv):
    t = self.q_len
    nq, nk = _cdiv(t, block_q), _cdiv(t, block_kv)
    keys = self._coords()
    b, rem = np.divmod(keys, t * t)
    i, j = np.divmod(rem, t)
    tile = (b * nq + i // block_q) * nk + j // block_kv
    batch = self._parents.shape[0]
    counts = np.bincount(tile, minlength=batch * nq * nk).reshape(batch, 1, nq, nk)
    return _kinds_from_counts(counts, block_q, block_kv)

  def _count(self):
    return int(self._coords().size)


class DilatedMask(Mask):
  """LongFormer dilated window: |i - j| <= window * dilation and (i - j) % dilation == 0."""

  def __init__(self, q_len: int, kv_len: int, window: int, dilation: int):
    super().__init__((q_len, kv_len))
    self.window, self.dilation = window, dilation

  def rule(self):
    if self.dilation == 1:
      return ElementRule(Band(-self.window, self.window))
    return None

  def _tiles(self, b, n, q0, k0, tq, tk):
    qp, _, qv = _positions(q0, tq, self.q_len)
    kp, _, kv = _positions(k0, tk, self.kv_len)
    diff = kp[:, None, :] - qp[:, :, None]
    ok = (np.abs(diff) <= self.window * self.dilation) & (diff % self.dilation == 0)
    return ok & qv[:, :, None] & kv[:, None, :]

  def _compute_kinds(self, block_q, block_kv):
    d, reach = self.dilation, self.window * self.dilation
    dmin, dmax, inside = _tile_grid_geometry(self.q_len, self.kv_len, block_q, block_kv)
    lo, hi = np.maximum(dmin, -reach), np.minimum(dmax, reach)
    # Some multiple of d in [lo, hi]; the diagonals j - i of a tile are all its values.
    nonempty = (lo <= hi) & ((hi // d) * d >= lo)
    full = inside & (dmin >= -reach) & (dmax <= reach) & (dmin == dmax) & (dmin % d == 0)
    kinds = np.where(nonempty, np.where(full, FULL, PARTIAL), EMPTY).astype(np.int8)
    return kinds[None, None]

  def _count(self):
    i = np.arange(self.q_len, dtype=np.int64)
    d, w = self.dilation, self.window
    # j = i + m * d with |m| <= w and 0 <= j < S.
    m_lo = np.maximum(-w, -(i // d))
    m_hi = np.minimum(w, (self.kv_len - 1 - i) // d)
    return int(np.maximum(m_hi - m_lo + 1, 0).sum())


class GlobalTokensMask(Mask):
  """LongFormer: |i - j| <= window, or query i or key j is a global token."""

  def __init__(self, q_len: int, kv_len: int, window: int, global_ids: np.ndarray):
    super().__init__((q_len, kv_len))
    self.window = window
    self.global_ids = global_ids  # sorted unique int64
    self._q_global = np.zeros(q_len, bool)
    self._q_global[global_ids[global_ids < q_len]] = True
    self._kv_global = np.zeros(kv_len, bool)
    self._kv_global[global_ids[global_ids < kv_len]] = True

  def rule(self):
    if self.global_ids.size == 0:
      return ElementRule(Band(-self.window, self.window))
    return None

  def _tiles(self, b, n, q0, k0, tq, tk):
    qp, qc, qv = _positions(q0, tq, self.q_len)
    kp, kc, kv = _positions(k0, tk, self.kv_len)
    ok = np.abs(kp[:, None, :] - qp[:, :, None]) <= self.window
    ok = ok | self._q_global[qc][:, :, None] | self._kv_global[kc][:, None, :]
    return ok & qv[:, :, None] & kv[:, None, :]

  def _compute_kinds(self, block_q, block_kv):
    w = self.window
    band = band_block_kinds(Band(-w, w), self.q_len, self.kv_len, block_q, block_kv)
    inside = _tile_grid_geometry(self.q_len, self.kv_len, block_q, block_kv)[2]
    big, small = _BIG, _SMALL
    q_pos = np.arange(self.q_len, dtype=np.int64)
    kv_pos = np.arange(self.kv_len, dtype=np.int64)
    q_any = _block_reduce(self._q_global, block_q, False, np.any)[:, None]
    kv_any = _block_reduce(self._kv_global, block_kv, False, np.any)[None, :]
    # Extremes of the non-global rows / columns: the band must hold for all their pairs.
    rmin = _block_reduce(np.where(self._q_global, big, q_pos), block_q, big, np.min)[:, None]
    rmax = _block_reduce(np.where(self._q_global, small, q_pos), block_q, small,
                         np.max)[:, None]
    cmin = _block_reduce(np.where(self._kv_global, big, kv_pos), block_kv, big,
                         np.min)[None, :]
    cmax = _block_reduce(np.where(self._kv_global, small, kv_pos), block_kv, small,
                         np.max)[None, :]
    no_rows, no_cols = rmin == big, cmin == big
    in_band = (cmax - rmin <= w) & (cmin - rmax >= -w)
    full = inside & (no_rows | no_cols | in_band)
    nonempty = (band != EMPTY) | q_any | kv_any
    kinds = np.where(full, FULL, np.where(nonempty, PARTIAL, EMPTY)).astype(np.int8)
    return kinds[None, None]

  def _count(self):
    rows = np.arange(self.q_len, dtype=np.int64)
    x, y = _band_limits(Band(-self.window, self.window), rows, self.kv_len)
    kv_global = np.flatnonzero(self._kv_global)
    in_band = np.searchsorted(kv_global, y) - np.searchsorted(kv_global, x)
    counts = (y - x) + kv_global.size - in_band
    return int(np.where(self._q_global, self.kv_len, counts).sum())


class CoordinateMask(Mask):
  """A sparse 2-D mask stored as sorted allowed coordinates (random_banded, RCM)."""

  def __init__(self, q_len: int, kv_len: int, rows: np.ndarray, cols: np.ndarray):
    super().__init__((q_len, kv_len))
    keys = np.unique(np.asarray(rows, np.int64) * kv_len + np.asarray(cols, np.int64))
    self._rows, self._cols = np.divmod(keys, kv_len)
    self._row_ptr = np.searchsorted(self._rows, np.arange(q_len + 1))

  @property
  def nnz(self) -> int:
    return int(self._rows.size)

  def _nonzero(self):
    return self._rows.copy(), self._cols.copy()

  def _tiles(self, b, n, q0, k0, tq, tk):
    out = np.zeros((len(b), tq, tk), bool)
    for t, (r0, c0) in enumerate(zip(q0, k0)):
      lo, hi = self._row_ptr[np.clip([r0, r0 + tq], 0, self.q_len)]
      r, c = self._rows[lo:hi] - r0, self._cols[lo:hi] - c0
      sel = (c >= 0) & (c < tk)
      out[t, r[sel], c[sel]] = True
    return out

  def _block_tiles(self, block_q, block_kv, b, n, qb, kb):
    nk = _cdiv(self.kv_len, block_kv)
    # Requests may repeat a tile (other leading indices): build each distinct tile once.
    wanted, inverse = np.unique(qb.astype(np.int64) * nk + kb, return_inverse=True)
    out = np.zeros((wanted.size, block_q, block_kv), bool)
    if wanted.size:
      tile = (self._rows // block_q) * nk + self._cols // block_kv
      slot = np.minimum(np.searchsorted(wanted, tile), wanted.size - 1)
      hit = wanted[slot] == tile
      out[slot[hit], self._rows[hit] % block_q, self._cols[hit] % block_kv] = True
    return out[inverse.ravel()]

  def _compute_kinds(self, block_q, block_kv):
    nq, nk = _cdiv(self.q_len, block_q), _cdiv(self.kv_len, block_kv)
    tile = (self._rows // block_q) * nk + self._cols // block_kv
    counts = np.bincount(tile, minlength=nq * nk).reshape(1, 1, nq, nk)
    return _kinds_from_counts(counts, block_q, block_kv)

  def _count(self):
    return self.nnz


class _Combined(Mask):
  """Elementwise combination of two masks (leading dims broadcast)."""

  def __init__(self, a: Mask, b: Mask):
    super().__init__(_broadcast_lead(a.shape, b.shape))
    self.a, self.b = a, b

  def __repr__(self):
    return f"{type(self).__name__}({self.a!r}, {self.b!r})"

  def _child_kinds(self, block_q, block_kv):
    shape = self.lead + (_cdiv(self.q_len, block_q), _cdiv(self.kv_len, block_kv))
    return (np.broadcast_to(self.a.block_kinds(block_q, block_kv), shape),
            np.broadcast_to(self.b.block_kinds(block_q, block_kv), shape))

  def _combine_tiles(self, ta: np.ndarray, tb: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def _tiles(self, b, n, q0, k0, tq, tk):
    return self._combine_tiles(self.a._tiles(*_sub_index(self.a, b, n), q0, k0, tq, tk),
                               self.b._tiles(*_sub_index(self.b, b, n), q0, k0, tq, tk))

  def _block_tiles(self, block_q, block_kv, b, n, qb, kb):
    return self._combine_tiles(
        self.a._block_tiles(block_q, block_kv, *_sub_index(self.a, b, n), qb, kb),
        self.b._block_tiles(block_q, block_kv, *_sub_index(self.b, b, n), qb, kb))

  def _resolve(self, kinds: np.ndarray, undecided: np.ndarray, block_q: int, block_kv: int,
               decide) -> np.ndarray:
    """Sets kinds of undecided tiles to decide(their combined bool tiles)."""
    coords = np.nonzero(undecided)
    step = max(1, _CHUNK_ELEMENTS // (block_q * block_kv))
    for c in range(0, coords[0].size, step):
      part = tuple(x[c:c + step] for x in coords)
      tiles = self._block_tiles(block_q, block_kv, *part)
      kinds[part] = decide(tiles)
    return kinds


class AndMask(_Combined):
  """Elementwise AND; computable when both sides are and their rules combine."""

  def rule(self):
    if "rule" not in self._memo:
      ra, rb = self.a.rule(), self.b.rule()
      self._memo["rule"] = None if ra is None or rb is None else and_rules(ra, rb)
    return self._memo["rule"]

  def _combine_tiles(self, ta, tb):
    return ta & tb

  def _compute_kinds(self, block_q, block_kv):
    ka, kb = self._child_kinds(block_q, block_kv)
    kinds = np.where((ka == EMPTY) | (kb == EMPTY), EMPTY,
                     np.where((ka == FULL) & (kb == FULL), FULL, PARTIAL)).astype(np.int8)
    # FULL & PARTIAL is exactly PARTIAL; PARTIAL & PARTIAL may be empty.
    decide = lambda t: np.where(t.any(axis=(1, 2)), PARTIAL, EMPTY)
    return self._resolve(kinds, (ka == PARTIAL) & (kb == PARTIAL), block_q, block_kv, decide)


class OrMask(_Combined):
  """Elementwise OR; computable only for one band (or equal segments) from both sides."""

  def rule(self):
    if "rule" not in self._memo:
      ra, rb = self.a.rule(), self.b.rule()
      self._memo["rule"] = None if ra is None or rb is None else _or_rules(ra, rb)
    return self._memo["rule"]

  def _combine_tiles(self, ta, tb):
    return ta | tb

  def _compute_kinds(self, block_q, block_kv):
    ka, kb = self._child_kinds(block_q, block_kv)
    kinds = np.where((ka == FULL) | (kb == FULL), FULL,
                     np.where((ka == EMPTY) & (kb == EMPTY), EMPTY, PARTIAL)).astype(np.int8)
    # PARTIAL | PARTIAL may fill the tile (tiles overhanging T or S never do).
    decide = lambda t: np.where(t.all(axis=(1, 2)), FULL, PARTIAL)
    return self._resolve(kinds, (ka == PARTIAL) & (kb == PARTIAL), block_q, block_kv, decide)


# ----------------------------------------------------------------------------- constructors


def _as_ids(name: str, value: Any) -> np.ndarray:
  """Integer id array of rank 1 or 2 as int32."""
  arr = _host_array(name, value)
  if arr.ndim not in (1, 2) or arr.shape[-1] == 0 or arr.size == 0:
    raise ValueError(f"{name}.shape={arr.shape} must be [T] or [B, T] with T, B >= 1")
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{name}.dtype={arr.dtype} must be an integer type")
  if arr.min() < _INT32.min or arr.max() > _INT32.max:
    raise ValueError(f"{name} values must fit int32: min={arr.min()}, max={arr.max()}")
  return arr.astype(np.int32)


def _segment_pair(segment_ids: Any) -> tuple[np.ndarray, np.ndarray, bool]:
  """(q_ids [B, T], kv_ids [B, S], batched) from [T], [B, T] or a (q_ids, kv_ids) tuple."""
  if isinstance(segment_ids, tuple):
    if len(segment_ids) != 2:
      raise ValueError(f"segment_ids tuple has {len(segment_ids)=} entries; expected "
                       "(q_ids, kv_ids)")
    q_ids, kv_ids = _as_ids("q_ids", segment_ids[0]), _as_ids("kv_ids", segment_ids[1])
  else:
    q_ids = kv_ids = _as_ids("segment_ids", segment_ids)
  batched = q_ids.ndim == 2 or kv_ids.ndim == 2
  q2, kv2 = q_ids.reshape(-1, q_ids.shape[-1]), kv_ids.reshape(-1, kv_ids.shape[-1])
  if q2.shape[0] != kv2.shape[0] and 1 not in (q2.shape[0], kv2.shape[0]):
    raise ValueError(f"{q_ids.shape=} and {kv_ids.shape=} have different batch sizes")
  batch = max(q2.shape[0], kv2.shape[0])
  q2 = np.ascontiguousarray(np.broadcast_to(q2, (batch, q2.shape[1])))
  kv2 = np.ascontiguousarray(np.broadcast_to(kv2, (batch, kv2.shape[1])))
  return q2, kv2, batched


def full(q_len: int, kv_len: int) -> Mask:
  """Every query attends every key.

  Args:
    q_len: T.
    kv_len: S.
  """
  q_len, kv_len = _check_int("q_len", q_len, 1), _check_int("kv_len", kv_len, 1)
  return RuleMask(q_len, kv_len, ElementRule(Band()))


def causal(q_len: int, kv_len: int, offset: int = 0) -> Mask:
  """Query i attends key j when j <= i + offset.

  Args:
    q_len: T.
    kv_len: S.
    offset: diagonal shift (e.g. S - T aligns the last query with the last key).
  """
  q_len, kv_len = _check_int("q_len", q_len, 1), _check_int("kv_len", kv_len, 1)
  offset = _check_int("offset", offset)
  return RuleMask(q_len, kv_len, ElementRule(Band(None, offset)))


def sliding_window(q_len: int, kv_len: int, left: int, right: int = 0) -> Mask:
  """Query i attends key j when i - left <= j <= i + right.

  Args:
    q_len: T.
    kv_len: S.
    left: keys visible before the query (>= 0).
    right: keys visible after the query (>= 0; 0 is causal).
  """
  q_len, kv_len = _check_int("q_len", q_len, 1), _check_int("kv_len", kv_len, 1)
  left, right = _check_int("left", left, 0), _check_int("right", right, 0)
  return RuleMask(q_len, kv_len, ElementRule(Band(-left, right)))


def document(segment_ids: Any, causal: bool = True) -> Mask:  # pylint: disable=redefined-outer-name
  """Packed sequences: query i attends key j of the same segment (and j <= i if causal).

  Args:
    segment_ids: int [T] (shape (T, T)), int [B, T] (one row per batch element, shape
      (B, 1, T, T)), or a tuple (q_ids, kv_ids) of int [T]|[B, T] and [S]|[B, S].
    causal: also require j <= i.
  """
  q_ids, kv_ids, batched = _segment_pair(segment_ids)
  band = Band(None, 0) if causal else Band()
  return RuleMask(q_ids.shape[1], kv_ids.shape[1], ElementRule(band, q_ids, kv_ids),
                  batched)


def _prefix_table(prefix_lengths: Any, batch: int, max_id: int) -> np.ndarray:
  """Prefix length per (batch row, segment id) as int64 [B|1, max_id + 1]."""
  if isinstance(prefix_lengths, dict):
    table = np.zeros((1, max_id + 1), np.int64)
    for seg, length in prefix_lengths.items():
      seg = _check_int("prefix_lengths key", seg, 0)
      length = _check_int(f"prefix_lengths[{seg}]", length, 0)
      if seg <= max_id:
        table[0, seg] = length
    return table
  arr = _host_array("prefix_lengths", prefix_lengths)
  if not np.issubdtype(arr.dtype, np.integer) or arr.ndim not in (1, 2):
    raise ValueError(f"prefix_lengths (dtype {arr.dtype}, shape {arr.shape}) must be an int, "
                     "a dict, or an int array [num_ids] or [B, num_ids]")
  if arr.size and arr.min() < 0:
    raise ValueError(f"prefix_lengths must be >= 0, got min {arr.min()}")
  table = arr.reshape(-1, arr.shape[-1]).astype(np.int64)
  if arr.ndim == 2 and table.shape[0] not in (1, batch):
    raise ValueError(f"prefix_lengths.shape={arr.shape} must have {batch} rows (one per "
                     "batch row of segment_ids)")
  if table.shape[1] <= max_id:
    raise ValueError(f"prefix_lengths.shape={arr.shape} must cover segment ids up to "
                     f"{max_id}")
  return table


def _rank_in_segment(ids: np.ndarray) -> np.ndarray:
  """Per row, how many earlier tokens share each token's id ([B, S] -> [B, S])."""
  rank = np.empty(ids.shape, np.int64)
  for b, row in enumerate(ids):
    order = np.argsort(row, kind="stable")
    srt = row[order]
    new = np.r_[True, srt[1:] != srt[:-1]]
    starts = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    rank[b, order] = np.arange(row.size) - starts[group]
  return rank


def prefix_lm(segment_ids: Any, prefix_lengths: Any) -> Mask:
  """Prefix-LM over packed segments.

  Query i attends key j when both are in the same segment and (j <= i or j is among the
  first `prefix_lengths[segment]` tokens of that segment, counted in order of position).

  Args:
    segment_ids: like `document`: int [T], int [B, T] or a tuple (q_ids, kv_ids).
    prefix_lengths: non-negative prefix length per segment, one of
      * an int: the same length for every segment;
      * a dict {segment id: length}: ids not listed have no prefix;
      * int [num_ids]: indexed by segment id (ids must lie in [0, num_ids));
      * int [B, num_ids]: per batch row of segment_ids, indexed by segment id.
  """
  q_ids, kv_ids, batched = _segment_pair(segment_ids)
  rank = _rank_in_segment(kv_ids)
  if not isinstance(prefix_lengths, dict) and np.ndim(prefix_lengths) == 0:
    kv_in_prefix = rank < _check_int("prefix_lengths", np.asarray(prefix_lengths)[()], 0)
  else:
    if not isinstance(prefix_lengths, dict) and kv_ids.min() < 0:
      raise ValueError(f"segment ids must be >= 0 to index prefix_lengths; got "
                       f"{kv_ids.min()}")
    max_id = int(max(kv_ids.max(), 0))
    table = _prefix_table(prefix_lengths, kv_ids.shape[0], max_id)
    if table.shape[0] > kv_ids.shape[0]:
      q_ids = np.repeat(q_ids, table.shape[0], axis=0)
      kv_ids = np.repeat(kv_ids, table.shape[0], axis=0)
      rank = np.repeat(rank, table.shape[0], axis=0)
      batched = True
    rows = np.arange(kv_ids.shape[0])[:, None] if table.shape[0] > 1 else 0
    kv_in_prefix = (kv_ids >= 0) & (rank < table[rows, np.clip(kv_ids, 0, max_id)])
  rule = ElementRule(Band(None, 0), q_ids, kv_ids, kv_in_prefix)
  return RuleMask(q_ids.shape[1], kv_ids.shape[1], rule, batched)


def tree(parents: Any) -> Mask:
  """MEDUSA-style tree attention: node i attends key j when j == i or j == parents[i].

  Args:
    parents: int [T] or [B, T]: parent index of each node, -1 for a root; values in [-1, T).
  """
  arr = _host_array("parents", parents)
  if arr.ndim not in (1, 2) or arr.shape[-1] == 0 or arr.size == 0:
    raise ValueError(f"parents.shape={arr.shape} must be [T] or [B, T] with T, B >= 1")
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"parents.dtype={arr.dtype} must be an integer type")
  t = arr.shape[-1]
  if arr.min() < -1 or arr.max() >= t:
    raise ValueError(f"parents values must lie in [-1, {t}); got min={arr.min()}, "
                     f"max={arr.max()}")
  return TreeMask(arr.reshape(-1, t).astype(np.int64), batched=arr.ndim == 2)


def dilated(q_len: int, kv_len: int, window: int, dilation: int) -> Mask:
  """LongFormer dilated sliding window.

  Query i attends key j when |i - j| <= window * dilation and (i - j) % dilation == 0,
  i.e. the `window` keys on each side at stride `dilation`, plus the diagonal.

  Args:
    q_len: T.
    kv_len: S.
    window: keys per side (>= 0).
    dilation: stride between attended keys (>= 1; 1 is a sliding window).
  """
  q_len, kv_len = _check_int("q_len", q_len, 1), _check_int("kv_len", kv_len, 1)
  window, dilation = _check_int("window", window, 0), _check_int("dilation", dilation, 1)
  return DilatedMask(q_len, kv_len, window, dilation)


def global_tokens(q_len: int, kv_len: int, window: int, global_ids: Any) -> Mask:
  """LongFormer sliding window with global tokens.

  Query i attends key j when |i - j| <= window, or i is a global position (it attends
  everything), or j is a global position (everything attends it).

  Args:
    q_len: T.
    kv_len: S.
    window: keys per side (>= 0).
    global_ids: int [G] global positions in [0, max(T, S)); a position >= T is only a
      global key, one >= S only a global query.
  """
  q_len, kv_len = _check_int("q_len", q_len, 1), _check_int("kv_len", kv_len, 1)
  window = _check_int("window", window, 0)
  ids = _host_array("global_ids", global_ids)
  if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
    raise ValueError(f"global_ids (shape {ids.shape}, dtype {ids.dtype}) must be a 1-D int "
                     "array")
  if ids.size and (ids.min() < 0 or ids.max() >= max(q_len, kv_len)):
    raise ValueError(f"global_ids must lie in [0, {max(q_len, kv_len)}); got "
                     f"min={ids.min()}, max={ids.max()}")
  return GlobalTokensMask(q_len, kv_len, window, np.unique(ids.astype(np.int64)))


def random_banded(q_len: int, kv_len: int, seed: int = 0, *, peak: float = 0.5,
                  decay: float = 0.3, floor: float = 2e-4, symmetric: bool = False) -> Mask:
  """Synthetic banded-random mask (Sharma & Geiping 2024).

  Key j is allowed for query i with probability max(peak * exp(-decay * |i - j|), floor),
  independently, plus the diagonal j == min(i, S - 1) always (no row is empty). Offsets
  where the exponential exceeds the floor are sampled densely; the floor background is
  drawn per row as a binomial count of uniform columns (a repeated column counts once, so
  the background is marginally sparser than `floor`). Deterministic for a given seed, and
  built in O(T * band + floor * T * S) time and memory.

  With `symmetric` (T == S), as the paper's synthetic RCM matrix: only the pairs j > i are
  drawn, each with the probability above, and mirrored, so (i, j) and (j, i) are allowed
  together with probability p (not 1 - (1 - p)^2) and the mask equals its transpose (the
  undirected graph Reverse Cuthill-McKee orders).

  Args:
    q_len: T.
    kv_len: S.
    seed: numpy random seed.
    peak: probability on the diagonal before the floor, in (0, 1].
    decay: exponential decay per position of distance (> 0).
    floor: background probability, in (0, peak].
    symmetric: draw the upper triangle and mirror it (needs T == S).
  """
  q_len, kv_len = _check_int("q_len", q_len, 1), _check_int("kv_len", kv_len, 1)
  seed = _check_int("seed", seed, 0)
  if not 0 < floor <= peak <= 1:
    raise ValueError(f"need 0 < {floor=} <= {peak=} <= 1")
  if not decay > 0:
    raise ValueError(f"{decay=} must be > 0")
  if symmetric and q_len != kv_len:
    raise ValueError(f"symmetric=True needs q_len == kv_len: {q_len=}, {kv_len=}")
  rng = np.random.default_rng(seed)
  reach = min(int(math.log(peak / floor) / decay), max(q_len, kv_len))
  # Symmetric: offsets j - i >= 1 only (the upper triangle); the diagonal is added below.
  offsets = np.arange(1 if symmetric else -reach, reach + 1)
  prob = np.maximum(peak * np.exp(-decay * np.abs(offsets)), floor)
  rows_band, which = np.nonzero(rng.random((q_len, offsets.size)) < prob)
  cols_band = rows_band + offsets[which]
  keep = (cols_band >= 0) & (cols_band < kv_len)
  rows = np.arange(q_len, dtype=np.int64)
  # Background columns: outside [lo, lo + width) (the band), and for `symmetric` only the
  # columns right of it (j > i + reach).
  lo = np.clip(rows - reach, 0, kv_len) if not symmetric else np.zeros_like(rows)
  width = np.clip(rows + reach + 1, 0, kv_len) - lo
  outside = kv_len - width
  count = rng.binomial(outside, floor)
  rows_bg = np.repeat(rows, count)
  u = rng.integers(0, np.maximum(outside[rows_bg], 1))
  cols_bg = np.where(u < lo[rows_bg], u, u + width[rows_bg])
  r = np.concatenate([rows_band[keep], rows_bg])
  c = np.concatenate([cols_band[keep], cols_bg])
  if symmetric:
    r, c = np.concatenate([r, c]), np.concatenate([c, r])
  return CoordinateMask(q_len, kv_len, np.concatenate([r, rows]),
                        np.concatenate([c, np.minimum(rows, kv_len - 1)]))


def from_dense(array: Any) -> Mask:
  """A mask given element by element.

  Args:
    array: bool [T, S] or [B|1, N|1, T, S] (numpy or a concrete jax array).
  """
  arr = _host_array("array", array)
  if arr.dtype != np.bool_:
    raise ValueError(f"{arr.dtype=} must be bool")
  if arr.ndim not in (2, 4) or 0 in arr.shape:
    raise ValueError(f"{arr.shape=} must be (T, S) or (B|1, N|1, T, S), all >= 1")
  return DenseMask(arr)
