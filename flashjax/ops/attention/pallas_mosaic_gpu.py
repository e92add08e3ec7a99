"""Block-sparse FlashAttention in Pallas Mosaic GPU (Hopper: TMA + wgmma, ping-pong): forward.

Status: validated on an H200 and an H100 (jax 0.11.2; the whole compiled test file passed
on the H100 on 2026-12-07) against the float32 reference for dense, causal, GQA, document /
prefix-LM segments, sliding window, stored-tile (tree) masks, soft cap, D = 64 / 80 / 128 /
256, odd lengths and zero rows; `implementation=None` picks it first on
Hopper (compute capability 9.x). Numbers: docs/performance.md; notes: docs/mosaic_gpu.md.

Design (docs/architecture.md ideas 1 and 2; the BlockMask lists pallas_triton consumes):

* One program per (BlockMask query block, batch * query head), three warpgroups when
  block_q = 128 (FlashAttention-3 structure): two consumers of 64 query rows each and one
  producer. The producer walks the block's compacted kv list (FULL slots first) and TMA-loads
  K and V tiles into `num_stages`-deep SMEM rings, plus, for PARTIAL slots, the keys'
  segment ids and the stored mask tile; it refills a ring slot when both consumers have
  released it. block_q = 64 runs one consumer.
* Persistent grid (`BlockSizes.persistent=True`; None and False keep the grid above): G =
  min(work items, SMs) programs; the work items (query block, batch, head) are sorted in
  XLA by kv list length, longest first (ties in item order), and program p runs items
  p, p + G, ... of that order, so skewed masks (causal, documents) spread over the SMs.
  Producer and consumers walk the same items with the same per-item code as the grid
  above; the producer's end-of-list drain and the consumers' one wait per TMA keep every
  barrier's phases in step from item to item, and Q SMEM is refilled only after the
  previous item's output store has read it. The backward kernels take the same flag.
* Consumers: S = Q K^T by wgmma from SMEM (K read through a transposed view), online
  softmax in f32 base 2 (scale folded into the exponent), O += P V by wgmma with P in
  registers. FULL slots run a loop without mask code; PARTIAL slots AND the band (causal,
  window), segment ids and prefix flags (iotas in the wgmma register layout), add the stored
  tile (0 / -inf), and bound the keys. A schedule barrier makes the two consumers alternate,
  so one's softmax overlaps the other's matmuls.
* Residual lse2 = max + log2(sum) per row, [B * Nq, T], +inf for rows with no allowed key
  (output 0). The `custom_vjp` backward (`_backward_plan`) runs the Mosaic GPU dQ and dK/dV
  kernels of pallas_mosaic_gpu_vjp.py (D <= 128, dQ at block_q x 64 and dK/dV at 64 x 128
  tiles by default); for D > 128, dK/dV tiles it cannot take, or a caller's BlockMask other
  than 64 x 64, it runs pallas_triton's dQ and dK/dV kernels (same lse2 convention) on
  BlockMasks at Triton's tiles.
* GQA: query head h reads kv head h // (Nq // Nkv); K/V are never repeated in memory.
* bfloat16 / float16 only (wgmma has no f32 x f32 form: float32 raises NotImplementedError so
  dispatch moves on); no bias; D <= 256, padded to a power of two.

Interpret mode (`interpret=True`) runs the same kernel under Mosaic GPU's own interpreter
(`InterpretGPUParams`, jax-private), which simulates SMEM, TMA, barriers, wgmma and the
three warpgroups, but not register layouts, transposed SMEM views, register wgmma operands
or `run_state`. There K^T comes pre-transposed from XLA, P goes through SMEM and the P V
product is added to the accumulator; everything else (lists, rings, barriers, masks,
ping-pong) is the compiled code. docs/mosaic_gpu.md lists the interpreter's limits.

Block sizes: block_q 64 or 128, block_kv >= 64; default: the measured entry of the tuning
store for this device and shape class (flashjax/ops/attention/tuned/, docs/autotune.md),
else 128 x 128 (D > 128: 128 x 64), halved in block_kv when stored mask tiles would not fit
the 227 KiB of SMEM; num_stages is the ring depth (default 2).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from flashjax.masks.block_mask import BlockMask
from flashjax.ops.attention import base
from flashjax.ops.attention import pallas_gpu_common as gpu_common
from flashjax.ops.attention import pallas_mosaic_gpu_common as mosaic_common
from flashjax.ops.attention import pallas_mosaic_gpu_vjp
from flashjax.ops.attention import pallas_triton
from flashjax.ops.attention.block_sizes import BlockSizes, padded_head_dim
from flashjax.ops.attention.pallas_gpu_common import (LOG2E, MAX_HEAD_DIM, MaskLayout,
                                                      TritonParams, pad_to)
from flashjax.ops.attention.pallas_mosaic_gpu_common import ROWS, SMEM_LIMIT, MosaicParams
from flashjax.ops.attention.tuning import store as tuning_store
from flashjax.ops.tiling import pow2_ceil

_DTYPES = (jnp.bfloat16, jnp.float16)  # wgmma takes 16-bit operands only
_WGMMA_M = ROWS
# Experimental, off: the forward's intra-warpgroup overlap of softmax and the next products
# (`overlapped` in the kernel), for padded D <= 128. Correct on an H100 but 13-21% slower
# there on the persistent grid (docs/mosaic_gpu.md, docs/performance.md "v5").
INTRA_WG_OVERLAP = False
_MIN_BLOCK_KV = 64


def default_block_sizes(head_dim: int, q_len: int, kv_len: int, *,
                        interpret: bool = False, full_mask: bool = False,
                        causal_only: bool = False) -> BlockSizes:
  """128 x 128 tiles (two consumer warpgroups of 64 rows), 128 x 64 for D > 128; with a full
  or plain causal mask, the tuning studies' picks.

  The dense picks (`full_mask`: no mask, not causal, no segment ids): padded D = 128 runs
  the persistent grid (won every dense D = 128 shape of the H200 and H100 tuning tables,
  5-57% faster than the best per-item tiles); D <= 64 keeps the per-item grid with a 3-deep
  K/V ring (the D = 64 dense winner on the H200). Plain causal calls (`causal_only`:
  is_causal with no mask and no segment ids) at padded D = 128 run the persistent grid too
  (on the H100 12% faster at T = 4k and 22% at T = 16k than the best per-item tiles, on the
  H200 3.5% at T = 16k; the H200's T = 4k row is within its noise, 2% slower). Other masked
  calls keep the per-item grid and 2 stages (the document shapes' winners differ between the
  cards by less than the run-to-run spread).

  Args:
    head_dim: D; above 128 the K/V ring slots halve to fit SMEM.
    q_len: T (unused: block_q stays 128, two warpgroups' wgmma M).
    kv_len: S; block_kv shrinks to it (not below 64).
    interpret: True for interpret mode (CPU tests): 64 x 64 tiles, one consumer.
    full_mask: every (query, key) pair is allowed (the dense picks above).
    causal_only: the mask is is_causal alone (the causal pick above).

  Returns:
    BlockSizes of the forward only: the Mosaic GPU backward picks its own tiles (dQ 128 x 64,
    dK/dV 64 x 128) and pallas_triton's, where it runs the backward, are Triton's defaults,
    unless a caller's BlockSizes names *_bwd tiles.
  """
  del q_len
  if interpret:
    return BlockSizes(_WGMMA_M, _MIN_BLOCK_KV)
  dp = padded_head_dim(head_dim)
  block_kv = 128 if dp <= 128 else 64
  block_kv = max(_MIN_BLOCK_KV, min(block_kv, pow2_ceil(kv_len)))
  sizes = BlockSizes(2 * _WGMMA_M, block_kv)
  if (full_mask or causal_only) and dp == 128:
    return dataclasses.replace(sizes, num_stages=2, persistent=True)
  if full_mask and dp <= 64:
    return dataclasses.replace(sizes, num_stages=3)
  return sizes


def search_space(head_dim: int) -> list[BlockSizes]:
  """Candidate forward tiles for the block-size search (flashjax.ops.attention.tuning.search).

  block_q {64, 128} x block_kv {64, 128} x num_stages {2, 3} x persistent {False, True}: 16
  candidates; block_kv 64 only when the padded D > 128 (a 128-key ring slot of D = 256
  overflows shared memory): 8. Other shared-memory overflows are left to
  `dot_product_attention` (ValueError, skipped by the search).

  Args:
    head_dim: D.

  Returns:
    The candidate BlockSizes, in search order.
  """
  kvs = (64, 128) if padded_head_dim(head_dim) <= 128 else (64,)
  return [BlockSizes(block_q=q, block_kv=kv, num_stages=s, persistent=p)
          for q, kv, s, p in itertools.product((64, 128), kvs, (2, 3), (False, True))]


def _check_tiling(sizes: BlockSizes | None, block_q: int, block_kv: int) -> None:
  """block_q: one or two consumer warpgroups of 64 rows (wgmma M); block_kv >= 64."""
  if block_q not in (_WGMMA_M, 2 * _WGMMA_M):
    raise ValueError(f"pallas_mosaic_gpu: {block_q=} must be 64 or 128 (one or two "
                     f"warpgroups of 64 rows); {block_kv=}")
  if block_kv < _MIN_BLOCK_KV:
    raise ValueError(f"pallas_mosaic_gpu: {block_kv=} must be >= {_MIN_BLOCK_KV}; {block_q=}")
  stages = None if sizes is None else sizes.num_stages
  if stages is not None and stages < 2:
    raise ValueError(f"pallas_mosaic_gpu: num_stages={stages} must be >= 2 (K/V ring depth)")


def _smem_bytes(layout: MaskLayout, head_dim_padded: int, stages: int, itemsize: int) -> int:
  """Shared memory the forward kernel allocates (plus slack for barriers and alignment)."""
  bq, bk, dp = layout.block_q, layout.block_kv, head_dim_padded
  total = bq * dp * itemsize + 2 * stages * bk * dp * itemsize + bq * 4
  if layout.has_segments:
    total += bq * 4 + stages * bk * 4
  if layout.has_tiles:
    total += stages * bq * bk * itemsize
  return total + 4096


def _forward_kernel(q_ref, k_ref, v_ref, *refs, layout, config: MosaicParams, num_heads: int,
                    group: int, head_dim: int, consumers: int, stages: int,
                    present: tuple[bool, ...], num_q_blocks: int, num_programs: int):
  """BlockMask query blocks of (batch, query head) pairs: one per program, or, persistent,
  a strided share of the sorted work items per program.

  Warpgroups 0 .. consumers-1 each own 64 query rows of the block; warpgroup `consumers` is
  the producer: it walks the block's kv list and TMA-loads K and V tiles (and, for PARTIAL
  slots, the kv segment ids / stored mask tile) into `stages`-deep SMEM rings. A ring slot is
  refilled once every consumer has arrived on its "free" barrier. With two consumers a
  schedule barrier makes them alternate (FlashAttention-3 ping-pong): one runs softmax while
  the other's matmuls use the tensor cores. Producer and consumers run the same per-item
  code on the same item sequence; every barrier completes and is awaited equally often per
  item, so the phases carry over from one item to the next.
  """
  compiled = not config.interpret
  it = iter(refs)
  order_ref = next(it) if config.persistent else None
  parts = mosaic_common.MaskParts(*(next(it) if p else None for p in present))
  o_ref, lse_ref = next(it), next(it)
  (qo_smem, k_smem, v_smem, lse_smem, q_bars, k_bars, v_bars, k_free, v_free) = (
      next(it) for _ in range(9))
  schedule = next(it) if consumers == 2 else None
  qseg_smem = qseg_bars = meta_smem = meta_bars = tile_smem = tile_bars = None
  if layout.has_segments:
    qseg_smem, qseg_bars, meta_smem, meta_bars = (next(it) for _ in range(4))
  if layout.has_tiles:
    tile_smem, tile_bars = next(it), next(it)
  p_smem = None if compiled else next(it)

  wg = lax.axis_index("wg")
  bk = layout.block_kv
  # Register layouts, iotas and loads: plain jnp under the interpreter.
  ops = mosaic_common.KernelOps(config.interpret)
  wgmma_layout, row_layout, col_layout = ops.tile, ops.rows, ops.cols

  def kv_start(item, slot):
    return item.kv_start(parts, slot, bk)

  def ping_pong():
    if schedule is not None:
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(schedule)

  def produce(item: mosaic_common.QueryItem):
    """TMA-loads the item's kv list into the rings, then awaits the ring's last releases."""
    @pl.loop(0, item.count)
    def _(slot):
      buf = lax.rem(slot, stages)
      rows = pl.ds(kv_start(item, slot), bk)

      @pl.when(slot >= stages)
      def _():
        plgpu.barrier_wait(k_free.at[buf])

      k_tile = (k_ref.at[item.batch, rows, item.kv_head] if compiled else
                k_ref.at[item.batch, item.kv_head, :, rows])  # interpret: K^T [B, Nkv, Dp, S]
      plgpu.copy_gmem_to_smem(k_tile, k_smem.at[buf], k_bars.at[buf])

      @pl.when(slot >= item.n_full)
      def _():
        if meta_smem is not None:
          plgpu.copy_gmem_to_smem(parts.kv_meta.at[item.rule_batch, rows], meta_smem.at[buf],
                                  meta_bars.at[buf])
        if tile_smem is not None:
          plgpu.copy_gmem_to_smem(parts.tiles.at[parts.tile[item.index + (slot,)]],
                                  tile_smem.at[buf], tile_bars.at[buf])

      @pl.when(slot >= stages)
      def _():
        plgpu.barrier_wait(v_free.at[buf])

      plgpu.copy_gmem_to_smem(v_ref.at[item.batch, rows, item.kv_head], v_smem.at[buf],
                              v_bars.at[buf])

    # Observe the ring's last releases too, so every phase of the free barriers is awaited
    # once (the interpreter checks this) and the next item starts on an empty ring.
    @pl.loop(jnp.maximum(item.count - stages, 0), item.count)
    def _(slot):
      buf = lax.rem(slot, stages)
      plgpu.barrier_wait(k_free.at[buf])
      plgpu.barrier_wait(v_free.at[buf])

  def consume(item: mosaic_common.QueryItem):
    """Attends the item's 64 query rows of this warpgroup and stores output and lse2."""
    count, n_full = item.count, item.n_full
    q_start = item.qi * layout.block_q + wg * _WGMMA_M
    q_smem = qo_smem.at[wg]
    # The previous item's output store has left q_smem (read-only wait at its end).
    plgpu.copy_gmem_to_smem(q_ref.at[item.batch, pl.ds(q_start, _WGMMA_M), item.head], q_smem,
                            q_bars.at[wg])
    q_seg = None
    if qseg_smem is not None:
      plgpu.copy_gmem_to_smem(parts.q_seg.at[item.rule_batch, pl.ds(q_start, _WGMMA_M)],
                              qseg_smem.at[wg], qseg_bars.at[wg])
      plgpu.barrier_wait(qseg_bars.at[wg])
      q_seg = ops.load(qseg_smem.at[wg], row_layout)
    plgpu.barrier_wait(q_bars.at[wg])

    def keep_mask(slot, buf):
      """Allowed [64, bk] for a PARTIAL slot: rule AND stored tile AND key bounds; returns
      (bool mask or None, additive tile or None)."""
      shape = (_WGMMA_M, bk)
      q_ids = kv_meta = None
      if meta_smem is not None:
        plgpu.barrier_wait(meta_bars.at[buf])
        kv_meta = lax.broadcast_in_dim(ops.load(meta_smem.at[buf], col_layout), shape, [1])
        q_ids = lax.broadcast_in_dim(q_seg, shape, [0])
      keep = mosaic_common.keep_mask(layout, ops.iota(shape, 0) + q_start,
                                  ops.iota(shape, 1) + kv_start(item, slot), q_ids, kv_meta)
      tile = None
      if tile_smem is not None:
        plgpu.barrier_wait(tile_bars.at[buf])
        tile = ops.load(tile_smem.at[buf, pl.ds(wg * _WGMMA_M, _WGMMA_M)], wgmma_layout)
        tile = tile.astype(jnp.float32)
      return keep, tile

    # Logits in base 2: exp(x) = exp2(x * log2(e)). Without a soft cap the scale is folded
    # into the row max and the exponent (one FMA per element); with one, the tanh transform
    # already yields base-2 logits.
    logit_scale = config.scale * LOG2E if config.soft_cap is None else 1.0

    def k_transposed(buf):
      return plgpu.transpose_ref(k_smem.at[buf], (1, 0)) if compiled else k_smem.at[buf]

    def qk(buf):
      """S = Q K^T of ring slot `buf` (ping-pong between issue and read)."""
      def run(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_transposed(buf))
        ping_pong()
        return acc_ref[...]

      return pl.run_scoped(run, plgpu.ACC((_WGMMA_M, bk), jnp.float32))

    def online_softmax(s, row_max, keep, tile, partial):
      """Masks S of a slot (soft cap, stored tile `tile`, allowed `keep`; both None for a
      FULL slot) and returns (P, alpha, new row max): P = exp2 of the logits against the new
      max, alpha rescales the old state."""
      if config.soft_cap is not None:
        s = jnp.tanh(s * (config.scale / config.soft_cap)) * (config.soft_cap * LOG2E)
      if tile is not None:
        s = s + tile
      if keep is not None:
        s = jnp.where(keep, s, -jnp.inf)
      new_max = jnp.maximum(row_max, s.max(axis=1) * logit_scale)
      shift = new_max
      if partial:
        # A row with no allowed key yet has max -inf: shift by 0 so exp2(-inf - 0) = 0.
        shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
      alpha = jnp.exp2(row_max - shift)
      p = jnp.exp2(s * logit_scale - lax.broadcast_in_dim(shift, s.shape, [0]))
      return p, alpha, new_max

    def pv_into(acc, p16, buf, during=None):
      """acc + P V of ring slot `buf`, `during()` issued while the product runs. Compiled, P
      comes from registers; the interpreter takes neither a register wgmma operand nor
      run_state: P goes through SMEM and the product is added to the accumulator."""
      if compiled:
        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[buf])
          if during is not None:
            during()

        return pl.run_state(pv)(plgpu.ACC.init(acc))
      p_smem.at[wg][...] = p16
      plgpu.commit_smem()

      def pv_interpret(acc_ref):
        plgpu.wgmma(acc_ref, p_smem.at[wg], v_smem.at[buf])
        if during is not None:
          during()
        return plgpu.wgmma_accumulator_load(acc_ref)

      return acc + pl.run_scoped(pv_interpret, plgpu.ACC((_WGMMA_M, head_dim), jnp.float32))

    def body(slot, carry, *, partial):
      acc, row_max, row_sum = carry
      buf = lax.rem(slot, stages)
      keep, tile = keep_mask(slot, buf) if partial else (None, None)
      s = qk(buf)
      plgpu.barrier_arrive(k_free.at[buf])
      p, alpha, new_max = online_softmax(s, row_max, keep, tile, partial)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      row_sum = row_sum * alpha + p.sum(axis=1)
      p16 = p.astype(v_ref.dtype)
      if head_dim <= 128:
        # Keeps the compiler from sinking the softmax tail past the barriers below.
        acc, row_sum, new_max, p16 = lax.optimization_barrier((acc, row_sum, new_max, p16))
      if schedule is not None:
        plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(v_bars.at[buf])
      if schedule is not None:
        plgpu.barrier_wait(schedule)

      def wait_next_k():
        # While P @ V runs: wait for the next slot's K tile (the wait of slot 0 precedes
        # the loops, so every slot's K is awaited exactly once, across both loops).
        @pl.when(slot + 1 < count)
        def _():
          plgpu.barrier_wait(k_bars.at[lax.rem(slot + 1, stages)])

      acc = pv_into(acc, p16, buf, during=wait_next_k)
      plgpu.barrier_arrive(v_free.at[buf])
      return acc, new_max, row_sum

    init = (ops.zeros((_WGMMA_M, head_dim)),
            ops.cast(jnp.full((_WGMMA_M,), -jnp.inf, jnp.float32), row_layout),
            ops.cast(jnp.zeros((_WGMMA_M,), jnp.float32), row_layout))

    def overlapped(carry):
      """Intra-warpgroup overlap (FlashAttention-3), for an item with count > 0: step j
      issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back and runs the softmax of
      S_j while the P V product is in flight; O is rescaled once it has landed. Every K and
      V slot is awaited and released once, as in `body`; one ping-pong per step."""
      acc, row_max, row_sum = carry
      plgpu.barrier_wait(k_bars.at[0])

      def first(partial):
        keep, tile = keep_mask(0, 0) if partial else (None, None)
        s = qk(0)
        plgpu.barrier_arrive(k_free.at[0])
        p, alpha, new_max = online_softmax(s, row_max, keep, tile, partial)
        return p.astype(v_ref.dtype), new_max, row_sum * alpha + p.sum(axis=1)

      if layout.has_partial:
        p16, row_max, row_sum = lax.cond(n_full > 0, lambda: first(False),
                                         lambda: first(True))
      else:
        p16, row_max, row_sum = first(False)

      def step(slot, carry, *, partial):
        acc, p16, row_max, row_sum = carry
        buf, prev = lax.rem(slot, stages), lax.rem(slot - 1, stages)
        keep, tile = keep_mask(slot, buf) if partial else (None, None)
        plgpu.barrier_wait(k_bars.at[buf])
        plgpu.barrier_wait(v_bars.at[prev])
        if compiled:
          def products_and_softmax(refs):
            s_ref, o_ref, p_ref, alpha_ref, max_ref, sum_ref = refs
            plgpu.wgmma(s_ref, q_smem, k_transposed(buf))  # S_j (onto zeros)
            plgpu.wgmma(o_ref, p16, v_smem.at[prev])  # O += P_{j-1} V_{j-1}
            ping_pong()
            s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # S_j; P V still running
            plgpu.barrier_arrive(k_free.at[buf])
            p, alpha, new_max = online_softmax(s, row_max, keep, tile, partial)
            p_ref[...] = p.astype(v_ref.dtype)
            alpha_ref[...] = alpha
            max_ref[...] = new_max
            sum_ref[...] = row_sum * alpha + p.sum(axis=1)

          # Initial values: S zeros; O; then P, alpha, max, sum (row_max only gives alpha
          # its shape and layout: the body overwrites every one of them).
          _, acc, p16, alpha, row_max, row_sum = pl.run_state(products_and_softmax)(
              (plgpu.ACC.init(ops.zeros((_WGMMA_M, bk))), plgpu.ACC.init(acc), p16, row_max,
               row_max, row_sum))
        else:  # the interpreter runs each product at once: same barriers, same math
          s = qk(buf)
          plgpu.barrier_arrive(k_free.at[buf])
          acc = pv_into(acc, p16, prev)
          p, alpha, row_max = online_softmax(s, row_max, keep, tile, partial)
          p16, row_sum = p.astype(v_ref.dtype), row_sum * alpha + p.sum(axis=1)
        plgpu.barrier_arrive(v_free.at[prev])
        return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), p16, row_max, row_sum

      carry = (acc, p16, row_max, row_sum)
      carry = lax.fori_loop(1, n_full, functools.partial(step, partial=False), carry)
      if layout.has_partial:
        carry = lax.fori_loop(jnp.maximum(n_full, 1), count,
                              functools.partial(step, partial=True), carry)
      acc, p16, row_max, row_sum = carry
      last = lax.rem(count - 1, stages)
      plgpu.barrier_wait(v_bars.at[last])
      acc = pv_into(acc, p16, last)
      plgpu.barrier_arrive(v_free.at[last])
      return acc, row_max, row_sum

    if config.overlap:
      if schedule is not None:
        pl.when(wg == 1)(ping_pong)
      carry = lax.cond(count > 0, overlapped, lambda c: c, init)
    else:
      @pl.when(count > 0)
      def _():
        plgpu.barrier_wait(k_bars.at[0])

      if schedule is not None:
        pl.when(wg == 1)(ping_pong)
      carry = lax.fori_loop(0, n_full, functools.partial(body, partial=False), init)
      if layout.has_partial:
        carry = lax.fori_loop(n_full, count, functools.partial(body, partial=True), carry)
    if schedule is not None:
      pl.when(wg == 0)(ping_pong)
    acc, row_max, row_sum = carry
    empty = row_sum == 0.0
    safe_sum = jnp.where(empty, 1.0, row_sum)
    q_smem[...] = (acc / lax.broadcast_in_dim(safe_sum, acc.shape, [0])).astype(q_smem.dtype)
    lse_smem.at[wg][...] = jnp.where(empty, jnp.inf, row_max + jnp.log2(safe_sum))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[item.batch, pl.ds(q_start, _WGMMA_M), item.head])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[item.bh, pl.ds(q_start, _WGMMA_M)])
    # q_smem and lse_smem are rewritten by the next item once the stores have read them.
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  def per_item(fn):
    return lambda qi, bh: fn(mosaic_common.query_item(qi, bh, parts, layout, num_heads, group))

  mosaic_common.run_warpgroups(
      consumers, config.interpret, per_item(produce), per_item(consume),
      mosaic_common.for_each_item(order_ref, "q", num_q_blocks, num_programs))


