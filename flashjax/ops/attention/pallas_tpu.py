"""Block-sparse FlashAttention for TPU (Pallas Mosaic TPU), backend "pallas_tpu": the entry.

`dot_product_attention` (a base.BlockSparseBackend: the contract applies an RCM order
through flashjax.masks.rcm around it) checks the tiling, builds the forward and backward
BlockMasks (flashjax.masks.builders.block_mask_for), moves to the kernels' head-major,
lane-padded layout and calls the differentiable kernel pair `pallas_tpu_vjp.attention`. The kernels live in pallas_tpu_common (the forward and the pieces
both passes share) and pallas_tpu_vjp (the backward); neither imports this module.

No TPU was reachable while writing this: correctness is checked in interpret mode on CPU and
the TPU lowering is traced on CPU; speed is unmeasured (docs/tpu.md).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax.numpy as jnp

from flashjax.masks import builders
from flashjax.masks.block_mask import BlockMask
from flashjax.ops.attention import base, pallas_tpu_vjp
from flashjax.ops.attention.block_sizes import BlockSizes
from flashjax.ops.attention.pallas_tpu_common import LANES, TpuParams
from flashjax.ops.tiling import round_up

SUBLANES = 8
DEFAULT_BLOCK_SIZES = BlockSizes(block_q=128, block_kv=128)


def min_block_q(dtype) -> int:
  """Smallest legal block_q for `dtype`: 8 sublanes of 32 bits, packed for narrower types."""
  return SUBLANES * max(1, 4 // jnp.dtype(dtype).itemsize)


def validate_block_shape(block_q: int, block_kv: int, dtype, what: str = "") -> None:
  """NotImplementedError unless (block_q, block_kv) fits the TPU (8, 128) tiling for `dtype`:
  the tiles are fine for other backends, so lists of names move on."""
  if block_kv % LANES:
    raise NotImplementedError(
        f"pallas_tpu{what}: {block_kv=} must be a multiple of {LANES} (TPU lanes)")
  need = min_block_q(dtype)
  if block_q % need:
    raise NotImplementedError(
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


class _Plan(NamedTuple):
  fwd_mask: BlockMask
  bwd_mask: BlockMask
  params: TpuParams


class PallasTpu(base.BlockSparseBackend):
  """Block-sparse FlashAttention on TPU (the "pallas_tpu" backend).

  Takes the canonical arguments of flashjax.ops.attention.base (no bias: NotImplementedError).
  block_sizes: BlockSizes, default 128 x 128; block_kv must be a multiple of 128 and block_q
  of 8 (16 for 16-bit inputs). interpret=True runs the kernels in Pallas interpret mode (CPU
  tests); a pltpu.InterpretParams selects the TPU interpreter instead. An RCM-reordered
  BlockMask with is_causal or segment ids is refused (NotImplementedError).
  """

  name = "pallas_tpu"
  bias_hint = "use the xla backend or express the bias as a mask"

  def check_supported(self, args):
    if args.permuted and (args.is_causal or args.q_segment_ids is not None):
      # The kernels would apply them in the permuted order.
      raise NotImplementedError("pallas_tpu: an RCM-reordered BlockMask cannot be combined "
                                "with is_causal or segment ids")

  def plan(self, args):
    dtype = args.query.dtype
    block_q, block_kv, block_q_bwd, block_kv_bwd = _kernel_tiling(args.mask, args.block_sizes)
    validate_block_shape(block_q, block_kv, dtype)
    validate_block_shape(block_q_bwd, block_kv_bwd, dtype, " backward")
    make_mask = functools.partial(
        builders.block_mask_for, q_len=args.q_len, kv_len=args.kv_len, mask=args.mask,
        is_causal=args.is_causal, q_segment_ids=args.q_segment_ids,
        kv_segment_ids=args.kv_segment_ids)
    fwd_mask = make_mask(block_q=block_q, block_kv=block_kv)
    bwd_mask = fwd_mask
    if (block_q_bwd, block_kv_bwd) != (block_q, block_kv):
      bwd_mask = make_mask(block_q=block_q_bwd, block_kv=block_kv_bwd)
    params = TpuParams(scale=float(args.scale), soft_cap=args.logits_soft_cap,
                       q_len=args.q_len, kv_len=args.kv_len, interpret=args.interpret)
    return _Plan(fwd_mask, bwd_mask, params)

  def kernel(self, query, key, value, plan):
    head_dim = query.shape[3]
    # [B, T, N, D] -> head-major [B, N, T, Dp]; zero lanes added to D change no dot product.
    d_pad = round_up(head_dim, LANES) - head_dim
    q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, d_pad))).transpose(0, 2, 1, 3)
               for x in (query, key, value))
    out = pallas_tpu_vjp.attention(q, k, v, plan.fwd_mask, plan.bwd_mask, plan.params)
    return out[..., :head_dim].transpose(0, 2, 1, 3)


dot_product_attention = PallasTpu()
