r"""Batch-union sparse MLP benchmark: flashjax.sparse_mlp beside dense MLPs.

GPU (OPT-6.7B and OPT-13B MLP shapes: d 4096 / 5120, F = 4d; B in {1, 8, 32, 64, 128, 256};
neuron density in {0.05, 0.1, 0.25, 0.5, 1}; bf16; pallas_triton, dense XLA (cuBLAS) and
torch dense at density 1, every output checked; `--config.implementations` adds "xla", the
gather-then-dot path):

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.launch \
      --config=configs/bench_sparse_mlp.py:gpu --workdir=/tmp/fj_sparse_mlp

"tune": pallas_triton tile variants at OPT-6.7B, B in {1, 64, 256}, density {0.1, 0.5, 1}.
CPU (the default there; d=128, F=512, B in {1, 8}, pallas_triton in interpret mode: shows
that everything runs, not a speed): `--config=configs/bench_sparse_mlp.py`.
Rows: median / p10 / p90 us per call (device loop, or CUDA events for torch), k, weight MB
read, weight TB/s, % of the copy bandwidth measured in the same process, TFLOP/s, tiles.
"""

from __future__ import annotations

import ml_collections

from configs import common

VARIANTS = {
    "gpu": common.Variant("OPT-6.7B / 13B MLP shapes, B 1-256, density 0.05-1, bf16: "
                          "pallas_triton beside dense XLA (cuBLAS) and torch dense"),
    "tune": common.Variant("pallas_triton tile variants at OPT-6.7B, B {1, 64, 256}, "
                           "density {0.1, 0.5, 1}"),
    "cpu": common.Variant("d=128 F=512 B {1, 8} float32, xla and pallas_triton in interpret "
                          "mode (default on a CPU host, ~1 min)", cpu=True),
}
_TILE_VARIANTS = [
    # (block_k, block_k_fc2, block_out, block_b, num_splits, num_warps, num_stages); 0 = auto
    (0, 0, 0, 0, 0, 0, 0),
    (32, 64, 64, 0, 0, 4, 4),
    (64, 128, 128, 0, 0, 4, 3),
    (16, 32, 32, 0, 0, 4, 4),
    (32, 64, 64, 0, 4, 8, 3),
]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Sparse MLP benchmark config; arg "gpu", "tune" or "cpu" (default: cpu on a CPU host)."""
  arg = common.choose_variant(arg, VARIANTS, default="gpu")
  c = ml_collections.ConfigDict()
  c.experiment = "sparse_mlp_bench"
  small = arg == "cpu"
  c.implementation = "pallas_triton"
  c.d_model, c.d_ff = (128, 512) if small else (4096, 16384)
  c.batch = 1
  c.density = 1.0
  for name in ("block_k", "block_k_fc2", "block_d", "block_out", "block_b", "num_splits",
               "num_warps", "num_stages"):
    c[name] = 0  # 0: the heuristic (flashjax.ops.sparse_mlp.block_sizes.resolve)
  if arg == "gpu":
    c.implementations = ("pallas_triton", "dense_xla", "torch_dense")
    c.shapes = ((4096, 16384), (5120, 20480))
    c.batches = (1, 8, 32, 64, 128, 256)
    c.densities = (0.05, 0.1, 0.25, 0.5, 1.0)
    c.sweep = [{"implementation": c.get_ref("implementations")},
               {"d_model": [s[0] for s in c.shapes], "d_ff": [s[1] for s in c.shapes]},
               {"batch": c.get_ref("batches")}, {"density": c.get_ref("densities")}]
  elif arg == "tune":
    c.batches = (1, 64, 256)
    c.densities = (0.1, 0.5, 1.0)
    fields = ("block_k", "block_k_fc2", "block_out", "block_b", "num_splits", "num_warps",
              "num_stages")
    c.sweep = [{name: [v[i] for v in _TILE_VARIANTS] for i, name in enumerate(fields)},
               {"batch": c.get_ref("batches")}, {"density": c.get_ref("densities")}]
  else:
    c.implementations = ("pallas_triton", "xla", "dense_xla")
    c.batches = (1, 8)
    c.densities = (0.25, 1.0)
    c.sweep = [{"implementation": c.get_ref("implementations")},
               {"batch": c.get_ref("batches")}, {"density": c.get_ref("densities")}]
  c.dtype = "float32" if small else "bfloat16"
  c.interpret = small
  c.seed = 0
  c.input_sets = 2
  c.warmup = 3
  c.iters = 5 if small else 200
  c.repeats = 3 if small else 5
  c.check = True
  c.measure_copy = not small
  c.report = ml_collections.ConfigDict({
      "columns": ["median_us", "k", "weight_mb", "weight_tbps", "pct_of_copy", "tflops",
                  "max_abs_err", "within_tol"],
      "plots": [{"x": "batch", "y": "median_us", "logy": True, "logx": True}],
  })
  common.tag(c, arg, VARIANTS)
  return c
