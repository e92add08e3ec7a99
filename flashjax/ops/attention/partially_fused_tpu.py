"""Partially fused softmax attention for TPU (Pallas Mosaic TPU): two grid-driven kernels.

The TPU counterpart of flashjax.ops.attention.partially_fused (the Triton-flavoured GPU
backend; docs/partially_fused.md): the same algorithm and the same float32 math, written the
TPU way, i.e. every loop over key tiles is the last ("arbitrary") grid axis, so each step's
K / V / P tile is brought into VMEM by the BlockSpec pipeline instead of a fori_loop over a
whole-K block held in VMEM.

1. Scores kernel, grid (B * Nq, n_q, n_kv): step (bh, i, j) computes the base-2 logits
   s = log2(e) * scale * q_i k_j^T of one [block_q, block_kv] tile, masks it (top-left causal
   j <= i, padded keys >= S), and writes the unnormalised tile exp2(s - m_j) in the input
   dtype to p [B * Nq, T_pad, S_pad], block (block_q, block_kv) at (bh, i, j). Its row
   statistics m_j = max(s) and l_j = sum(exp2(s - m_j)) go to the float32 arrays
   m, l [B * Nq, T_pad, n_kv]: row = query position, lane = key tile. Their block
   (block_q, n_kv) at (bh, i, 0) does not depend on j, so it stays resident in VMEM across
   the j axis; it is initialised at j == 0 (m = -inf, l = 0) and tile j's column is merged
   in each step with a lane-iota select (no dynamic lane indexing), then written back once.
   A row with no allowed key in a tile keeps m_j = -inf (shifted by 0, so l_j = 0).
2. P @ V kernel, grid (B * Nq, n_q, n_kv): at j == 0 it reduces the row's statistics over
   the lanes into the global m = max_j m_j and l = sum_j l_j * exp2(m_j - m) (VMEM scratch,
   lane-broadcast to [block_q, 128] like pallas_tpu's softmax statistics); each step adds
   (p_j @ v_j) * exp2(m_j - m) to a float32 [block_q, Dp] accumulator; the last needed step
   writes acc / l (0 for a row with no allowed key) in q.dtype to out [B * Nq, T_pad, Dp].

Causal (top-left aligned: key j allowed for query i iff j <= i): key tiles wholly above the
diagonal of query block i are neither computed nor fetched. Both kernels clamp the tile
index of their k / p / v index maps to the last needed tile (the block index then repeats,
so no new DMA is issued and the p output block is not rewritten with new data) and guard the
body with pl.when; the P @ V kernel therefore never reads a p tile the scores kernel did not
write.

Layouts: the wrapper moves q [B, T, Nq, D] and k / v [B, S, Nkv, D] to head-major
[B * N, T_pad | S_pad, Dp] (T, S zero-padded to whole tiles, D zero-padded to a multiple of
128 lanes; zero lanes change no dot product) and back. GQA: query head h reads kv head
h // (Nq // Nkv) through the index maps.

TPU tiling rules (check_block_sizes): block_kv a multiple of 128 (lanes: it is the last dim
of the p block); block_q a multiple of 8 sublanes for float32, 16 for 16-bit types (it is
the second-minor dim of every block). The stats block's last dim n_kv equals the array's
full dim, which Mosaic accepts for any n_kv. Blocks larger than the (padded) sequence are
shrunk to it, keeping these multiples. Matmuls are lax.dot_general with float32 results
(Precision.HIGHEST for float32 inputs); bf16 / fp16 tiles exp2(s - m_j) are rounded to the
input dtype before the P @ V matmul, as on GPU.

Supported: float32 / bfloat16 / float16, D <= 256, any static scale, is_causal or no mask,
any T and S. No backward kernel here: a caller differentiates through the XLA backend's
backward, as the GPU backend does.

No TPU was available while writing this: correctness is checked in Pallas interpret mode on
CPU, and the Mosaic TPU lowering is traced on CPU (jit(...).trace(...).lower(
lowering_platforms=("tpu",))); TPU speed is unmeasured.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flashjax.ops.attention.block_sizes import BlockSizes
from flashjax.ops.attention.pallas_tpu import min_block_q
from flashjax.ops.attention.pallas_tpu_common import LANES, NN_DIMS, NT_DIMS, precision_for
from flashjax.ops.tiling import cdiv, round_up

DEFAULT_BLOCK_SIZES = BlockSizes(block_q=128, block_kv=128)
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
LOG2E = math.log2(math.e)  # as pallas_gpu_common.LOG2E


def check_block_sizes(block_q: int, block_kv: int, dtype) -> None:
  """Raises ValueError unless (block_q, block_kv) fits the TPU tiling for `dtype`.

  block_kv must be a positive multiple of 128 (lanes), block_q a positive multiple of 8
  (float32) or 16 (16-bit types) sublanes.
  """
  if not isinstance(block_kv, int) or block_kv <= 0 or block_kv % LANES:
    raise ValueError(
        f"partially_fused_tpu: block_kv={block_kv!r} must be a positive multiple of {LANES} "
        "(TPU lanes)")
  need = min_block_q(dtype)
  if not isinstance(block_q, int) or block_q <= 0 or block_q % need:
    raise ValueError(
        f"partially_fused_tpu: block_q={block_q!r} must be a positive multiple of {need} for "
        f"{jnp.dtype(dtype).name} (TPU sublanes)")


@dataclasses.dataclass(frozen=True)
class _Params:
  """Static parameters of one call (after shrinking the blocks to the sequence)."""

  scale: float
  is_causal: bool
  block_q: int
  block_kv: int
  kv_len: int
  n_kv: int


def _last_tile(i, p: _Params):
  """Index of the last key tile query block i needs: n_kv - 1, or with is_causal the tile
  holding the block's last row (tiles starting after it are wholly above the diagonal)."""
  if not p.is_causal:
    return p.n_kv - 1
  last_row = (i + 1) * p.block_q - 1
  return jnp.minimum(p.n_kv - 1, lax.div(last_row, p.block_kv))


