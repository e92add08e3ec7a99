"""Forward + backward time of pallas_mosaic_gpu with the one-kernel backward
(BlockSizes.fused_backward=True) beside the two-kernel backward, same process and inputs.

  python -m experiments.fused_backward_bench OUT.json

bf16, N = 32 query and KV heads; (B, T, D) in {(4, 4096, 128), (1, 16384, 128),
(8, 2048, 64)}; dense and causal; forward tiles 128 x 128 (persistent for dense, as the
tuned tables), backward at the default tiles (dQ 128 x 64, dK/dV 64 x 128); at D = 128 the
fused kernel also runs without the split of dQ's columns (SPLIT_DQ = False). Each time is
the median per call of `benchmarking.time_in_loop` (grad of sum(out * do) in a device loop);
the fused gradients are checked against the two-kernel ones first.
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
from flashjax.ops.attention import pallas_mosaic_gpu_vjp
from flashjax.ops.attention.block_sizes import BlockSizes

SHAPES = ((4, 4096, 128), (1, 16384, 128), (8, 2048, 64))


def bench(batch: int, length: int, head_dim: int, causal: bool) -> dict:
  keys = jax.random.split(jax.random.key(length + head_dim + causal), 4)
  shape = (batch, length, 32, head_dim)
  q, k, v, do = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
  row = {"batch": batch, "seq_len": length, "head_dim": head_dim, "causal": causal,
         "device": jax.devices()[0].device_kind, "jax": jax.__version__}

  def grads_fn(fused):
    sizes = BlockSizes(128, 128, persistent=not causal, fused_backward=fused)

    def loss(q, k, v):
      out = flashjax.dot_product_attention(q, k, v, implementation="pallas_mosaic_gpu",
                                           is_causal=causal, block_sizes=sizes)
      return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))

  fused = jax.jit(grads_fn(True))(q, k, v)
  two = jax.jit(grads_fn(False))(q, k, v)
  diff = lambda x, y: {n: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(
      jnp.float32)))) for n, a, b in zip(("dq", "dk", "dv"), x, y)}
  row["max_abs_diff"] = diff(fused, two)
  if pallas_mosaic_gpu_vjp.uses_split_dq(2, head_dim):
    with common.switched(pallas_mosaic_gpu_vjp, "SPLIT_DQ", False):
      row["max_abs_diff_unsplit"] = diff(jax.jit(grads_fn(True))(q, k, v), two)
  flops = 4 * batch * 32 * length * length * head_dim * (0.5 if causal else 1.0) * 3.5
  for name, fused_flag, split in (("two_kernels", False, True), ("fused", True, True),
                                  ("fused_unsplit", True, False)):
    if name == "fused_unsplit" and not pallas_mosaic_gpu_vjp.uses_split_dq(2, head_dim):
      continue  # D = 64: the fused kernel does not split anyway
    with common.switched(pallas_mosaic_gpu_vjp, "SPLIT_DQ", split):
      timing = benchmarking.time_in_loop(grads_fn(fused_flag), q, k, v, iters=10, repeats=5)
    ms = float(np.median(timing.times_s)) * 1e3
    row[f"{name}_ms"] = round(ms, 3)
    row[f"{name}_tflops"] = round(flops / ms / 1e9, 1)
  return row


def main(argv):
  if len(argv) != 2:
    raise SystemExit(__doc__)
  rows = []
  for batch, length, head_dim in SHAPES:
    for causal in (False, True):
      try:
        rows.append(bench(batch, length, head_dim, causal))
      except Exception as e:  # pylint: disable=broad-except
        rows.append({"batch": batch, "seq_len": length, "head_dim": head_dim,
                     "causal": causal, "error": f"{type(e).__name__}: {e}"[:2000]})
      print(json.dumps(rows[-1]), flush=True)
      with open(argv[1], "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main(sys.argv)
