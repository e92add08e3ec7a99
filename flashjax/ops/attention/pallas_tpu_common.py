"""Block-sparse FlashAttention forward kernel for TPU and the pieces its backward shares.

The "pallas_tpu" backend is three modules, each importing only those before it:
pallas_tpu_common (this: TpuParams, the list indexers, mask operands, BlockSpecs, the
partial-tile mask and the forward kernel `flash_fwd`) -> pallas_tpu_vjp (the dQ and dK/dV
kernels and the custom_vjp `attention`) -> pallas_tpu (the backend entry
`dot_product_attention`: tiling checks, BlockMask, RCM order, layout).

The kernel consumes a `flashjax.masks.BlockMask` (binary block masking, Sharma & Geiping 2024):
its compacted per-query-block lists of non-empty kv blocks are scalar-prefetched into SMEM and
drive the grid (B, Nq, num_q_blocks, Lf), whose last axis walks the list. The k/v BlockSpec
index_maps read the list, so only non-empty kv blocks are ever copied into VMEM; padding slots
repeat the previous block id (no new DMA) and do no work. FULL blocks skip all mask arithmetic;
PARTIAL blocks AND the ElementRule (band, segment ids, prefix flags evaluated on iota), the
stored tile (`BlockMask.tiles`, fetched through an index_map reading the tile list) and bounds.

Layout on the kernel side is head-major [B, N, T, D] with D padded to a multiple of 128 and
T, S padded to block multiples (done in XLA around the kernels). Softmax statistics live in
float32 VMEM scratch, lane-broadcast to [block_q, 128]; the logsumexp output is likewise
lane-broadcast. A query row with no allowed key outputs 0 and gets logsumexp +inf, so the
backward recomputes P = exp(s - lse) = 0 for it.

No TPU was reachable while writing this: correctness is checked in interpret mode on CPU and
the TPU lowering is traced on CPU; speed is unmeasured (docs/tpu.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flashjax.masks import block_mask as block_mask_lib
from flashjax.masks.block_mask import BlockMask
from flashjax.masks.rule import element_mask
from flashjax.ops.tiling import pad_axis

LANES = 128

# Contract the last dims of both operands: [m, d] x [n, d] -> [m, n].
NT_DIMS = (((1,), (1,)), ((), ()))
# Plain matmul: [m, k] x [k, n] -> [m, n].
NN_DIMS = (((1,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class TpuParams:
  """Static parameters shared by the forward and backward kernels.

  Attributes:
    scale: multiplier of q.k.
    soft_cap: logits soft cap (cap * tanh(logits / cap)) or None.
    q_len: logical query length T (rows >= T are padding).
    kv_len: logical key length S (columns >= S are padding).
    interpret: False, True or a pltpu.InterpretParams (see interpret_arg).
  """

  scale: float
  soft_cap: float | None
  q_len: int
  kv_len: int
  interpret: Any


def interpret_arg(interpret: Any) -> Any:
  """The `interpret` argument of pl.pallas_call.

  Args:
    interpret: False (compile for TPU), True (Pallas interpret mode), or a
      pltpu.InterpretParams (the TPU interpreter: uninitialised memory reads as NaN, optional
      race detection; slower).
  """
  if isinstance(interpret, pltpu.InterpretParams):
    return interpret
  return bool(interpret)


def precision_for(dtype) -> lax.Precision:
  """float32 inputs are multiplied at full precision, narrower types natively."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


@dataclasses.dataclass(frozen=True)
class ListIndexer:
  """Flat indices into compacted BlockMask lists [Bm, Nm, rows, L] kept 1-D in SMEM.

  SMEM pads multi-dimensional arrays, so the lists are flattened; broadcast axes (Bm or Nm
  equal to 1) always index 0.
  """

  bm: int
  nm: int
  rows: int
  length: int

  def row(self, b, h, r):
    b = b if self.bm > 1 else 0
    h = h if self.nm > 1 else 0
    return (b * self.nm + h) * self.rows + r

  def slot(self, b, h, r, s):
    return self.row(b, h, r) * self.length + s


def _fill_tile_ids(kind: jax.Array, tile: jax.Array) -> jax.Array:
  """Tile id to fetch at every slot: non-PARTIAL slots repeat the nearest PARTIAL tile id.

  Slots that need no stored tile (FULL or padding) then keep the tile index_map constant, so
  they trigger no tile DMA.

  Args:
    kind: int32 [..., L] block kinds of a list.
    tile: int32 [..., L] tile ids of the same list.

  Returns:
    int32 [..., L].
  """
  slots = lax.broadcasted_iota(jnp.int32, kind.shape, kind.ndim - 1)
  partial = kind == block_mask_lib.PARTIAL
  last = lax.cummax(jnp.where(partial, slots, -1), axis=kind.ndim - 1)
  first = jnp.argmax(partial, axis=-1, keepdims=True).astype(jnp.int32)
  return jnp.take_along_axis(tile, jnp.where(last < 0, first, last), axis=-1)


