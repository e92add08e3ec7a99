"""BlockMask: the block-level view of an attention mask that every kernel consumes.

A mask of logical shape [B|1, N|1, T, S] is cut into tiles of block_q x block_kv
(nq = cdiv(T, block_q), nk = cdiv(S, block_kv)). Each tile is

  0 EMPTY   no allowed element: never loaded, never computed;
  1 PARTIAL some allowed: the kernel applies the element mask;
  2 FULL    every element allowed and the tile lies wholly inside T x S: no mask arithmetic.

A tile that overhangs T or S is never FULL (kernels then need no bounds checks on full tiles).

The element mask of a partial tile is the AND of the parts that are present:
  * `rule` (flashjax.masks.rule.ElementRule): band, segment ids, prefix flags, computed from
    positions inside the kernel, no T x S traffic;
  * `tiles[tile_index]`: a stored bool tile [block_q, block_kv] (deduplicated), for masks that
    cannot be computed (tree, dilated, random, from_dense, unions);
  * bounds: i < T and j < S.

Compacted lists (what kernels iterate):
  forward, per query block, ascending kv block ids of its non-empty tiles:
    fwd_count [Bm, Nm, nq] int32, fwd_block / fwd_kind / fwd_tile [Bm, Nm, nq, Lf] int32
  backward (dK/dV), per kv block, ascending q block ids:
    bwd_count [Bm, Nm, nk] int32, bwd_block / bwd_kind / bwd_tile [Bm, Nm, nk, Lb] int32
  Padding slots (slot >= count) repeat the last valid block id (0 if count == 0) so a TPU
  index_map that reads them issues no new DMA; their kind is 0 and tile 0.
  Bm is 1 or B, Nm is 1 or N (broadcast axes stay 1).

BlockMask is a pytree (arrays are leaves; shapes, block sizes and the band are static), so
it passes through jax.jit. Host builders (numpy, from a flashjax.masks.Mask) give tight list
lengths Lf/Lb; device builders (jax.numpy, from traced segment ids or bool arrays) use
Lf = nk and Lb = nq.

This module also holds the host builder (`block_mask_from_mask`, behind `BlockMask.from_mask`,
with its RCM variant `block_mask_rcm`), `expand_block_mask` (behind `BlockMask.expand`) and
the pieces the device builders of flashjax.masks.builders share with it (`assemble`,
`dedup_tiles`, `tile_grid`, ...). Layering: rule -> masks -> rcm -> block_mask -> builders.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flashjax.masks import masks as masks_lib
from flashjax.masks import rcm
from flashjax.masks.masks import EMPTY, FULL, PARTIAL  # re-exported: the tile kinds
from flashjax.masks.rule import Band, ElementRule, dense_rule_mask, int32_rule

# Tiles of partial blocks are produced in chunks of about this many elements.
_CHUNK_ELEMENTS = 1 << 24

# BlockMasks built from a Mask, per Mask object (weakly held) and build key.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask:
  """Block map plus compacted block lists; see the module docstring for the layout.

  Attributes:
    shape: logical mask shape (Bm, Nm, T, S); Bm/Nm are 1 when broadcast.
    block_q: query tile size.
    block_kv: key tile size.
    kinds: [Bm, Nm, nq, nk] int8 (0 empty, 1 partial, 2 full).
    fwd_count, fwd_block, fwd_kind, fwd_tile: forward lists (per query block).
    bwd_count, bwd_block, bwd_kind, bwd_tile: backward lists (per kv block).
    rule: ElementRule or None (its arrays are pytree leaves, its band is static).
    tiles: [n_tiles, block_q, block_kv] bool, or None.
    density: scalar, fraction of allowed elements in T x S (averaged over Bm, Nm).
    block_density: scalar, fraction of non-empty tiles.
    q_perm: [T] int32 or None: RCM permutation (attend over q[q_perm], k[kv_perm]...).
    kv_perm: [S] int32 or None.
  """

  shape: tuple[int, int, int, int]
  block_q: int
  block_kv: int
  kinds: Any
  fwd_count: Any
  fwd_block: Any
  fwd_kind: Any
  fwd_tile: Any
  bwd_count: Any
  bwd_block: Any
  bwd_kind: Any
  bwd_tile: Any
  rule: ElementRule | None = None
  tiles: Any = None
  density: Any = None
  block_density: Any = None
  q_perm: Any = None
  kv_perm: Any = None

  _ARRAY_FIELDS = ("kinds", "fwd_count", "fwd_block", "fwd_kind", "fwd_tile", "bwd_count",
                   "bwd_block", "bwd_kind", "bwd_tile", "tiles", "density", "block_density",
                   "q_perm", "kv_perm")

  @classmethod
  def from_mask(cls, mask: Any, block_q: int, block_kv: int, *,
                reorder: str | None = None) -> "BlockMask":
    """Host BlockMask of a flashjax.masks Mask, cached per Mask object and block sizes.

    Args:
      mask: a flashjax.masks Mask of shape (T, S) or (B|1, N|1, T, S).
      block_q: query tile size.
      block_kv: key tile size.
      reorder: None, or "rcm" for the Reverse Cuthill-McKee reordered mask (T == S; sets
        q_perm / kv_perm, see flashjax.masks.rcm).

    Returns:
      BlockMask with numpy arrays and tight list lengths.
    """
    return block_mask_from_mask(mask, block_q, block_kv, reorder=reorder)

  def expand(self) -> Any:
    """The element mask the kernels apply, bool [Bm, Nm, T, S] (jnp)."""
    return expand_block_mask(self)

  @property
  def num_q_blocks(self) -> int:
    return -(-self.shape[2] // self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return -(-self.shape[3] // self.block_kv)

  def tree_flatten(self):
    rule = self.rule
    rule_leaves = (None, None, None) if rule is None else (
        rule.q_segment_ids, rule.kv_segment_ids, rule.kv_in_prefix)
    rule_static = None if rule is None else (rule.band.lo, rule.band.hi)
    leaves = tuple(getattr(self, f) for f in self._ARRAY_FIELDS) + rule_leaves
    aux = (self.shape, self.block_q, self.block_kv, rule_static)
    return leaves, aux

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    shape, block_q, block_kv, rule_static = aux
    n = len(cls._ARRAY_FIELDS)
    fields = dict(zip(cls._ARRAY_FIELDS, leaves[:n]))
    rule = None
    if rule_static is not None:
      q_seg, kv_seg, prefix = leaves[n:]
      rule = ElementRule(Band(*rule_static), q_seg, kv_seg, prefix)
    obj = object.__new__(cls)
    for k, v in dict(shape=shape, block_q=block_q, block_kv=block_kv, rule=rule,
                     **fields).items():
      object.__setattr__(obj, k, v)
    return obj

  def __repr__(self):
    dens = self.density if isinstance(self.density, (float, np.ndarray, np.generic)) else "?"
    return (f"BlockMask(shape={self.shape}, block_q={self.block_q}, "
            f"block_kv={self.block_kv}, density={dens})")


# ----------------------------------------------------------------------------- shared helpers


def check_size(name: str, value: Any) -> int:
  """value as an int, raising ValueError unless it is a positive int."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive int")
  return int(value)


