"""Block-sparse FlashAttention forward in Pallas Mosaic GPU (Hopper: TMA + wgmma).

Status: first step of the backend. The forward kernel below is checked in Mosaic GPU
interpret mode on CPU only; it has NEVER run on a GPU. Until it has,
`dot_product_attention(..., interpret=False)` raises NotImplementedError ("not yet validated on
a GPU") unless the environment variable FLASHJAX_MOSAIC_GPU_UNVALIDATED=1 is set, so that
`implementation=None` on Hopper keeps falling through to "pallas_triton". The next session
removes this gate after the H200 run (docs/mosaic_gpu.md lists what to check).

Interpret mode: `interpret=True` runs the kernel under Mosaic GPU's own interpreter
(`InterpretGPUParams`, which simulates SMEM, TMA, barriers and wgmma). Pallas' generic
interpreter (what `plgpu.kernel(..., interpret=True)` selects) supports none of TMA copies,
wgmma, commit_smem or layout_cast on jax 0.10.2; docs/mosaic_gpu.md has the probe results.

Design (DESIGN.md ideas 1 and 2; same BlockMask consumption as pallas_triton):

* One program per (query block i, batch b * Nq + query head h), one warpgroup. It TMA-loads its
  Q tile [bq, Dp] into SMEM, then walks the compacted kv block list of its query block: FULL
  slots first with no mask code, then PARTIAL slots that AND the ElementRule, the stored tile
  and the sequence bounds (pallas_triton's list reordering and tile-mask helpers are reused).
* K^T and V tiles stream through a 2-slot SMEM ring: the TMA for list slot n + 1 is issued
  before slot n is computed, one barrier per slot and operand. The ring runs across the FULL
  and PARTIAL loops (buffer = list slot % 2).
* Matmuls are wgmma with both operands in SMEM and f32 accumulators: S = Q @ K^T with K^T
  pre-transposed in XLA to [B, Nkv, Dp, S] (the interpreter cannot read a `transpose_ref`
  operand), and O += P @ V with P (cast to the input dtype) staged in SMEM (the interpreter
  cannot take a register operand). Both are candidates for the GPU tuning step.
* Online softmax in f32, base 2 (logits times log2(e), exp2), like pallas_triton: the saved
  statistic is lse2 = max + log2(sum) per row, [B * Nq, T], +inf for rows with no allowed key,
  whose output is 0.
* GQA: query head h reads kv head h // (Nq // Nkv); K/V are never repeated in memory.
* Backward: `jax.custom_vjp` whose backward is pallas_triton's dK/dV and dQ kernels (same lse2
  convention, same BlockMasks), so the API differentiates; on a GPU those are Triton kernels.
* Inputs must be bfloat16 or float16 (wgmma has no f32 x f32 form): float32 raises
  NotImplementedError so dispatch moves on. Head dim <= 256, padded to a power of two >= 16.

Block sizes: block_q must be a multiple of 64 (one warpgroup's wgmma M) and block_kv a
multiple of 16 (the K extent of the P @ V wgmma); defaults 64 x 64 (interpret: 64 x 32),
shrunk to the sequence where that stays valid.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from flashjax.masks.block_mask import BlockMask
from flashjax.ops.attention import pallas_triton as triton_backend
from flashjax.ops.attention.configs import BlockSizes

_LOG2E = math.log2(math.e)
_MAX_HEAD_DIM = 256
_DTYPES = (jnp.bfloat16, jnp.float16)
_GATE_ENV = "FLASHJAX_MOSAIC_GPU_UNVALIDATED"
_WGMMA_M = 64
_WGMMA_K = 16

# pallas_triton internals shared on purpose: same BlockMask operands and tile-mask code,
# same residuals, and its backward kernels.
# pylint: disable=protected-access
_MaskLayout = triton_backend._MaskLayout
_TritonParams = triton_backend._Params
_triton_attention_bwd = triton_backend._attention_bwd
_block_masks = triton_backend._block_masks
_check_block_mask = triton_backend._check_block_mask
_triton_check_inputs = triton_backend._check_inputs
_full_then_partial = triton_backend._full_then_partial
_head_dim_padded = triton_backend._head_dim_padded
_launch_params = triton_backend._launch_params
_mask_logits = triton_backend._mask_logits
_mask_operands = triton_backend._mask_operands
_pad_to = triton_backend._pad_to
_pow2_ceil = triton_backend._pow2_ceil
_unpack_mask_refs = triton_backend._unpack_mask_refs
# pylint: enable=protected-access


def _interpret_params() -> Any:
  """Mosaic GPU interpreter parameters (jax-private module: NotImplementedError if absent)."""
  try:
    from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise NotImplementedError(
        "pallas_mosaic_gpu: this jax has no Mosaic GPU interpreter (InterpretGPUParams)") from e
  return params.InterpretGPUParams()


def default_block_sizes(head_dim: int, q_len: int, kv_len: int, *,
                        interpret: bool = False) -> BlockSizes:
  """64 x 64 tiles (interpret mode 64 x 32), block_kv shrunk to the sequence (>= 16).

  Args:
    head_dim: D (unused for now: one tiling until the GPU sweep).
    q_len: T (unused: block_q stays 64, one warpgroup's wgmma M).
    kv_len: S.
    interpret: True for interpret mode (CPU tests): more, smaller kv tiles.

  Returns:
    BlockSizes whose backward tiles (used by the pallas_triton backward) equal the forward.
  """
  del head_dim, q_len
  block_kv = min(32 if interpret else 64, max(_WGMMA_K, _pow2_ceil(kv_len)))
  return BlockSizes(_WGMMA_M, block_kv)


def _check_tiling(block_q: int, block_kv: int) -> None:
  """block_q must fill whole wgmma M tiles; block_kv (a power of two >= 16, BlockSizes) always
  fits the K extent of the P @ V wgmma."""
  if block_q % _WGMMA_M:
    raise ValueError(f"pallas_mosaic_gpu: {block_q=} must be a multiple of {_WGMMA_M} "
                     f"(one warpgroup's wgmma M); {block_kv=}")


def _swizzled_smem(shape: tuple[int, ...], dtype) -> Any:
  """SMEM scratch with the tiling + swizzle layout wgmma operands want (minor dim swizzled)."""
  bits = jnp.finfo(dtype).bits
  swizzle = plgpu.find_swizzle(shape[-1] * bits)
  transforms = (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))
  return plgpu.SMEM(shape, dtype, transforms=transforms)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static kernel parameters of the forward."""

  scale: float
  soft_cap: float | None
  interpret: bool


def _forward_kernel(q_ref, kt_ref, v_ref, *refs, layout, config: _Config, num_heads: int,
                    group: int, head_dim: int):
  """One query block of one (batch, query head): online softmax over its kv block list.

  Refs (GMEM): q [B, T_pad, Nq, Dp], kt [B, Nkv, Dp, S_pad], v [B, S_pad, Nkv, Dp], the
  pallas_triton mask operands (fwd lists), outputs o [B, T_pad, Nq, Dp] and lse2
  [B * Nq, T_pad]; then scratch: q/o SMEM [bq, Dp], K^T ring [2, Dp, bk], V ring [2, bk, Dp],
  P [bq, bk], lse2 SMEM [bq], barriers (Q, K x2, V x2).
  """
  (*mask_refs, o_ref, lse_ref, q_smem, kt_smem, v_smem, p_smem, lse_smem, q_bar, k_bars,
   v_bars) = refs
  m = _unpack_mask_refs(layout, mask_refs)
  qi, bh = lax.axis_index("q"), lax.axis_index("bh")
  batch, head = lax.div(bh, num_heads), lax.rem(bh, num_heads)
  kv_head = lax.div(head, group)
  mb = 0 if layout.batch_bcast else batch
  mh = 0 if layout.head_bcast else head
  bq, bk = layout.block_q, layout.block_kv
  q_start = qi * bq
  count = m.count[mb, mh, qi]
  # Register layouts only exist when compiled; the interpreter has no layout_cast rule.
  cast = (lambda x, _: x) if config.interpret else plgpu.layout_cast
  row_layout = plgpu.Layout.WGMMA.reduce(1)

  def fetch(slot):
    """Starts the TMA loads of list slot `slot`'s K^T and V tiles into ring buffer slot % 2."""
    buf = lax.rem(slot, 2)
    kv_start = m.block[mb, mh, qi, slot] * bk
    plgpu.copy_gmem_to_smem(kt_ref.at[batch, kv_head, :, pl.ds(kv_start, bk)],
                            kt_smem.at[buf], k_bars.at[buf])
    plgpu.copy_gmem_to_smem(v_ref.at[batch, pl.ds(kv_start, bk), kv_head], v_smem.at[buf],
                            v_bars.at[buf])

  plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_start, bq), head], q_smem, q_bar)

  @pl.when(count > 0)
  def _():
    fetch(0)

  plgpu.barrier_wait(q_bar)

  def body(slot, carry, *, partial):
    acc, row_max, row_sum = carry
    buf = lax.rem(slot, 2)

    @pl.when(slot + 1 < count)
    def _():
      fetch(slot + 1)

    plgpu.barrier_wait(k_bars.at[buf])

    def qk(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, kt_smem.at[buf])
      return plgpu.wgmma_accumulator_load(acc_ref)

    s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
    if config.soft_cap is None:
      s = s * (config.scale * _LOG2E)
    else:
      s = jnp.tanh(s * (config.scale / config.soft_cap)) * (config.soft_cap * _LOG2E)
    kv_start = m.block[mb, mh, qi, slot] * bk
    s = _mask_logits(s, layout, m, batch, (mb, mh, qi, slot), q_start, kv_start,
                     partial=partial)
    new_max = jnp.maximum(row_max, s.max(axis=1))
    shift = new_max
    if partial:
      # A row with no allowed key yet has max -inf: shift by 0 so exp2(-inf - shift) = 0.
      # FULL slots run first and make every row max finite, so their loop needs no guard.
      shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
    alpha = jnp.exp2(row_max - shift)
    p = jnp.exp2(s - shift[:, None])
    p_smem[...] = p.astype(p_smem.dtype)
    plgpu.commit_smem()
    plgpu.barrier_wait(v_bars.at[buf])

    def pv(acc_ref):
      plgpu.wgmma(acc_ref, p_smem, v_smem.at[buf])
      return plgpu.wgmma_accumulator_load(acc_ref)

    pv_out = pl.run_scoped(pv, plgpu.ACC((bq, head_dim), jnp.float32))
    return alpha[:, None] * acc + pv_out, new_max, alpha * row_sum + p.sum(axis=1)

  init = (cast(jnp.zeros((bq, head_dim), jnp.float32), plgpu.Layout.WGMMA),
          cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout),
          cast(jnp.zeros((bq,), jnp.float32), row_layout))
  acc, row_max, row_sum = _full_then_partial(layout, m, (mb, mh, qi), body, init)
  empty = row_sum == 0.0
  # Q is no longer read (every wgmma was awaited): its SMEM tile stages the output.
  q_smem[...] = (acc / jnp.where(empty, 1.0, row_sum)[:, None]).astype(q_smem.dtype)
  lse_smem[...] = jnp.where(empty, jnp.inf, row_max + jnp.log2(row_sum))
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, pl.ds(q_start, bq), head])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bh, pl.ds(q_start, bq)])
  plgpu.wait_smem_to_gmem(0)


