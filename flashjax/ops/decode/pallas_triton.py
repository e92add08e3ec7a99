"""Head-sparse split-K flash decoding on Pallas Triton (portable GPU, sm80+).

Grid (B, K, num_splits): program (b, k, s) reads the KV group head_indices[b, k] of sequence
b (read inside the kernel from the program ids, so unselected groups are never touched),
loads the G = Nq / Nkv query heads of that group straight from the [B, Nq, D] query into one
[R, D] tile (R = max(16, G rounded up to a power of two); rows past G are masked, so GQA
reads each KV byte once for all G heads) and streams split s of the sequence's live blocks
(see block_sizes.py) with an online softmax in float32. Positions at or past lengths[b] are
masked in the loads themselves: they are neither read nor able to leak garbage (even NaN)
from the unused part of the cache, and S_max need not be a multiple of block_kv.

Output, by launch (every path writes [B, Nq, D] in the query's dtype):
  * one split: the kernel normalises its state and stores the G rows of its group straight
    into the output, so a decode step is one kernel;
  * several splits: the kernel writes float32 partial states [B, K, splits, R(, D)] and a
    second Pallas kernel (grid (B, K, D / 32): head-dim chunks, so that a few sequences
    with many splits still spread the merge over several SMs) merges them with
    log-sum-exp weights and stores the group's rows: two kernels;
  * `DecodeBlockSizes(xla_merge=True)`, the default: partial states merged and scattered in
    XLA (split_k.merge_splits / scatter_groups). The two paths above run with
    xla_merge=False; on the H200 they were slower at B = 1 (docs/performance.md).
With head_indices, the output is a zero array aliased into the kernel that stores it
(`input_output_aliases`), so the heads of unselected groups stay 0; without, every group
is stored and no zero fill is needed.

The cache is read in its public [B, S, Nkv, D] layout: a [block_kv, D] tile is block_kv rows
of D contiguous elements (256 bytes at D = 128 bf16) with stride Nkv * D, which the loads
coalesce as well as one contiguous run. `kv_layout="BNSD"` reads a [B, Nkv, S, D] cache
instead; docs/decode.md has the measured comparison.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from flashjax.ops.decode import base
from flashjax.ops.decode import block_sizes as decode_sizes
from flashjax.ops.decode import split_k
from flashjax.ops.tiling import pow2_ceil

_KV_LAYOUTS = ("BSND", "BNSD")
# The merge kernel splits the head dim into chunks of this many columns (more programs when
# B * K is small), with a pipelined loop over the splits.
_MERGE_COLUMNS = 32
_MERGE_WARPS = 2
_MERGE_STAGES = 3
_WAVES = 2  # programs wanted per SM (block_sizes.py: measured split counts)


def launch_shape(batch: int, num_groups: int, max_len: int,
                 block_sizes: decode_sizes.DecodeBlockSizes | None = None) -> tuple[int, int]:
  """(block_kv, num_splits) this backend launches with on the default device.

  Args:
    batch: B.
    num_groups: K, KV groups computed per sequence (Nkv when head_indices is None).
    max_len: S_max.
    block_sizes: the caller's DecodeBlockSizes, None for the defaults.

  Returns:
    decode_sizes.launch_shape for the device's SM count.
  """
  return decode_sizes.launch_shape(batch, num_groups, max_len,
                              block_sizes or decode_sizes.DecodeBlockSizes(),
                              num_cores=decode_sizes.gpu_core_count(), waves=_WAVES)


def _attend_split(heads_ref, lengths_ref, q_ref, k_ref, v_ref, *, block_kv: int,
                  num_splits: int, group: int, scale: float, logits_soft_cap: float | None,
                  kv_layout: str):
  """Online softmax of program (b, k, split) over its blocks: (acc [R, D], m [R], l [R])."""
  b, k, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  head = heads_ref[b, k]
  length = lengths_ref[b]
  num_blocks = pl.cdiv(length, block_kv)
  per_split = pl.cdiv(num_blocks, num_splits)
  first = split * per_split
  last = jnp.minimum(first + per_split, num_blocks)

  head_dim = q_ref.shape[2]
  rows = pow2_ceil(max(16, group))
  q_live = jnp.arange(rows) < group  # [R]: rows past G belong to the next group
  q = plgpu.load(q_ref.at[b, pl.ds(head * group, rows), :], mask=q_live[:, None], other=0)
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT

  def tile(ref, start, live):
    rows_at = pl.ds(start, block_kv)
    view = ref.at[b, rows_at, head, :] if kv_layout == "BSND" else ref.at[b, head, rows_at, :]
    return plgpu.load(view, mask=live[:, None], other=0)

  def body(block, carry):
    acc, m_prev, l_prev = carry
    start = block * block_kv
    live = start + jnp.arange(block_kv) < length  # [block_kv]
    key = tile(k_ref, start, live)  # [block_kv, D], 0 past the length
    logits = jnp.einsum(
        "rd,sd->rs", q, key, precision=precision, preferred_element_type=jnp.float32
    ) * scale
    if logits_soft_cap is not None:
      logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
    logits = jnp.where(live[None, :], logits, -jnp.inf)
    # Each iterated block has a live position, so m_next is finite and exp() never sees
    # -inf - -inf.
    m_next = jnp.maximum(m_prev, logits.max(axis=-1))
    correction = jnp.exp(m_prev - m_next)
    p = jnp.exp(logits - m_next[:, None])  # [R, block_kv]
    value = tile(v_ref, start, live)
    pv = jnp.einsum(
        "rs,sd->rd", p.astype(value.dtype), value, precision=precision,
        preferred_element_type=jnp.float32,
    )
    return correction[:, None] * acc + pv, m_next, correction * l_prev + p.sum(axis=-1)

  init = (
      jnp.zeros((rows, head_dim), jnp.float32),
      jnp.full((rows,), -jnp.inf, jnp.float32),
      jnp.zeros((rows,), jnp.float32),
  )
  return lax.fori_loop(first, jnp.maximum(first, last), body, init)


def _store_group(out_ref, heads_ref, acc, l, *, group: int, column: int = 0):
  """Stores acc / l (0 where l == 0: no key) into the G output rows of program (b, k),
  columns [column, column + acc.shape[1])."""
  b, k = pl.program_id(0), pl.program_id(1)
  rows, columns = acc.shape
  out = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(out_ref.dtype)
  live = jnp.arange(rows) < group
  view = out_ref.at[b, pl.ds(heads_ref[b, k] * group, rows), pl.ds(column, columns)]
  plgpu.store(view, out, mask=live[:, None])


def _partials_kernel(heads_ref, lengths_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, **kw):
  """Writes the split's float32 state: o_ref [R, D], m_ref / l_ref [R] blocks."""
  o_ref[...], m_ref[...], l_ref[...] = _attend_split(heads_ref, lengths_ref, q_ref, k_ref,
                                                     v_ref, **kw)


