r"""Decode benchmark on a GPU: flashjax decode kernels against cuDNN, XLA, Pallas, torch.

Grid: batch B in {1, 8, 32, 64, 128, 256} x cache length S in {1k, 4k, 16k} x Nkv in {32
(MHA), 8 (GQA)} x head density in {1, .75, .5, .25}, with Nq = 32, D = 128, bf16, all lengths
= S (`--config.ragged=True`: uniform in [S/2, S]). Each point times one implementation on
the device (many calls in one jitted loop: the step time), checks its output against the
float32 reference in the same run, and reports KV TB/s, % of the ~4.3 TB/s copy ceiling, us
per step and the dense-equivalent TB/s. Peers compute every head, so their points below
density 1 are "unsupported" at once (no time spent); flashjax "pallas_triton" and "xla" take
head_indices. Run with JAX's preallocation off so that the torch child (run first, see
below) gets the memory:

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.launch \
      --config=configs/bench_decode_gpu.py:grid --workdir=/tmp/fj_decode_grid
  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.launch \
      --config=configs/bench_decode_gpu.py:core --workdir=/tmp/fj_decode_core

"grid" (the whole grid in about 5 minutes): 720 points; implementations torch SDPA
(first), pallas_triton, cuDNN, XLA (jax.nn) and jax's Pallas decode, i.e. 144 pallas_triton
points, 4 x 36 = 144 dense peer points (36 of them torch) and 432 peer points below density
1 skipped at once. Where "all" spends its time and what "grid" does instead:
  * compiles: "all" compiles every point three times (the step for the wall timer, the
    timing loop, the error check); "grid" sets wall_timing=False: one program returns the
    output to check and runs the timing loop, so one compile per point (the reference
    check compiles once per shape and is shared by the implementations of that shape);
  * torch: one child process per point costs torch's import and CUDA start-up (5-10 s) 36
    times; torch_keep_alive (now the default everywhere) keeps one child for all torch
    points (they run first) and ends it before the first JAX point;
  * timing: loops of >= 10 ms (>= 3 calls) x 5 repeats instead of >= 50 ms (>= 20 calls)
    x 5, and the wall timer's 23 calls are gone (B = 256, S = 16k, MHA: a 16 ms step);
  * check: 8 rows spread over the batch (first and last included) instead of every row,
    still on every point (torch's child checks the same rows);
  * flashjax "xla" is left out (the targets are pallas_triton and the dense peers).
Estimate (not yet run; each row's `wall_s` will tell): about 0.7 s per in-process point
(one compile of 0.3-0.6 s, input generation, 6 loop runs, the check) -> 252 x 0.7 = 180 s,
torch 36 x 0.5 s + 10 s start-up = 30 s, per-shape reference and generator compiles about
30 s, launcher start 15 s: about 4.5 minutes (3-6). The launcher resumes a workdir, so run
it under `timeout 300` and repeat the same command if it stops early.

"core" (S = 4096, B in {1, 32, 128, 256}, implementations including flashjax "xla", wall
and loop timing, every row checked): 192 points, 96 of them peers below density 1 (skipped
at once), 64 flashjax points and 32 dense peer points (8 of them torch); about 4-5 minutes.
"all": the grid with core's settings: 864 points, 432 skipped at once, 288 flashjax and
144 dense peer points (36 torch): about 30-40 minutes.

Memory (H200, 139 GB; JAX may use 75% of it): one input set of B=256, S=16k, Nkv=32 is
256 * 16384 * 32 * 128 * 2 * 2 B = 68.7 GB. Every point sizes its number of input sets
(up to `input_sets`, and only as many as rotate through `min_rotation_mb`, enough to keep
small caches out of the 50 MB L2) to `memory_budget_gb` (default: 90% of what JAX reports
free) using XLA's memory analysis of the compiled step; a point whose single set does not
fit (e.g. the XLA implementations at that shape, which copy the cache) is "unsupported"
with the sizes in its reason. The torch child (third_party.torch_peers) builds its own
inputs; its points are sized to `torch_memory_gb`. Implementations run in the order
listed, torch first: with preallocation off the child then runs before JAX has grown its
memory pool. Without `XLA_PYTHON_CLIENT_PREALLOCATE=false` pass `--config.torch_memory_gb=30`.

`--config.implementations="('pallas_triton', 'peer:jax_nn_cudnn')"` narrows the columns;
`--config.batches`, `--config.kv_lens`, `--config.kv_heads`, `--config.densities` the grid;
`--config.num_splits=8` (or block_kv, xla_merge) sets pallas_triton's block_sizes.
The report plots TB/s, dense-equivalent TB/s and us per step against the batch, one line per
(implementation, S, Nkv, density).
"""

from __future__ import annotations

import ml_collections

from configs import common

IMPLEMENTATIONS = ("peer:torch_sdpa", "pallas_triton", "xla", "peer:jax_nn_cudnn",
                   "peer:jax_nn_xla", "peer:pallas_decode")
FAST_IMPLEMENTATIONS = ("peer:torch_sdpa", "pallas_triton", "peer:jax_nn_cudnn",
                        "peer:jax_nn_xla", "peer:pallas_decode")
GRIDS = {
    "all": {"batches": (1, 8, 32, 64, 128, 256), "kv_lens": (1024, 4096, 16384)},
    "core": {"batches": (1, 32, 128, 256), "kv_lens": (4096,)},
    "grid": {"batches": (1, 8, 32, 64, 128, 256), "kv_lens": (1024, 4096, 16384),
             "implementations": FAST_IMPLEMENTATIONS, "fast": True},
}
VARIANTS = {
    "all": common.Variant("B 1..256 x S {1k, 4k, 16k} x Nkv {32, 8} x 4 densities, 6 "
                          "implementations: 864 points, ~30-40 min (GPU; default)"),
    "grid": common.Variant("the same grid with one compile per point and no flashjax xla: "
                           "720 points, ~5 min (GPU)"),
    "core": common.Variant("S=4096, B {1, 32, 128, 256}: 192 points, ~4-5 min (GPU)"),
}
# What a CPU host runs instead (this benchmark has no CPU-sized grid).
CPU_ALTERNATIVE = "configs/ablate_batch_size.py:cpu"
KV_HEADS = (32, 8)
DENSITIES = (1.0, 0.75, 0.5, 0.25)

def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Decode benchmark config; arg "all" (the full grid, default), "grid" (the same grid in about
  5 minutes, module docstring) or "core" (a 4-5 min subset)."""
  grid = common.choose_variant(arg, VARIANTS, default="all")
  c = common.decode_base()
  c.grid = grid
  c.implementations = GRIDS[grid].get("implementations", IMPLEMENTATIONS)
  if GRIDS[grid].get("fast"):
    common.decode_fast_timing(c)
  c.batches = GRIDS[grid]["batches"]
  c.kv_lens = GRIDS[grid]["kv_lens"]
  c.kv_heads = KV_HEADS
  c.densities = DENSITIES
  c.sweep = common.decode_sweep(c)
  common.tag(c, grid, VARIANTS, cpu_alternative=CPU_ALTERNATIVE)
  return c
