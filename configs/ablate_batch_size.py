r"""Ablation: decode time and KV bandwidth against batch size x head density.

Polar Sparsity's claim (docs/architecture.md, idea 3): attention-head sparsity is per
sequence and does not fade with the batch, so a head-sparse decode step should stay about
`density` times the dense one at every batch size. This study measures it: flashjax decode
backends, dense (density 1) and head-sparse (a fraction of the KV groups, random per
sequence), across batch sizes, optionally beside the best dense peer of docs/performance.md's
decode table (torch SDPA; peers compute every head, so they appear at density 1 only).
Experiment kind: decode_bench.

Variants (GPU: S = 4096, Nq = 32, D = 128, bf16; every point checked against the float32
decode reference):

  "gpu": pallas_triton and xla x Nkv 8 (GQA: KV groups are selected) x density {1, .5, .25}
      x B {1, 8, 64, 256} = 24 in-process points. Estimated on an H200 (jax 0.11.2): ~2.5 s
      per point (two compiles, input generation, 5 timed loops of >= 50 ms, the check) and
      ~12 s of start-up and report: about 75 s (budget 90 s).
  "full" (default on a GPU host): torch SDPA, pallas_triton and xla x Nkv {32, 8} x density {1,
      .75, .5, .25} x B {1, 2, 4, ..., 256}: 216 points, 54 of them the peer below density 1
      (skipped at once) and 18 torch children (8-10 s each): roughly 8-10 minutes.
  "cpu": tiny shapes, float32, Pallas in interpret mode: 36 points in about 33 s on 2 cores
      (the numbers only show that everything runs).

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.launch \
      --config=configs/ablate_batch_size.py:gpu --workdir=/tmp/fj_ablate_batch
  python -m experiments.launch --config=configs/ablate_batch_size.py:cpu \
      --workdir=/tmp/fj_ablate_batch_cpu

(see configs/bench_decode_gpu.py for why preallocation is off and the torch peer runs first).
`--config.batches="(1, 8, 64)"`, `--config.densities="(1.0, 0.5)"`, `--config.kv_heads`,
`--config.kv_lens` and `--config.implementations` change the grid (`--config.kv_heads="(32,
8)"` adds MHA to the "gpu" grid). The report plots us per step, KV TB/s and
dense-equivalent TB/s (dense bytes / time: the head-sparse speed-up) against the batch, one
line per (implementation, Nkv, density).
"""

from __future__ import annotations

import ml_collections

from configs import common

_GRIDS = {
    "gpu": {"implementations": ("pallas_triton", "xla"), "batches": (1, 8, 64, 256),
            "kv_heads": (8,), "densities": (1.0, 0.5, 0.25)},
    "full": {"implementations": ("peer:torch_sdpa", "pallas_triton", "xla"),
             "batches": (1, 2, 4, 8, 16, 32, 64, 128, 256), "kv_heads": (32, 8),
             "densities": (1.0, 0.75, 0.5, 0.25)},
    "cpu": {"implementations": ("xla", "pallas_triton", "peer:jax_nn_xla"),
            "batches": (1, 4, 16), "kv_heads": (4, 2), "densities": (1.0, 0.5)},
}

VARIANTS = {
    "gpu": common.Variant("decode, S=4096 Nq=32 D=128 bf16: pallas_triton and xla x Nkv 8 x "
                          "density {1, .5, .25} x B {1, 8, 64, 256}: 24 points, ~75 s (H200)"),
    "full": common.Variant("torch SDPA, pallas_triton, xla x Nkv {32, 8} x 4 densities x B 1..256: "
                           "216 points, ~8-10 min (GPU; default on a GPU host)"),
    "cpu": common.Variant("tiny float32 shapes, Pallas in interpret mode: 36 points "
                          "(default on a CPU host)", cpu=True),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Batch-size ablation config; arg "full", "gpu" or "cpu"; none: "cpu" on a CPU host, else
  "full"."""
  arg = common.choose_variant(arg, VARIANTS, default="full")
  c = common.decode_base()
  grid = _GRIDS[arg]
  c.implementations = grid["implementations"]
  c.densities = grid["densities"]
  c.batches = grid["batches"]
  c.kv_heads = grid["kv_heads"]
  c.kv_lens = (128,) if arg == "cpu" else (4096,)
  if arg == "cpu":
    c.num_heads = 4
    c.head_dim = 32
    c.warmup = 1
    c.iters = 3
    common.decode_cpu_settings(c)
  c.sweep = common.decode_sweep(c)
  c.report = ml_collections.ConfigDict({
      "columns": ["groups", "us_per_step", "median_us_wall", "kv_tbps", "pct_of_ceiling",
                  "dense_equiv_tbps", "input_sets", "max_abs_err", "within_tol"],
      "plots": [{"x": "batch", "y": "us_per_step", "logx": True, "logy": True},
                {"x": "batch", "y": "kv_tbps", "logx": True},
                {"x": "batch", "y": "dense_equiv_tbps", "logx": True}],
  })
  common.tag(c, arg, VARIANTS)
  return c
