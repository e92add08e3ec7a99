"""What the two Pallas GPU attention backends (Triton and Mosaic GPU) share.

Both consume the same BlockMask operands (`MaskLayout`, `mask_operands` with the FULL slots
of every list first; `flag_operands` for pallas_triton's flag-loop forward ablation), the
same zero-padding of [B, L, N, D] inputs (`pad_to`, `pad_rows`), the same capability and
BlockMask checks (`check_supported`, `check_block_mask`) and the same construction of the
forward / backward BlockMasks (`block_masks`). The Triton kernels' static parameters
(`TritonParams`, with per-kernel `LaunchParams` from `launch_params`) live here too, because
the Mosaic GPU backend runs pallas_triton's backward kernels where its own cannot run.
Nothing here builds a kernel; neither backend module is imported.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
from jax.experimental.pallas import triton as plt
import jax.numpy as jnp

from flashjax.masks import builders
from flashjax.masks import block_mask as block_mask_lib
from flashjax.masks.block_mask import FULL, PARTIAL, BlockMask
from flashjax.masks.rule import Band
from flashjax.ops.attention.block_sizes import DISPATCHES, BlockSizes, padded_head_dim

LOG2E = math.log2(math.e)
MAX_HEAD_DIM = 256
TRITON_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class LaunchParams:
  """Triton launch parameters of one kernel (None: the backend default)."""

  num_warps: int | None = None
  num_stages: int | None = None

  def compiler_params(self) -> plt.CompilerParams:
    return plt.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def launch_params(sizes: BlockSizes, head_dim: int, dkdv_tile: tuple[int, int]
                  ) -> tuple[LaunchParams, LaunchParams, LaunchParams]:
  """(forward, dQ, dK/dV) launch parameters: the caller's, else by tile and head dim.

  Defaults from a sweep on an H200 (bf16, B=4, T=4096, N=32, D=128): the 128x64 forward ran
  at 411 TFLOP/s with 4 warps vs 278 with 8, while dQ at the same tiling needs 8 warps
  (backward 8.0 ms vs 10.7 ms) and 64x64 dK/dV 4 warps (8.0 ms vs 13.3 ms with 8).
  """
  dp = padded_head_dim(head_dim)
  stages = 3 if dp <= 128 else 2
  fwd = LaunchParams(4 if dp <= 128 else 8, stages)
  dq = LaunchParams(4 if dp <= 64 else 8, stages)
  # dK/dV keeps two f32 [block_kv, Dp] accumulators in registers.
  dkdv = LaunchParams(4 if dkdv_tile[1] * dp <= 64 * 128 else 8, stages)
  launches = (fwd, dq, dkdv)
  if sizes.num_warps is not None:
    launches = tuple(LaunchParams(sizes.num_warps, x.num_stages) for x in launches)
  if sizes.num_stages is not None:
    launches = tuple(LaunchParams(x.num_warps, sizes.num_stages) for x in launches)
  return launches


@dataclasses.dataclass(frozen=True)
class TritonParams:
  """Static (hashable) parameters of the Triton kernels (forward, dQ, dK/dV).

  fwd_dispatch: how the forward kernel finds its kv tiles, "lists" (compacted lists of
  non-empty tiles) or "flags" (every kv tile, EMPTY ones skipped by their kind); from
  `BlockSizes.dispatch` (None: "lists"). The dQ and dK/dV kernels always walk the lists.
  """

  scale: float
  soft_cap: float | None
  interpret: bool
  fwd_launch: LaunchParams = LaunchParams()
  dq_launch: LaunchParams = LaunchParams()
  dkdv_launch: LaunchParams = LaunchParams()
  fwd_dispatch: str = "lists"

  def __post_init__(self):
    if self.fwd_dispatch not in DISPATCHES:
      raise ValueError(f"TritonParams.fwd_dispatch={self.fwd_dispatch!r} must be one of "
                       f"{DISPATCHES}")


@dataclasses.dataclass(frozen=True)
class MaskLayout:
  """Static description of a BlockMask as seen by a kernel (which operands it gets)."""

  block_q: int
  block_kv: int
  q_len: int
  kv_len: int
  batch_bcast: bool       # BlockMask Bm == 1
  head_bcast: bool        # BlockMask Nm == 1
  band: Band | None       # None: no ElementRule to evaluate
  rule_batch_bcast: bool  # segment / prefix arrays have batch 1
  has_segments: bool
  has_prefix: bool
  has_tiles: bool

  @classmethod
  def of(cls, bm: BlockMask) -> MaskLayout:
    rule = bm.rule
    if rule is not None and rule.band.unbounded and not rule.has_segments:
      rule = None
    seg = None if rule is None else rule.q_segment_ids
    return cls(
        block_q=bm.block_q, block_kv=bm.block_kv, q_len=bm.shape[2], kv_len=bm.shape[3],
        batch_bcast=bm.shape[0] == 1, head_bcast=bm.shape[1] == 1,
        band=None if rule is None else rule.band,
        rule_batch_bcast=seg is None or seg.shape[0] == 1,
        has_segments=seg is not None,
        has_prefix=rule is not None and rule.kv_in_prefix is not None,
        has_tiles=bm.tiles is not None and bm.tiles.shape[0] > 0)

  @property
  def q_bounds(self) -> bool:
    return self.q_len % self.block_q != 0

  @property
  def kv_bounds(self) -> bool:
    return self.kv_len % self.block_kv != 0

  @property
  def has_partial(self) -> bool:
    """Whether any tile can need element masking."""
    return self.band is not None or self.has_tiles or self.q_bounds or self.kv_bounds


def full_first(block: jax.Array, kind: jax.Array, tile: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Reorders each block list so that its FULL slots come first.

  Args:
    block: [Bm, Nm, n_outer, L] int32 block ids of the compacted lists.
    kind: [Bm, Nm, n_outer, L] int32 slot kinds (FULL, PARTIAL, or 0 for padding slots).
    tile: [Bm, Nm, n_outer, L] int32 stored-tile indices.

  Returns:
    block and tile with, per list, the FULL slots, then the PARTIAL ones, then the padding
    (stable inside each kind), and n_full [Bm, Nm, n_outer] int32, the number of FULL slots.
  """
  rank = jnp.where(kind == FULL, 0, jnp.where(kind == PARTIAL, 1, 2))
  order = jnp.argsort(rank, axis=-1, stable=True)
  take = lambda x: jnp.take_along_axis(x, order, axis=-1)
  return take(block), take(tile), jnp.sum(kind == FULL, axis=-1, dtype=jnp.int32)