def _direct_kernel(heads_ref, lengths_ref, q_ref, k_ref, v_ref, *refs, **kw):
  """One split: normalises and stores the group's rows of the [B, Nq, D] output (refs[-1];
  refs[0] is the aliased zero input when there is one)."""
  acc, _, l = _attend_split(heads_ref, lengths_ref, q_ref, k_ref, v_ref, **kw)
  _store_group(refs[-1], heads_ref, acc, l, group=kw["group"])


def _merge_kernel(heads_ref, o_ref, m_ref, l_ref, *refs, num_splits: int, group: int,
                  columns: int):
  """Program (b, k, c): log-sum-exp merge of the splits of slot k of sequence b, head-dim
  columns [c * columns, (c + 1) * columns).

  o_ref [B, K, splits, R, D], m_ref / l_ref [B, K, splits, R] (float32, whole arrays);
  refs[-1] is the [B, Nq, D] output (refs[0] the aliased zero input when there is one).
  """
  b, k = pl.program_id(0), pl.program_id(1)
  column = pl.program_id(2) * columns
  rows = o_ref.shape[3]

  def body(split, carry):
    acc, m_run, l_run = carry
    m_split = plgpu.load(m_ref.at[b, k, split, :])
    m_next = jnp.maximum(m_run, m_split)
    # Both -inf (nothing read yet): shift by 0 so that both weights are exp(-inf) = 0.
    shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    keep, take = jnp.exp(m_run - shift), jnp.exp(m_split - shift)
    o_split = plgpu.load(o_ref.at[b, k, split, :, pl.ds(column, columns)])
    acc = keep[:, None] * acc + take[:, None] * o_split
    return acc, m_next, keep * l_run + take * plgpu.load(l_ref.at[b, k, split, :])

  init = (
      jnp.zeros((rows, columns), jnp.float32),
      jnp.full((rows,), -jnp.inf, jnp.float32),
      jnp.zeros((rows,), jnp.float32),
  )
  acc, _, l = lax.fori_loop(0, num_splits, body, init)
  _store_group(refs[-1], heads_ref, acc, l, group=group, column=column)


def _whole(x) -> pl.BlockSpec:
  return pl.BlockSpec(x.shape, lambda *_: (0,) * len(x.shape))


