r"""Split-count tuning of pallas_triton decode at small batch, beside cuDNN.

At B = 1..8 a decode step reads 4 MB to 2 GB of KV and its time is mostly fixed costs
(launches, latency), so how many programs share the cache (B x Nkv x splits) matters more
than streaming efficiency. Sweep (experiment kind decode_bench, as
configs/bench_decode_gpu.py): B in {1, 8} x S in {1k, 4k, 16k} x Nkv in {32, 8} (Nq = 32,
D = 128, bf16, dense, all lengths = S) x 8 variants, innermost:

  pallas_triton  num_splits = None (the heuristic: flashjax.ops.decode.block_sizes.launch_shape,
                 which also shortens the tile until the SMs are filled), 4, 8, 16, 32, 64
                 (block_kv left to the heuristic: the tile is halved, down to 16, until every
                 split owns one, so every count runs at every S)
  pallas_triton  num_splits = None with xla_merge=True: the splits merged and the groups
                 scattered in XLA, the path before the merge kernel and the one-split direct
                 store: the before/after of that change in the same run
  peer:jax_nn_cudnn  the dense peer that was fastest at B = 1 (docs/performance.md)

96 points (72 split counts, 12 XLA-merge, 12 cuDNN), each timed with one compiled program
(wall_timing=False: the output to check and loops of >= 10 ms x 5 repeats), every row
checked against the float32 reference. Estimate (not yet run; each row's `wall_s` will
tell): 0.5-0.8 s per point (one compile with one or two Triton kernels; inputs of at most
2.1 GB per set) -> 50-75 s, plus 12 per-shape reference / generator compiles (~5 s) and the
launcher's start (~15 s): 70-95 s on an H200. It resumes a workdir, so `timeout 120` and a
re-run finish it in any case.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.launch \
      --config=configs/tune_decode_splits.py --workdir=/tmp/fj_tune_splits

Read the table per (batch, kv_len, num_kv_heads): `us_per_step` of each split count against
the heuristic (launch_splits / launch_block_kv show what it picked), against the XLA merge
and against cuDNN. `--config.batches`, `--config.kv_lens`, `--config.kv_heads` narrow the
grid.

CPU (`:cpu`): the same variants on tiny shapes (float32, Pallas in interpret mode, split
counts {None, 2, 4}, jax.nn's XLA as the peer; 20 points in about 16 s on 2 cores); the
numbers only show that everything runs:

  python -m experiments.launch --config=configs/tune_decode_splits.py:cpu \
      --workdir=/tmp/fj_tune_splits_cpu

Tiles (`:gpu_tiles`): pallas_triton at B = 128, S = 4096, Nkv in {8, 32} (Nq = 32, D = 128,
bf16, dense, all lengths = S), 14 variants: (block_kv, num_warps, num_stages) in (32, 4, 2),
(64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 4, 3), (128, 8, 2),
(128, 8, 3), (256, 4, 1), (256, 8, 1) with the heuristic's split count, and num_splits in
{1, 2, 4} with half the KV groups (head_density 0.5, the heuristic's tiles): 28 points, the
first 4 rows of each checked. A tile that overflows shared memory is an error row; the
others still run. This is the sweep that `tests/ops/decode/test_decode_gpu.py` printed as
`test_tuning_sweeps` (it asserted nothing and was deleted); its split counts at B = 1 and 8
are the `:gpu` grid above. Not carried over: its split counts at B = 32 and its BNSD cache
layout timing (decode_bench has no layout field). Estimate (not yet run): up to 8.6 GB of
KV per input set at Nkv = 32, ~2 ms per step, about 1 s per point: ~1 minute with start-up.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.launch \
      --config=configs/tune_decode_splits.py:gpu_tiles --workdir=/tmp/fj_tune_decode_tiles
"""

from __future__ import annotations

import ml_collections

from configs import common

