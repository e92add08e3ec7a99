"""Block-sparse FlashAttention in Pallas with the Triton lowering (the portable GPU backend).

Forward and backward kernels plus the `jax.custom_vjp` wiring live in this one module (the
backward needs the forward's tile math and the custom_vjp needs both, so one file keeps the
imports acyclic). Entry point: `dot_product_attention`, called by `api.py` with the keyword
arguments of docs/architecture.md "Attention backend protocol".

Design (ideas 1 and 2 of docs/architecture.md, "Design"):

* Masks reach the kernels as a `BlockMask` at the kernel tiling, built by
  `flashjax.masks.builders.block_mask_for` unless the caller passed one. The forward program
  (query block i, batch b, query head h) reads `fwd_count[b', h', i]` and loops over the
  compacted kv block ids only, so EMPTY tiles are never loaded. The wrapper reorders every
  list (XLA, stable) so that its FULL slots come first and passes n_full, their count; each
  kernel (forward, dQ, dK/dV) then runs two loops with the same online-softmax / gradient
  math: `fori_loop(0, n_full)` over FULL tiles with no mask code, no branch and no -inf guard
  (a FULL tile makes every row max finite, and it runs before any PARTIAL tile), then
  `fori_loop(n_full, count)` over PARTIAL tiles, which always AND the ElementRule (band from
  static ints, segment ids and prefix flags loaded for the tile), the stored tile and the
  sequence bounds, and keep the -inf guard. No `lax.cond` (`scf.if`) sits in either loop body,
  which would stop Triton from software-pipelining the K/V loads. When a BlockMask can have no
  PARTIAL masking at all (no rule, no tiles, lengths that are block multiples) only the FULL
  loop is emitted and the lists are not reordered.
* Ablation (`BlockSizes(dispatch="flags")`, forward only; default "lists"): the binary block
  masking paper's dispatch. The forward program loops over all nk kv tiles, reads each tile's
  kind from the BlockMask's [Bm, Nm, nq, nk] `kinds` (`pallas_gpu_common.flag_operands`) and
  branches (`lax.cond`, `_flag_loop`): EMPTY skipped, FULL unmasked, PARTIAL masked as above.
  The dQ and dK/dV kernels keep the lists. docs/studies.md (the binary block masking
  reproduction) describes the ablation.
* Softmax statistics are float32 and base 2: logits are multiplied by log2(e) so the kernels use
  exp2, and the saved statistic is lse2 = max + log2(sum) per row. A row without an allowed key
  gets output 0 and lse2 = +inf, so the backward recomputes P = exp2(s - lse2) = 0 and its
  gradients are 0 (no NaN, no inf * 0).
* GQA: query head h reads kv head h // (Nq // Nkv) through the BlockSpec index maps; K/V are
  never repeated in memory. The dK/dV program of one kv head loops over the query heads of its
  group inside the kernel, accumulating dK/dV in registers, and writes them once per kv head.
* Backward (FlashAttention-2): Delta = rowsum(dO * O) in XLA; a dK/dV kernel over kv blocks
  iterating the `bwd_*` lists of the BlockMask at the backward tiling (block_q_bwd x
  block_kv_bwd), and a dQ kernel over query blocks iterating the `fwd_*` lists of the forward
  BlockMask, i.e. at the forward tiling (tall query tiles suit dQ as they suit the forward;
  dK/dV prefers its own tiles). Residuals: q, k, v, out, lse2 and both BlockMasks.
* Sequences are zero-padded to block multiples and the head dim to a power of two >= 16 in XLA
  (no copy when already aligned); padded keys are masked by the bounds check, padded rows and
  columns are sliced off.
* Precision: every kernel matmul is issued at Precision.HIGHEST, which the Triton lowering runs
  as IEEE f32 for f32 inputs (its default would be TF32), so f32 results match the float32
  reference to ~1e-5. bf16/fp16 inputs: P and dS are cast to the input dtype before their
  matmuls (as in FlashAttention-2); accumulation and softmax are f32.

Block sizes (`default_block_sizes`): on GPU 128x64 forward (and dQ) tiles and 64x64 dK/dV tiles
for head dim <= 128, 64x32 / 32x32 for head dim 256; in interpret mode 32x32 so that small CPU
tests still see many tiles. Defaults shrink to the sequence (power of two >= 16). Warps and
stages default per kernel (`pallas_gpu_common.launch_params`); a `BlockSizes` with num_warps /
num_stages set applies them to all three kernels. A caller's `BlockSizes` is used as given.
A BlockMask fixes the tiling of both passes: `block_sizes` whose forward tiles disagree with
it is a ValueError, its backward tiles are then ignored (only num_warps / num_stages apply).

Measured numbers, side by side with cuDNN, torch SDPA, FlexAttention and the jax Pallas
examples, and the effect of the two-loop change: docs/performance.md. D=256 is untuned
(~140-180 TFLOP/s forward on the H200).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from flashjax.masks.block_mask import EMPTY, FULL, BlockMask
from flashjax.masks.rule import element_mask
from flashjax.ops.attention import base
from flashjax.ops.attention import pallas_gpu_common as gpu_common
from flashjax.ops.attention.block_sizes import BlockSizes
from flashjax.ops.attention.pallas_gpu_common import (LOG2E, MaskLayout, TritonParams,
                                                      flag_operands, mask_operands, pad_rows,
                                                      pad_to)
from flashjax.ops.attention.tuning import store as tuning_store
from flashjax.ops.tiling import pow2_ceil

def default_block_sizes(head_dim: int, q_len: int, kv_len: int, *,
                        interpret: bool = False, full_mask: bool = False) -> BlockSizes:
  """Heuristic tiling by head dim (see the module docstring), shrunk to the sequence.

  Args:
    head_dim: D of the query/key/value.
    q_len: T.
    kv_len: S.
    interpret: True for Pallas interpret mode (CPU tests): small 32x32 tiles.
    full_mask: whether every pair is allowed (the backends' common signature; the Triton
      tiles do not depend on it).

  Returns:
    BlockSizes with forward (also dQ) and dK/dV tiles; num_warps and num_stages are left None
    so that each kernel picks its own (`pallas_gpu_common.launch_params`).
  """
  del full_mask
  if interpret:
    sizes = BlockSizes(32, 32)
  elif head_dim <= 128:
    sizes = BlockSizes(128, 64, 64, 64)
  else:
    sizes = BlockSizes(64, 32, 32, 32)
  fit_q = lambda b: min(b, max(16, pow2_ceil(q_len)))
  fit_kv = lambda b: min(b, max(16, pow2_ceil(kv_len)))
  return dataclasses.replace(
      sizes, block_q=fit_q(sizes.block_q), block_kv=fit_kv(sizes.block_kv),
      block_q_bwd=fit_q(sizes.bwd_q), block_kv_bwd=fit_kv(sizes.bwd_kv))


def search_space(head_dim: int) -> list[BlockSizes]:
  """Candidate forward tiles for the block-size search (flashjax.ops.attention.tuning.search).

  block_q {64, 128} x block_kv {32, 64, 128} x num_warps {4, 8} x num_stages {2, 3}: 24
  candidates for every D; the dK/dV tiles stay the heuristic's (`block_masks`).

  Args:
    head_dim: D (unused: the same space for every D).

  Returns:
    The candidate BlockSizes, in search order.
  """
  del head_dim
  return [BlockSizes(block_q=q, block_kv=kv, num_warps=w, num_stages=s)
          for q, kv, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))]


class _MaskRefs(NamedTuple):
  """Kernel refs of one direction's block lists (or, for the flag-loop forward, of the tile
  kinds) and of the element-mask parts."""

  count: Any = None     # [Bm, Nm, n_outer] int32 (lists)
  block: Any = None     # [Bm, Nm, n_outer, L] int32, FULL slots first (`full_first`)
  n_full: Any = None    # [Bm, Nm, n_outer] int32 (only if some tile can be partial)
  tile: Any = None      # lists: [Bm, Nm, n_outer, L] int32, flags: [Bm, Nm, nq, nk] int32
                        # (only with stored tiles)
  kinds: Any = None     # [Bm, Nm, nq, nk] int32 EMPTY / PARTIAL / FULL (flags only)
  q_seg: Any = None     # [B|1, T_pad] int32
  kv_seg: Any = None    # [B|1, S_pad] int32
  prefix: Any = None    # [B|1, S_pad] int8
  tiles: Any = None     # [n_tiles, block_q, block_kv] int8


def _unpack_mask_refs(layout: MaskLayout, refs, *, flags: bool = False) -> _MaskRefs:
  """Refs in the order of `mask_operands` (flags=False) or `flag_operands` (flags=True)."""
  it = iter(refs)
  take = lambda present: next(it) if present else None
  if flags:
    head = dict(kinds=next(it), tile=take(layout.has_tiles))
  else:
    head = dict(count=next(it), block=next(it), n_full=take(layout.has_partial),
                tile=take(layout.has_tiles))
  return _MaskRefs(
      **head, q_seg=take(layout.has_segments), kv_seg=take(layout.has_segments),
      prefix=take(layout.has_prefix), tiles=take(layout.has_tiles))


def _tile_mask(layout: MaskLayout, refs: _MaskRefs, batch, list_index, q_start, kv_start):
  """Element mask [block_q, block_kv] of a partial tile: rule AND stored tile AND bounds."""
  bq, bk = layout.block_q, layout.block_kv
  q_pos = q_start + jnp.arange(bq, dtype=jnp.int32)[:, None]
  kv_pos = kv_start + jnp.arange(bk, dtype=jnp.int32)[None, :]
  parts = []
  if layout.band is not None:
    rb = 0 if layout.rule_batch_bcast else batch
    q_seg = kv_seg = prefix = None
    if layout.has_segments:
      q_seg = refs.q_seg[rb, pl.ds(q_start, bq)][:, None]
      kv_seg = refs.kv_seg[rb, pl.ds(kv_start, bk)][None, :]
    if layout.has_prefix:
      prefix = refs.prefix[rb, pl.ds(kv_start, bk)][None, :] != 0
    parts.append(element_mask(q_pos, kv_pos, layout.band, q_seg, kv_seg, prefix))
  if layout.has_tiles:
    parts.append(refs.tiles[refs.tile[list_index]] != 0)
  if layout.q_bounds:
    parts.append(q_pos < layout.q_len)
  if layout.kv_bounds:
    parts.append(kv_pos < layout.kv_len)
  return functools.reduce(jnp.logical_and, parts)


def _mask_logits(s, layout: MaskLayout, refs: _MaskRefs, batch, list_index, q_start,
                 kv_start, *, partial: bool):
  """Sets disallowed logits of a PARTIAL tile to -inf; FULL tiles (partial=False) pass through
  untouched."""
  if not partial:
    return s
  keep = _tile_mask(layout, refs, batch, list_index, q_start, kv_start)
  return jnp.where(keep, s, -jnp.inf)


def _full_then_partial(layout: MaskLayout, refs: _MaskRefs, index, body, carry):
  """Runs `body(slot, carry, partial=...)` over the FULL slots of list `index`, then over its
  PARTIAL slots: two loops, so that the FULL one holds no mask code and no branch (a branch in
  the loop body keeps Triton from pipelining the K/V loads). Only the FULL loop is emitted when
  the layout cannot have PARTIAL tiles."""
  count = refs.count[index]
  if not layout.has_partial:
    return lax.fori_loop(0, count, functools.partial(body, partial=False), carry)
  n_full = refs.n_full[index]
  carry = lax.fori_loop(0, n_full, functools.partial(body, partial=False), carry)
  return lax.fori_loop(n_full, count, functools.partial(body, partial=True), carry)


def _flag_loop(layout: MaskLayout, refs: _MaskRefs, index, num_tiles: int, step, carry):
  """The binary block masking paper's dispatch (`dispatch="flags"`, forward only): visits
  every kv tile 0..num_tiles-1 of row `index` (mask batch, mask head, query block), reads its
  kind and branches: EMPTY tiles are skipped (nothing loaded), FULL ones run
  `step(carry, j, list_index, partial=False)`, PARTIAL ones `partial=True`, the element mask
  applied exactly as in the list form (`list_index` (*index, j) reads the stored-tile grid).
  Without PARTIAL masking in the layout every non-EMPTY tile runs as FULL, as the lists do.

  The FULL branch keeps no -inf guard although a PARTIAL tile may come first here: a FULL
  tile makes every row max finite, and exp2(-inf - finite) = 0 rescales the empty
  accumulator, so the order of the kinds does not matter.
  """
  def body(j, carry):
    kind = refs.kinds[(*index, j)]
    visit = lambda partial: lambda c: step(c, j, (*index, j), partial=partial)
    skip = lambda c: c
    if not layout.has_partial:
      return lax.cond(kind == EMPTY, skip, visit(False), carry)
    return lax.cond(kind == EMPTY, skip,
                    lambda c: lax.cond(kind == FULL, visit(False), visit(True), c), carry)

  return lax.fori_loop(0, num_tiles, body, carry)


def _dot(a, b, contract: tuple[int, int]):
  """2-D matmul contracting a's axis contract[0] with b's axis contract[1], f32 result.

  HIGHEST makes the Triton lowering run f32 x f32 at IEEE precision (its default is TF32);
  for bf16/fp16 inputs it changes nothing.
  """
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


def _logits(q, k, params: TritonParams):
  """Base-2 logits [bq, bk] (f32) and, with a soft cap, t = tanh(scale * q k^T / cap)."""
  s = _dot(q, k, (1, 1))
  if params.soft_cap is None:
    return s * (params.scale * LOG2E), None
  t = jnp.tanh(s * (params.scale / params.soft_cap))
  return t * (params.soft_cap * LOG2E), t


def _mask_batch_head(layout: MaskLayout, batch, head):
  return (0 if layout.batch_bcast else batch), (0 if layout.head_bcast else head)


def _split_bh(bh, num_heads: int):
  """Grid axis 1 (batch * heads) -> (batch, head)."""
  return lax.div(bh, num_heads), lax.rem(bh, num_heads)


def _head_spec(rows: int, head_dim: int, num_heads: int, *, group: int = 1,
               tiled: bool = True) -> pl.BlockSpec:
  """[B, L, N', Dp] seen by program (i, b * num_heads + h): head h // group, rows of tile i
  (tiled) or all rows."""
  def index_map(i, bh):
    batch, head = _split_bh(bh, num_heads)
    return batch, i if tiled else 0, lax.div(head, group), 0
  return pl.BlockSpec((None, rows, None, head_dim), index_map)


# ----------------------------------------------------------------------------- forward


def _forward_kernel(q_ref, k_ref, v_ref, *refs, layout: MaskLayout, params: TritonParams,
                    num_heads: int, num_kv_tiles: int):
  """One query block of one (batch, query head): online softmax over its kv block list
  (params.fwd_dispatch "lists"), or over all num_kv_tiles kv tiles, EMPTY ones skipped by
  their kind ("flags", `_flag_loop`).

  Refs: q [bq, Dp], k/v [S_pad, Dp] (the kv head of this query head), mask operands
  (`mask_operands` or `flag_operands`), then outputs o [bq, Dp] and lse2 [bq].
  """
  *mask_refs, o_ref, lse_ref = refs
  flags = params.fwd_dispatch == "flags"
  m = _unpack_mask_refs(layout, mask_refs, flags=flags)
  qi, bh = pl.program_id(0), pl.program_id(1)
  batch, head = _split_bh(bh, num_heads)
  mb, mh = _mask_batch_head(layout, batch, head)
  bq, bk = layout.block_q, layout.block_kv
  q = q_ref[...]
  q_start = qi * bq

  def step(carry, kv_block, list_index, *, partial):
    acc, row_max, row_sum = carry
    kv_start = pl.multiple_of(kv_block * bk, bk)
    k = k_ref[pl.ds(kv_start, bk), :]
    s, _ = _logits(q, k, params)
    s = _mask_logits(s, layout, m, batch, list_index, q_start, kv_start, partial=partial)
    new_max = jnp.maximum(row_max, s.max(axis=1))
    shift = new_max
    if partial:
      # A row with no allowed key yet has max -inf: shift by 0 so exp2(-inf - shift) = 0.
      # FULL tiles run first and make every row max finite, so their loop needs no guard.
      shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
    alpha = jnp.exp2(row_max - shift)
    p = jnp.exp2(s - shift[:, None])
    v = v_ref[pl.ds(kv_start, bk), :]
    pv = _dot(p.astype(v.dtype), v, (1, 0))
    return alpha[:, None] * acc + pv, new_max, alpha * row_sum + p.sum(axis=1)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  if flags:
    acc, row_max, row_sum = _flag_loop(layout, m, (mb, mh, qi), num_kv_tiles, step, init)
  else:
    def body(slot, carry, *, partial):
      return step(carry, m.block[mb, mh, qi, slot], (mb, mh, qi, slot), partial=partial)

    acc, row_max, row_sum = _full_then_partial(layout, m, (mb, mh, qi), body, init)
  empty = row_sum == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, row_sum)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, row_max + jnp.log2(row_sum))


def _forward(q, k, v, bm: BlockMask, params: TritonParams):
  """Forward pass.

  Args:
    q: [B, T, Nq, D].
    k: [B, S, Nkv, D].
    v: [B, S, Nkv, D].
    bm: BlockMask of logical shape (Bm, Nm, T, S).
    params: static kernel parameters.

  Returns:
    out [B, T, Nq, D] (dtype of q) and lse2 [B * Nq, T] float32 (base-2 logsumexp of the
    scaled logits, +inf for rows without an allowed key).
  """
  (batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, group, layout, bq, bk, q_pad, kv_pad,
   dp) = gpu_common.tiling(q, k, bm)
  nq, nk = q_pad // bq, kv_pad // bk
  if params.fwd_dispatch == "flags":
    mask_ops = flag_operands(bm, layout, q_pad=q_pad, kv_pad=kv_pad)
  else:
    mask_ops = mask_operands(bm, layout, backward=False, q_pad=q_pad, kv_pad=kv_pad)
  q_spec = _head_spec(bq, dp, num_heads)
  kv_spec = _head_spec(nk * bk, dp, num_heads, group=group, tiled=False)
  kernel = functools.partial(_forward_kernel, layout=layout, params=params,
                             num_heads=num_heads, num_kv_tiles=nk)
  out, lse = pl.pallas_call(
      kernel,
      grid=(nq, batch * num_heads),
      in_specs=[q_spec, kv_spec, kv_spec] + [pl.BlockSpec()] * len(mask_ops),
      out_specs=[q_spec, pl.BlockSpec((None, bq), lambda i, bh: (bh, i))],
      out_shape=[jax.ShapeDtypeStruct((batch, nq * bq, num_heads, dp), q.dtype),
                 jax.ShapeDtypeStruct((batch * num_heads, nq * bq), jnp.float32)],
      compiler_params=params.fwd_launch.compiler_params(),
      interpret=params.interpret,
      name="flashjax_triton_fwd",
  )(pad_to(q, nq * bq, dp), pad_to(k, nk * bk, dp), pad_to(v, nk * bk, dp), *mask_ops)
  return out[:, :q_len, :, :head_dim], lse[:, :q_len]


# ---------------------------------------------------------------------------- backward


def _probs_and_dscores(q, k, v, do, lse, delta, s_mask, params: TritonParams):
  """Recomputes P [bq, bk] and dS = dLoss/d(q k^T) / scale for one tile (f32)."""
  s, t = _logits(q, k, params)
  s = s_mask(s)
  p = jnp.exp2(s - lse[:, None])
  dp = _dot(do, v, (1, 1))
  ds = p * (dp - delta[:, None])
  if t is not None:
    ds = ds * (1.0 - t * t)  # d/dx cap * tanh(x / cap)
  return p, ds


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, layout: MaskLayout,
                 params: TritonParams, num_kv_heads: int, group: int):
  """dK, dV of one kv block of one (batch, kv head), summed over the group's query heads.

  Refs: q/do [T_pad, group, Dp], k/v [bk, Dp], lse2/delta [group, T_pad], mask operands
  (bwd lists), then outputs dk/dv [bk, Dp].
  """
  *mask_refs, dk_ref, dv_ref = refs
  m = _unpack_mask_refs(layout, mask_refs)
  kj, bh = pl.program_id(0), pl.program_id(1)
  batch, kv_head = _split_bh(bh, num_kv_heads)
  bq, bk = layout.block_q, layout.block_kv
  k = k_ref[...]
  v = v_ref[...]
  kv_start = kj * bk

  def head_body(j, carry):
    mb, mh = _mask_batch_head(layout, batch, kv_head * group + j)

    def body(slot, carry, *, partial):
      dk, dv = carry
      q_start = pl.multiple_of(m.block[mb, mh, kj, slot] * bq, bq)
      q = q_ref[pl.ds(q_start, bq), j, :]
      do = do_ref[pl.ds(q_start, bq), j, :]
      s_mask = functools.partial(_mask_logits, layout=layout, refs=m, batch=batch,
                                 list_index=(mb, mh, kj, slot), q_start=q_start,
                                 kv_start=kv_start, partial=partial)
      p, ds = _probs_and_dscores(q, k, v, do, lse_ref[j, pl.ds(q_start, bq)],
                                 delta_ref[j, pl.ds(q_start, bq)], s_mask, params)
      return (dk + _dot(ds.astype(q.dtype), q, (0, 0)),
              dv + _dot(p.astype(do.dtype), do, (0, 0)))

    return _full_then_partial(layout, m, (mb, mh, kj), body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, head_body, (zeros, zeros))
  dk_ref[...] = (dk * params.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, layout: MaskLayout,
               params: TritonParams, num_heads: int):
  """dQ of one query block of one (batch, query head) over its forward kv block list.

  Refs: q/do [bq, Dp], k/v [S_pad, Dp], lse2/delta [bq], mask operands (fwd lists), then
  the output dq [bq, Dp].
  """
  *mask_refs, dq_ref = refs
  m = _unpack_mask_refs(layout, mask_refs)
  qi, bh = pl.program_id(0), pl.program_id(1)
  batch, head = _split_bh(bh, num_heads)
  mb, mh = _mask_batch_head(layout, batch, head)
  bq, bk = layout.block_q, layout.block_kv
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_start = qi * bq

  def body(slot, dq, *, partial):
    kv_start = pl.multiple_of(m.block[mb, mh, qi, slot] * bk, bk)
    k = k_ref[pl.ds(kv_start, bk), :]
    v = v_ref[pl.ds(kv_start, bk), :]
    s_mask = functools.partial(_mask_logits, layout=layout, refs=m, batch=batch,
                               list_index=(mb, mh, qi, slot), q_start=q_start,
                               kv_start=kv_start, partial=partial)
    _, ds = _probs_and_dscores(q, k, v, do, lse, delta, s_mask, params)
    return dq + _dot(ds.astype(k.dtype), k, (1, 0))

  dq = _full_then_partial(layout, m, (mb, mh, qi), body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * params.scale).astype(dq_ref.dtype)


def _dkdv(q, k, v, do, lse, delta, bm: BlockMask, params: TritonParams):
  """dK, dV [B, S, Nkv, D] over the `bwd_*` lists of `bm` (its tiling).

  Args:
    q: [B, T, Nq, D].
    k: [B, S, Nkv, D].
    v: [B, S, Nkv, D].
    do: [B, T, Nq, D] output cotangent (dtype of q).
    lse: [B * Nq, T] float32 base-2 logsumexp from the forward.
    delta: [B * Nq, T] float32 rowsum(dO * O).
    bm: BlockMask at the dK/dV tiling.
    params: static kernel parameters.
  """
  (batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, group, layout, bq, bk, q_pad, kv_pad,
   dp) = gpu_common.tiling(q, k, bm)
  kv_block = _head_spec(bk, dp, num_kv_heads)

  def q_group_index(j, bh):  # all rows of the `group` query heads of kv head bh % Nkv
    del j
    b, kv_head = _split_bh(bh, num_kv_heads)
    return b, 0, kv_head, 0

  q_group = pl.BlockSpec((None, q_pad, group, dp), q_group_index)
  stat_group = pl.BlockSpec((group, q_pad), lambda j, bh: (bh, 0))
  mask_ops = mask_operands(bm, layout, backward=True, q_pad=q_pad, kv_pad=kv_pad)
  kp, vp = pad_to(k, kv_pad, dp), pad_to(v, kv_pad, dp)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, layout=layout, params=params,
                        num_kv_heads=num_kv_heads, group=group),
      grid=(kv_pad // bk, batch * num_kv_heads),
      in_specs=[q_group, kv_block, kv_block, q_group, stat_group, stat_group]
      + [pl.BlockSpec()] * len(mask_ops),
      out_specs=[kv_block, kv_block],
      out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype),
                 jax.ShapeDtypeStruct(vp.shape, v.dtype)],
      compiler_params=params.dkdv_launch.compiler_params(),
      interpret=params.interpret,
      name="flashjax_triton_dkdv",
  )(pad_to(q, q_pad, dp), kp, vp, pad_to(do, q_pad, dp), pad_rows(lse, q_pad, jnp.inf),
    pad_rows(delta, q_pad, 0.0), *mask_ops)
  return dk[:, :kv_len, :, :head_dim], dv[:, :kv_len, :, :head_dim]


def _dq(q, k, v, do, lse, delta, bm: BlockMask, params: TritonParams):
  """dQ [B, T, Nq, D] over the `fwd_*` lists of `bm` (its tiling); arguments as `_dkdv`."""
  (batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, group, layout, bq, bk, q_pad, kv_pad,
   dp) = gpu_common.tiling(q, k, bm)
  q_block = _head_spec(bq, dp, num_heads)
  kv_all = _head_spec(kv_pad, dp, num_heads, group=group, tiled=False)
  stat_block = pl.BlockSpec((None, bq), lambda i, bh: (bh, i))
  mask_ops = mask_operands(bm, layout, backward=False, q_pad=q_pad, kv_pad=kv_pad)
  qp = pad_to(q, q_pad, dp)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, layout=layout, params=params, num_heads=num_heads),
      grid=(q_pad // bq, batch * num_heads),
      in_specs=[q_block, kv_all, kv_all, q_block, stat_block, stat_block]
      + [pl.BlockSpec()] * len(mask_ops),
      out_specs=q_block,
      out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
      compiler_params=params.dq_launch.compiler_params(),
      interpret=params.interpret,
      name="flashjax_triton_dq",
  )(qp, pad_to(k, kv_pad, dp), pad_to(v, kv_pad, dp), pad_to(do, q_pad, dp),
    pad_rows(lse, q_pad, jnp.inf), pad_rows(delta, q_pad, 0.0), *mask_ops)
  return dq[:, :q_len, :, :head_dim]


# ---------------------------------------------------------------------- custom_vjp wiring


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, fwd_mask: BlockMask, bwd_mask: BlockMask, params: TritonParams):
  """(out, lse2) of the forward kernel; differentiable in q, k, v through `out` only (lse2
  is a statistic: return_residual stops its gradient, `kernel` drops it)."""
  return _forward(q, k, v, fwd_mask, params)


def _attention_fwd(q, k, v, fwd_mask, bwd_mask, params):
  out, lse = _forward(q, k, v, fwd_mask, params)
  return (out, lse), (q, k, v, out, lse, fwd_mask, bwd_mask)


def _attention_bwd(params, residuals, cotangents):
  return backward(params, residuals, cotangents[0])


def backward(params: TritonParams, residuals, do):
  """dQ, dK, dV (and None for the two BlockMasks) from the forward's residuals
  (q, k, v, out, lse2, fwd_mask, bwd_mask): dQ over fwd_mask's forward lists, dK/dV over
  bwd_mask's backward lists. Also the backward of pallas_mosaic_gpu where its own kernels
  cannot run (same lse2 residual)."""
  q, k, v, out, lse, fwd_mask, bwd_mask = residuals
  batch, q_len, num_heads, _ = q.shape
  # Delta = rowsum(dO * O) [B * Nq, T]: elementwise in f32 (no TF32 matmul).
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  delta = delta.transpose(0, 2, 1).reshape(batch * num_heads, q_len)
  return _grads(q, k, v, do, lse, delta, fwd_mask, bwd_mask, params) + (None, None)


def _grads(q, k, v, do, lse2, delta, fwd_mask: BlockMask, bwd_mask: BlockMask,
           params: TritonParams) -> tuple[jax.Array, jax.Array, jax.Array]:
  """dQ (fwd_mask's forward lists) and dK, dV (bwd_mask's backward lists) from the rows'
  lse2 and delta [B * Nq, T] float32."""
  do = do.astype(q.dtype)
  dk, dv = _dkdv(q, k, v, do, lse2, delta, bwd_mask, params)
  dq = _dq(q, k, v, do, lse2, delta, fwd_mask, params)
  return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)


# -------------------------------------------------------------------------- entry point


def block_masks(mask, query, key, *, is_causal, q_segment_ids, kv_segment_ids, block_sizes,
                interpret):
  """Forward and backward BlockMasks plus the BlockSizes whose launch parameters apply.

  Without `block_sizes` (and without a BlockMask) the tiles are the tuned ones of this device
  (tuning store: forward tiles / launch parameters, the dK/dV tiles stay) or
  `default_block_sizes`; then pallas_gpu_common.block_masks builds both BlockMasks.
  """
  if block_sizes is None and not isinstance(mask, BlockMask):
    q_len, kv_len, head_dim = query.shape[1], key.shape[1], query.shape[3]
    block_sizes = default_block_sizes(head_dim, q_len, kv_len, interpret=interpret)
    tuned = tuning_store.tuned_block_sizes(
        "pallas_triton", query, key, mask=mask, is_causal=is_causal,
        q_segment_ids=q_segment_ids, interpret=interpret)
    if tuned is not None:
      block_sizes = dataclasses.replace(block_sizes, **tuning_store.block_sizes_to_dict(tuned))
  return gpu_common.block_masks(mask, query, key, is_causal=is_causal,
                                q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                block_sizes=block_sizes)


class _Plan(NamedTuple):
  fwd_mask: BlockMask
  bwd_mask: BlockMask
  params: TritonParams


class PallasTriton(base.BlockSparseBackend):
  """Block-sparse FlashAttention (Pallas Triton backend); differentiable in q, k, v.

  Takes the canonical arguments of flashjax.ops.attention.base: float32, bfloat16 or
  float16 inputs with D <= 256 (NotImplementedError otherwise, and for a bias); block_sizes
  None for the tuned tiles of this device or `default_block_sizes`. Rows with no allowed key
  are 0. A block_sizes that disagrees with a BlockMask is a ValueError.
  """

  name = "pallas_triton"

  def check_supported(self, args):
    gpu_common.check_supported(args.query, backend=self.name)

  def plan(self, args):
    fwd_mask, bwd_mask, sizes = block_masks(
        args.mask, args.query, args.key, is_causal=args.is_causal,
        q_segment_ids=args.q_segment_ids, kv_segment_ids=args.kv_segment_ids,
        block_sizes=args.block_sizes, interpret=args.interpret)
    for bm in (fwd_mask, bwd_mask):
      gpu_common.check_block_mask(bm, args.query, args.key)
    fwd_launch, dq_launch, dkdv_launch = gpu_common.launch_params(
        sizes, args.head_dim, (bwd_mask.block_q, bwd_mask.block_kv))
    params = TritonParams(scale=float(args.scale), soft_cap=args.logits_soft_cap,
                          interpret=bool(args.interpret), fwd_launch=fwd_launch,
                          dq_launch=dq_launch, dkdv_launch=dkdv_launch,
                          fwd_dispatch=sizes.dispatch or "lists")
    return _Plan(fwd_mask, bwd_mask, params)

  def kernel(self, query, key, value, plan):
    return self.kernel_with_lse(query, key, value, plan)[0]

  def kernel_with_lse(self, query, key, value, plan):
    return _attention(query, key, value, plan.fwd_mask, plan.bwd_mask, plan.params)

  def backward_from_stats(self, args, d_out, lse, delta):
    """dQ, dK, dV from external row statistics (base.AttentionBackend.backward_from_stats)
    on this backend's dQ and dK/dV kernels, at the BlockMasks `plan` builds for `args`."""
    if args.bias is not None:
      raise NotImplementedError(f"{self.name}: additive bias is not supported")
    self.check_supported(args)
    plan = self.plan(args)
    if args.permuted:
      raise NotImplementedError(f"{self.name}: backward_from_stats with an RCM-reordered "
                                "BlockMask is not supported")
    q, k, v = args.query, args.key, args.value
    want = q.shape[:3]
    for name, x in (("lse", lse), ("delta", delta)):
      if tuple(x.shape) != want:
        raise ValueError(f"{name}.shape={tuple(x.shape)} must be [B, T, Nq] = {want}")
    if tuple(d_out.shape) != q.shape:
      raise ValueError(f"d_out.shape={tuple(d_out.shape)} must be query's {q.shape}")
    lse2 = base.lse2_rows(lse)
    delta = delta.astype(jnp.float32).transpose(0, 2, 1).reshape(lse2.shape)
    return _grads(q, k, v, d_out, lse2, delta, plan.fwd_mask, plan.bwd_mask, plan.params)


dot_product_attention = PallasTriton()