class PallasTriton(base.DecodeBackend):
  """Head-sparse decode attention over a KV cache on Pallas Triton (decode backend contract).

  `attend(args, kv_layout="BSND")`: kv_layout "BNSD" reads [B, Nkv, S_max, D] caches.
  block_sizes: tile, split and merge parameters; None for the defaults and heuristics
  (block_sizes.launch_shape). NotImplementedError when D is not a power of two >= 16
  (Triton tiles need one); ValueError for an unknown kv_layout, or block_sizes.num_splits
  above the cache's tiles.
  """

  name = "pallas_triton"

  def attend(self, args: base.DecodeArgs, *, kv_layout: str = "BSND") -> jax.Array:
    return _decode(args.query, args.key_cache, args.value_cache, args.lengths,
                   args.head_indices, scale=args.scale,
                   logits_soft_cap=args.logits_soft_cap, interpret=bool(args.interpret),
                   block_sizes=args.block_sizes, kv_layout=kv_layout)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "logits_soft_cap", "interpret", "block_sizes", "kv_layout"),
)
def _decode(query, key_cache, value_cache, lengths, head_indices, *, scale, logits_soft_cap,
            interpret, block_sizes, kv_layout):
  """The split-K kernels on canonical arguments (jitted; the static ones are hashable)."""
  if kv_layout not in _KV_LAYOUTS:
    raise ValueError(f"{kv_layout=} must be one of {_KV_LAYOUTS}")
  batch, num_heads, head_dim = query.shape
  if kv_layout == "BSND":
    max_len, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
  else:
    num_kv_heads, max_len = key_cache.shape[1], key_cache.shape[2]
  if head_dim < 16 or head_dim != pow2_ceil(head_dim):
    raise NotImplementedError(f"pallas_triton decode needs a power-of-two {head_dim=} >= 16")
  config = block_sizes or decode_sizes.DecodeBlockSizes()
  group = num_heads // num_kv_heads
  rows = pow2_ceil(max(16, group))
  heads = split_k.group_ids(head_indices, batch, num_kv_heads)
  num_groups = heads.shape[1]
  block_kv, num_splits = launch_shape(batch, num_groups, max_len, config)
  lengths = lengths.astype(jnp.int32)
  attend = dict(block_kv=block_kv, num_splits=num_splits, group=group, scale=scale,
                logits_soft_cap=logits_soft_cap, kv_layout=kv_layout)
  params = plgpu.CompilerParams(num_warps=config.num_warps or 4,
                                num_stages=config.num_stages or 2)
  grid = (batch, num_groups, num_splits)
  kernel_inputs = (heads, lengths, query, key_cache, value_cache)
  out_shape = jax.ShapeDtypeStruct(query.shape, query.dtype)

  def output_call(kernel, inputs, grid, params, name):
    """pallas_call of a kernel whose last ref is the whole [B, Nq, D] output."""
    # Head-sparse outputs start from zeros (aliased in), dense ones are written everywhere.
    zeros = () if head_indices is None else (jnp.zeros(query.shape, query.dtype),)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=[_whole(x) for x in inputs + zeros],
        out_specs=_whole(out_shape), out_shape=out_shape,
        input_output_aliases={len(inputs): 0} if zeros else {}, compiler_params=params,
        interpret=interpret, name=name,
    )(*inputs, *zeros)

  if num_splits == 1 and not config.xla_merge:
    return output_call(functools.partial(_direct_kernel, **attend), kernel_inputs, grid,
                       params, "flashjax_decode_triton")

  state_shape = (batch, num_groups, num_splits, rows)
  o, m, l = pl.pallas_call(
      functools.partial(_partials_kernel, **attend),
      grid=grid,
      in_specs=[_whole(x) for x in kernel_inputs],
      out_specs=[
          pl.BlockSpec((None, None, None, rows, head_dim), lambda b, k, s: (b, k, s, 0, 0)),
          pl.BlockSpec((None, None, None, rows), lambda b, k, s: (b, k, s, 0)),
          pl.BlockSpec((None, None, None, rows), lambda b, k, s: (b, k, s, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((*state_shape, head_dim), jnp.float32),
          jax.ShapeDtypeStruct(state_shape, jnp.float32),
          jax.ShapeDtypeStruct(state_shape, jnp.float32),
      ],
      compiler_params=params,
      interpret=interpret,
      name="flashjax_decode_triton",
  )(*kernel_inputs)
  if config.xla_merge:
    out = split_k.merge_splits(o, m, l)
    return split_k.scatter_groups(out, head_indices, num_kv_heads, num_heads).astype(
        query.dtype)
  columns = min(head_dim, _MERGE_COLUMNS)
  merge = functools.partial(_merge_kernel, num_splits=num_splits, group=group,
                            columns=columns)
  return output_call(merge, (heads, o, m, l), (batch, num_groups, head_dim // columns),
                     plgpu.CompilerParams(num_warps=_MERGE_WARPS, num_stages=_MERGE_STAGES),
                     "flashjax_decode_triton_merge")


decode_attention = PallasTriton()
