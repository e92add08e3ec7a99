"""Partially fused softmax attention in Pallas: two kernels, scores materialised once.

The "partially fused softmax" of "Speed is all you need: on-device acceleration of large
diffusion models via GPU-aware optimizations" (Chen et al., 2023), as a flashjax backend
(`implementation="partially_fused"`). Instead of FlashAttention's fully
fused online softmax:

1. Scores kernel, program (query block i, batch * query head): for each key tile j it
   computes the base-2 logits s = log2(e) * scale * q k^T of the [block_q, block_kv] tile and,
   in the epilogue, the tile's row statistics m_j = max(s) and l_j = sum(exp2(s - m_j)). It
   writes the unnormalised tile exp2(s - m_j) (values in [0, 1], stored in the input dtype)
   to a [B * Nq, T, S] array in HBM, and m_j, l_j (float32 [B * Nq, n_kv, T]).
2. P @ V kernel, program (query block i, batch * query head): combines the per-tile
   statistics into the row's global max m = max_j m_j and sum l = sum_j l_j * exp2(m_j - m),
   then reads the stored tiles again and accumulates
   out = sum_j (p_j @ V_j) * exp2(m_j - m) / l: the normalisation is fused into the matmul.

So T x S scores cross HBM twice (written once, read once). The analytic line of this family
is flashjax.io_model's "partial_fused" (3 score-sized transfers: it models the paper's
separate reduction pass; here the reduction lives in the scores kernel's epilogue, so one
score read is saved, at the price of n_kv = cdiv(S, block_kv) float32 (max, sum) pairs per
row instead of one). Like the model's "naive" line it counts K and V once; the kernels
re-read K (scores kernel) and V (P @ V kernel) once per query block, as FlashAttention does.
FLOPs are the model's 4 * T * S * D per head (two matmuls). `io_model.prefer_partially_fused`
is the (unmeasured) rule for when this should beat FlashAttention and unfused XLA.

Supported: no mask or `is_causal` (top-left aligned, or a Mask that is exactly
`flashjax.masks.causal(T, S)`; key tiles above the diagonal are neither computed, stored nor
read), GQA (query head h reads kv head h // (Nq // Nkv) through the
BlockSpec index maps), float32 / bfloat16 / float16, any static scale, head dim <= 128
(zero-padded to a power of two >= 16), any T and S (zero-padded to whole tiles; padded keys
are masked by a bounds check, padded rows sliced off). Everything else (mask arrays, Mask
objects, BlockMasks, segment ids / sequence lengths, logits_soft_cap, bias,
return_residual) raises NotImplementedError naming the argument.

Numerics: logits and statistics are float32; f32 matmuls run at Precision.HIGHEST (IEEE f32
on Triton, as pallas_triton). For bf16 / fp16 inputs the stored tile exp2(s - m_j) is
rounded to the input dtype before the P @ V matmul (as FlashAttention casts P).

Backward: a `jax.custom_vjp` whose backward pass is the XLA backend's
(flashjax.ops.attention.xla, jax autodiff of its dense path on recomputed scores); the
residuals are q, k, v only. There is no Pallas backward kernel.

Platforms: on a GPU (and in interpret mode on a CPU) the two kernels below run, written for
the Triton lowering (power-of-two tiles, `pallas_gpu_common.LaunchParams`); on a TPU
(`on_tpu()`) the same algorithm runs as the grid-driven Mosaic TPU kernels of
flashjax.ops.attention.partially_fused_tpu (block_kv a multiple of 128, block_q of 8 / 16
sublanes, D <= 256; default 128 x 128). The Triton kernels are tested in interpret mode on
CPU and compiled on an H100 (tests/ops/attention/test_partially_fused_gpu.py); the TPU
kernels in interpret mode and by their Mosaic TPU lowering on CPU (no TPU was available).
GPU and TPU speed are unmeasured.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from flashjax.masks import masks as masks_lib
from flashjax.masks.rule import Band
from flashjax.ops.attention import base
from flashjax.ops.attention import partially_fused_tpu
from flashjax.ops.attention import xla
from flashjax.ops.attention.block_sizes import BlockSizes, padded_head_dim
from flashjax.ops.attention.pallas_gpu_common import LOG2E, TRITON_DTYPES, LaunchParams, pad_to
from flashjax.ops.tiling import pow2_ceil

MAX_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class Params:
  """Static (hashable) parameters of one call."""

  scale: float
  is_causal: bool
  block_q: int
  block_kv: int
  interpret: bool
  launch: LaunchParams = LaunchParams()
  tpu: bool = False  # the Mosaic TPU kernels (partially_fused_tpu) instead of the Triton ones


def default_block_sizes(head_dim: int, q_len: int, kv_len: int, *,
                        interpret: bool = False, full_mask: bool = False) -> BlockSizes:
  """128 x 64 tiles on GPU (pallas_triton's forward tiles for D <= 128), 32 x 32 in interpret
  mode (small CPU tests still see several tiles); shrunk to the sequence (power of two >= 16).
  `full_mask` (the backends' common signature) does not change them.
  """
  del head_dim, full_mask
  bq, bk = (32, 32) if interpret else (128, 64)
  return BlockSizes(min(bq, max(16, pow2_ceil(q_len))), min(bk, max(16, pow2_ceil(kv_len))))


def _dot(a, b, contract: tuple[int, int]):
  """2-D matmul contracting a's axis contract[0] with b's contract[1]; f32 result (HIGHEST:
  IEEE f32 on Triton for f32 inputs, nothing changes for 16-bit ones)."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


def _num_kv_tiles(i, params: Params, n_kv: int):
  """Key tiles query block i visits: all, or with is_causal those starting at or before the
  block's last row (j * block_kv <= (i + 1) * block_q - 1)."""
  if not params.is_causal:
    return n_kv
  last_row = (i + 1) * params.block_q - 1
  return jnp.minimum(n_kv, lax.div(last_row, params.block_kv) + 1)


def _scores_kernel(q_ref, k_ref, p_ref, m_ref, l_ref, *, params: Params, kv_len: int,
                   n_kv: int):
  """Writes exp2(s - m_j) of every visited key tile j and its row stats m_j, l_j."""
  i = pl.program_id(0)
  bq, bk = params.block_q, params.block_kv
  q = q_ref[...]
  q_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)[:, None]
  needs_bounds = kv_len % bk != 0

  def body(j, carry):
    k = k_ref[pl.ds(j * bk, bk), :]
    s = _dot(q, k, (1, 1)) * (params.scale * LOG2E)  # base-2 logits [bq, bk]
    kv_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)[None, :]
    allowed = None
    if params.is_causal:
      allowed = kv_pos <= q_pos
    if needs_bounds:
      in_bounds = kv_pos < kv_len
      allowed = in_bounds if allowed is None else allowed & in_bounds
    if allowed is not None:
      s = jnp.where(allowed, s, -jnp.inf)
    m = jnp.max(s, axis=1)
    # A row with no allowed key in this tile has m = -inf: shift by 0 so exp2(-inf) = 0.
    shift = jnp.where(m == -jnp.inf, 0.0, m)
    p = jnp.exp2(s - shift[:, None])
    p_ref[:, pl.ds(j * bk, bk)] = p.astype(p_ref.dtype)
    m_ref[j, :] = m
    l_ref[j, :] = jnp.sum(p, axis=1)
    return carry

  lax.fori_loop(0, _num_kv_tiles(i, params, n_kv), body, 0)