def _dot(a, b, dims):
  return lax.dot_general(a, b, dims, precision=precision_for(a.dtype),
                         preferred_element_type=jnp.float32)


def _scores_kernel(q_ref, k_ref, p_ref, m_ref, l_ref, *, p: _Params):
  """Step (bh, i, j): tile exp2(s - m_j) into p_ref, its m_j, l_j into lane j of m / l."""
  i, j = pl.program_id(1), pl.program_id(2)
  bq, bk = p.block_q, p.block_kv

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

  @pl.when(j <= _last_tile(i, p))
  def _body():
    s = _dot(q_ref[...], k_ref[...], NT_DIMS) * (p.scale * LOG2E)  # base-2 logits [bq, bk]
    allowed = None
    if p.is_causal or p.kv_len % bk:
      kv_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
      if p.is_causal:
        q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        allowed = kv_pos <= q_pos
      if p.kv_len % bk:
        in_bounds = kv_pos < p.kv_len
        allowed = in_bounds if allowed is None else allowed & in_bounds
    if allowed is not None:
      s = jnp.where(allowed, s, -jnp.inf)
    m = jnp.max(s, axis=1, keepdims=True)  # [bq, 1]
    # A row with no allowed key in this tile has m = -inf: shift by 0 so exp2(-inf) = 0.
    shift = jnp.where(m == -jnp.inf, 0.0, m)
    prob = jnp.exp2(s - shift)
    p_ref[...] = prob.astype(p_ref.dtype)
    # Merge tile j's statistics into lane j of the resident stats block.
    lane = lax.broadcasted_iota(jnp.int32, m_ref.shape, 1)
    m_ref[...] = jnp.where(lane == j, m, m_ref[...])
    l_ref[...] = jnp.where(lane == j, jnp.sum(prob, axis=1, keepdims=True), l_ref[...])


