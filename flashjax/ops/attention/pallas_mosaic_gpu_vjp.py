"""Block-sparse FlashAttention backward in Pallas Mosaic GPU (Hopper: TMA + wgmma).

Two kernels, each walking BlockMask lists as the forward does (FULL slots first, EMPTY
blocks never loaded), with a producer warpgroup that TMA-loads the streamed operand into
`stages`-deep SMEM rings and one or two consumer warpgroups of 64 rows:

* dQ: one program per (query block, batch * query head) over the forward lists of a
  BlockMask with 64-key tiles. Per slot: S = Q K^T, P = exp2(S' - lse2), dP = dO V^T,
  dS = P (dP - delta), dQ += dS K (dS a register wgmma operand).
* dK / dV: one program per (kv block, batch * kv head) over the backward lists of a
  BlockMask with 64-query tiles, for each of the kv head's `group` query heads in turn (GQA
  sums in registers, K/V never repeated). Per slot: S^T = K Q^T, P^T = exp2(S'^T - lse2),
  dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
* Fused (opt-in, `dkdv_dq`, `BlockSizes(fused_backward=True)`): the dK / dV kernel also adds
  each slot's dS K into a float32 dQ accumulator by TMA reduce-add (5 tile matmuls per slot
  instead of 7); with two consumers at D = 128 they share dS^T and split dQ's columns.
  Interpret-checked and lowered for CUDA; not yet run on a GPU (docs/mosaic_gpu.md).

S' is the base-2 logit: scale * log2(e) * S, or cap * log2(e) * tanh(scale * S / cap) with a
soft cap (then dS also takes the factor 1 - tanh^2). lse2 [B * Nq, T] is the forward's
residual (+inf for rows without an allowed key, so their P is 0); delta = rowsum(dO * O).
Partial tiles are masked in-kernel exactly as in the forward (band and segment rules from
wgmma-layout iotas and TMA-staged ids, stored tiles as 0 / -inf addends, key bounds).

Only head dims <= 128 (padded): at 256, dK and dV accumulators alone would take 256
registers per thread of a 64-row warpgroup. Larger heads keep pallas_triton's backward
(pallas_mosaic_gpu.py picks). Shared memory always fits: at D = 128 with 2-stage rings the
dQ kernel (128-row query block) and the dK/dV kernel (128-key block) each take at most
~161 KiB with stored tiles and segment ids, under the 227 KiB of an SM.

With `MosaicParams.persistent` both kernels run min(items, SMs) programs looping over their work
items, longest list first (as the forward). What the forward (pallas_mosaic_gpu.py) shares
with these kernels (MosaicParams, the mask operands, keep_mask, QueryItem, the work-item loop
and grids, the warpgroup split, KernelOps, launch) is in pallas_mosaic_gpu_common.py.

Interpret mode (CPU): the Mosaic GPU interpreter has no transposed SMEM views and no
register wgmma operands, so the transposed operands (K^T, V^T; Q^T, dO^T) come from XLA
through their own rings and the register operands (dS, P^T, dS^T) go through SMEM; the
rest is the compiled code.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from flashjax.masks.block_mask import BlockMask
from flashjax.ops.attention.block_sizes import padded_head_dim
from flashjax.ops.attention.pallas_gpu_common import LOG2E, MaskLayout, pad_to, tiling
from flashjax.ops.attention.pallas_mosaic_gpu_common import (
    ROWS, KernelOps, MaskParts, MosaicParams, for_each_item, grid_and_order,
    keep_mask, launch, launch_with_refs, longest_first, mask_parts, mask_scratch, query_item,
    query_item_order, refuse_vmap, run_warpgroups, swizzled_smem)


def _probs(s, lse, config: MosaicParams, *, lse_dim: int, keep, tile):
  """P = exp2(S' - lse2) of a logits tile and the soft cap's tanh (or None).

  lse is broadcast along dimension `lse_dim` (0: per row, 1: per column).
  """
  t = None
  if config.soft_cap is None:
    s2 = s * (config.scale * LOG2E)
  else:
    t = jnp.tanh(s * (config.scale / config.soft_cap))
    s2 = t * (config.soft_cap * LOG2E)
  if tile is not None:
    s2 = s2 + tile
  if keep is not None:
    s2 = jnp.where(keep, s2, -jnp.inf)
  return jnp.exp2(s2 - lax.broadcast_in_dim(lse, s.shape, [lse_dim])), t


def _dscores(p, dp, delta, t, *, delta_dim: int):
  """dS = P (dP - delta) (times 1 - t^2 under a soft cap), f32."""
  ds = p * (dp - lax.broadcast_in_dim(delta, p.shape, [delta_dim]))
  return ds if t is None else ds * (1.0 - t * t)


def _drain(free, stages: int, total):
  """Waits for the last `stages` releases of a ring, so every barrier phase is observed."""
  @pl.loop(jnp.maximum(total - stages, 0), total)
  def _(step):
    plgpu.barrier_wait(free.at[lax.rem(step, stages)])


# ---------------------------------------------------------------------------------- dQ


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, stats_ref, *refs, layout, config: MosaicParams,
               num_heads: int, group: int, head_dim: int, consumers: int,
               present: tuple[bool, ...], num_outer: int, num_programs: int):
  """dQ of one query block (consumers x 64 rows) of one (batch, query head).

  Operands: q/do [B, T_pad, Nq, Dp], k/v [B, S_pad, Nkv, Dp] (interpret: plus K^T and V^T
  [B, Nkv, Dp, S_pad] after v), stats [B * Nq, 2, T_pad] (lse2, delta), mask parts; output
  dq [B, T_pad, Nq, Dp].
  """
  stages, bk = config.stages, layout.block_kv
  it = iter(refs)
  order_ref = next(it) if config.persistent else None
  kt_ref = vt_ref = None
  if config.interpret:
    kt_ref, vt_ref = next(it), next(it)
  parts = MaskParts(*(next(it) if p else None for p in present))
  dq_ref = next(it)
  (q_smem, do_smem, stats_smem, k_smem, v_smem, row_bars, k_bars, v_bars, free) = (
      next(it) for _ in range(9))
  seg_smem = seg_bars = meta_smem = meta_bars = tile_smem = tile_bars = None
  if layout.has_segments:
    seg_smem, seg_bars, meta_smem, meta_bars = (next(it) for _ in range(4))
  if layout.has_tiles:
    tile_smem, tile_bars = next(it), next(it)
  kt_smem = vt_smem = kt_bars = vt_bars = a_smem = None
  if config.interpret:
    kt_smem, vt_smem, kt_bars, vt_bars, a_smem = (next(it) for _ in range(5))

  wg = lax.axis_index("wg")

  def item_of(qi, bh):
    item = query_item(qi, bh, parts, layout, num_heads, group)
    kv_start = lambda slot: item.kv_start(parts, slot, bk)
    return (item.batch, item.head, item.kv_head, item.index, item.rule_batch, item.count,
            item.n_full, kv_start)

  def produce(qi, bh):
    batch, _, kv_head, index, rule_batch, count, n_full, kv_start = item_of(qi, bh)

    @pl.loop(0, count)
    def _(slot):
      buf = lax.rem(slot, stages)
      rows = pl.ds(kv_start(slot), bk)

      @pl.when(slot >= stages)
      def _():
        plgpu.barrier_wait(free.at[buf])

      plgpu.copy_gmem_to_smem(k_ref.at[batch, rows, kv_head], k_smem.at[buf], k_bars.at[buf])
      if config.interpret:
        plgpu.copy_gmem_to_smem(kt_ref.at[batch, kv_head, :, rows], kt_smem.at[buf],
                                kt_bars.at[buf])
        plgpu.copy_gmem_to_smem(vt_ref.at[batch, kv_head, :, rows], vt_smem.at[buf],
                                vt_bars.at[buf])
      else:
        plgpu.copy_gmem_to_smem(v_ref.at[batch, rows, kv_head], v_smem.at[buf],
                                v_bars.at[buf])

      @pl.when(slot >= n_full)
      def _():
        if meta_smem is not None:
          plgpu.copy_gmem_to_smem(parts.kv_meta.at[rule_batch, rows], meta_smem.at[buf],
                                  meta_bars.at[buf])
        if tile_smem is not None:
          plgpu.copy_gmem_to_smem(parts.tiles.at[parts.tile[index + (slot,)]],
                                  tile_smem.at[buf], tile_bars.at[buf])

    _drain(free, stages, count)

  def consume(qi, bh):
    batch, head, _, index, rule_batch, count, n_full, kv_start = item_of(qi, bh)
    ops = KernelOps(config.interpret, None if a_smem is None else a_smem.at[wg])
    q_start = qi * layout.block_q + wg * ROWS
    rows = pl.ds(q_start, ROWS)
    # One barrier for the consumer's row operands: Q, dO, stats (+ segment ids).
    plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[wg], row_bars.at[3 * wg])
    plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem.at[wg], row_bars.at[3 * wg + 1])
    plgpu.copy_gmem_to_smem(stats_ref.at[bh, :, rows], stats_smem.at[wg], row_bars.at[3 * wg + 2])
    q_seg = None
    if seg_smem is not None:
      plgpu.copy_gmem_to_smem(parts.q_seg.at[rule_batch, rows], seg_smem.at[wg],
                              seg_bars.at[wg])
      plgpu.barrier_wait(seg_bars.at[wg])
      q_seg = lax.broadcast_in_dim(ops.load(seg_smem.at[wg], ops.rows), (ROWS, bk), [0])
    for j in range(3):
      plgpu.barrier_wait(row_bars.at[3 * wg + j])
    lse = ops.load(stats_smem.at[wg, 0], ops.rows)
    delta = ops.load(stats_smem.at[wg, 1], ops.rows)

    def body(slot, dq, *, partial):
      buf = lax.rem(slot, stages)
      keep = tile = None
      if partial:
        kv_meta = None
        if meta_smem is not None:
          plgpu.barrier_wait(meta_bars.at[buf])
          kv_meta = lax.broadcast_in_dim(ops.load(meta_smem.at[buf], ops.cols), (ROWS, bk),
                                         [1])
        keep = keep_mask(layout, ops.iota((ROWS, bk), 0) + q_start,
                     ops.iota((ROWS, bk), 1) + kv_start(slot), q_seg, kv_meta)
        if tile_smem is not None:
          plgpu.barrier_wait(tile_bars.at[buf])
          tile = ops.load(tile_smem.at[buf, pl.ds(wg * ROWS, ROWS)], ops.tile)
          tile = tile.astype(jnp.float32)
      plgpu.barrier_wait(k_bars.at[buf])
      if ops.compiled:
        plgpu.barrier_wait(v_bars.at[buf])
      else:
        plgpu.barrier_wait(kt_bars.at[buf])
        plgpu.barrier_wait(vt_bars.at[buf])
      kt = None if kt_smem is None else kt_smem.at[buf]
      vt = None if vt_smem is None else vt_smem.at[buf]
      s = ops.mm_t(q_smem.at[wg], k_smem.at[buf], kt, (ROWS, bk))
      p, t = _probs(s, lse, config, lse_dim=0, keep=keep, tile=tile)
      dp = ops.mm_t(do_smem.at[wg], v_smem.at[buf], vt, (ROWS, bk))
      ds = _dscores(p, dp, delta, t, delta_dim=0)
      dq = ops.mma(dq, ds.astype(k_smem.dtype), k_smem.at[buf])
      plgpu.barrier_arrive(free.at[buf])
      return dq

    dq = lax.fori_loop(0, n_full, functools.partial(body, partial=False),
                       ops.zeros((ROWS, head_dim)))
    if layout.has_partial:
      dq = lax.fori_loop(n_full, count, functools.partial(body, partial=True), dq)
    q_smem.at[wg][...] = (dq * config.scale).astype(q_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[batch, rows, head])
    # The next item's Q lands in q_smem once this store has read it.
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  run_warpgroups(consumers, config.interpret, produce, consume,
                 for_each_item(order_ref, "q", num_outer, num_programs))


# ------------------------------------------------------------------------------ dK / dV


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, stats_ref, *refs, layout, config: MosaicParams,
                 num_kv_heads: int, group: int, head_dim: int, consumers: int,
                 present: tuple[bool, ...], num_outer: int, num_programs: int,
                 fused_dq: bool = False, split_dq: bool = False):
  """dK, dV of one kv block (consumers x 64 keys) of one (batch, kv head), summed over the
  kv head's `group` query heads; with `fused_dq` also every slot's dQ contribution.

  Operands as `_dq_kernel` (interpret: Q^T and dO^T [B, Nq, Dp, T_pad] after do), mask parts
  of the backward lists; outputs dk, dv [B, S_pad, Nkv, Dp]. Fused: compiled, the float32
  dQ accumulator [B, T_pad, Nq, Dp] (a zero-initialised Ref after the mask parts) takes each
  consumer's partial dS K by TMA reduce-add; interpret, each (kv block, consumer) writes its
  partials to its own slice of an extra output [nk * consumers, B, T_pad, Nq, Dp] (see
  `dkdv_dq`).
  """
  stages, bq = config.stages, layout.block_q
  it = iter(refs)
  order_ref = next(it) if config.persistent else None
  qt_ref = dot_ref = None
  if config.interpret:
    qt_ref, dot_ref = next(it), next(it)
  parts = MaskParts(*(next(it) if p else None for p in present))
  dq_acc_ref = next(it) if fused_dq and not config.interpret else None
  dk_ref, dv_ref = next(it), next(it)
  dq_parts_ref = next(it) if fused_dq and config.interpret else None
  (k_smem, v_smem, meta_smem, row_bars, q_smem, do_smem, stats_smem, q_bars, do_bars,
   stats_bars, free) = (next(it) for _ in range(11))
  seg_smem = seg_bars = tile_smem = tile_bars = None
  if layout.has_segments:
    seg_smem, seg_bars = next(it), next(it)
  if layout.has_tiles:
    tile_smem, tile_bars = next(it), next(it)
  qt_smem = dot_smem = qt_bars = dot_bars = a_smem = None
  if config.interpret:
    qt_smem, dot_smem, qt_bars, dot_bars, a_smem = (next(it) for _ in range(5))
  ds_smem = dq_smem = ds_ready = a2_smem = None
  if fused_dq:
    ds_smem, dq_smem = next(it), next(it)
    if split_dq:
      ds_ready = next(it)
      if config.interpret:
        a2_smem = next(it)

  wg = lax.axis_index("wg")
  num_heads = num_kv_heads * group
  # split_dq: K of all consumers is one [consumers * 64, Dp] block (the dQ product reads it
  # whole); else one [64, Dp] block per consumer.
  k_wg = k_smem.at[pl.ds(wg * ROWS, ROWS)] if split_dq else k_smem.at[wg]

  def item_of(kj, bh):
    batch, kv_head = lax.div(bh, num_kv_heads), lax.rem(bh, num_kv_heads)

    def list_index(j):
      head = kv_head * group + j
      return (0 if layout.batch_bcast else batch, 0 if layout.head_bcast else head, kj)

    head_count = lambda j: parts.count[list_index(j)]
    head_n_full = lambda j: (parts.n_full[list_index(j)] if layout.has_partial else
                             head_count(j))
    q_start = lambda j, slot: parts.block[list_index(j) + (slot,)] * bq
    return (batch, kv_head, 0 if layout.rule_batch_bcast else batch, list_index, head_count,
            head_n_full, q_start)

  def produce(kj, bh):
    batch, kv_head, rule_batch, list_index, head_count, head_n_full, q_start = item_of(kj, bh)

    def head_loop(j, step0):
      head = kv_head * group + j
      n_full = head_n_full(j)

      @pl.loop(0, head_count(j))
      def _(slot):
        step = step0 + slot
        buf = lax.rem(step, stages)
        rows = pl.ds(q_start(j, slot), bq)

        @pl.when(step >= stages)
        def _():
          plgpu.barrier_wait(free.at[buf])

        plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[buf], q_bars.at[buf])
        plgpu.copy_gmem_to_smem(stats_ref.at[batch * num_heads + head, :, rows],
                                stats_smem.at[buf], stats_bars.at[buf])
        plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem.at[buf],
                                do_bars.at[buf])
        if config.interpret:
          plgpu.copy_gmem_to_smem(qt_ref.at[batch, head, :, rows], qt_smem.at[buf],
                                  qt_bars.at[buf])
          plgpu.copy_gmem_to_smem(dot_ref.at[batch, head, :, rows], dot_smem.at[buf],
                                  dot_bars.at[buf])

        @pl.when(slot >= n_full)
        def _():
          if seg_smem is not None:
            plgpu.copy_gmem_to_smem(parts.q_seg.at[rule_batch, rows], seg_smem.at[buf],
                                    seg_bars.at[buf])
          if tile_smem is not None:
            plgpu.copy_gmem_to_smem(parts.tiles.at[parts.tile[list_index(j) + (slot,)]],
                                    tile_smem.at[buf], tile_bars.at[buf])

      return step0 + head_count(j)

    _drain(free, stages, lax.fori_loop(0, group, head_loop, jnp.int32(0)))

  def consume(kj, bh):
    batch, kv_head, rule_batch, _, head_count, head_n_full, q_start = item_of(kj, bh)
    ops = KernelOps(config.interpret, None if a_smem is None else a_smem.at[wg])
    kv_start = kj * layout.block_kv + wg * ROWS
    rows = pl.ds(kv_start, ROWS)
    plgpu.copy_gmem_to_smem(k_ref.at[batch, rows, kv_head], k_wg, row_bars.at[3 * wg])
    plgpu.copy_gmem_to_smem(v_ref.at[batch, rows, kv_head], v_smem.at[wg], row_bars.at[3 * wg + 1])
    kv_meta = None
    if layout.has_segments:
      plgpu.copy_gmem_to_smem(parts.kv_meta.at[rule_batch, rows], meta_smem.at[wg],
                              row_bars.at[3 * wg + 2])
      plgpu.barrier_wait(row_bars.at[3 * wg + 2])
      kv_meta = lax.broadcast_in_dim(ops.load(meta_smem.at[wg], ops.rows), (ROWS, bq), [0])
    plgpu.barrier_wait(row_bars.at[3 * wg])
    plgpu.barrier_wait(row_bars.at[3 * wg + 1])

    def head_loop(j, carry):
      dk, dv, step0 = carry

      def body(slot, carry, *, partial):
        dk, dv = carry
        step = step0 + slot
        buf = lax.rem(step, stages)
        keep = tile = None
        if partial:
          q_seg = None
          if seg_smem is not None:
            plgpu.barrier_wait(seg_bars.at[buf])
            q_seg = lax.broadcast_in_dim(ops.load(seg_smem.at[buf], ops.cols), (ROWS, bq), [1])
          keep = keep_mask(layout, ops.iota((ROWS, bq), 1) + q_start(j, slot),
                       ops.iota((ROWS, bq), 0) + kv_start, q_seg, kv_meta)
          if tile_smem is not None:
            plgpu.barrier_wait(tile_bars.at[buf])
            tile = ops.load(tile_smem.at[buf, pl.ds(wg * ROWS, ROWS)], ops.tile)
            tile = tile.astype(jnp.float32)
        plgpu.barrier_wait(q_bars.at[buf])
        plgpu.barrier_wait(stats_bars.at[buf])
        plgpu.barrier_wait(do_bars.at[buf])
        qt = dot = None
        if not ops.compiled:
          plgpu.barrier_wait(qt_bars.at[buf])
          plgpu.barrier_wait(dot_bars.at[buf])
          qt, dot = qt_smem.at[buf], dot_smem.at[buf]
        s_t = ops.mm_t(k_wg, q_smem.at[buf], qt, (ROWS, bq))
        lse = ops.load(stats_smem.at[buf, 0], ops.cols)
        delta = ops.load(stats_smem.at[buf, 1], ops.cols)
        p_t, t = _probs(s_t, lse, config, lse_dim=1, keep=keep, tile=tile)
        dv = ops.mma(dv, p_t.astype(do_smem.dtype), do_smem.at[buf])
        dp_t = ops.mm_t(v_smem.at[wg], do_smem.at[buf], dot, (ROWS, bq))
        ds_t = _dscores(p_t, dp_t, delta, t, delta_dim=1)
        ds16 = ds_t.astype(q_smem.dtype)
        dk = ops.mma(dk, ds16, q_smem.at[buf])
        plgpu.barrier_arrive(free.at[buf])
        if fused_dq:
          (emit_dq_split if split_dq else emit_dq)(ops, ds16, j, slot, step)
        return dk, dv

      n_full, count = head_n_full(j), head_count(j)
      dk, dv = lax.fori_loop(0, n_full, functools.partial(body, partial=False), (dk, dv))
      if layout.has_partial:
        dk, dv = lax.fori_loop(n_full, count, functools.partial(body, partial=True), (dk, dv))
      return dk, dv, step0 + count

    def add_partial(ops, part, dst):
      """Stages a float32 dQ partial in this consumer's SMEM, then reduce-adds it into `dst`,
      a view of the accumulator (interpret: stores it to `dst`, a view of the partials)."""
      # The previous slot's store has read dq_smem before it is overwritten.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      dq_smem.at[wg][...] = part
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dq_smem.at[wg], dst,
                              reduction_op="add" if ops.compiled else None)

    def emit_dq(ops, ds16, j, slot, step):
      """This consumer's dQ contribution to the slot's 64 query rows: dS K_wg [64, Dp]
      (unscaled, float32), staged in SMEM and reduce-added into the accumulator (interpret:
      stored to this (kv block, consumer)'s slice of the partials). `step` is unused (the
      split form's signature)."""
      head = kv_head * group + j
      rows_q = pl.ds(q_start(j, slot), bq)
      if ops.compiled:
        ds_smem.at[wg][...] = ds16
        plgpu.commit_smem()

        def run(acc_ref):
          plgpu.wgmma(acc_ref, plgpu.transpose_ref(ds_smem.at[wg], (1, 0)), k_wg)
          return acc_ref[...]

        part = pl.run_scoped(run, plgpu.ACC((bq, head_dim), jnp.float32))
      else:
        part = ops.mma(ops.zeros((bq, head_dim)), ds16.T, k_wg)
      add_partial(ops, part, dq_acc_ref.at[batch, rows_q, head] if ops.compiled else
                  dq_parts_ref.at[kj * consumers + wg, batch, rows_q, head])

    def emit_dq_split(ops, ds16, j, slot, step):
      """FlashAttention-3's split: the consumers share their dS^T tiles through SMEM, then
      each computes dQ for its 1 / consumers of the head dim over all consumers x 64 keys
      (half the reduce-add traffic of `emit_dq` with two consumers). dS^T is double-buffered
      by step parity: a consumer rewrites a buffer only after the other has passed the next
      slot's barrier, i.e. finished reading it."""
      head = kv_head * group + j
      rows_q = pl.ds(q_start(j, slot), bq)
      cols = pl.ds(wg * (head_dim // consumers), head_dim // consumers)
      ds_buf = ds_smem.at[lax.rem(step, 2)]  # [consumers * 64 keys, bq]
      ds_buf.at[pl.ds(wg * ROWS, ROWS)][...] = ds16
      plgpu.commit_smem()
      plgpu.barrier_arrive(ds_ready.at[0])
      plgpu.barrier_wait(ds_ready.at[0])
      shape = (bq, head_dim // consumers)
      if ops.compiled:
        def run(acc_ref):
          plgpu.wgmma(acc_ref, plgpu.transpose_ref(ds_buf, (1, 0)), k_smem.at[:, cols])
          return acc_ref[...]

        part = pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))
      else:
        a2_smem.at[wg][...] = ds_buf[...].T
        plgpu.commit_smem()

        def run_interpret(acc_ref):
          plgpu.wgmma(acc_ref, a2_smem.at[wg], k_smem.at[:, cols])
          return plgpu.wgmma_accumulator_load(acc_ref)

        part = pl.run_scoped(run_interpret, plgpu.ACC(shape, jnp.float32))
      add_partial(ops, part, dq_acc_ref.at[batch, rows_q, head, cols] if ops.compiled else
                  dq_parts_ref.at[kj, batch, rows_q, head, cols])

    zeros = ops.zeros((ROWS, head_dim))
    dk, dv, _ = lax.fori_loop(0, group, head_loop, (zeros, zeros, jnp.int32(0)))
    if split_dq:
      # The other consumers' last dQ products have read all of K before dK overwrites it.
      plgpu.barrier_arrive(ds_ready.at[0])
      plgpu.barrier_wait(ds_ready.at[0])
    k_wg[...] = (dk * config.scale).astype(k_smem.dtype)
    v_smem.at[wg][...] = dv.astype(v_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_wg, dk_ref.at[batch, rows, kv_head])
    plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[batch, rows, kv_head])
    # The next item's K and V land in k_smem / v_smem once these stores have read them.
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  run_warpgroups(consumers, config.interpret, produce, consume,
                 for_each_item(order_ref, "kv", num_outer, num_programs))


# ---------------------------------------------------------------------------- launchers


def _consumers(rows: int, what: str) -> int:
  if rows not in (ROWS, 2 * ROWS):
    raise ValueError(f"pallas_mosaic_gpu backward: {what}={rows} must be 64 or 128 "
                     "(one or two warpgroups of 64 rows)")
  return rows // ROWS


def _interpret_extras(config: MosaicParams, a, b, tile: int, scratch: list, consumers: int) -> list:
  """Interpret mode: the streamed operands a, b [B, L, N, Dp] transposed by XLA to
  [B, N, Dp, L] (streamed in `tile`-long pieces), with their SMEM rings and barriers and the
  SMEM staging of register A operands appended to `scratch`. Compiled: nothing."""
  if not config.interpret:
    return []
  stages, dp, dtype = config.stages, a.shape[3], a.dtype
  scratch += [swizzled_smem((stages, dp, tile), dtype), swizzled_smem((stages, dp, tile), dtype),
              plgpu.Barrier(num_arrivals=1, num_barriers=stages),
              plgpu.Barrier(num_arrivals=1, num_barriers=stages),
              swizzled_smem((consumers, ROWS, tile), dtype)]
  return [jnp.einsum("blnd->bndl", a), jnp.einsum("blnd->bndl", b)]


def dq(q, k, v, do, stats, bm: BlockMask, config: MosaicParams) -> jax.Array:
  """dQ [B, T, Nq, D] over the forward lists of `bm` (block_q 64 or 128, block_kv 64).

  Args:
    q: [B, T, Nq, D] bfloat16 / float16, D <= 128.
    k: [B, S, Nkv, D].
    v: [B, S, Nkv, D].
    do: [B, T, Nq, D] output cotangent (dtype of q).
    stats: [B * Nq, 2, T] float32: the forward's lse2 and delta = rowsum(dO * O).
    bm: BlockMask at the dQ tiling.
    config: static parameters.
  """
  (batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, group, layout, bq, bk, q_pad, kv_pad,
   dp) = tiling(q, k, bm)
  stages = config.stages
  if bk != ROWS:
    raise ValueError(f"pallas_mosaic_gpu dQ: block_kv={bk} must be {ROWS}")
  consumers = _consumers(bq, "block_q")
  parts = mask_parts(bm, layout, q.dtype, q_pad, kv_pad, backward=False)
  present = tuple(x is not None for x in parts)
  nq = q_pad // bq
  order, grid, grid_names, programs = grid_and_order(
      config, nq, batch * num_heads, lambda: query_item_order(parts.count, batch, num_heads),
      "q")
  kernel = functools.partial(_dq_kernel, layout=layout, config=config, num_heads=num_heads,
                             group=group, head_dim=dp,
                             consumers=consumers, present=present, num_outer=nq,
                             num_programs=programs)
  kernel.__name__ = "flashjax_mosaic_gpu_dq"
  dtype = q.dtype
  scratch = [
      swizzled_smem((consumers, ROWS, dp), dtype),  # Q, then dQ
      swizzled_smem((consumers, ROWS, dp), dtype),  # dO
      plgpu.SMEM((consumers, 2, ROWS), jnp.float32),
      swizzled_smem((stages, bk, dp), dtype),
      swizzled_smem((stages, bk, dp), dtype),
      plgpu.Barrier(num_arrivals=1, num_barriers=3 * consumers),
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
  ]
  scratch += mask_scratch(layout, stages=stages, streamed_len=bk, tile_shape=(bq, bk),
                          dtype=dtype, resident=(consumers, ROWS))
  kp, vp = pad_to(k, kv_pad, dp), pad_to(v, kv_pad, dp)
  extra = _interpret_extras(config, kp, vp, bk, scratch, consumers)
  out = launch(kernel, jax.ShapeDtypeStruct((batch, q_pad, num_heads, dp), dtype), scratch,
                grid, grid_names, consumers, config.interpret)(
      pad_to(q, q_pad, dp), kp, vp, pad_to(do, q_pad, dp), _pad_stats(stats, q_pad),
      *order, *extra, *(x for x in parts if x is not None))
  return out[:, :q_len, :, :head_dim]


def dkdv(q, k, v, do, stats, bm: BlockMask, config: MosaicParams) -> tuple[jax.Array, jax.Array]:
  """dK, dV [B, S, Nkv, D] over the backward lists of `bm` (block_q 64, block_kv 64 or 128);
  arguments as `dq`."""
  return _dkdv(q, k, v, do, stats, bm, config, fused_dq=False)[1:]


def dkdv_dq(q, k, v, do, stats, bm: BlockMask,
            config: MosaicParams) -> tuple[jax.Array, jax.Array, jax.Array]:
  """dQ, dK, dV in one kernel over the backward lists of `bm` (block_q 64, block_kv 64 or
  128): 5 tile matmuls per slot instead of the two kernels' 7; arguments as `dq`.

  Each consumer adds dS K of its 64 keys to the slot's 64 query rows of a float32 dQ
  accumulator: compiled, by TMA reduce-add into a zero-initialised mutable Ref passed to
  `pl.kernel` (the order of the float32 adds varies from run to run); in interpret mode (no
  TMA reduction, no Refs in the interpreter) each (kv block, consumer) stores its partials
  to its own slice of an extra output, and XLA sums the slices over the tiles the backward
  lists visited (the rest of each slice is never written).
  """
  return _dkdv(q, k, v, do, stats, bm, config, fused_dq=True)


# dkdv_dq with two consumers at padded D = 128 shares dS^T between them and splits dQ's
# columns (`uses_split_dq`); False keeps one full-width dQ partial per consumer (the A/B
# switch of experiments/fused_backward_bench.py).
SPLIT_DQ = True


# dkdv_dq pads D to at least 64: its dQ product reads K (at padded D = 32, 64-byte swizzle)
# against dS^T (64 queries: 128-byte swizzle), which Mosaic GPU refuses ("WGMMA rhs swizzle
# must match lhs swizzle" on jax 0.10.2; layout inference fails on jax 0.11.2, measured on an
# H100). Zero columns add nothing to Q K^T and are sliced off dQ, dK and dV.
FUSED_MIN_HEAD_DIM = 64


def fused_head_dim(head_dim: int) -> int:
  """The padded D that dkdv_dq runs at."""
  return max(padded_head_dim(head_dim), FUSED_MIN_HEAD_DIM)


_FUSED_VMAP_MESSAGE = (
    "pallas_mosaic_gpu: the fused backward (BlockSizes(fused_backward=True)) does not run "
    "under jax.vmap: its kernel takes mutable Refs, which have no batching rule, and looping "
    "over the mapped axis gave a wrong dQ on an H100 (jax 0.11.2). Use "
    "BlockSizes(fused_backward=False), the default two-kernel backward, which batches.")


def uses_split_dq(consumers: int, head_dim_padded: int) -> bool:
  """Whether dkdv_dq splits dQ's columns over the consumers: two of them and >= 64 columns
  each (a column slice of K must be whole 128-byte swizzle rows)."""
  return SPLIT_DQ and consumers == 2 and head_dim_padded // consumers >= 64


def fused_smem_bytes(bm: BlockMask, head_dim: int, itemsize: int) -> int:
  """Shared memory of `dkdv_dq` at the dK/dV tiles of `bm` (2-stage rings, padded head_dim;
  plus slack for barriers and alignment)."""
  layout = MaskLayout.of(bm)
  consumers, bq, dp, stages = layout.block_kv // ROWS, layout.block_q, fused_head_dim(
      head_dim), 2
  total = (2 * consumers * ROWS * dp * itemsize        # resident K, V (then dK, dV)
           + 2 * stages * bq * dp * itemsize           # Q and dO rings
           + stages * 2 * bq * 4                       # (lse2, delta) ring
           + consumers * ROWS * bq * itemsize          # dS^T (split: twice, double-buffered)
           * (2 if uses_split_dq(consumers, dp) else 1)
           + consumers * bq * dp * 4                   # float32 dQ partial (split: half)
           // (consumers if uses_split_dq(consumers, dp) else 1))
  if layout.has_segments:
    total += consumers * ROWS * 4 + stages * bq * 4
  if layout.has_tiles:
    total += stages * layout.block_kv * bq * itemsize
  return total + 4096


def _visited(bm: BlockMask, batch: int, num_heads: int) -> jax.Array:
  """bool [nk, B, nq, Nq]: which 64-row query tiles the backward list of each kv block
  holds, per batch row and query head."""
  count, block = bm.bwd_count, bm.bwd_block  # [Bm, Nm, nk], [Bm, Nm, nk, L]
  nq = bm.num_q_blocks
  slots = jnp.arange(block.shape[-1]) < count[..., None]
  hit = jax.nn.one_hot(jnp.where(slots, block, nq), nq + 1, dtype=jnp.int32)[..., :nq]
  visited = hit.sum(axis=-2) > 0  # [Bm, Nm, nk, nq]
  visited = jnp.broadcast_to(visited, (batch, num_heads) + visited.shape[2:])
  return visited.transpose(2, 0, 3, 1)


def _dkdv(q, k, v, do, stats, bm: BlockMask, config: MosaicParams, *, fused_dq: bool):
  """dkdv / dkdv_dq: (dq or None, dk, dv)."""
  (batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, group, layout, bq, bk, q_pad, kv_pad,
   dp) = tiling(q, k, bm)
  stages = config.stages
  if fused_dq:
    dp = fused_head_dim(head_dim)
  if bq != ROWS:
    raise ValueError(f"pallas_mosaic_gpu dK/dV: block_q={bq} must be {ROWS}")
  consumers = _consumers(bk, "block_kv")
  parts = mask_parts(bm, layout, q.dtype, q_pad, kv_pad, backward=True)
  present = tuple(x is not None for x in parts)
  nk = kv_pad // bk

  def lengths():  # an item's slots: its kv head's group of query heads together
    counts = jnp.broadcast_to(parts.count, (batch, num_heads, nk))
    return counts.reshape(batch * num_kv_heads, group, nk).sum(axis=1).reshape(-1)

  order, grid, grid_names, programs = grid_and_order(
      config, nk, batch * num_kv_heads, lambda: longest_first(lengths()), "kv")
  split = fused_dq and uses_split_dq(consumers, dp)
  kernel = functools.partial(_dkdv_kernel, layout=layout, config=config,
                             num_kv_heads=num_kv_heads, group=group, head_dim=dp,
                             consumers=consumers, present=present, num_outer=nk,
                             num_programs=programs, fused_dq=fused_dq, split_dq=split)
  kernel.__name__ = "flashjax_mosaic_gpu_dkdv_dq" if fused_dq else "flashjax_mosaic_gpu_dkdv"
  dtype = q.dtype
  scratch = [
      # K, then dK (split: one [consumers * 64, Dp] block, as the dQ product reads it)
      swizzled_smem((consumers * ROWS, dp) if split else (consumers, ROWS, dp), dtype),
      swizzled_smem((consumers, ROWS, dp), dtype),  # V, then dV
      plgpu.SMEM((consumers, ROWS), jnp.int32),     # kv segment ids / prefix flags
      plgpu.Barrier(num_arrivals=1, num_barriers=3 * consumers),
      swizzled_smem((stages, bq, dp), dtype),
      swizzled_smem((stages, bq, dp), dtype),
      plgpu.SMEM((stages, 2, bq), jnp.float32),
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
  ]
  # The resident K/V block's segment ids share the main scratch (kv segment ids slot).
  scratch += mask_scratch(layout, stages=stages, streamed_len=bq, tile_shape=(bk, bq),
                          dtype=dtype)
  qp, dop = pad_to(q, q_pad, dp), pad_to(do, q_pad, dp)
  extra = _interpret_extras(config, qp, dop, bq, scratch, consumers)
  if split:
    scratch += [swizzled_smem((2, consumers * ROWS, bq), dtype),                # dS^T x 2
                swizzled_smem((consumers, bq, dp // consumers), jnp.float32),  # dQ partial
                plgpu.Barrier(num_arrivals=consumers, num_barriers=1)]          # dS^T ready
    if config.interpret:
      scratch += [swizzled_smem((consumers, bq, consumers * ROWS), dtype)]     # dS staging
  elif fused_dq:
    scratch += [swizzled_smem((consumers, ROWS, bq), dtype),         # dS^T
                swizzled_smem((consumers, bq, dp), jnp.float32)]     # dQ partial
  out = jax.ShapeDtypeStruct((batch, kv_pad, num_kv_heads, dp), dtype)
  operands = (qp, pad_to(k, kv_pad, dp), pad_to(v, kv_pad, dp), dop, _pad_stats(stats, q_pad),
              *order, *extra, *(x for x in parts if x is not None))
  dq = None
  if not fused_dq:
    dk, dv = launch(kernel, [out, out], scratch, grid, grid_names, consumers,
                    config.interpret)(*operands)
  elif config.interpret:
    slices = nk if split else nk * consumers  # split: the consumers fill one slice's columns
    parts_type = jax.ShapeDtypeStruct((slices, batch, q_pad, num_heads, dp), jnp.float32)
    dk, dv, dq_parts = launch(kernel, [out, out, parts_type], scratch, grid, grid_names,
                              consumers, config.interpret)(*operands)
    # Slices hold partials only at the query tiles their kv block's lists visit (NaN,
    # never written, elsewhere).
    visited = jnp.repeat(_visited(bm, batch, num_heads), slices // nk, axis=0)
    dq_parts = dq_parts.reshape(slices, batch, q_pad // bq, bq, num_heads, dp)
    dq = jnp.where(visited[:, :, :, None, :, None], dq_parts, 0.0).sum(axis=0)
    dq = dq.reshape(batch, q_pad, num_heads, dp)
  else:
    def run(*operands):
      # dQ (zeroed: the kernel reduce-adds into it), dK and dV as Refs of one run_state.
      def body(refs):
        launch_with_refs(kernel, [], scratch, grid, grid_names, consumers)(*operands, *refs)

      return pl.run_state(body)((jnp.zeros((batch, q_pad, num_heads, dp), jnp.float32),
                                 jnp.zeros(out.shape, dtype), jnp.zeros(out.shape, dtype)))

    dq, dk, dv = refuse_vmap(run, _FUSED_VMAP_MESSAGE)(*operands)
  if dq is not None:
    dq = (dq[:, :q_len, :, :head_dim] * config.scale).astype(dtype)
  return dq, dk[:, :kv_len, :, :head_dim], dv[:, :kv_len, :, :head_dim]


def _pad_stats(stats: jax.Array, length: int) -> jax.Array:
  """Pads [B * Nq, 2, T] to T = length: lse2 with +inf (P = 0), delta with 0."""
  pad = length - stats.shape[2]
  if pad == 0:
    return stats
  fill = jnp.broadcast_to(jnp.array([jnp.inf, 0.0], jnp.float32)[None, :, None],
                          (stats.shape[0], 2, pad))
  return jnp.concatenate([stats, fill], axis=2)


def backward(q, k, v, out, lse, do, dq_mask: BlockMask, dkdv_mask: BlockMask,
             config: MosaicParams, *, fused: bool = False
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """dQ, dK, dV of block-sparse attention from the forward's residuals.

  Args:
    q: [B, T, Nq, D] bfloat16 / float16, D <= 128.
    k: [B, S, Nkv, D].
    v: [B, S, Nkv, D].
    out: [B, T, Nq, D] forward output.
    lse: [B * Nq, T] float32 base-2 logsumexp of the forward (+inf for empty rows).
    do: [B, T, Nq, D] output cotangent.
    dq_mask: BlockMask with block_kv 64 (its forward lists drive dQ).
    dkdv_mask: BlockMask with block_q 64 (its backward lists drive dK / dV).
    config: static parameters.
    fused: one kernel for dQ, dK and dV (`dkdv_dq`, over dkdv_mask's lists; dq_mask unused)
      instead of the dQ and dK/dV kernels.

  Returns:
    dq, dk, dv in the dtypes of q, k, v.
  """
  batch, q_len, num_heads, _ = q.shape
  # delta = rowsum(dO * O) [B * Nq, T], elementwise in f32.
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  delta = delta.transpose(0, 2, 1).reshape(batch * num_heads, q_len)
  stats = jnp.stack([lse, delta], axis=1)
  do = do.astype(q.dtype)
  if fused:
    return dkdv_dq(q, k, v, do, stats, dkdv_mask, config)
  dk, dv = dkdv(q, k, v, do, stats, dkdv_mask, config)
  return dq(q, k, v, do, stats, dq_mask, config), dk, dv