def _forward(q, k, v, bm: BlockMask, config: MosaicParams):
  """Forward pass.

  Args:
    q: [B, T, Nq, D] bfloat16 or float16.
    k: [B, S, Nkv, D].
    v: [B, S, Nkv, D].
    bm: BlockMask of logical shape (Bm, Nm, T, S); block_q in {64, 128}.
    config: static kernel parameters (stages: depth of the K/V SMEM rings; persistent: grid
      of min(work items, SMs) programs looping over the items, longest kv list first).

  Returns:
    out [B, T, Nq, D] (dtype of q) and lse2 [B * Nq, T] float32 (base-2 logsumexp of the
    scaled logits, +inf for rows without an allowed key): pallas_triton's residual layout.
  """
  (batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, group, layout, bq, bk, q_pad, kv_pad,
   dp) = gpu_common.tiling(q, k, bm)
  stages, consumers = config.stages, bq // _WGMMA_M
  nq, nk = q_pad // bq, kv_pad // bk
  parts = mosaic_common.mask_parts(bm, layout, q.dtype, q_pad, kv_pad, backward=False)
  present = tuple(x is not None for x in parts)
  # Persistent: work items (query block, batch, head) longest list first; program p runs
  # items p, p + G, p + 2G, ... of that order.
  order, grid, grid_names, programs = mosaic_common.grid_and_order(
      config, nq, batch * num_heads,
      lambda: mosaic_common.query_item_order(parts.count, batch, num_heads), "q")
  operands = order + [x for x in parts if x is not None]
  kernel = functools.partial(_forward_kernel, layout=layout, config=config,
                             num_heads=num_heads, group=num_heads // num_kv_heads,
                             head_dim=dp, consumers=consumers, stages=stages,
                             present=present, num_q_blocks=nq, num_programs=programs)
  kernel.__name__ = "flashjax_mosaic_gpu_fwd"  # plgpu.kernel names the kernel after its body
  scratch = [
      mosaic_common.swizzled_smem((consumers, _WGMMA_M, dp), q.dtype),
      mosaic_common.swizzled_smem((stages, dp, bk) if config.interpret else (stages, bk, dp),
                                  q.dtype),
      mosaic_common.swizzled_smem((stages, bk, dp), q.dtype),
      plgpu.SMEM((consumers, _WGMMA_M), jnp.float32),
      plgpu.Barrier(num_arrivals=1, num_barriers=consumers),
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
      plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
  ]
  if consumers == 2:
    scratch.append(plgpu.Barrier(num_arrivals=2))
  scratch += mosaic_common.mask_scratch(layout, stages=stages, streamed_len=bk,
                                       tile_shape=(bq, bk), dtype=q.dtype,
                                       resident=(consumers, _WGMMA_M))
  k_in = pad_to(k, nk * bk, dp)
  if config.interpret:
    # The interpreter cannot read a transposed SMEM view: K^T comes from XLA, P via SMEM.
    k_in = jnp.einsum("bsnd->bnds", k_in)
    scratch += [mosaic_common.swizzled_smem((consumers, _WGMMA_M, bk), q.dtype)]
  out_type = [jax.ShapeDtypeStruct((batch, nq * bq, num_heads, dp), q.dtype),
              jax.ShapeDtypeStruct((batch * num_heads, nq * bq), jnp.float32)]
  out, lse = mosaic_common.launch(kernel, out_type, scratch, grid, grid_names, consumers,
                                 config.interpret)(
      pad_to(q, nq * bq, dp), k_in, pad_to(v, nk * bk, dp), *operands)
  return out[:, :q_len, :, :head_dim], lse[:, :q_len]