def mask_operands(bm: BlockMask, layout: MaskLayout, *, backward: bool, q_pad: int,
                  kv_pad: int) -> list[jax.Array]:
  """Flat list of the arrays a kernel needs, absent parts skipped: count, block, n_full,
  tile (lists), q / kv segment ids, prefix flags, stored tiles (the order of pallas_triton's
  MaskRefs; pallas_mosaic_gpu_common.mask_parts regroups them)."""
  lists = ((bm.bwd_count, bm.bwd_block, bm.bwd_kind, bm.bwd_tile) if backward else
           (bm.fwd_count, bm.fwd_block, bm.fwd_kind, bm.fwd_tile))
  count, block, kind, tile = (jnp.asarray(x, jnp.int32) for x in lists)
  if layout.has_partial:
    block, tile, n_full = full_first(block, kind, tile)
    ops = [count, block, n_full]
  else:  # every listed slot is FULL: the lists are already in loop order
    ops = [count, block]
  if layout.has_tiles:
    ops.append(tile)
  return ops + _element_operands(bm, layout, q_pad=q_pad, kv_pad=kv_pad)


def flag_operands(bm: BlockMask, layout: MaskLayout, *, q_pad: int, kv_pad: int
                  ) -> list[jax.Array]:
  """Operands of the flag-loop forward (pallas_triton's dispatch="flags"): the tile kinds
  [Bm, Nm, nq, nk] int32 (EMPTY / PARTIAL / FULL per tile, no lists), the stored-tile index
  of every grid tile [Bm, Nm, nq, nk] int32 (only with stored tiles), then the element-mask
  parts in `mask_operands`' order (segment ids, prefix flags, stored tiles)."""
  ops = [jnp.asarray(bm.kinds, jnp.int32)]
  if layout.has_tiles:
    ops.append(block_mask_lib.tile_grid(bm, jnp))
  return ops + _element_operands(bm, layout, q_pad=q_pad, kv_pad=kv_pad)


def _element_operands(bm: BlockMask, layout: MaskLayout, *, q_pad: int, kv_pad: int
                      ) -> list[jax.Array]:
  """q / kv segment ids, prefix flags and stored tiles (absent parts skipped)."""
  ops = []
  pad_seq = lambda x, n, dtype: jnp.pad(jnp.asarray(x, dtype), ((0, 0), (0, n - x.shape[1])))
  if layout.has_segments:
    ops.append(pad_seq(bm.rule.q_segment_ids, q_pad, jnp.int32))
    ops.append(pad_seq(bm.rule.kv_segment_ids, kv_pad, jnp.int32))
  if layout.has_prefix:
    ops.append(pad_seq(bm.rule.kv_in_prefix, kv_pad, jnp.int8))
  if layout.has_tiles:
    ops.append(jnp.asarray(bm.tiles, jnp.int8))
  return ops


class Tiling(NamedTuple):
  """Shapes of one call at a BlockMask's tiling, as every pass of both GPU backends reads them:
  q [B, T, Nq, D], k [B, S, Nkv, D]; lengths padded up to whole tiles, D to the kernels'
  padded head dim."""
  batch: int
  q_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  group: int  # Nq // Nkv
  layout: MaskLayout
  block_q: int
  block_kv: int
  q_pad: int  # T rounded up to block_q
  kv_pad: int  # S rounded up to block_kv
  padded_dim: int  # padded_head_dim(D)