@dataclasses.dataclass(frozen=True)
class MaskOperands:
  """Kernel operands derived from one BlockMask and one direction of its lists.

  Attributes:
    indexer: static ListIndexer of the lists.
    prefetch: (count, block, kind, tile_fetch) flat int32 arrays for scalar prefetch.
    q_seg: [Bs, Tp, 128] int32 (lane-broadcast query segment ids) or None.
    kv_seg: [Bs, 1, Sp] int32 key segment ids or None.
    kv_prefix: [Bs, 1, Sp] int32 prefix-LM flags or None.
    tiles: [n_tiles, block_q, block_kv] int8 (int32 when block_q % 32) stored tiles or None.
    band: static band of the rule (None when the mask has no rule).
  """

  indexer: ListIndexer
  prefetch: tuple[jax.Array, ...]
  q_seg: jax.Array | None
  kv_seg: jax.Array | None
  kv_prefix: jax.Array | None
  tiles: jax.Array | None
  band: Any


def mask_operands(bm: BlockMask, direction: str, t_pad: int, s_pad: int) -> MaskOperands:
  """Flattens `bm`'s lists for scalar prefetch and lays out its rule arrays and tiles.

  Args:
    bm: the BlockMask.
    direction: "fwd" (lists per query block) or "bwd" (lists per kv block).
    t_pad: padded query length (multiple of bm.block_q).
    s_pad: padded key length (multiple of bm.block_kv).

  Returns:
    MaskOperands.
  """
  count, block, kind, tile = (jnp.asarray(getattr(bm, f"{direction}_{n}"), jnp.int32)
                              for n in ("count", "block", "kind", "tile"))
  bm_, nm, rows, length = block.shape
  indexer = ListIndexer(bm_, nm, rows, length)
  prefetch = (count.reshape(-1), block.reshape(-1), kind.reshape(-1),
              _fill_tile_ids(kind, tile).reshape(-1))
  q_seg = kv_seg = kv_prefix = band = None
  rule = bm.rule
  if rule is not None:
    band = rule.band
    if rule.has_segments:
      qs = jnp.asarray(rule.q_segment_ids, jnp.int32)
      qs = jnp.pad(qs, ((0, 0), (0, t_pad - qs.shape[1])))
      q_seg = jnp.broadcast_to(qs[:, :, None], (*qs.shape, LANES))
      ks = jnp.asarray(rule.kv_segment_ids, jnp.int32)
      kv_seg = jnp.pad(ks, ((0, 0), (0, s_pad - ks.shape[1])))[:, None, :]
      if rule.kv_in_prefix is not None:
        pre = jnp.asarray(rule.kv_in_prefix).astype(jnp.int32)
        kv_prefix = jnp.pad(pre, ((0, 0), (0, s_pad - pre.shape[1])))[:, None, :]
  tiles = None
  if bm.tiles is not None:
    tile_dtype = jnp.int8 if bm.block_q % 32 == 0 else jnp.int32
    tiles = jnp.asarray(bm.tiles).astype(tile_dtype)
  return MaskOperands(indexer, prefetch, q_seg, kv_seg, kv_prefix, tiles, band)


class Step(NamedTuple):
  """Block coordinates of one grid step, read from the prefetched lists.

  Attributes:
    batch: batch index.
    q_head: query head.
    kv_head: key/value head (q_head // group).
    q_block: query block id.
    kv_block: key block id.
    row: flat index of the list row (into the count list).
    slot: flat index of the list slot (into the block / kind / tile lists).
    pos: position of the step in its list (padding when >= count).
  """

  batch: Any
  q_head: Any
  kv_head: Any
  q_block: Any
  kv_block: Any
  row: Any
  slot: Any
  pos: Any


def fwd_steps(ix: ListIndexer, group: int) -> Callable[..., Step]:
  """Step map of the forward / dQ grid (B, Nq, num_q_blocks, Lf) over the forward lists.

  Args:
    ix: ListIndexer of the forward lists.
    group: query heads per kv head.

  Returns:
    steps(b, h, qi, s, count_ref, block_ref, kind_ref, tile_ref) -> Step.
  """
  def steps(b, h, qi, s, count_ref, block_ref, kind_ref, tile_ref):
    del count_ref, kind_ref, tile_ref
    slot = ix.slot(b, h, qi, s)
    return Step(b, h, lax.div(h, group), qi, block_ref[slot], ix.row(b, h, qi), slot, s)
  return steps


