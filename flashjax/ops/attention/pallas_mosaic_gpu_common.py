"""What the Pallas Mosaic GPU (Hopper) attention forward and backward kernels share.

Static parameters (`MosaicParams`), the BlockMask operands regrouped for TMA (`MaskParts`,
`mask_parts`), the partial-tile rule (`keep_mask`), one query work item of a kernel
(`QueryItem`), the persistent-grid machinery (`num_programs`, `longest_first`,
`query_item_order`, `for_each_item`, `grid_and_order`), the warpgroup split
(`run_warpgroups`), the compiled / interpreted register forms (`KernelOps`), SMEM layouts
(`swizzled_smem`) and the launchers (`launch`; `launch_with_refs` with `refuse_vmap`
for kernels that take mutable Refs), plus the Hopper limits both passes plan with.
The forward kernel (pallas_mosaic_gpu.py) and the backward kernels (pallas_mosaic_gpu_vjp.py)
import this module; it imports neither.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from flashjax.masks.block_mask import BlockMask
from flashjax.ops.attention.pallas_gpu_common import mask_operands

ROWS = 64  # rows of one consumer warpgroup (wgmma M) and the streamed tile of each kernel
BWD_MAX_HEAD_DIM = 128  # padded D of the backward kernels (dK + dV accumulators in registers)
SMEM_LIMIT = 232448  # bytes of shared memory per block on Hopper (227 KiB)
HOPPER_SMS = 132  # SMs of an H100 / H200 SXM
INTERPRET_PROGRAMS = 3  # persistent programs in interpret mode
# setmaxnreg registers per thread of (the producer, each consumer) with two consumer
# warpgroups: a 384-thread block launches with 168 a thread, which the warpgroups re-split
# (40 + 2 x 232 = 504 = 3 x 168). FlashAttention-3 gives its consumers 240 (24 + 2 x 240);
# (24, 240) is kept as an experiment (`experiments.kernel_resources` compiles both) until a
# GPU run says which is faster. One consumer always takes (40, 240).
REGISTERS_TWO_CONSUMERS = (40, 232)


def register_split(consumers: int) -> tuple[int, int]:
  """(producer, consumer) setmaxnreg counts; refuses a split setmaxnreg cannot take."""
  split = REGISTERS_TWO_CONSUMERS if consumers == 2 else (40, 240)
  producer, consumer = split
  if (any(r % 8 or not 24 <= r <= 256 for r in split)
      or producer + consumers * consumer > 504):
    raise ValueError(f"register split {split!r} for {consumers} consumer warpgroups: each count "
                     "must be a multiple of 8 in [24, 256] and producer + consumers x consumer "
                     "<= 504 (3 warpgroups x 168 at launch)")
  return producer, consumer


@dataclasses.dataclass(frozen=True)
class MosaicParams:
  """Static parameters of the forward and backward kernels (stages: K/V ring depth of the
  forward; the backward runs 2-stage rings)."""

  scale: float
  soft_cap: float | None
  interpret: bool
  stages: int = 2
  persistent: bool = False  # one program per SM over the work items, longest list first
  fused_backward: bool = False  # backward: dQ, dK, dV in one kernel (vjp.dkdv_dq)
  overlap: bool = False  # forward: intra-warpgroup overlap of softmax and products


class MaskParts(NamedTuple):
  """One direction's BlockMask operands, in kernel-argument order (absent parts are None).

  count [Bm, Nm, n] int32, block [Bm, Nm, n, L] int32 (FULL slots first), n_full [Bm, Nm, n],
  tile [Bm, Nm, n, L] stored-tile index per slot; q_seg [B|1, T_pad] int32; kv_meta
  [B|1, S_pad] int32 = 2 * kv segment id + (key in a prefix); tiles [n_tiles, bq, bk] (forward
  lists) or [n_tiles, bk, bq] (backward lists) in the input dtype, 0 where allowed and -inf
  elsewhere (added to the logits).
  """

  count: Any
  block: Any
  n_full: Any = None
  tile: Any = None
  q_seg: Any = None
  kv_meta: Any = None
  tiles: Any = None


def mask_parts(bm: BlockMask, layout, dtype, q_pad: int, kv_pad: int, *,
               backward: bool) -> MaskParts:
  """The kernels' mask operands of `bm`: forward (per query block) or backward lists."""
  ops = iter(mask_operands(bm, layout, backward=backward, q_pad=q_pad, kv_pad=kv_pad))
  take = lambda present: next(ops) if present else None
  count, block = next(ops), next(ops)
  n_full, tile = take(layout.has_partial), take(layout.has_tiles)
  q_seg, kv_seg = take(layout.has_segments), take(layout.has_segments)
  prefix, tiles = take(layout.has_prefix), take(layout.has_tiles)
  kv_meta = None
  if kv_seg is not None:
    kv_meta = 2 * kv_seg + (0 if prefix is None else prefix.astype(jnp.int32))
  if tiles is not None:
    tiles = jnp.where(tiles != 0, 0.0, -jnp.inf).astype(dtype)
    if backward:  # the dK/dV kernel's tiles have keys as rows
      tiles = jnp.swapaxes(tiles, 1, 2)
  return MaskParts(count, block, n_full, tile, q_seg, kv_meta, tiles)