def _pv_kernel(p_ref, m_ref, l_ref, v_ref, o_ref, *, params: Params, n_kv: int):
  """out = sum_j (p_j @ V_j) * exp2(m_j - m) / l over the visited key tiles."""
  i = pl.program_id(0)
  bq, bk = params.block_q, params.block_kv
  count = _num_kv_tiles(i, params, n_kv)

  def row_max(j, m):
    return jnp.maximum(m, m_ref[j, :])

  m = lax.fori_loop(0, count, row_max, jnp.full((bq,), -jnp.inf, jnp.float32))
  m = jnp.where(m == -jnp.inf, 0.0, m)  # no allowed key at all: every l_j is 0 anyway

  def row_sum(j, l):
    # exp2(m_j - m) rescales tile j's sum from its own max to the row's; 0 for m_j = -inf.
    return l + l_ref[j, :] * jnp.exp2(m_ref[j, :] - m)

  l = lax.fori_loop(0, count, row_sum, jnp.zeros((bq,), jnp.float32))

  def body(j, acc):
    p = p_ref[:, pl.ds(j * bk, bk)]
    v = v_ref[pl.ds(j * bk, bk), :]
    rescale = jnp.exp2(m_ref[j, :] - m)
    return acc + _dot(p, v, (1, 0)) * rescale[:, None]

  acc = lax.fori_loop(0, count, body, jnp.zeros((bq, v_ref.shape[-1]), jnp.float32))
  o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)