# ---------------------------------------------------------------------- custom_vjp wiring


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attention(q, k, v, fwd_mask: BlockMask, dq_mask: BlockMask, dkdv_mask: BlockMask,
               config: MosaicParams, bwd_params: Any):
  """(out, lse2) of the forward kernel; differentiable through `out` only (lse2 is a
  statistic: return_residual stops its gradient, `kernel` drops it)."""
  del dq_mask, dkdv_mask, bwd_params
  return _forward(q, k, v, fwd_mask, config)


def _attention_fwd(q, k, v, fwd_mask, dq_mask, dkdv_mask, config, bwd_params):
  del bwd_params
  out, lse = _forward(q, k, v, fwd_mask, config)
  return (out, lse), (q, k, v, out, lse, dq_mask, dkdv_mask)


def _attention_bwd(config, bwd_params, residuals, cotangents):
  del config
  do = cotangents[0]
  q, k, v, out, lse, dq_mask, dkdv_mask = residuals
  if isinstance(bwd_params, MosaicParams):
    grads = pallas_mosaic_gpu_vjp.backward(q, k, v, out, lse, do, dq_mask, dkdv_mask, bwd_params,
                                           fused=bwd_params.fused_backward)
    return grads + (None, None, None)
  # pallas_triton's backward takes exactly these residuals (same lse2 layout): its dQ kernel
  # walks the forward lists of dq_mask, its dK/dV kernel the backward lists of dkdv_mask.
  return pallas_triton.backward(bwd_params, residuals, do) + (None,)