def swizzled_smem(shape: tuple[int, ...], dtype) -> Any:
  """SMEM scratch with the tiling + swizzle layout wgmma operands want (minor dim swizzled)."""
  bits = jnp.finfo(dtype).bits
  swizzle = plgpu.find_swizzle(shape[-1] * bits)
  transforms = (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))
  return plgpu.SMEM(shape, dtype, transforms=transforms)


def mask_scratch(layout, *, stages: int, streamed_len: int, tile_shape: tuple[int, int], dtype,
                 resident: tuple[int, int] | None = None) -> list[Any]:
  """Shared memory (and barriers) for the mask operands a kernel copies in: per pipeline stage
  the streamed block's segment ids / prefix flags [streamed_len] and the stored tile
  [tile_shape]; with resident=(consumers, rows), each consumer's resident-block segment ids
  first. Empty for masks without segments or stored tiles."""
  scratch = []
  if layout.has_segments:
    if resident is not None:
      consumers, rows = resident
      scratch += [plgpu.SMEM((consumers, rows), jnp.int32),
                  plgpu.Barrier(num_arrivals=1, num_barriers=consumers)]
    scratch += [plgpu.SMEM((stages, streamed_len), jnp.int32),
                plgpu.Barrier(num_arrivals=1, num_barriers=stages)]
  if layout.has_tiles:
    scratch += [swizzled_smem((stages, *tile_shape), dtype),
                plgpu.Barrier(num_arrivals=1, num_barriers=stages)]
  return scratch


def interpret_params() -> Any:
  """Mosaic GPU interpreter parameters (jax-private module: NotImplementedError if absent)."""
  try:
    from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise NotImplementedError(
        "pallas_mosaic_gpu: this jax has no Mosaic GPU interpreter (InterpretGPUParams)") from e
  return params.InterpretGPUParams()


# ------------------------------------------------------------------- shared kernel helpers


class KernelOps:
  """Register layouts, loads and wgmma forms, compiled or under the interpreter."""

  def __init__(self, interpret: bool, a_smem=None):
    self.compiled = not interpret
    self.a_smem = a_smem  # interpret mode: [ROWS, K] SMEM staging of register A operands
    self.tile = plgpu.Layout.WGMMA
    self.rows = plgpu.Layout.WGMMA.reduce(1)  # vectors indexed by a tile's row
    self.cols = plgpu.Layout.WGMMA.reduce(0)  # vectors indexed by a tile's column

  def cast(self, x, layout):
    return plgpu.layout_cast(x, layout) if self.compiled else x

  def iota(self, shape, dim):
    if self.compiled:
      return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=self.tile)
    return lax.broadcasted_iota(jnp.int32, shape, dim)

  def load(self, ref, layout):
    return plgpu.load(ref, (), layout=layout) if self.compiled else ref[...]

  def zeros(self, shape):
    return self.cast(jnp.zeros(shape, jnp.float32), self.tile)

  def mm_t(self, a_ref, b_ref, b_t_ref, shape):
    """a @ b^T [shape] f32 from SMEM: b through a transposed view (interpret: b_t_ref)."""
    b = plgpu.transpose_ref(b_ref, (1, 0)) if self.compiled else b_t_ref

    def run(acc_ref):
      plgpu.wgmma(acc_ref, a_ref, b)
      return acc_ref[...]

    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))

  def mma(self, acc, a, b_ref):
    """acc + a @ b with `a` in registers (interpret: staged through SMEM)."""
    if self.compiled:
      return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b_ref))(plgpu.ACC.init(acc))
    self.a_smem[...] = a
    plgpu.commit_smem()

    def run(acc_ref):
      plgpu.wgmma(acc_ref, self.a_smem, b_ref)
      return plgpu.wgmma_accumulator_load(acc_ref)

    return acc + pl.run_scoped(run, plgpu.ACC(acc.shape, jnp.float32))