def _pv_kernel(p_ref, m_ref, l_ref, v_ref, o_ref, m_scr, l_scr, acc_scr, *, p: _Params):
  """Step (bh, i, j): acc += (p_j @ v_j) * exp2(m_j - m); the last step writes acc / l."""
  i, j = pl.program_id(1), pl.program_id(2)
  last = _last_tile(i, p)

  @pl.when(j == 0)
  def _init():
    m_all = m_ref[...]  # [bq, n_kv]; tiles not visited kept m = -inf, l = 0
    m = jnp.max(m_all, axis=1, keepdims=True)
    m = jnp.where(m == -jnp.inf, 0.0, m)  # no allowed key at all: every l_j is 0 anyway
    # exp2(m_j - m) rescales tile j's sum from its own max to the row's; 0 for m_j = -inf.
    l = jnp.sum(l_ref[...] * jnp.exp2(m_all - m), axis=1, keepdims=True)
    m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l, l_scr.shape)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(j <= last)
  def _accumulate():
    m_all = m_ref[...]
    lane = lax.broadcasted_iota(jnp.int32, m_all.shape, 1)
    m_j = jnp.max(jnp.where(lane == j, m_all, -jnp.inf), axis=1, keepdims=True)
    rescale = jnp.exp2(m_j - m_scr[:, :1])
    acc_scr[...] += _dot(p_ref[...], v_ref[...], NN_DIMS) * rescale

  @pl.when(j == last)
  def _finish():
    l = l_scr[:, :1]
    o_ref[...] = (acc_scr[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def _head_major(x, length, dp):
  """[B, L, N, D] -> [B * N, length, dp], zero-padded at the end of L and D."""
  b, l, n, d = x.shape
  x = jnp.pad(x, ((0, 0), (0, length - l), (0, 0), (0, dp - d)))
  return x.transpose(0, 2, 1, 3).reshape(b * n, length, dp)


def forward(q, k, v, *, scale: float, is_causal: bool, block_q: int = 128,
            block_kv: int = 128, interpret: bool = False) -> jax.Array:
  """Partially fused softmax attention forward on TPU (module docstring).

  Args:
    q: [B, T, Nq, D] queries.
    k: [B, S, Nkv, D] keys (Nq a multiple of Nkv).
    v: [B, S, Nkv, D] values.
    scale: static multiplier of q.k.
    is_causal: top-left aligned causal mask (key j allowed for query i iff j <= i).
    block_q: query rows per tile (multiple of 8, or 16 for 16-bit inputs).
    block_kv: keys per tile (multiple of 128).
    interpret: run both kernels in Pallas interpret mode (CPU).

  Returns:
    [B, T, Nq, D] in q.dtype.
  """
  batch, q_len, num_heads, head_dim = q.shape
  _, kv_len, num_kv_heads, _ = k.shape
  dtype = jnp.dtype(q.dtype)
  if dtype not in SUPPORTED_DTYPES or k.dtype != dtype or v.dtype != dtype:
    raise ValueError(f"partially_fused_tpu: dtypes {q.dtype}, {k.dtype}, {v.dtype}: q, k and v "
                     "must share one of float32, bfloat16, float16")
  if head_dim > MAX_HEAD_DIM:
    raise ValueError(f"partially_fused_tpu: head_dim={head_dim} > {MAX_HEAD_DIM}")
  if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
    raise ValueError(f"partially_fused_tpu: k {k.shape} / v {v.shape} do not match q {q.shape}")
  if num_heads % num_kv_heads:
    raise ValueError(f"partially_fused_tpu: Nq={num_heads} is not a multiple of "
                     f"Nkv={num_kv_heads}")
  check_block_sizes(block_q, block_kv, dtype)
  # Blocks larger than the sequence shrink to it (still legal multiples).
  bq = min(block_q, round_up(q_len, min_block_q(dtype)))
  bk = min(block_kv, round_up(kv_len, LANES))
  n_q, n_kv = cdiv(q_len, bq), cdiv(kv_len, bk)
  t_pad, s_pad, dp = n_q * bq, n_kv * bk, round_up(head_dim, LANES)
  group = num_heads // num_kv_heads
  bh_count = batch * num_heads
  params = _Params(scale=float(scale), is_causal=bool(is_causal), block_q=bq, block_kv=bk,
                   kv_len=kv_len, n_kv=n_kv)

  qp = _head_major(q, t_pad, dp)
  kp, vp = _head_major(k, s_pad, dp), _head_major(v, s_pad, dp)

  def kv_row(bh):
    return lax.div(bh, num_heads) * num_kv_heads + lax.div(lax.rem(bh, num_heads), group)

  def tile(i, j):
    # Causal: tiles above the diagonal repeat the last needed one (no new DMA / writeback).
    return jnp.minimum(j, _last_tile(i, params)) if is_causal else j

  q_spec = pl.BlockSpec((None, bq, dp), lambda bh, i, j: (bh, i, 0))
  kv_spec = pl.BlockSpec((None, bk, dp), lambda bh, i, j: (kv_row(bh), tile(i, j), 0))
  p_spec = pl.BlockSpec((None, bq, bk), lambda bh, i, j: (bh, i, tile(i, j)))
  # One (bh, i) block holds every key tile's statistics (lanes); resident across j.
  stats_spec = pl.BlockSpec((None, bq, n_kv), lambda bh, i, j: (bh, i, 0))
  stats_shape = jax.ShapeDtypeStruct((bh_count, t_pad, n_kv), jnp.float32)
  compiler_params = pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary"))
  grid = (bh_count, n_q, n_kv)

  probs, row_max, row_sum = pl.pallas_call(
      functools.partial(_scores_kernel, p=params),
      grid=grid,
      in_specs=[q_spec, kv_spec],
      out_specs=[p_spec, stats_spec, stats_spec],
      out_shape=[jax.ShapeDtypeStruct((bh_count, t_pad, s_pad), dtype), stats_shape,
                 stats_shape],
      compiler_params=compiler_params,
      interpret=interpret,
      name="partially_fused_tpu_scores",
  )(qp, kp)
  out = pl.pallas_call(
      functools.partial(_pv_kernel, p=params),
      grid=grid,
      in_specs=[p_spec, stats_spec, stats_spec, kv_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct((bh_count, t_pad, dp), dtype),
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, dp), jnp.float32)],
      compiler_params=compiler_params,
      interpret=interpret,
      name="partially_fused_tpu_pv",
  )(probs, row_max, row_sum, vp)
  out = out.reshape(batch, num_heads, t_pad, dp).transpose(0, 2, 1, 3)
  return out[:, :q_len, :, :head_dim]