def cached(mask: masks_lib.Mask, key: tuple[Any, ...], build) -> BlockMask:
  """build(), run once per Mask object (weakly held) and key."""
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


def assemble(kinds, grid, rule: ElementRule | None, tiles, density, q_len: int,
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


def dedup_tiles(tile_fn, coords: tuple[np.ndarray, ...], block_q: int, block_kv: int):
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
  block_q, block_kv = check_size("block_q", block_q), check_size("block_kv", block_kv)
  if reorder not in (None, "rcm"):
    raise ValueError(f"{reorder=} must be None or 'rcm'")

  def build():
    if reorder == "rcm":
      return block_mask_rcm(mask, block_q, block_kv)
    return build_from_mask(mask, block_q, block_kv)

  return cached(mask, (block_q, block_kv, reorder), build)


def build_from_mask(mask: masks_lib.Mask, block_q: int, block_kv: int) -> BlockMask:
  """`block_mask_from_mask` without the cache and the reorder option (checked sizes)."""
  kinds = np.ascontiguousarray(mask.block_kinds(block_q, block_kv))
  rule = mask.rule()
  if rule is not None:
    return assemble(kinds, None, int32_rule(rule), None, mask.density, mask.q_len,
                    mask.kv_len, block_q, block_kv, host=True)
  coords = np.nonzero(kinds == PARTIAL)
  tile_fn = functools.partial(mask.block_tiles, block_q, block_kv)
  tiles, ids, partial_allowed = dedup_tiles(tile_fn, coords, block_q, block_kv)
  grid = np.zeros(kinds.shape, np.int32)
  grid[coords] = ids
  allowed = np.count_nonzero(kinds == FULL) * block_q * block_kv + partial_allowed
  density = allowed / (kinds.shape[0] * kinds.shape[1] * mask.q_len * mask.kv_len)
  return assemble(kinds, grid, None, tiles, density, mask.q_len, mask.kv_len, block_q,
                  block_kv, host=True)


def block_mask_rcm(mask: Any, block_q: int, block_kv: int) -> BlockMask:
  """Host BlockMask of the RCM-reordered mask, with q_perm = kv_perm = the RCM order.

  Also reached through `BlockMask.from_mask(mask, block_q, block_kv, reorder="rcm")`
  (cached per Mask object).

  Args:
    mask: a flashjax.masks Mask or bool array (T, T).
    block_q: query tile size.
    block_kv: key tile size.

  Returns:
    BlockMask of the permuted mask; use with `rcm.permute_qkv` / `rcm.unpermute_output`.
  """
  perm, _ = rcm.rcm_permutation(mask)
  bm = block_mask_from_mask(rcm.permute_mask(mask, perm), block_q, block_kv)
  return dataclasses.replace(bm, q_perm=perm, kv_perm=perm)


# ----------------------------------------------------------------------------- expansion


def tile_grid(bm: BlockMask, xp) -> Any:
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
    allowed = allowed & dense_rule_mask(bm.rule, q_len, kv_len)
  if bm.tiles is not None:
    tiles = jnp.asarray(bm.tiles)[tile_grid(bm, jnp)]  # [Bm, Nm, nq, nk, bq, bk]
    tiles = tiles.transpose(0, 1, 2, 4, 3, 5).reshape(
        bmm, nm, nq * bm.block_q, nk * bm.block_kv)
    allowed = allowed & tiles[:, :, :q_len, :kv_len]
  out = (kinds == FULL) | ((kinds == PARTIAL) & allowed)
  return jnp.broadcast_to(out, bm.shape)