# (implementation, num_splits, xla_merge) per variant.
_VARIANTS = {
    "gpu": [("pallas_triton", splits, False) for splits in (None, 4, 8, 16, 32, 64)]
           + [("pallas_triton", None, True), ("peer:jax_nn_cudnn", None, False)],
    "cpu": [("pallas_triton", splits, False) for splits in (None, 2, 4)]
           + [("pallas_triton", None, True), ("peer:jax_nn_xla", None, False)],
}
# `:gpu_tiles`: (block_kv, num_warps, num_stages, num_splits, head_density) per variant.
_TILE_VARIANTS = (
    [(kv, warps, stages, None, 1.0) for kv, warps, stages in (
        (32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 4, 3),
        (128, 8, 2), (128, 8, 3), (256, 4, 1), (256, 8, 1))]
    + [(None, None, None, splits, 0.5) for splits in (1, 2, 4)])

VARIANTS = {
    "gpu": common.Variant("pallas_triton decode split counts at B {1, 8} x S {1k, 4k, 16k} x Nkv "
                          "{32, 8}, beside cuDNN: 96 points, ~70-95 s (H200; default on a GPU "
                          "host)"),
    "cpu": common.Variant("tiny float32 shapes, splits {None, 2, 4}, Pallas in interpret mode: "
                          "20 points (default on a CPU host)", cpu=True),
    "gpu_tiles": common.Variant("pallas_triton decode tiles (block_kv x num_warps x num_stages) "
                                "and head-sparse split counts at B=128 S=4k Nkv {8, 32}: 28 "
                                "points, ~1 min (estimate)"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Split tuning config; arg "gpu", "gpu_tiles" or "cpu" (tiny, interpret mode); none: "cpu" on
  a CPU host, else "gpu"."""
  arg = common.choose_variant(arg, VARIANTS, default="gpu")
  c = common.decode_base()
  common.decode_fast_timing(c)
  if arg == "gpu_tiles":
    return _tiles_config(c)
  c.check_rows = None  # B <= 8: every row
  if arg == "gpu":
    c.batches = (1, 8)
    c.kv_lens = (1024, 4096, 16384)
    c.kv_heads = (32, 8)
  else:
    c.batches = (1, 2)
    c.kv_lens = (64, 200)
    c.kv_heads = (2,)
    c.num_heads = 4
    c.head_dim = 16
    common.decode_cpu_settings(c)
  implementations, splits, merges = zip(*_VARIANTS[arg])
  c.sweep = [{"batch": c.get_ref("batches")}, {"kv_len": c.get_ref("kv_lens")},
             {"num_kv_heads": c.get_ref("kv_heads")},
             {"implementation": list(implementations), "num_splits": list(splits),
              "xla_merge": list(merges)}]
  c.report = ml_collections.ConfigDict({
      "columns": ["launch_splits", "launch_block_kv", "us_per_step", "kv_tbps",
                  "pct_of_ceiling", "loop_calls", "input_sets", "compile_s", "max_abs_err",
                  "within_tol"],
      "plots": [{"x": "kv_len", "y": "us_per_step", "logx": True, "logy": True}],
  })
  common.tag(c, arg, VARIANTS)
  return c


def _tiles_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `:gpu_tiles` variant (module docstring) on top of base_config + fast_timing."""
  c.check_rows = 4
  c.batches = (128,)
  c.kv_lens = (4096,)
  c.kv_heads = (8, 32)
  c.num_warps = ml_collections.FieldReference(None, field_type=int)
  c.num_stages = ml_collections.FieldReference(None, field_type=int)
  block_kv, warps, stages, splits, density = zip(*_TILE_VARIANTS)
  c.sweep = [{"batch": c.get_ref("batches")}, {"kv_len": c.get_ref("kv_lens")},
             {"num_kv_heads": c.get_ref("kv_heads")},
             {"block_kv": list(block_kv), "num_warps": list(warps), "num_stages": list(stages),
              "num_splits": list(splits), "head_density": list(density)}]
  c.report = ml_collections.ConfigDict({
      "columns": ["launch_splits", "launch_block_kv", "us_per_step", "kv_tbps",
                  "pct_of_ceiling", "loop_calls", "input_sets", "compile_s", "max_abs_err",
                  "within_tol"],
  })
  common.tag(c, "gpu_tiles", VARIANTS)
  return c
