"""Tile sizes of the blocked attention kernels (`BlockSizes`, the API's `block_sizes=`).

The backends' static kernel parameters built from them are each backend's `*Params`
(pallas_gpu_common.TritonParams, pallas_mosaic_gpu_common.MosaicParams,
pallas_tpu_common.TpuParams).
"""

from __future__ import annotations

import dataclasses

from flashjax.ops.tiling import is_pow2, pow2_ceil

# Forward dispatch forms of the pallas_triton kernel (`BlockSizes.dispatch`).
DISPATCHES = ("lists", "flags")


def padded_head_dim(head_dim: int) -> int:
  """D as the Pallas attention kernels pad it: the next power of two, at least 16."""
  return max(16, pow2_ceil(head_dim))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and launch parameters of a blocked attention kernel.

  The forward pass tiles queries by `block_q` and keys by `block_kv`; these are also the
  tiles of the BlockMask the kernel consumes. The backward pass uses
  `block_q_bwd` x `block_kv_bwd` (None: same as the forward) with its own BlockMask when the
  mask can be rebuilt at that tiling, and the forward tiling when the caller passed a
  BlockMask.

  Attributes:
    block_q: query rows per tile (power of two >= 16).
    block_kv: keys per tile (power of two >= 16).
    block_q_bwd: query rows per backward tile, or None.
    block_kv_bwd: keys per backward tile, or None.
    num_warps: GPU warps per program (Triton), None for the backend default.
    num_stages: software-pipelining depth (GPU), None for the backend default.
    persistent: Mosaic GPU forward: one program per SM looping over work items ordered by
      their number of non-empty blocks (True), one program per work item (False), or None
      for the backend default. Other backends ignore it.
    dispatch: pallas_triton forward: how a query block finds its kv tiles. "lists" (the
      backend default, None): loop over the BlockMask's compacted list of non-empty tiles;
      "flags": the binary block masking paper's form, loop over every kv tile and skip the
      EMPTY ones by their kind flag (an ablation). The backward kernels always use the lists.
      Other backends ignore it.
    fused_backward: Mosaic GPU backward: dQ, dK and dV in one kernel over the dK/dV lists
      (True: 5 tile matmuls per slot, dQ reduce-added in float32 in a run-dependent order;
      slower than the two kernels on an H100 and refused under jax.vmap), or the dQ and
      dK/dV kernels (False / None, the default). Other backends ignore it.
  """

  block_q: int = 128
  block_kv: int = 64
  block_q_bwd: int | None = None
  block_kv_bwd: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  persistent: bool | None = None
  dispatch: str | None = None
  fused_backward: bool | None = None

  def __post_init__(self):
    for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
      value = getattr(self, name)
      if value is None and name.endswith("_bwd"):
        continue
      if not isinstance(value, int) or not is_pow2(value) or value < 16:
        raise ValueError(f"BlockSizes.{name}={value!r} must be a power of two >= 16")
    for name in ("num_warps", "num_stages"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"BlockSizes.{name}={value!r} must be a positive int or None")
    for name in ("persistent", "fused_backward"):
      value = getattr(self, name)
      if value is not None and not isinstance(value, bool):
        raise ValueError(f"BlockSizes.{name}={value!r} must be a bool or None")
    if self.dispatch is not None and self.dispatch not in DISPATCHES:
      raise ValueError(f"BlockSizes.dispatch={self.dispatch!r} must be one of {DISPATCHES} "
                       "or None")

  @property
  def bwd_q(self) -> int:
    return self.block_q_bwd or self.block_q

  @property
  def bwd_kv(self) -> int:
    return self.block_kv_bwd or self.block_kv