_attention.defvjp(_attention_fwd, _attention_bwd)


# -------------------------------------------------------------------------- entry point


def _mosaic_backward_masks(mask, query, key, fwd_mask: BlockMask, block_sizes, build,
                            interpret: bool):
  """(dQ mask, dK/dV mask) for the Mosaic GPU backward, or None where it cannot run.

  dQ walks the forward lists at (forward block_q) x 64 tiles, dK/dV the backward lists at
  64 x block_kv_bwd (default 128, two consumer warpgroups; 64 in interpret mode). A caller's
  BlockMask or an RCM-permuted one is used as is, so only a 64 x 64 one fits both kernels.
  """
  if padded_head_dim(query.shape[3]) > mosaic_common.BWD_MAX_HEAD_DIM:
    return None  # dK + dV accumulators of D = 256 do not fit a warpgroup's registers
  rows = ROWS
  if isinstance(mask, BlockMask) or fwd_mask.q_perm is not None:
    fits = (fwd_mask.block_q, fwd_mask.block_kv) == (rows, rows)
    return (fwd_mask, fwd_mask) if fits else None
  default_kv = rows if interpret else min(2 * rows, max(rows, pow2_ceil(key.shape[1])))
  dkdv_tiles = (block_sizes.block_q_bwd or rows, block_sizes.block_kv_bwd or default_kv)
  if dkdv_tiles[0] != rows or dkdv_tiles[1] not in (rows, 2 * rows):
    return None  # the caller's dK/dV tiles are pallas_triton's (documented)
  built = {(fwd_mask.block_q, fwd_mask.block_kv): fwd_mask}

  def at(tiles):
    if tiles not in built:
      built[tiles] = build(block_sizes=BlockSizes(*tiles))[0]
    return built[tiles]

  return at((fwd_mask.block_q, rows)), at(dkdv_tiles)


