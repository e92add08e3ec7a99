"""Head-sparse split-K flash decoding on Pallas Mosaic TPU.

Grid (B, K, num_splits, blocks_per_split); the last axis walks the KV blocks of one split
(see block_sizes.py for the per-length split layout) with the softmax state in VMEM scratch.
`lengths` and the selected groups are scalar-prefetched into SMEM, so the KV index_map picks
the selected group's lanes and the block of the split directly. It clamps the block index
to the split's last block and to the sequence's last live block: grid steps past the end of
a split or of the sequence (dead splits included) revisit the block already in VMEM and
issue no new DMA, and the kernel skips their compute.

The cache is viewed (for free) as [B, S, Nkv * D] and tiled [block_kv, W] along the lane
axis, which keeps the (8, 128) tiling rule without transposing the cache:
  * D % 128 == 0: W = D, one group per tile;
  * Nkv * D <= 128: W = Nkv * D (the whole row);
  * 128 % D == 0: W = 128 holds 128 / D groups; the query of the selected group is placed
    in its lanes of a zero [R, W] tile, so q @ k^T only sees that group, and the group's
    output lanes are taken out after the merge. A tile then also carries its neighbours'
    bytes (2x the traffic at D = 64);
  * otherwise D is zero-padded to a multiple of 128, which copies the cache (slow).
Performance is unmeasured: no TPU is reachable from this project; correctness is checked in
interpret mode.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from flashjax.ops.decode import base
from flashjax.ops.decode import block_sizes as decode_sizes
from flashjax.ops.decode import split_k
from flashjax.ops.tiling import round_up

_LANES = 128


def _traced_cdiv(a, b):
  # Truncating division: operands are non-negative, and it keeps the scalar code simple.
  return lax.div(a + b - 1, b)


def _split_blocks(length, split, step, *, block_kv: int, num_splits: int):
  """Block of grid step `step` of split `split`, and whether the step has work.

  Returns:
    (block index clamped into the split and the live range, live flag).
  """
  num_blocks = _traced_cdiv(length, block_kv)
  per_split = _traced_cdiv(num_blocks, num_splits)
  block = split * per_split + step
  live = (step < per_split) & (block < num_blocks)
  last = jnp.minimum(split * per_split + per_split, num_blocks) - 1
  return jnp.maximum(jnp.minimum(block, last), 0), live


def _decode_kernel(
    lengths_ref,  # SMEM int32 [B]
    heads_ref,  # SMEM int32 [B * K]
    q_ref,  # [R, W]
    k_ref,  # [block_kv, W]
    v_ref,  # [block_kv, W]
    o_ref,  # float32 [R, W]
    m_ref,  # float32 [R, 128]
    l_ref,  # float32 [R, 128]
    acc_scratch,  # float32 [R, W]
    m_scratch,  # float32 [R, 128], lanes equal
    l_scratch,  # float32 [R, 128], lanes equal
    *,
    block_kv: int,
    num_splits: int,
    scale: float,
    logits_soft_cap: float | None,
):
  del heads_ref  # Only the index maps need it.
  b, split, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  length = lengths_ref[b]
  block, live = _split_blocks(length, split, step, block_kv=block_kv, num_splits=num_splits)

  @pl.when(step == 0)
  def _init():
    acc_scratch[...] = jnp.zeros_like(acc_scratch)
    m_scratch[...] = jnp.full_like(m_scratch, -jnp.inf)
    l_scratch[...] = jnp.zeros_like(l_scratch)

  @pl.when(live)
  def _compute():
    q = q_ref[...]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
    logits = jnp.einsum(
        "rw,sw->rs", q, k_ref[...], precision=precision, preferred_element_type=jnp.float32
    ) * scale
    if logits_soft_cap is not None:
      logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
    start = block * block_kv
    live_cols = start + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1) < length
    logits = jnp.where(live_cols, logits, -jnp.inf)
    # The cache tail (and a partial last block) may hold anything, even NaN: zero it so
    # that p = 0 there cannot become 0 * NaN.
    live_rows = start + lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0) < length
    value = jnp.where(live_rows, v_ref[...], 0)
    m_prev = m_scratch[...]
    # A live block has a live column, so m_next is finite.
    m_next = jnp.maximum(m_prev, logits.max(axis=-1, keepdims=True))  # [R, 128]
    correction = jnp.exp(m_prev - m_next)
    p = jnp.exp(logits - m_next[:, :1])  # [R, block_kv]
    pv = jnp.einsum(
        "rs,sw->rw", p.astype(value.dtype), value, precision=precision,
        preferred_element_type=jnp.float32,
    )
    acc_scratch[...] = correction[:, :1] * acc_scratch[...] + pv
    m_scratch[...] = m_next
    l_scratch[...] = correction * l_scratch[...] + p.sum(axis=-1, keepdims=True)

  @pl.when(step == pl.num_programs(3) - 1)
  def _store():
    o_ref[...] = acc_scratch[...]
    m_ref[...] = m_scratch[...]
    l_ref[...] = l_scratch[...]


def _lane_tiling(num_kv_heads: int, head_dim: int) -> tuple[int, int]:
  """(lane stride of one group in the cache view, tile width W)."""
  if head_dim % _LANES == 0:
    return head_dim, head_dim
  if num_kv_heads * head_dim <= _LANES:
    return head_dim, num_kv_heads * head_dim
  if _LANES % head_dim == 0:
    return head_dim, _LANES
  padded = round_up(head_dim, _LANES)
  return padded, padded


class PallasTpu(base.DecodeBackend):
  """Head-sparse decode attention over a KV cache on Pallas TPU (decode backend contract).

  interpret=True runs the kernel with the Pallas TPU interpreter. block_sizes: tile and
  split parameters; None for the defaults and the split heuristic (num_warps, num_stages
  and xla_merge do not apply: the merge is always in XLA). ValueError for
  block_sizes.num_splits above the cache's tiles.
  """

  name = "pallas_tpu"

  def attend(self, args: base.DecodeArgs) -> jax.Array:
    return _decode(args.query, args.key_cache, args.value_cache, args.lengths,
                   args.head_indices, scale=args.scale,
                   logits_soft_cap=args.logits_soft_cap, interpret=bool(args.interpret),
                   block_sizes=args.block_sizes)


@functools.partial(
    jax.jit, static_argnames=("scale", "logits_soft_cap", "interpret", "block_sizes")
)
def _decode(query, key_cache, value_cache, lengths, head_indices, *, scale, logits_soft_cap,
            interpret, block_sizes):
  """The split-K kernel on canonical arguments (jitted; the static ones are hashable)."""
  batch, num_heads, head_dim = query.shape
  _, max_len, num_kv_heads, _ = key_cache.shape
  config = block_sizes or decode_sizes.DecodeBlockSizes()
  # A tile as long as the whole cache is always a legal block.
  block_kv = min(max_len, config.block_kv or decode_sizes.DEFAULT_BLOCK_KV)
  group = num_heads // num_kv_heads
  rows = round_up(group, 8 * 4 // key_cache.dtype.itemsize)  # sublane tile of the dtype
  stride, width = _lane_tiling(num_kv_heads, head_dim)
  if stride != head_dim:
    pad = ((0, 0), (0, 0), (0, 0), (0, stride - head_dim))
    key_cache, value_cache = jnp.pad(key_cache, pad), jnp.pad(value_cache, pad)
  key_view = key_cache.reshape(batch, max_len, num_kv_heads * stride)
  value_view = value_cache.reshape(batch, max_len, num_kv_heads * stride)

  heads = split_k.group_ids(head_indices, batch, num_kv_heads)
  num_groups = heads.shape[1]
  num_splits = config.num_splits or decode_sizes.num_splits_heuristic(
      batch, num_groups, max_len, block_kv, num_cores=2, waves=1
  )
  decode_sizes.check_num_splits(num_splits, max_len, block_kv)
  blocks_per_split = pl.cdiv(pl.cdiv(max_len, block_kv), num_splits)

  q = split_k.select_queries(query, head_indices, num_kv_heads, rows)  # [B, K, R, D]
  offset = heads * stride % width  # [B, K] first lane of each selected group in its tile
  if width != head_dim:
    # Place each selected group's queries in its lanes of a zero [R, W] tile.
    source = jnp.arange(width) - offset[..., None]  # [B, K, W] query lane feeding tile lane
    q = jnp.take_along_axis(q, jnp.clip(source, 0, head_dim - 1)[:, :, None, :], axis=-1)
    q = jnp.where(((source >= 0) & (source < head_dim))[:, :, None, :], q, 0)
  q = q.astype(key_cache.dtype)

  def kv_map(b, k, split, step, lengths_ref, heads_ref):
    block, _ = _split_blocks(
        lengths_ref[b], split, step, block_kv=block_kv, num_splits=num_splits
    )
    return b, block, lax.div(heads_ref[b * num_groups + k] * stride, width)

  state_map = lambda b, k, split, step, *_: (b, k, split, 0, 0)
  state_shape = (batch, num_groups, num_splits, rows)
  kernel = functools.partial(
      _decode_kernel,
      block_kv=block_kv,
      num_splits=num_splits,
      scale=scale,
      logits_soft_cap=logits_soft_cap,
  )
  o, m, l = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(batch, num_groups, num_splits, blocks_per_split),
          in_specs=[
              pl.BlockSpec((None, None, rows, width), lambda b, k, *_: (b, k, 0, 0)),
              pl.BlockSpec((None, block_kv, width), kv_map),
              pl.BlockSpec((None, block_kv, width), kv_map),
          ],
          out_specs=[
              pl.BlockSpec((None, None, None, rows, width), state_map),
              pl.BlockSpec((None, None, None, rows, _LANES), state_map),
              pl.BlockSpec((None, None, None, rows, _LANES), state_map),
          ],
          scratch_shapes=[
              pltpu.VMEM((rows, width), jnp.float32),
              pltpu.VMEM((rows, _LANES), jnp.float32),
              pltpu.VMEM((rows, _LANES), jnp.float32),
          ],
      ),
      out_shape=[
          jax.ShapeDtypeStruct((*state_shape, width), jnp.float32),
          jax.ShapeDtypeStruct((*state_shape, _LANES), jnp.float32),
          jax.ShapeDtypeStruct((*state_shape, _LANES), jnp.float32),
      ],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
      ),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="flashjax_decode_tpu",
  )(lengths.astype(jnp.int32), heads.reshape(-1), q, key_view, value_view)
  out = split_k.merge_splits(o, m[..., 0], l[..., 0])  # [B, K, R, W]
  if width != head_dim:
    lanes = offset[..., None] + jnp.arange(head_dim)  # [B, K, D]
    out = jnp.take_along_axis(out, lanes[:, :, None, :], axis=-1)
  return split_k.scatter_groups(out, head_indices, num_kv_heads, num_heads).astype(query.dtype)


decode_attention = PallasTpu()
