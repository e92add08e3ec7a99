"""Block-sparse FlashAttention backward for TPU (Pallas Mosaic TPU) and its custom_vjp.

The backward recomputes P = exp(s - lse) tile by tile (FlashAttention-2):

  Delta = rowsum(dO * O)                     (XLA, float32)
  dV_j = sum_i P_ij^T dO_i,  dS_ij = P_ij * (dO_i V_j^T - Delta_i)
  dK_j = sum_i dS_ij^T Q_i,  dQ_i = sum_j dS_ij K_j   (times scale and the soft-cap slope)

Two kernels, both driven by scalar-prefetched BlockMask lists:
  * dK/dV: grid (B, Nkv, num_kv_blocks, G, Lb) iterating the backward lists (query blocks of
    each kv block, the transposed block map). For GQA the inner axis G walks the group's query
    heads, so each K/V block accumulates its whole group in VMEM before one store: no per-head
    dK/dV in HBM and no repeated K/V.
  * dQ: grid (B, Nq, num_q_blocks, Lf) iterating the forward lists.
Empty blocks are never fetched; padding slots repeat the last block id and do no work.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flashjax.masks.block_mask import BlockMask
from flashjax.ops.attention import pallas_tpu_common as common
from flashjax.ops.attention.pallas_tpu_common import LANES, NN_DIMS, NT_DIMS, TpuParams
from flashjax.ops.tiling import pad_axis


def _dlogits(q, k, v, do, lse, delta, mask, cfg: TpuParams):
  """P and dS/d(q.k) of one tile.

  Args:
    q: [bq, D] queries.
    k: [bkv, D] keys.
    v: [bkv, D] values.
    do: [bq, D] output cotangent.
    lse: [bq, 1] float32 logsumexp (+inf on rows with no key).
    delta: [bq, 1] float32 rowsum(dO * O).
    mask: bool [bq, bkv] or None (FULL tile).
    cfg: TpuParams.

  Returns:
    (p, ds) float32 [bq, bkv]; ds already includes the soft-cap slope and the scale.
  """
  s = common.scaled_logits(q, k, cfg)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  p = jnp.exp(s - lse)
  dp = lax.dot_general(do, v, NT_DIMS, precision=common.precision_for(do.dtype),
                       preferred_element_type=jnp.float32)
  ds = p * (dp - delta)
  if cfg.soft_cap is not None:
    # d(cap * tanh(x / cap))/dx = 1 - tanh^2; s holds the capped logits (or -inf where p = 0).
    t = jnp.where(p > 0.0, s / cfg.soft_cap, 0.0)
    ds = ds * (1.0 - t * t)
  return p, ds * cfg.scale


def dkv_steps(ix: common.ListIndexer, group: int) -> Callable[..., common.Step]:
  """Step map of the dK/dV grid (B, Nkv, num_kv_blocks, G, Lb) over the backward lists.

  Args:
    ix: ListIndexer of the backward lists (rows are kv blocks).
    group: query heads per kv head.

  Returns:
    steps(b, kvh, kj, g, s, count_ref, block_ref, kind_ref, tile_ref) -> Step.
  """
  def steps(b, kvh, kj, g, s, count_ref, block_ref, kind_ref, tile_ref):
    del count_ref, kind_ref, tile_ref
    h = kvh * group + g
    slot = ix.slot(b, h, kj, s)
    return common.Step(b, h, kvh, block_ref[slot], kj, ix.row(b, h, kj), slot, s)
  return steps


def _dkv_kernel(count_ref, block_ref, kind_ref, tile_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, *refs, steps, flags, band, last_pos: int, group: int,
                cfg: TpuParams, block_q: int, block_kv: int):
  """One (batch, kv head, kv block, group member, list slot) step of dK/dV."""
  opt, (dk_ref, dv_ref, dk_acc, dv_acc) = common.split_optional_refs(refs, flags)
  ids = common.grid_ids(5)
  st = steps(*ids, count_ref, block_ref, kind_ref, tile_ref)
  g = ids[3]

  @pl.when((g == 0) & (st.pos == 0))
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def step(masked: bool):
    mask = common.step_mask(masked, opt, band, st, block_q, block_kv, cfg)
    q, do = q_ref[...], do_ref[...]
    p, ds = _dlogits(q, k_ref[...], v_ref[...], do, lse_ref[...][:, :1],
                     delta_ref[...][:, :1], mask, cfg)
    prec = common.precision_for(q.dtype)
    dv_acc[...] += lax.dot_general(p.T.astype(do.dtype), do, NN_DIMS, precision=prec,
                                   preferred_element_type=jnp.float32)
    dk_acc[...] += lax.dot_general(ds.T.astype(q.dtype), q, NN_DIMS, precision=prec,
                                   preferred_element_type=jnp.float32)

  common.run_steps(step, st, count_ref, kind_ref)

  @pl.when((g == group - 1) & (st.pos == last_pos))
  def _finish():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(count_ref, block_ref, kind_ref, tile_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, *refs, steps, flags, band, last_pos: int,
               cfg: TpuParams, block_q: int, block_kv: int):
  """One (batch, head, query block, list slot) step of dQ."""
  opt, (dq_ref, dq_acc) = common.split_optional_refs(refs, flags)
  st = steps(*common.grid_ids(4), count_ref, block_ref, kind_ref, tile_ref)

  @pl.when(st.pos == 0)
  def _init():
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

  def step(masked: bool):
    mask = common.step_mask(masked, opt, band, st, block_q, block_kv, cfg)
    k = k_ref[...]
    _, ds = _dlogits(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...][:, :1],
                     delta_ref[...][:, :1], mask, cfg)
    dq_acc[...] += lax.dot_general(ds.astype(k.dtype), k, NN_DIMS,
                                   precision=common.precision_for(k.dtype),
                                   preferred_element_type=jnp.float32)

  common.run_steps(step, st, count_ref, kind_ref)

  @pl.when(st.pos == last_pos)
  def _finish():
    dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def flash_bwd(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array,
              do: jax.Array, bm: BlockMask, cfg: TpuParams):
  """Gradients of the attention output with respect to q, k and v.

  Args:
    q: [B, Nq, T, D] head-major queries, D a multiple of 128.
    k: [B, Nkv, S, D] keys.
    v: [B, Nkv, S, D] values.
    out: [B, Nq, T, D] forward output.
    lse: [B, Nq, T] float32 forward logsumexp.
    do: [B, Nq, T, D] output cotangent.
    bm: BlockMask at the backward tiling.
    cfg: TpuParams.

  Returns:
    (dq [B, Nq, T, D], dk [B, Nkv, S, D], dv [B, Nkv, S, D]) in the input dtypes.
  """
  batch, num_q_heads, q_len, head_dim = q.shape
  num_kv_heads, kv_len = k.shape[1], k.shape[2]
  group = num_q_heads // num_kv_heads
  block_q, block_kv = bm.block_q, bm.block_kv
  nq, nk = bm.num_q_blocks, bm.num_kv_blocks
  t_pad, s_pad = nq * block_q, nk * block_kv

  delta = jnp.einsum("bntd,bntd->bnt", do.astype(jnp.float32), out.astype(jnp.float32))
  # Row statistics lane-broadcast to [B, Nq, T, 128]; padding rows get lse = +inf (P = 0).
  lanes = lambda x: jnp.broadcast_to(x[..., None], (*x.shape, LANES))
  operands = (pad_axis(q, 2, t_pad), pad_axis(k, 2, s_pad),
              pad_axis(v, 2, s_pad), pad_axis(do.astype(q.dtype), 2, t_pad),
              pad_axis(lanes(lse), 2, t_pad, jnp.inf),
              pad_axis(lanes(delta), 2, t_pad))
  interpret = common.interpret_arg(cfg.interpret)
  static = dict(cfg=cfg, block_q=block_q, block_kv=block_kv)

  def in_specs(specs, mask_specs):
    return [specs["q"], specs["kv"], specs["kv"], specs["q"], specs["stat"], specs["stat"],
            *mask_specs]

  ops = common.mask_operands(bm, "bwd", t_pad, s_pad)
  steps = dkv_steps(ops.indexer, group)
  specs, mask_arrays, mask_specs, flags = common.block_specs(steps, ops, block_q, block_kv,
                                                             head_dim)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, steps=steps, flags=flags, band=ops.band,
                        last_pos=ops.indexer.length - 1, group=group, **static),
      out_shape=(jax.ShapeDtypeStruct((batch, num_kv_heads, s_pad, head_dim), k.dtype),
                 jax.ShapeDtypeStruct((batch, num_kv_heads, s_pad, head_dim), v.dtype)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(batch, num_kv_heads, nk, group, ops.indexer.length),
          in_specs=in_specs(specs, mask_specs),
          out_specs=(specs["kv"], specs["kv"]),
          scratch_shapes=[pltpu.VMEM((block_kv, head_dim), jnp.float32),
                          pltpu.VMEM((block_kv, head_dim), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=(
          "parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="flashjax_tpu_bwd_dkv",
  )(*ops.prefetch, *operands, *mask_arrays)

  ops = common.mask_operands(bm, "fwd", t_pad, s_pad)
  steps = common.fwd_steps(ops.indexer, group)
  specs, mask_arrays, mask_specs, flags = common.block_specs(steps, ops, block_q, block_kv,
                                                             head_dim)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, steps=steps, flags=flags, band=ops.band,
                        last_pos=ops.indexer.length - 1, **static),
      out_shape=jax.ShapeDtypeStruct((batch, num_q_heads, t_pad, head_dim), q.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(batch, num_q_heads, nq, ops.indexer.length),
          in_specs=in_specs(specs, mask_specs),
          out_specs=specs["q"],
          scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="flashjax_tpu_bwd_dq",
  )(*ops.prefetch, *operands, *mask_arrays)
  return dq[:, :, :q_len], dk[:, :, :kv_len], dv[:, :, :kv_len]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, fwd_mask: BlockMask,
              bwd_mask: BlockMask, cfg: TpuParams) -> jax.Array:
  """Differentiable block-sparse attention on head-major arrays.

  Args:
    q: [B, Nq, T, D] queries, D a multiple of 128.
    k: [B, Nkv, S, D] keys.
    v: [B, Nkv, S, D] values.
    fwd_mask: BlockMask at the forward tiling.
    bwd_mask: BlockMask at the backward tiling (may be `fwd_mask`).
    cfg: static TpuParams.

  Returns:
    [B, Nq, T, D] in q.dtype.
  """
  del bwd_mask
  return common.flash_fwd(q, k, v, fwd_mask, cfg)[0]


def _attention_fwd(q, k, v, fwd_mask, bwd_mask, cfg):
  out, lse = common.flash_fwd(q, k, v, fwd_mask, cfg)
  return out, (q, k, v, out, lse, bwd_mask)


def _attention_bwd(cfg, residuals, do):
  q, k, v, out, lse, bwd_mask = residuals
  dq, dk, dv = flash_bwd(q, k, v, out, lse, do, bwd_mask, cfg)
  return dq, dk, dv, None, None


attention.defvjp(_attention_fwd, _attention_bwd)