def block_specs(steps: Callable[..., Step], ops: MaskOperands, block_q: int, block_kv: int,
                head_dim: int) -> tuple[dict, list, list, tuple[bool, ...]]:
  """BlockSpecs of a kernel whose grid steps are described by `steps`.

  Args:
    steps: (grid ids..., 4 prefetch refs) -> Step.
    ops: MaskOperands of the lists `steps` walks.
    block_q: query tile size.
    block_kv: key tile size.
    head_dim: padded head dim.

  Returns:
    (specs, mask_arrays, mask_specs, flags): specs["q"] / ["kv"] / ["stat"] map query rows
    [B, Nq, T, D], key rows [B, Nkv, S, D] and lane-broadcast row statistics [B, Nq, T, 128];
    mask_arrays / mask_specs are the optional mask operands (q_seg, kv_seg, kv_prefix, tiles,
    those present, in that order) and flags says which are present.
  """
  def q_map(*args):
    st = steps(*args)
    return st.batch, st.q_head, st.q_block, 0

  def kv_map(*args):
    st = steps(*args)
    return st.batch, st.kv_head, st.kv_block, 0

  specs = dict(q=pl.BlockSpec((None, None, block_q, head_dim), q_map),
               kv=pl.BlockSpec((None, None, block_kv, head_dim), kv_map),
               stat=pl.BlockSpec((None, None, block_q, LANES), q_map))

  def batch_of(st, arr):
    return st.batch if arr.shape[0] > 1 else 0

  arrays, mask_specs = [], []
  if ops.q_seg is not None:
    def q_seg_map(*args, arr=ops.q_seg):
      st = steps(*args)
      return batch_of(st, arr), st.q_block, 0
    arrays.append(ops.q_seg)
    mask_specs.append(pl.BlockSpec((None, block_q, LANES), q_seg_map))
  for arr in (ops.kv_seg, ops.kv_prefix):
    if arr is not None:
      def kv_row_map(*args, arr=arr):
        st = steps(*args)
        return batch_of(st, arr), 0, st.kv_block
      arrays.append(arr)
      mask_specs.append(pl.BlockSpec((None, 1, block_kv), kv_row_map))
  if ops.tiles is not None:
    def tile_map(*args):
      tile_ref = args[-1]
      return tile_ref[steps(*args).slot], 0, 0
    arrays.append(ops.tiles)
    mask_specs.append(pl.BlockSpec((None, block_q, block_kv), tile_map))
  flags = (ops.q_seg is not None, ops.kv_seg is not None, ops.kv_prefix is not None,
           ops.tiles is not None)
  return specs, arrays, mask_specs, flags


def step_mask(masked: bool, refs: dict, band, st, block_q: int, block_kv: int,
              cfg: TpuParams) -> jax.Array | None:
  """`partial_mask` of list step `st`'s tile when `masked` (a PARTIAL tile), else None (a
  FULL tile needs no mask)."""
  if not masked:
    return None
  return partial_mask(refs, band, st.q_block * block_q, st.kv_block * block_kv, block_q,
                      block_kv, cfg)


def partial_mask(refs: dict, band, q_start, kv_start, block_q: int, block_kv: int,
                 cfg: TpuParams) -> jax.Array:
  """Element mask of a PARTIAL tile: rule AND stored tile AND bounds.

  Args:
    refs: VMEM refs of the present optional operands: "q_seg" [block_q, 128],
      "kv_seg" / "kv_prefix" [1, block_kv], "tile" [block_q, block_kv].
    band: static Band of the rule, or None.
    q_start: first query position of the tile.
    kv_start: first key position of the tile.
    block_q: tile rows.
    block_kv: tile columns.
    cfg: TpuParams (logical lengths).

  Returns:
    bool [block_q, block_kv].
  """
  shape = (block_q, block_kv)
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
  kv_pos = kv_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  mask = (q_pos < cfg.q_len) & (kv_pos < cfg.kv_len)
  if band is not None:
    q_seg = refs["q_seg"][...][:, :1] if "q_seg" in refs else None
    kv_seg = refs["kv_seg"][...] if "kv_seg" in refs else None
    prefix = refs["kv_prefix"][...] != 0 if "kv_prefix" in refs else None
    mask &= element_mask(q_pos, kv_pos, band, q_seg, kv_seg, prefix)
  if "tile" in refs:
    mask &= refs["tile"][...].astype(jnp.int32) != 0
  return mask


def split_optional_refs(refs, flags) -> tuple[dict, list]:
  """Names the optional mask refs (in block_specs order) and returns the remaining refs."""
  refs = list(refs)
  out = {}
  for name, present in zip(("q_seg", "kv_seg", "kv_prefix", "tile"), flags):
    if present:
      out[name] = refs.pop(0)
  return out, refs