class QueryItem(NamedTuple):
  """One (query block, batch x query head) work item inside a kernel (traced scalars)."""

  qi: Any        # query block
  bh: Any        # batch * Nq + query head (row of lse2 / stats)
  batch: Any
  head: Any
  kv_head: Any
  index: tuple   # (batch, head, qi) into the BlockMask lists, broadcast dims at 0
  rule_batch: Any
  count: Any     # slots of the item's kv list
  n_full: Any    # FULL slots (they come first)

  def kv_start(self, parts: MaskParts, slot, block_kv: int):
    """First key of list slot `slot`."""
    return parts.block[self.index + (slot,)] * block_kv


def query_item(qi, bh, parts: MaskParts, layout, num_heads: int, group: int) -> QueryItem:
  """The QueryItem of query block qi of row bh = batch * Nq + head."""
  batch, head = lax.div(bh, num_heads), lax.rem(bh, num_heads)
  index = (0 if layout.batch_bcast else batch, 0 if layout.head_bcast else head, qi)
  count = parts.count[index]
  return QueryItem(qi=qi, bh=bh, batch=batch, head=head, kv_head=lax.div(head, group),
                   index=index, rule_batch=0 if layout.rule_batch_bcast else batch,
                   count=count, n_full=parts.n_full[index] if layout.has_partial else count)


def keep_mask(layout, q_pos, kv_pos, q_seg, kv_meta):
  """Allowed [ROWS, ROWS] of a PARTIAL tile from the rule and the key bound (None: all).

  q_pos / kv_pos are int32 position tiles; q_seg / kv_meta the ids broadcast to the tile (or
  None without segments).
  """
  keep = None
  both = lambda a, b: b if a is None else a & b
  if layout.band is not None:
    diff = kv_pos - q_pos
    if layout.band.lo is not None:
      keep = both(keep, diff >= layout.band.lo)
    if layout.band.hi is not None:
      keep = both(keep, diff <= layout.band.hi)
    if kv_meta is not None:
      if layout.has_prefix:
        in_prefix = (kv_meta & 1) == 1
        keep = in_prefix if keep is None else keep | in_prefix
      keep = both(keep, q_seg == (kv_meta >> 1))
  if layout.kv_bounds:
    keep = both(keep, kv_pos < layout.kv_len)
  return keep


def num_programs(n_items: int, interpret: bool) -> int:
  """Programs of a persistent grid: one per SM, at most one per work item."""
  if interpret:
    # A few programs, so that the interpreter runs several items per program.
    return min(n_items, INTERPRET_PROGRAMS)
  # GPU devices report their SM count as `core_count` (132 on an H100 / H200 SXM); a device
  # without the attribute gets the Hopper SXM count.
  sms = getattr(jax.devices()[0], "core_count", None) or HOPPER_SMS
  return min(n_items, sms)


def longest_first(lengths: jax.Array) -> jax.Array:
  """Item ids [n] int32 sorted by their list length, descending; equal lengths keep
  increasing id order (stable), so neighbouring programs share operands in L2."""
  return jnp.argsort(-lengths, stable=True).astype(jnp.int32)


