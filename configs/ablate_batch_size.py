r"""Ablation: decode time and KV bandwidth against batch size x head density.

Polar Sparsity's claim (DESIGN.md idea 3): attention-head sparsity is per sequence and does
not fade with the batch, so a head-sparse decode step should stay about `density` times the
dense one at every batch size. This study measures it: flashjax decode backends, dense
(density 1) and head-sparse (.75, .5, .25 of the KV groups, random per sequence), from
B = 1 to 256, beside the best dense peer of DESIGN.md's decode table (torch SDPA; peers
compute every head, so they appear at density 1 only). Experiment kind: decode_bench.

GPU (default; S = 4096, Nq = 32, Nkv in {32, 8}, D = 128, bf16; 216 points, 54 of them the
peer below density 1, skipped at once; roughly 8-10 minutes on an H200):

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.launch \
      --config=configs/ablate_batch_size.py --workdir=/tmp/fj_ablate_batch

(see configs/bench_decode_gpu.py for why preallocation is off and the torch peer runs first).

CPU (tiny shapes, float32, Pallas in interpret mode; 36 points in about 30 s on 2 cores;
the numbers only show that everything runs):

  python -m experiments.launch --config=configs/ablate_batch_size.py:cpu \
      --workdir=/tmp/fj_ablate_batch_cpu

`--config.batches="(1, 8, 64)"`, `--config.densities="(1.0, 0.5)"`, `--config.kv_heads`,
`--config.kv_lens` and `--config.implementations` change the grid. The report plots us per
step, KV TB/s and dense-equivalent TB/s (dense bytes / time: the head-sparse speed-up)
against the batch, one line per (implementation, Nkv, density).
"""

from __future__ import annotations

import ml_collections

from configs import bench_decode_gpu

_IMPLEMENTATIONS = {
    "gpu": ("peer:torch_sdpa", "pallas_triton", "xla"),
    "cpu": ("xla", "pallas_triton", "peer:jax_nn_xla"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Batch-size ablation config; arg "gpu" (default) or "cpu" (tiny, interpret mode).

  Args:
    arg: "gpu" or "cpu".

  Returns:
    The ConfigDict.
  """
  arg = arg or "gpu"
  if arg not in _IMPLEMENTATIONS:
    raise ValueError(f"{arg=} must be one of {sorted(_IMPLEMENTATIONS)}")
  c = bench_decode_gpu.base_config()
  c.implementations = _IMPLEMENTATIONS[arg]
  c.densities = (1.0, 0.75, 0.5, 0.25)
  if arg == "gpu":
    c.batches = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    c.kv_lens = (4096,)
    c.kv_heads = (32, 8)
  else:
    c.batches = (1, 4, 16)
    c.kv_lens = (128,)
    c.kv_heads = (4, 2)
    c.densities = (1.0, 0.5)
    c.num_heads = 4
    c.head_dim = 32
    c.dtype = "float32"
    c.warmup = 1
    c.iters = 3
    c.loop_iters = 4
    c.loop_repeats = 2
    c.input_sets = 2
    c.min_rotation_mb = None
    c.torch_memory_gb = None
    c.chunk_mb = 1.0
  c.sweep = bench_decode_gpu.decode_sweep(c)
  c.report = ml_collections.ConfigDict({
      "columns": ["groups", "us_per_step", "median_us_wall", "kv_tbps", "pct_of_ceiling",
                  "dense_equiv_tbps", "input_sets", "max_abs_err", "within_tol"],
      "plots": [{"x": "batch", "y": "us_per_step", "logx": True, "logy": True},
                {"x": "batch", "y": "kv_tbps", "logx": True},
                {"x": "batch", "y": "dense_equiv_tbps", "logx": True}],
  })
  return c