def scaled_logits(q: jax.Array, k: jax.Array, cfg: TpuParams) -> jax.Array:
  """float32 [block_q, block_kv] logits q k^T * scale, soft-capped if configured."""
  s = lax.dot_general(q, k, NT_DIMS, precision=precision_for(q.dtype),
                      preferred_element_type=jnp.float32) * cfg.scale
  if cfg.soft_cap is not None:
    s = cfg.soft_cap * jnp.tanh(s / cfg.soft_cap)
  return s


def run_steps(step_fn: Callable[[bool], None], st: Step, count_ref, kind_ref) -> None:
  """Runs `step_fn(masked)` on live list slots: unmasked on FULL blocks, masked otherwise.

  Padding slots (position >= count) do nothing.
  """
  live = st.pos < count_ref[st.row]
  full = kind_ref[st.slot] == block_mask_lib.FULL
  pl.when(live & full)(lambda: step_fn(False))
  pl.when(live & jnp.logical_not(full))(lambda: step_fn(True))


def grid_ids(rank: int) -> tuple[jax.Array, ...]:
  return tuple(pl.program_id(i) for i in range(rank))


def _fwd_kernel(count_ref, block_ref, kind_ref, tile_ref, q_ref, k_ref, v_ref, *refs,
                steps, flags, band, last_pos: int, cfg: TpuParams, block_q: int,
                block_kv: int):
  """One (batch, head, query block, list slot) step of the forward."""
  opt, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = split_optional_refs(refs, flags)
  st = steps(*grid_ids(4), count_ref, block_ref, kind_ref, tile_ref)

  @pl.when(st.pos == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(masked: bool):
    s = scaled_logits(q_ref[...], k_ref[...], cfg)
    mask = step_mask(masked, opt, band, st, block_q, block_kv, cfg)
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    m_prev = m_ref[...]                                            # [bq, 128]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # Rows that have seen no allowed key yet keep m = -inf; shift them by 0 instead.
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - m_safe[:, :1])
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    pv = lax.dot_general(p.astype(v.dtype), v, NN_DIMS, precision=precision_for(v.dtype),
                         preferred_element_type=jnp.float32)
    acc_ref[...] = acc_ref[...] * alpha[:, :1] + pv
    m_ref[...] = m_next

  run_steps(step, st, count_ref, kind_ref)

  @pl.when(st.pos == last_pos)
  def _finish():
    l = l_ref[...]
    empty = l == 0.0
    l = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_ref[...] / l[:, :1]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m_ref[...] + jnp.log(l))


def flash_fwd(q: jax.Array, k: jax.Array, v: jax.Array, bm: BlockMask,
              cfg: TpuParams) -> tuple[jax.Array, jax.Array]:
  """Runs the forward kernel.

  Args:
    q: [B, Nq, T, D] head-major queries, D a multiple of 128.
    k: [B, Nkv, S, D] keys.
    v: [B, Nkv, S, D] values.
    bm: BlockMask of logical shape (Bm, Nm, T, S) at the kernel tiling.
    cfg: TpuParams.

  Returns:
    (out [B, Nq, T, D] in q.dtype, logsumexp [B, Nq, T] float32; +inf on rows with no key).
  """
  batch, num_q_heads, q_len, head_dim = q.shape
  group = num_q_heads // k.shape[1]
  block_q, block_kv = bm.block_q, bm.block_kv
  nq = bm.num_q_blocks
  t_pad, s_pad = nq * block_q, bm.num_kv_blocks * block_kv
  ops = mask_operands(bm, "fwd", t_pad, s_pad)
  steps = fwd_steps(ops.indexer, group)
  specs, mask_arrays, mask_specs, flags = block_specs(steps, ops, block_q, block_kv, head_dim)
  kernel = functools.partial(_fwd_kernel, steps=steps, flags=flags, band=ops.band,
                             last_pos=ops.indexer.length - 1, cfg=cfg, block_q=block_q,
                             block_kv=block_kv)
  out, lse = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((batch, num_q_heads, t_pad, head_dim), q.dtype),
                 jax.ShapeDtypeStruct((batch, num_q_heads, t_pad, LANES), jnp.float32)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(batch, num_q_heads, nq, ops.indexer.length),
          in_specs=[specs["q"], specs["kv"], specs["kv"], *mask_specs],
          out_specs=(specs["q"], specs["stat"]),
          scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32),
                          pltpu.VMEM((block_q, LANES), jnp.float32),
                          pltpu.VMEM((block_q, head_dim), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret_arg(cfg.interpret),
      name="flashjax_tpu_fwd",
  )(*ops.prefetch, pad_axis(q, 2, t_pad), pad_axis(k, 2, s_pad), pad_axis(v, 2, s_pad),
    *mask_arrays)
  return out[:, :, :q_len], lse[:, :, :q_len, 0]
