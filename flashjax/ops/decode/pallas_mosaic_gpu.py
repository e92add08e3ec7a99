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

from flashjax.ops.decode import base, pallas_triton

# The backend whose kernel this name runs.
KERNEL = "pallas_triton"


class PallasMosaicGpu(base.DecodeBackend):
  """pallas_triton's decode kernel under the "pallas_mosaic_gpu" name (module docstring).

  Same arguments and output as pallas_triton's decode (kv_layout included); its
  NotImplementedError (D not a power of two >= 16) is re-raised naming this backend.
  """

  name = "pallas_mosaic_gpu"

  def attend(self, args: base.DecodeArgs, *, kv_layout: str = "BSND") -> jax.Array:
    try:
      return pallas_triton.decode_attention.run(args, kv_layout=kv_layout)
    except NotImplementedError as e:
      raise NotImplementedError(
          f"pallas_mosaic_gpu decode runs pallas_triton's kernel, which cannot: {e}") from e


decode_attention = PallasMosaicGpu()
