"""Decode backend "pallas_mosaic_gpu": a documented reuse of pallas_triton's decode kernel.

There is no Mosaic GPU decode kernel. This name runs exactly `pallas_triton`'s split-K
head-sparse decode kernels (Triton lowering), so that code asking for the Hopper backend
everywhere (e.g. a model config with implementation="pallas_mosaic_gpu") also decodes.
Decode is bandwidth-bound: each KV byte is read once and used for G = Nq / Nkv query rows,
so the kernel's time is the cache read, and the Triton kernel already streams the cache at
92-102% of the H200's ~4.3 TB/s copy ceiling from B = 32 on (docs/decode.md). A Mosaic GPU
kernel (TMA, wgmma) could not read faster; it could only matter for B = 1 latency, where
fixed costs dominate, and wgmma's 64-row tiles would waste 4-16x the compute on the 4-16
heads of a group. Because it is the same kernel, `implementation=None` never tries this name
(flashjax.ops.decode.api.default_implementations): the default order on a Hopper GPU is
("pallas_triton", "xla") for decode. A benchmark row asked for "pallas_mosaic_gpu" reports
that name, with `kernel = "pallas_triton"` beside it (experiments/decode_bench.py).
"""

from __future__ import annotations

import jax

from flashjax.ops.decode import block_sizes as decode_sizes
from flashjax.ops.decode import pallas_triton

# The backend whose kernel this name runs.
KERNEL = "pallas_triton"


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
    block_sizes: decode_sizes.DecodeBlockSizes | None = None,
    kv_layout: str = "BSND",
) -> jax.Array:
  """pallas_triton's decode kernel under the "pallas_mosaic_gpu" name (module docstring).

  Args:
    query: [B, Nq, D].
    key_cache: [B, S_max, Nkv, D] ([B, Nkv, S_max, D] with kv_layout="BNSD").
    value_cache: same shape as key_cache.
    lengths: int32 [B], valid cache entries per sequence.
    head_indices: None or int32 [B, K] KV groups to compute per sequence.
    scale: logit scale.
    logits_soft_cap: None or cap > 0.
    interpret: run the (Triton) kernels in Pallas interpret mode.
    block_sizes: as pallas_triton's.
    kv_layout: as pallas_triton's.

  Returns:
    [B, Nq, D] in the query's dtype, identical to pallas_triton's output.

  Raises:
    NotImplementedError: wherever pallas_triton's decode raises it (D not a power of two
      >= 16), naming this backend.
    ValueError: as pallas_triton's.
  """
  try:
    return pallas_triton.decode_attention(
        query, key_cache, value_cache, lengths, head_indices=head_indices, scale=scale,
        logits_soft_cap=logits_soft_cap, interpret=interpret, block_sizes=block_sizes,
        kv_layout=kv_layout)
  except NotImplementedError as e:
    raise NotImplementedError(
        f"pallas_mosaic_gpu decode runs pallas_triton's kernel, which cannot: {e}") from e