def _forward(q, k, v, bm: BlockMask, config: _Config):
  """Forward pass.

  Args:
    q: [B, T, Nq, D] bfloat16 or float16.
    k: [B, S, Nkv, D].
    v: [B, S, Nkv, D].
    bm: BlockMask of logical shape (Bm, Nm, T, S).
    config: static kernel parameters.

  Returns:
    out [B, T, Nq, D] (dtype of q) and lse2 [B * Nq, T] float32 (base-2 logsumexp of the
    scaled logits, +inf for rows without an allowed key): pallas_triton's residual layout.
  """
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  layout = _MaskLayout.of(bm)
  bq, bk = layout.block_q, layout.block_kv
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  dp = _head_dim_padded(head_dim)
  mask_ops = _mask_operands(bm, layout, backward=False, q_pad=nq * bq, kv_pad=nk * bk)
  # K^T [B, Nkv, Dp, S_pad]: the QK^T wgmma reads its B operand untransposed from SMEM.
  kt = jnp.einsum("bsnd->bnds", _pad_to(k, nk * bk, dp))
  kernel = functools.partial(_forward_kernel, layout=layout, config=config,
                             num_heads=num_heads, group=num_heads // num_kv_heads,
                             head_dim=dp)
  kernel.__name__ = "flashjax_mosaic_gpu_fwd"  # plgpu.kernel names the kernel after its body
  scratch = [
      _swizzled_smem((bq, dp), q.dtype),
      _swizzled_smem((2, dp, bk), q.dtype),
      _swizzled_smem((2, bk, dp), q.dtype),
      _swizzled_smem((bq, bk), q.dtype),
      plgpu.SMEM((bq,), jnp.float32),
      plgpu.Barrier(num_arrivals=1),
      plgpu.Barrier(num_arrivals=1, num_barriers=2),
      plgpu.Barrier(num_arrivals=1, num_barriers=2),
  ]
  out, lse = plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct((batch, nq * bq, num_heads, dp), q.dtype),
                jax.ShapeDtypeStruct((batch * num_heads, nq * bq), jnp.float32)],
      scratch_types=scratch,
      grid=(nq, batch * num_heads),
      grid_names=("q", "bh"),
      interpret=_interpret_params() if config.interpret else None,
  )(_pad_to(q, nq * bq, dp), kt, _pad_to(v, nk * bk, dp), *mask_ops)
  return out[:, :q_len, :, :head_dim], lse[:, :q_len]