def _backward_plan(mask, query, key, fwd_mask: BlockMask, block_sizes, build,
                   config: MosaicParams):
  """The backward's masks and static parameters: the Mosaic GPU kernels where they run
  (`_mosaic_backward_masks`), else pallas_triton's at Triton's own tiles (or the caller's
  *_bwd tiles for dK/dV)."""
  masks = _mosaic_backward_masks(mask, query, key, fwd_mask, block_sizes, build,
                                 config.interpret)
  if masks is not None:
    fused = bool(block_sizes is not None and block_sizes.fused_backward)
    if fused:
      smem = pallas_mosaic_gpu_vjp.fused_smem_bytes(masks[1], query.shape[3],
                                                    query.dtype.itemsize)
      if smem > SMEM_LIMIT:
        raise ValueError(
            f"pallas_mosaic_gpu: fused_backward=True at dK/dV tiles {masks[1].block_q} x "
            f"{masks[1].block_kv} with head_dim={query.shape[3]} needs {smem} bytes of shared "
            f"memory > {SMEM_LIMIT}; use block_kv_bwd=64 or the two-kernel backward")
    return (*masks, dataclasses.replace(config, stages=2, fused_backward=fused))
  if block_sizes is not None and block_sizes.fused_backward:
    raise NotImplementedError(
        "pallas_mosaic_gpu: fused_backward=True needs the Mosaic GPU backward (head_dim <= "
        f"{mosaic_common.BWD_MAX_HEAD_DIM}, dK/dV tiles 64 x {{64, 128}}, a caller's "
        f"BlockMask of 64 x 64); got head_dim={query.shape[3]}")
  if isinstance(mask, BlockMask) or fwd_mask.q_perm is not None:
    # One permutation for both passes: the forward's BlockMask is used as is.
    dq_mask = dkdv_mask = fwd_mask
    bwd_sizes = BlockSizes(fwd_mask.block_q, fwd_mask.block_kv)
  else:
    bwd_sizes = pallas_triton.default_block_sizes(query.shape[3], query.shape[1],
                                                   key.shape[1], interpret=config.interpret)
    if block_sizes.block_q_bwd is not None or block_sizes.block_kv_bwd is not None:
      bwd_sizes = dataclasses.replace(bwd_sizes, block_q_bwd=block_sizes.bwd_q,
                                      block_kv_bwd=block_sizes.bwd_kv)
    dq_mask, dkdv_mask, bwd_sizes = build(block_sizes=bwd_sizes)
  _, dq_launch, dkdv_launch = gpu_common.launch_params(bwd_sizes, query.shape[3],
                                             (dkdv_mask.block_q, dkdv_mask.block_kv))
  return dq_mask, dkdv_mask, TritonParams(
      scale=config.scale, soft_cap=config.soft_cap, interpret=config.interpret,
      dq_launch=dq_launch, dkdv_launch=dkdv_launch)