def query_item_order(count: jax.Array, batch: int, num_heads: int) -> jax.Array:
  """Query work items (forward, dQ) of a persistent grid, longest kv list first.

  Args:
    count: [Bm, Nm, nq] int32 non-empty kv blocks per query block (Bm in {1, B}, Nm in
      {1, Nq}).
    batch: B.
    num_heads: Nq.

  Returns:
    int32 [B * Nq * nq]: item ids (b * Nq + h) * nq + qi sorted by count, descending; equal
    counts keep increasing id order (stable), so neighbouring programs share K/V in L2.
  """
  return longest_first(jnp.broadcast_to(count, (batch, num_heads, count.shape[-1])).reshape(-1))


def for_each_item(order_ref, outer_axis: str, num_outer: int, programs: int):
  """`run(fn)` calling fn(outer, bh) for this program's work items: its grid indices, or,
  with a persistent order (item id = bh * num_outer + outer), every `programs`-th item from
  the program index on."""
  def run(fn):
    if order_ref is None:
      fn(lax.axis_index(outer_axis), lax.axis_index("bh"))
      return

    @pl.loop(lax.axis_index("p"), order_ref.shape[0], step=programs)
    def _(i):
      item = order_ref[i]
      fn(lax.rem(item, num_outer), lax.div(item, num_outer))

  return run


def run_warpgroups(consumers: int, interpret: bool, produce, consume, items) -> None:
  """produce(item) on the producer warpgroup (index `consumers`) and consume(item) on the
  consumer warpgroups, for every item; the consumers then wait for their last stores."""
  wg = lax.axis_index("wg")
  producer_registers, consumer_registers = register_split(consumers)

  @pl.when(wg == consumers)
  def _():
    if not interpret:
      plgpu.set_max_registers(producer_registers, action="decrease")
    items(produce)

  @pl.when(wg < consumers)
  def _():
    if not interpret:
      plgpu.set_max_registers(consumer_registers, action="increase")
    items(consume)
    plgpu.wait_smem_to_gmem(0)


def grid_and_order(config: MosaicParams, num_outer: int, num_bh: int, order, outer_name: str):
  """(order operands, grid, grid names, programs): one program per (outer block, bh), or,
  persistent, `num_programs` programs over the items in the order `order()` returns
  (int32 [num_outer * num_bh] item ids bh * num_outer + outer)."""
  if not config.persistent:
    return [], (num_outer, num_bh), (outer_name, "bh"), 1
  programs = num_programs(num_outer * num_bh, config.interpret)
  return [order()], (programs,), ("p",), programs


def launch(kernel, out_type, scratch, grid, grid_names, consumers: int, interpret: bool):
  """plgpu.kernel with one producer and `consumers` consumer warpgroups."""
  return plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=grid_names,
      num_threads=consumers + 1, thread_name="wg",
      compiler_params=None if interpret else plgpu.CompilerParams(approx_math=True),
      interpret=interpret_params() if interpret else None)


def refuse_vmap(fn, message: str):
  """fn(*arrays) whose vmap raises NotImplementedError(message) at trace time. For launches
  through `pl.kernel` with mutable Refs (`launch_with_refs`), which have no batching rule of
  their own: looping over the mapped axis (lax.map) was tried and, on an H100 with jax 0.11.2,
  returned a zero dQ from the fused backward (docs/mosaic_gpu.md), so vmap is refused rather
  than risked."""
  wrapped = jax.custom_batching.custom_vmap(fn)

  @wrapped.def_vmap
  def _(axis_size, in_batched, *args):
    del axis_size, in_batched, args
    raise NotImplementedError(message)

  return wrapped


def launch_with_refs(kernel, out_type, scratch, grid, grid_names, consumers: int):
  """As `launch` (compiled only), through `pl.kernel` so that mutable JAX Refs passed after
  the operands are aliased in and out of the kernel (plgpu.kernel's vmap wrapper rejects
  them). The scratch is allocated as plgpu.kernel does: one run_scoped over all warpgroups."""
  mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, num_threads=consumers + 1,
                    thread_name="wg")

  def body(*refs):
    pl.run_scoped(functools.partial(kernel, *refs), *scratch, collective_axes="wg")

  return pl.kernel(body, out_type=out_type, mesh=mesh, name=getattr(kernel, "__name__", None),
                   compiler_params=plgpu.CompilerParams(approx_math=True))