# ---------------------------------------------------------------------- custom_vjp wiring


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, fwd_mask: BlockMask, bwd_mask: BlockMask, config: _Config,
               bwd_params: Any):
  del bwd_mask, bwd_params
  return _forward(q, k, v, fwd_mask, config)[0]


def _attention_fwd(q, k, v, fwd_mask, bwd_mask, config, bwd_params):
  del bwd_params
  out, lse = _forward(q, k, v, fwd_mask, config)
  return out, (q, k, v, out, lse, fwd_mask, bwd_mask)


def _attention_bwd(config, bwd_params, residuals, do):
  # pallas_triton's backward takes exactly these residuals (same lse2 layout and masks).
  del config
  return _triton_attention_bwd(bwd_params, residuals, do)


_attention.defvjp(_attention_fwd, _attention_bwd)


# -------------------------------------------------------------------------- entry point


def _check_inputs(query, key, value):
  # wgmma takes bfloat16 / float16 operands only.
  _triton_check_inputs(query, key, value, backend="pallas_mosaic_gpu", dtypes=_DTYPES,
                       max_head_dim=_MAX_HEAD_DIM)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: Any = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Block-sparse FlashAttention (Pallas Mosaic GPU forward, pallas_triton backward).

  Args:
    query: [B, T, Nq, D] bfloat16 or float16; D <= 256.
    key: [B, S, Nkv, D], Nq % Nkv == 0; query head n uses kv head n // (Nq // Nkv).
    value: [B, S, Nkv, D].
    bias: must be None (additive bias is not supported by this backend).
    mask: None | flashjax.masks.Mask | BlockMask | bool array [B|1, Nq|1, T, S].
    q_segment_ids: None or int32 [B, T].
    kv_segment_ids: None or int32 [B, S] (given together with q_segment_ids).
    is_causal: AND the mask with j <= i.
    scale: logit scale (default 1 / sqrt(D)).
    logits_soft_cap: None or cap > 0: logits = cap * tanh(logits / cap).
    block_sizes: BlockSizes (block_q % 64 == 0, block_kv % 16 == 0) or None for
      `default_block_sizes`; the backward (pallas_triton) uses its *_bwd tiles.
    interpret: run the forward in Mosaic GPU interpret mode (CPU) and the backward in Pallas
      interpret mode.

  Returns:
    [B, T, Nq, D] in the query's dtype; rows with no allowed key are 0.

  Raises:
    NotImplementedError: for bias, float32 or other dtypes, D > 256, and, until the kernel
      is validated on a GPU, for interpret=False without FLASHJAX_MOSAIC_GPU_UNVALIDATED=1.
    ValueError: for inconsistent shapes, tiles that wgmma cannot use, or a block_sizes that
      disagrees with a BlockMask.
  """
  if not interpret and os.environ.get(_GATE_ENV) != "1":
    raise NotImplementedError(
        "pallas_mosaic_gpu: not yet validated on a GPU; see docs/mosaic_gpu.md")
  if bias is not None:
    raise NotImplementedError(
        "pallas_mosaic_gpu: additive bias is not supported; use the xla backend")
  _check_inputs(query, key, value)
  if logits_soft_cap is not None and logits_soft_cap <= 0:
    raise ValueError(f"{logits_soft_cap=} must be > 0")
  if block_sizes is None and not isinstance(mask, BlockMask):
    block_sizes = default_block_sizes(query.shape[3], query.shape[1], key.shape[1],
                                      interpret=interpret)
  fwd_mask, bwd_mask, sizes = _block_masks(
      mask, query, key, is_causal=is_causal, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, block_sizes=block_sizes, interpret=interpret)
  _check_tiling(fwd_mask.block_q, fwd_mask.block_kv)
  for bm in (fwd_mask, bwd_mask):
    _check_block_mask(bm, query, key)
  scale = 1.0 / math.sqrt(query.shape[3]) if scale is None else float(scale)
  soft_cap = None if logits_soft_cap is None else float(logits_soft_cap)
  config = _Config(scale=scale, soft_cap=soft_cap, interpret=bool(interpret))
  fwd_launch, dq_launch, dkdv_launch = _launch_params(sizes, query.shape[3],
                                                      (bwd_mask.block_q, bwd_mask.block_kv))
  bwd_params = _TritonParams(
      scale=scale, soft_cap=soft_cap, interpret=bool(interpret), fwd_launch=fwd_launch,
      dq_launch=dq_launch, dkdv_launch=dkdv_launch)
  q_perm, kv_perm = fwd_mask.q_perm, fwd_mask.kv_perm
  if q_perm is not None:
    query = jnp.take(query, q_perm, axis=1)
  if kv_perm is not None:
    key, value = jnp.take(key, kv_perm, axis=1), jnp.take(value, kv_perm, axis=1)
  out = _attention(query, key, value, fwd_mask, bwd_mask, config, bwd_params)
  if q_perm is not None:
    out = jnp.take(out, jnp.argsort(q_perm), axis=1)
  return out