class _Plan(NamedTuple):
  fwd_mask: BlockMask
  dq_mask: BlockMask
  dkdv_mask: BlockMask
  config: MosaicParams
  bwd_params: Any  # MosaicParams (Mosaic GPU backward) or TritonParams (pallas_triton's)


class PallasMosaicGpu(base.BlockSparseBackend):
  """Block-sparse FlashAttention in Pallas Mosaic GPU, forward and backward.

  Takes the canonical arguments of flashjax.ops.attention.base: bfloat16 or float16 inputs
  with D <= 256 (NotImplementedError for float32 and other dtypes, D > 256 or a bias).
  block_sizes: BlockSizes (block_q 64 or 128, block_kv >= 64, num_stages >= 2 the K/V ring
  depth, persistent for the persistent grids) or None for the tuned tiles of this device
  (tuning store) or `default_block_sizes`. The Mosaic GPU backward runs dQ at block_q x 64
  and dK/dV at block_q_bwd x block_kv_bwd (default 64 x 128); other dK/dV tiles, D > 128, or
  a caller's BlockMask other than 64 x 64 run pallas_triton's backward (docs/mosaic_gpu.md).
  interpret=True runs the kernels in Mosaic GPU interpret mode (pallas_triton's backward,
  where it applies, in Pallas interpret mode). Tiles that wgmma cannot use or that overflow
  shared memory, and a block_sizes that disagrees with a BlockMask, are ValueErrors.
  """

  name = "pallas_mosaic_gpu"

  def check_supported(self, args):
    # wgmma takes bfloat16 / float16 operands only.
    gpu_common.check_supported(args.query, backend=self.name, dtypes=_DTYPES,
                               max_head_dim=MAX_HEAD_DIM)

  def plan(self, args):
    query, key, mask, block_sizes = args.query, args.key, args.mask, args.block_sizes
    is_causal, interpret = args.is_causal, args.interpret
    q_segment_ids, kv_segment_ids = args.q_segment_ids, args.kv_segment_ids
    defaulted = block_sizes is None and not isinstance(mask, BlockMask)
    if defaulted:
      # Measured tiles for this device and shape class (tuning store) or the heuristic.
      block_sizes = tuning_store.tuned_block_sizes(
          "pallas_mosaic_gpu", query, key, mask=mask, is_causal=is_causal,
          q_segment_ids=q_segment_ids, interpret=interpret) or default_block_sizes(
              query.shape[3], query.shape[1], key.shape[1], interpret=interpret,
              full_mask=mask is None and not is_causal and q_segment_ids is None,
              causal_only=mask is None and bool(is_causal) and q_segment_ids is None)
    build = functools.partial(
        gpu_common.block_masks, mask, query, key, is_causal=is_causal,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    while True:
      forward_only = block_sizes and dataclasses.replace(block_sizes, block_q_bwd=None,
                                                         block_kv_bwd=None)
      fwd_mask, _, sizes = build(block_sizes=forward_only)
      _check_tiling(sizes, fwd_mask.block_q, fwd_mask.block_kv)
      smem = _smem_bytes(MaskLayout.of(fwd_mask), padded_head_dim(query.shape[3]),
                         sizes.num_stages or 2, query.dtype.itemsize)
      if smem <= SMEM_LIMIT:
        break
      if defaulted and sizes.block_kv > _MIN_BLOCK_KV:
        # Stored mask tiles need a third SMEM ring: halve the default kv tile to fit it.
        block_sizes = dataclasses.replace(block_sizes, block_kv=sizes.block_kv // 2)
        continue
      raise ValueError(f"pallas_mosaic_gpu: tiles {fwd_mask.block_q} x {fwd_mask.block_kv} "
                       f"with num_stages={sizes.num_stages} and head_dim={query.shape[3]} need "
                       f"{smem} bytes of shared memory > {SMEM_LIMIT}; use smaller tiles")
    # persistent=None means off (the defaults above turn it on for full masks).
    config = MosaicParams(scale=float(args.scale), soft_cap=args.logits_soft_cap,
                          interpret=bool(interpret), stages=sizes.num_stages or 2,
                          persistent=bool(sizes.persistent),
                          overlap=INTRA_WG_OVERLAP and padded_head_dim(query.shape[3]) <= 128)
    dq_mask, dkdv_mask, bwd_params = _backward_plan(
        mask, query, key, fwd_mask, block_sizes, build, config)
    for bm in (fwd_mask, dq_mask, dkdv_mask):
      gpu_common.check_block_mask(bm, query, key)
    return _Plan(fwd_mask, dq_mask, dkdv_mask, config, bwd_params)

  def kernel(self, query, key, value, plan):
    return self.kernel_with_lse(query, key, value, plan)[0]

  def kernel_with_lse(self, query, key, value, plan):
    return _attention(query, key, value, plan.fwd_mask, plan.dq_mask, plan.dkdv_mask,
                      plan.config, plan.bwd_params)


dot_product_attention = PallasMosaicGpu()
