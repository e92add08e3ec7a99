"""pallas_mosaic_gpu at its default tiles with the tuning table on and off, in one process.

  python -m experiments.table_vs_heuristic OUT.json

Times the forward of dense and causal attention (bf16, N = 32, D = 128; B4 T4k and B1 T16k)
twice: with the tuning table (the device's own, or the nearest Hopper table) and inside
`tuning.store.disabled()`, where `default_block_sizes`' heuristic picks (the same path as
FLASHJAX_AUTOTUNE=0). Median per call of `benchmarking.time_in_loop`. A heuristic row within
noise of its table row means the heuristic picks what the table measured best.
"""

from __future__ import annotations

import contextlib
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import flashjax
from experiments import common
from flashjax import benchmarking
from flashjax.ops.attention.tuning import store

SHAPES = ((4, 4096), (1, 16384))
HEADS, HEAD_DIM = 32, 128


def bench(batch: int, length: int) -> list[dict]:
  """Four rows of one shape: (causal, dense) x (table, heuristic)."""
  keys = jax.random.split(jax.random.key(length), 3)
  q, k, v = (jax.random.normal(key, (batch, length, HEADS, HEAD_DIM), jnp.bfloat16)
             for key in keys)
  rows = []
  for causal in (True, False):
    for table in (True, False):
      fn = jax.jit(lambda q, k, v, causal=causal: flashjax.dot_product_attention(
          q, k, v, implementation="pallas_mosaic_gpu", is_causal=causal))
      row = {"batch": batch, "seq_len": length, "mask": "causal" if causal else "dense",
             "table": table, "device": jax.devices()[0].device_kind, "jax": jax.__version__}
      try:
        with contextlib.nullcontext() if table else store.disabled():
          timing = benchmarking.time_in_loop(fn, q, k, v, iters=20, repeats=5)
        row["ms"] = round(float(np.median(timing.times_s)) * 1e3, 4)
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
      print(json.dumps(row), flush=True)
      rows.append(row)
  return rows


def main(argv):
  if len(argv) != 2:
    raise SystemExit(__doc__)
  common.rows_per_shape(argv[1], SHAPES, bench)


if __name__ == "__main__":
  main(sys.argv)
