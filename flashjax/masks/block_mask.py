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
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from flashjax.masks.rule import Band, ElementRule

EMPTY, PARTIAL, FULL = 0, 1, 2


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
    from flashjax.masks import builders  # pylint: disable=g-import-not-at-top
    return builders.block_mask_from_mask(mask, block_q, block_kv, reorder=reorder)

  def expand(self) -> Any:
    """The element mask the kernels apply, bool [Bm, Nm, T, S] (jnp)."""
    from flashjax.masks import builders  # pylint: disable=g-import-not-at-top
    return builders.expand_block_mask(self)

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
