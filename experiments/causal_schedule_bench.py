"""Where the causal forward of pallas_mosaic_gpu loses time: masking or scheduling.

  python -m experiments.causal_schedule_bench OUT.json [PRODUCER,CONSUMER]

The optional second argument sets the setmaxnreg split of the two-consumer kernels
(`pallas_mosaic_gpu_common.REGISTERS_TWO_CONSUMERS`, default 40,232; e.g. 24,240) for the
whole run; every row records the split it ran with.

The causal forward runs at a lower fraction of peak than the dense one. Two causes are
separable by masks with the same shapes and tiles:
  dense         no mask: every item has all nk kv tiles (FULL);
  causal        `is_causal`: query block i has i FULL tiles and one PARTIAL diagonal tile
                (mask arithmetic on 128 x 128 elements);
  block_causal  kv block <= query block (a tile-aligned staircase, `masks.from_dense`): the
                same item lengths as causal, every tile FULL, no mask arithmetic.
causal / block_causal is what the diagonal tiles' masking costs (item 3 of the Hopper work:
split the diagonal tile); block_causal's TFLOP/s against dense's is what items of unequal,
shorter length cost (per-item overhead, the schedule's tail). Each mask runs on the per-item
grid and on the persistent grid (longest item first) at 128 x 128 tiles, 2 stages.

bf16, N = 32 query and KV heads, D = 128, (B, T) in {(4, 4096), (2, 8192)}; forward only;
median per call of `benchmarking.time_in_loop`; TFLOP/s over the allowed pairs
(4 B N D x pairs). Every row runs twice, without and with the experimental intra-warpgroup
overlap (`pallas_mosaic_gpu.INTRA_WG_OVERLAP`, the `overlap` field), in the same process;
the overlapped row's `max_abs_diff` is against the output without it.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import flashjax
from experiments import common
from flashjax import benchmarking
from flashjax.ops.attention import pallas_mosaic_gpu, pallas_mosaic_gpu_common
from flashjax.ops.attention.block_sizes import BlockSizes

SHAPES = ((4, 4096), (2, 8192))
HEADS, HEAD_DIM, TILE = 32, 128, 128


def masks(length: int) -> dict[str, tuple[dict, int]]:
  """name -> (attention kwargs, allowed (query, key) pairs) at T = S = length."""
  blocks = np.arange(length) // TILE
  staircase = blocks[:, None] >= blocks[None, :]
  return {"dense": ({}, length * length),
          "causal": ({"is_causal": True}, length * (length + 1) // 2),
          "block_causal": ({"mask": flashjax.masks.from_dense(staircase)},
                           int(staircase.sum()))}


def bench(batch: int, length: int) -> list[dict]:
  """The six rows (mask x grid) of one shape."""
  keys = jax.random.split(jax.random.key(length), 3)
  shape = (batch, length, HEADS, HEAD_DIM)
  q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
  cases, rows = masks(length), []
  for persistent in (False, True):
    sizes = BlockSizes(TILE, TILE, num_stages=2, persistent=persistent)
    for name, (kwargs, pairs) in cases.items():
      baseline = None
      for overlap in (False, True):
        fn = jax.jit(lambda q, k, v, kwargs=kwargs: flashjax.dot_product_attention(
            q, k, v, implementation="pallas_mosaic_gpu", block_sizes=sizes, **kwargs))
        row = {"batch": batch, "seq_len": length, "mask": name, "persistent": persistent,
               "overlap": overlap, "pairs": pairs,
               "registers": list(pallas_mosaic_gpu_common.REGISTERS_TWO_CONSUMERS),
               "device": jax.devices()[0].device_kind, "jax": jax.__version__}
        try:
          with common.switched(pallas_mosaic_gpu, "INTRA_WG_OVERLAP", overlap):
            out = fn(q, k, v).astype(jnp.float32)  # the switch is read while tracing
            timing = benchmarking.time_in_loop(fn, q, k, v, iters=20, repeats=5)
          if baseline is None:
            baseline = out
          else:
            row["max_abs_diff"] = float(jnp.max(jnp.abs(out - baseline)))
          ms = float(np.median(timing.times_s)) * 1e3
          row.update(ms=round(ms, 4),
                     tflops=round(4 * batch * HEADS * HEAD_DIM * pairs / ms / 1e9, 1))
        except Exception as e:  # pylint: disable=broad-except
          row["error"] = f"{type(e).__name__}: {e}"[:2000]
        rows.append(row)
        print(json.dumps(row), flush=True)
  return rows


def main(argv):
  if len(argv) not in (2, 3):
    raise SystemExit(__doc__)
  if len(argv) == 3:
    split = tuple(int(x) for x in argv[2].split(","))
    pallas_mosaic_gpu_common.REGISTERS_TWO_CONSUMERS = split
    pallas_mosaic_gpu_common.register_split(2)  # refuses a split setmaxnreg cannot take
  common.rows_per_shape(argv[1], SHAPES, bench)


if __name__ == "__main__":
  main(sys.argv)