def tiling(q: jax.Array, k: jax.Array, bm: BlockMask) -> Tiling:
  """The Tiling of q [B, T, Nq, D] and k [B, S, Nkv, D] at `bm`'s tiles."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  layout = MaskLayout.of(bm)
  bq, bk = layout.block_q, layout.block_kv
  return Tiling(batch, q_len, kv_len, num_heads, num_kv_heads, head_dim,
                num_heads // num_kv_heads, layout, bq, bk, -(-q_len // bq) * bq,
                -(-kv_len // bk) * bk, padded_head_dim(head_dim))


def pad_to(x: jax.Array, seq_len: int, head_dim: int) -> jax.Array:
  """Zero-pads [B, L, N, D] to [B, seq_len, N, head_dim]; no copy when already that size."""
  pads = ((0, 0), (0, seq_len - x.shape[1]), (0, 0), (0, head_dim - x.shape[3]))
  if all(p == (0, 0) for p in pads):
    return x
  return jnp.pad(x, pads)


def pad_rows(x: jax.Array, length: int, value: float) -> jax.Array:
  """Pads [R, L] to [R, length] with `value`."""
  if x.shape[1] == length:
    return x
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=value)


def check_supported(query, *, backend: str, dtypes: tuple[Any, ...] = TRITON_DTYPES,
                    max_head_dim: int = MAX_HEAD_DIM) -> None:
  """NotImplementedError (so dispatch moves on) for a dtype or head dim the backend cannot
  run; the shapes are checked by the contract (base.check_qkv)."""
  if query.dtype not in dtypes:
    supported = ", ".join(jnp.dtype(d).name for d in dtypes)
    raise NotImplementedError(f"{backend}: {query.dtype=} is not supported ({supported})")
  if query.shape[3] > max_head_dim:
    raise NotImplementedError(f"{backend}: head_dim={query.shape[3]} > {max_head_dim} "
                              "is not supported")


def check_block_mask(bm: BlockMask, query, key):
  """ValueError unless the BlockMask's logical shape fits the inputs."""
  batch, q_len, num_heads, _ = query.shape
  kv_len = key.shape[1]
  bm_batch, bm_heads, bm_q, bm_kv = bm.shape
  if (bm_q, bm_kv) != (q_len, kv_len) or bm_batch not in (1, batch) or (
      bm_heads not in (1, num_heads)):
    raise ValueError(f"BlockMask shape {bm.shape} does not fit {query.shape=} {key.shape=}")



def block_masks(mask, query, key, *, is_causal, q_segment_ids, kv_segment_ids,
                block_sizes: BlockSizes | None):
  """Forward and backward BlockMasks plus the BlockSizes whose launch parameters apply.

  A BlockMask `mask` fixes both tilings (`block_sizes`, if given, must agree with it); any
  other mask is built at `block_sizes` (required then): the forward at block_q x block_kv,
  the backward at its *_bwd tiles when they differ (an RCM-permuted mask is reused as is,
  so both passes share one permutation).
  """
  q_len, kv_len = query.shape[1], key.shape[1]
  extra = is_causal or q_segment_ids is not None
  build = functools.partial(
      builders.block_mask_for, q_len=q_len, kv_len=kv_len, mask=mask, is_causal=is_causal,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
  if isinstance(mask, BlockMask):
    tiling = (mask.block_q, mask.block_kv)
    if any(t < 16 or t & (t - 1) for t in tiling):
      # The mask is fine ("xla" runs any tiling); these kernels cannot: lists move on.
      raise NotImplementedError(f"a BlockMask with tiles {tiling[0]} x {tiling[1]}: the GPU "
                                "kernels take tiles that are powers of two >= 16")
    if block_sizes is not None and (block_sizes.block_q, block_sizes.block_kv) != tiling:
      raise ValueError(f"{block_sizes=} disagrees with the BlockMask tiling "
                       f"block_q={mask.block_q}, block_kv={mask.block_kv}")
    bm = build(block_q=mask.block_q, block_kv=mask.block_kv) if extra else mask
    return bm, bm, block_sizes or BlockSizes(*tiling)
  if block_sizes is None:
    raise ValueError("block_masks: block_sizes is required unless mask is a BlockMask")
  sizes = block_sizes
  fwd = build(block_q=sizes.block_q, block_kv=sizes.block_kv)
  if (sizes.bwd_q, sizes.bwd_kv) == (sizes.block_q, sizes.block_kv) or fwd.q_perm is not None:
    # A permuted (RCM) BlockMask is reused as is so both passes share one permutation.
    return fwd, fwd, sizes
  return fwd, build(block_q=sizes.bwd_q, block_kv=sizes.bwd_kv), sizes