def _forward(q, k, v, params: Params):
  """q [B, T, Nq, D], k / v [B, S, Nkv, D] -> out [B, T, Nq, D] through the two kernels."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  bq, bk = params.block_q, params.block_kv
  n_q, n_kv = -(-q_len // bq), -(-kv_len // bk)
  t_pad, s_pad, dp = n_q * bq, n_kv * bk, padded_head_dim(head_dim)
  qp, kp, vp = pad_to(q, t_pad, dp), pad_to(k, s_pad, dp), pad_to(v, s_pad, dp)
  bh_count = batch * num_heads

  def head_spec(rows, tiled, kv):
    def index_map(i, bh):
      b, h = lax.div(bh, num_heads), lax.rem(bh, num_heads)
      return b, i if tiled else 0, lax.div(h, group) if kv else h, 0
    return pl.BlockSpec((None, rows, None, dp), index_map)

  # [B * Nq, T_pad, S_pad]: the query block's rows, all key columns.
  rows_spec = pl.BlockSpec((None, bq, s_pad), lambda i, bh: (bh, i, 0))
  # [B * Nq, n_kv, T_pad] statistics: the query block's rows, every key tile.
  stats_spec = pl.BlockSpec((None, n_kv, bq), lambda i, bh: (bh, 0, i))
  stats_shape = jax.ShapeDtypeStruct((bh_count, n_kv, t_pad), jnp.float32)
  compiler_params = params.launch.compiler_params()

  probs, row_max, row_sum = pl.pallas_call(
      functools.partial(_scores_kernel, params=params, kv_len=kv_len, n_kv=n_kv),
      grid=(n_q, bh_count),
      in_specs=[head_spec(bq, True, False), head_spec(s_pad, False, True)],
      out_specs=[rows_spec, stats_spec, stats_spec],
      out_shape=[jax.ShapeDtypeStruct((bh_count, t_pad, s_pad), q.dtype), stats_shape,
                 stats_shape],
      compiler_params=compiler_params,
      interpret=params.interpret,
      name="partially_fused_scores",
  )(qp, kp)
  out = pl.pallas_call(
      functools.partial(_pv_kernel, params=params, n_kv=n_kv),
      grid=(n_q, bh_count),
      in_specs=[rows_spec, stats_spec, stats_spec, head_spec(s_pad, False, True)],
      out_specs=head_spec(bq, True, False),
      out_shape=jax.ShapeDtypeStruct((batch, t_pad, num_heads, dp), q.dtype),
      compiler_params=compiler_params,
      interpret=params.interpret,
      name="partially_fused_pv",
  )(probs, row_max, row_sum, vp)
  return out[:, :q_len, :, :head_dim]


def _forward_any(q, k, v, params: Params):
  """The forward on the kernels of the platform the call was planned for."""
  if params.tpu:
    return partially_fused_tpu.forward(q, k, v, scale=params.scale, is_causal=params.is_causal,
                                       block_q=params.block_q, block_kv=params.block_kv,
                                       interpret=params.interpret)
  return _forward(q, k, v, params)


def _xla_reference(q, k, v, params: Params):
  return xla.dot_product_attention(q, k, v, is_causal=params.is_causal, scale=params.scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, params: Params):
  return _forward_any(q, k, v, params)


def _attention_fwd(q, k, v, params):
  return _forward_any(q, k, v, params), (q, k, v)


def _attention_bwd(params, residuals, d_out):
  # The XLA backend's backward: autodiff of its dense path, which recomputes the scores.
  _, vjp = jax.vjp(functools.partial(_xla_reference, params=params), *residuals)
  return vjp(d_out)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _causal_mask_as_flag(args: base.AttentionArgs) -> base.AttentionArgs:
  """A Mask that is exactly top-left causal (`flashjax.masks.causal(T, S)`: band j <= i, no
  segments, [T, S]) runs as is_causal=True; every other mask is left for check_supported."""
  mask = args.mask
  if not isinstance(mask, masks_lib.Mask) or mask.shape != (args.q_len, args.kv_len):
    return args
  rule = mask.rule()
  if rule is None or rule.has_segments or rule.band != Band(None, 0):
    return args
  return dataclasses.replace(args, mask=None, is_causal=True)


def on_tpu() -> bool:
  """Whether calls run the Mosaic TPU kernels: JAX's default backend is a TPU. Elsewhere (a
  GPU, or interpret mode on a CPU) the Triton-flavoured kernels above run."""
  return jax.default_backend() == "tpu"


class PartiallyFused(base.AttentionBackend):
  """Backend "partially_fused": scores kernel + P @ V kernel (module docstring)."""

  name = "partially_fused"
  bias_hint = "use the xla backend"

  def check_supported(self, args: base.AttentionArgs) -> None:
    """NotImplementedError naming the first argument this backend cannot take."""
    if args.query.dtype not in TRITON_DTYPES:
      supported = ", ".join(jnp.dtype(d).name for d in TRITON_DTYPES)
      raise NotImplementedError(
          f"{self.name}: query.dtype={args.query.dtype} is not supported ({supported})")
    limit = partially_fused_tpu.MAX_HEAD_DIM if on_tpu() else MAX_HEAD_DIM
    if args.head_dim > limit:
      raise NotImplementedError(
          f"{self.name}: head_dim={args.head_dim} > {limit} is not supported here")
    if args.mask is not None:
      kind = type(args.mask).__name__
      raise NotImplementedError(
          f"{self.name}: mask ({kind}) is not supported; only is_causal=True or no mask "
          "(sequence lengths and local windows arrive as masks / segment ids too)")
    if args.q_segment_ids is not None:
      raise NotImplementedError(
          f"{self.name}: segment ids (segment_ids, query_seq_lengths, "
          "key_value_seq_lengths) are not supported")
    if args.logits_soft_cap is not None:
      raise NotImplementedError(
          f"{self.name}: logits_soft_cap={args.logits_soft_cap} is not supported")
    if isinstance(args.scale, jax.core.Tracer):
      raise NotImplementedError(f"{self.name}: a traced scale is not supported")

  def attend(self, args: base.AttentionArgs, **options: Any):
    if options:
      raise NotImplementedError(f"{self.name}: unsupported options {sorted(options)} "
                                "(return_residual: use the xla backend)")
    args = _causal_mask_as_flag(args)
    self.check_supported(args)
    if on_tpu():
      sizes = args.block_sizes or partially_fused_tpu.DEFAULT_BLOCK_SIZES
      partially_fused_tpu.check_block_sizes(sizes.block_q, sizes.block_kv, args.query.dtype)
      params = Params(scale=float(args.scale), is_causal=args.is_causal,
                      block_q=sizes.block_q, block_kv=sizes.block_kv,
                      interpret=bool(args.interpret), tpu=True)
      return _attention(args.query, args.key, args.value, params)
    sizes = args.block_sizes or default_block_sizes(
        args.head_dim, args.q_len, args.kv_len, interpret=bool(args.interpret))
    for name in ("block_q", "block_kv"):
      value = getattr(sizes, name)
      if not (isinstance(value, int) and value >= 16 and value == pow2_ceil(value)):
        raise ValueError(f"{self.name}: block_sizes.{name}={value!r} must be a power of "
                         "two >= 16")
    params = Params(scale=float(args.scale), is_causal=args.is_causal,
                    block_q=sizes.block_q, block_kv=sizes.block_kv,
                    interpret=bool(args.interpret),
                    launch=LaunchParams(sizes.num_warps, sizes.num_stages))
    return _attention(args.query, args.key, args.value, params)


dot_product_attention = PartiallyFused()
