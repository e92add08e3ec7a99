"""Head-sparse split-K flash decoding on Pallas Triton (portable GPU, sm80+).

Grid (B, K, num_splits): program (b, k, s) reads the KV group head_indices[b, k] of sequence
b (read inside the kernel from the program ids, so unselected groups are never touched),
packs the G = Nq / Nkv query heads of that group into one [R, D] tile (R = max(16, G rounded
up to a power of two), so GQA reads each KV byte once for all G heads) and streams split s of
the sequence's live blocks (see configs.py) with an online softmax in float32. Positions at
or past lengths[b] are masked in the loads themselves: they are neither read nor able to
leak garbage (even NaN) from the unused part of the cache, and S_max need not be a multiple
of block_kv. The splits are merged and the groups scattered into [B, Nq, D] in XLA.

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

from flashjax.ops.decode import configs

_KV_LAYOUTS = ("BSND", "BNSD")


def _next_pow2(x: int) -> int:
  return 1 << max(x - 1, 0).bit_length()


def _decode_kernel(
    heads_ref,  # int32 [B, K], whole array
    lengths_ref,  # int32 [B], whole array
    q_ref,  # [R, D] block
    k_ref,  # [B, S, Nkv, D] or [B, Nkv, S, D], whole array
    v_ref,  # same as k_ref
    o_ref,  # float32 [R, D] block
    m_ref,  # float32 [R] block
    l_ref,  # float32 [R] block
    *,
    block_kv: int,
    num_splits: int,
    scale: float,
    logits_soft_cap: float | None,
    kv_layout: str,
):
  b, k, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  head = heads_ref[b, k]
  length = lengths_ref[b]
  num_blocks = pl.cdiv(length, block_kv)
  per_split = pl.cdiv(num_blocks, num_splits)
  first = split * per_split
  last = jnp.minimum(first + per_split, num_blocks)

  q = q_ref[...]
  rows, head_dim = q.shape
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
  acc, m, l = lax.fori_loop(first, jnp.maximum(first, last), body, init)
  o_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


@functools.partial(
    jax.jit,
    static_argnames=("scale", "logits_soft_cap", "interpret", "config", "kv_layout"),
)
def decode_attention(
    query: jax.Array,
    key_cache: jax.Array,
    value_cache: jax.Array,
    lengths: jax.Array,
    *,
    head_indices: jax.Array | None,
    scale: float,
    logits_soft_cap: float | None,
    interpret: bool,
    config: configs.DecodeConfig | None = None,
    kv_layout: str = "BSND",
) -> jax.Array:
  """Head-sparse decode attention over a KV cache (decode backend protocol).

  Args:
    query: [B, Nq, D], one new token per sequence.
    key_cache: [B, S_max, Nkv, D] ([B, Nkv, S_max, D] with kv_layout="BNSD").
    value_cache: same shape as key_cache.
    lengths: int32 [B], valid cache entries per sequence (0 <= lengths <= S_max).
    head_indices: None (all groups) or int32 [B, K] KV groups to compute per sequence; query
      heads of the other groups output zeros.
    scale: logit scale.
    logits_soft_cap: None or cap > 0: logits = cap * tanh(logits / cap).
    interpret: run the kernel in Pallas interpret mode.
    config: tile and split parameters; None for the defaults and the split heuristic.
    kv_layout: "BSND" (public layout) or "BNSD".

  Returns:
    [B, Nq, D] in the query's dtype.

  Raises:
    NotImplementedError: D is not a power of two >= 16 (Triton tiles need one).
    ValueError: unknown kv_layout.
  """
  if kv_layout not in _KV_LAYOUTS:
    raise ValueError(f"{kv_layout=} must be one of {_KV_LAYOUTS}")
  batch, num_heads, head_dim = query.shape
  if kv_layout == "BSND":
    max_len, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
  else:
    num_kv_heads, max_len = key_cache.shape[1], key_cache.shape[2]
  if head_dim < 16 or head_dim != _next_pow2(head_dim):
    raise NotImplementedError(f"pallas_triton decode needs a power-of-two {head_dim=} >= 16")
  config = config or configs.DecodeConfig()
  # Tiles never need to be longer than the cache (rounded up to a power of two).
  block_kv = min(config.block_kv, max(16, _next_pow2(max_len)))
  group = num_heads // num_kv_heads
  rows = max(16, _next_pow2(group))
  heads = configs.group_ids(head_indices, batch, num_kv_heads)
  num_groups = heads.shape[1]
  num_splits = config.num_splits or configs.num_splits_heuristic(
      batch, num_groups, max_len, block_kv, num_cores=configs.gpu_core_count(), waves=2
  )
  q = configs.select_queries(query, head_indices, num_kv_heads, rows).astype(key_cache.dtype)

  kernel = functools.partial(
      _decode_kernel,
      block_kv=block_kv,
      num_splits=num_splits,
      scale=scale,
      logits_soft_cap=logits_soft_cap,
      kv_layout=kv_layout,
  )
  whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
  state_shape = (batch, num_groups, num_splits, rows)
  o, m, l = pl.pallas_call(
      kernel,
      grid=(batch, num_groups, num_splits),
      in_specs=[
          whole(heads),
          whole(lengths),
          pl.BlockSpec((None, None, rows, head_dim), lambda b, k, s: (b, k, 0, 0)),
          whole(key_cache),
          whole(value_cache),
      ],
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
      compiler_params=plgpu.CompilerParams(
          num_warps=config.num_warps or 4, num_stages=config.num_stages or 2
      ),
      interpret=interpret,
      name="flashjax_decode_triton",
  )(heads, lengths.astype(jnp.int32), q, key_cache, value_cache)
  out = configs.merge_splits(o, m, l)
  return configs.scatter_groups(out, head_indices, num_kv_heads, num_heads).astype(query.dtype)
