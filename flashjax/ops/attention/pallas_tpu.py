"""Block-sparse FlashAttention for TPU (Pallas Mosaic TPU), backend "pallas_tpu": the entry.

`dot_product_attention` checks the tiling, builds the forward and backward BlockMasks
(flashjax.masks.builders.block_mask_for), applies an RCM order (flashjax.masks.rcm), moves to
the kernels' head-major, lane-padded layout and calls the differentiable kernel pair
`pallas_tpu_vjp.attention`. The kernels live in pallas_tpu_common (the forward and the pieces
both passes share) and pallas_tpu_vjp (the backward); neither imports this module.

No TPU was reachable while writing this: correctness is checked in interpret mode on CPU and
the TPU lowering is traced on CPU; speed is unmeasured (docs/tpu.md).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from flashjax.masks import builders, rcm
from flashjax.masks.block_mask import BlockMask
from flashjax.ops.attention import pallas_tpu_vjp
from flashjax.ops.attention.block_sizes import BlockSizes
from flashjax.ops.attention.pallas_tpu_common import LANES, KernelConfig
from flashjax.ops.tiling import round_up

SUBLANES = 8
DEFAULT_BLOCK_SIZES = BlockSizes(block_q=128, block_kv=128)


def min_block_q(dtype) -> int:
  """Smallest legal block_q for `dtype`: 8 sublanes of 32 bits, packed for narrower types."""
  return SUBLANES * max(1, 4 // jnp.dtype(dtype).itemsize)


def validate_block_shape(block_q: int, block_kv: int, dtype, what: str = "") -> None:
  """Raises ValueError unless (block_q, block_kv) fits the TPU (8, 128) tiling for `dtype`."""
  if block_kv % LANES:
    raise ValueError(f"pallas_tpu{what}: {block_kv=} must be a multiple of {LANES} (TPU lanes)")
  need = min_block_q(dtype)
  if block_q % need:
    raise ValueError(
        f"pallas_tpu{what}: {block_q=} must be a multiple of {need} for {jnp.dtype(dtype).name}")


def _kernel_tiling(mask: Any, block_sizes: BlockSizes | None) -> tuple[int, int, int, int]:
  """(block_q, block_kv, block_q_bwd, block_kv_bwd) for these inputs.

  A BlockMask fixes the tiling of both passes; `block_sizes` must then agree with it.
  """
  if isinstance(mask, BlockMask):
    if block_sizes is not None and (block_sizes.block_q, block_sizes.block_kv) != (
        mask.block_q, mask.block_kv):
      raise ValueError(
          f"pallas_tpu: {block_sizes=} disagrees with the BlockMask tiles "
          f"{mask.block_q=}, {mask.block_kv=}")
    return mask.block_q, mask.block_kv, mask.block_q, mask.block_kv
  sizes = block_sizes or DEFAULT_BLOCK_SIZES
  return sizes.block_q, sizes.block_kv, sizes.bwd_q, sizes.bwd_kv


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
    interpret: Any = False,
) -> jax.Array:
  """Block-sparse FlashAttention on TPU (the "pallas_tpu" backend protocol).

  Args:
    query: [B, T, Nq, D].
    key: [B, S, Nkv, D], Nq % Nkv == 0 (query head n reads kv head n // (Nq // Nkv)).
    value: [B, S, Nkv, D].
    bias: must be None (additive bias is not supported).
    mask: None | flashjax.masks.Mask | BlockMask | bool array [B|1, Nq|1, T, S].
    q_segment_ids: None or int32 [B, T].
    kv_segment_ids: None or int32 [B, S] (with q_segment_ids).
    is_causal: AND a causal mask (j <= i).
    scale: logits multiplier, default 1/sqrt(D).
    logits_soft_cap: None or cap > 0: logits = cap * tanh(logits / cap).
    block_sizes: BlockSizes; default 128 x 128. block_kv must be a multiple of 128 and
      block_q of 8 (16 for 16-bit inputs).
    interpret: run the kernels in Pallas interpret mode (CPU tests); a
      pltpu.InterpretParams selects the TPU interpreter instead.

  Returns:
    [B, T, Nq, D] in query.dtype; rows with no allowed key are 0.
  """
  if bias is not None:
    raise NotImplementedError("pallas_tpu: additive bias is not supported; use the xla "
                              "backend or express the bias as a mask")
  _, q_len, num_q_heads, head_dim = query.shape
  kv_len, num_kv_heads = key.shape[1], key.shape[2]
  if num_q_heads % num_kv_heads:
    raise ValueError(f"pallas_tpu: {num_q_heads=} must be a multiple of {num_kv_heads=}")
  permuted = isinstance(mask, BlockMask) and (mask.q_perm is not None
                                              or mask.kv_perm is not None)
  if permuted and (is_causal or q_segment_ids is not None):
    # The kernels would apply them in the permuted order.
    raise NotImplementedError("pallas_tpu: an RCM-reordered BlockMask cannot be combined "
                              "with is_causal or segment ids")
  block_q, block_kv, block_q_bwd, block_kv_bwd = _kernel_tiling(mask, block_sizes)
  validate_block_shape(block_q, block_kv, query.dtype)
  validate_block_shape(block_q_bwd, block_kv_bwd, query.dtype, " backward")
  make_mask = functools.partial(
      builders.block_mask_for, q_len=q_len, kv_len=kv_len, mask=mask, is_causal=is_causal,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
  fwd_mask = make_mask(block_q=block_q, block_kv=block_kv)
  bwd_mask = fwd_mask
  if (block_q_bwd, block_kv_bwd) != (block_q, block_kv):
    bwd_mask = make_mask(block_q=block_q_bwd, block_kv=block_kv_bwd)
  cfg = KernelConfig(
      scale=float(scale if scale is not None else 1.0 / head_dim**0.5),
      soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
      q_len=q_len, kv_len=kv_len, interpret=interpret)
  if permuted:
    # An RCM BlockMask describes the sequences reordered by q_perm / kv_perm.
    query, key, value = rcm.permute_qkv(query, key, value, fwd_mask)
  # [B, T, N, D] -> head-major [B, N, T, Dp]; zero lanes added to D change no dot product.
  d_pad = round_up(head_dim, LANES) - head_dim
  q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, d_pad))).transpose(0, 2, 1, 3)
             for x in (query, key, value))
  out = pallas_tpu_vjp.attention(q, k, v, fwd_mask, bwd_mask, cfg)
  out = out[..., :head_dim].transpose(0, 2, 1, 3)
  return rcm.unpermute_output(out, fwd_mask) if permuted else out
