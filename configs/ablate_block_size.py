r"""Ablation: attention time against the tiles (block_q, block_kv), per mask and mode.

The forward and forward+backward time of the flashjax Pallas Triton backend
on causal and document-masked inputs at every (block_q, block_kv) of the grid; the backward
runs at the forward tiles (BlockSizes with no backward tiles). On "gpu" the Pallas Mosaic GPU
forward joins at its own tiles (block_q {64, 128} x block_kv {64, 128}: one or two consumer
warpgroups, no kv tile below 64), forward only: its backward kernels run at fixed tiles
(dQ block_q x 64, dK/dV 64 x 128), not the grid's. The report shows the
measured time beside the IO model's roofline (`roofline_ms`: block-skipping FlashAttention at
those tiles; smaller block_q re-reads K/V more often, larger tiles waste more of the
partial tiles of a mask). The XLA backend has no tiles, so it is not in this study.
Experiment kind: attention_bench.

Variants (B=2, T=S=4096, N=16, D=128, bf16, mean document 512 on GPU; a tile the backend
cannot launch is an error row; every point is checked against the float32 reference):

  "gpu": pallas_mosaic_gpu x {causal, document} x fwd x block_q {64, 128} x block_kv
      {64, 128} = 8 points, then pallas_triton x {causal, document} x {fwd, fwd_bwd} x
      block_q {64, 128} x block_kv {32, 64, 128} = 24 points: 32 points. Estimated on an
      H200 (jax 0.11.2): ~3.5 s per Mosaic GPU point (compile 2-4 s), ~2.5 s per Triton fwd
      and ~3.5 s per fwd_bwd point (Triton compile of the tile's kernels, 34 timed calls,
      check), ~25 s for the four reference compiles (2 masks x 2 modes) and ~15 s of
      start-up and report: about 140 s (the (implementation, mode, tiles) axis is fixed on
      this variant: `--config.block_qs` / `block_kvs` / `modes` / `implementations` apply to
      "full" and "cpu").
  "full" (default on a GPU host): pallas_triton on the dense mask too and block_q 256: 3 masks x
      2 modes x 3 x 3 tiles = 54 points, about 4 minutes.
  "cpu": B=1, T=S=128, N=2, D=32, float32, pallas_triton in interpret mode, 3 masks, tiles
      {32, 64} x {32, 64}: 24 points in about 20 s on 2 cores (the numbers only show that
      everything runs; Mosaic GPU interpret mode takes 15-30 s per call, so it is not here).

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.launch \
      --config=configs/ablate_block_size.py:gpu --workdir=/tmp/fj_ablate_blocks
  python -m experiments.launch --config=configs/ablate_block_size.py:cpu \
      --workdir=/tmp/fj_ablate_blocks_cpu

`--config.implementations`, `--config.masks`, `--config.modes`, `--config.block_qs` and
`--config.block_kvs` (tuples, e.g. "(64, 128)") change the grid.
"""

from __future__ import annotations

import ml_collections

from configs import common

_GRID = {
    "gpu": {"masks": ("causal", "document"), "block_qs": (64, 128),
            "block_kvs": (32, 64, 128),
            # (implementation, modes, block_qs, block_kvs) run before pallas_triton's grid.
            "extra": (("pallas_mosaic_gpu", ("fwd",), (64, 128), (64, 128)),)},
    "full": {"masks": ("dense", "causal", "document"), "block_qs": (64, 128, 256),
             "block_kvs": (32, 64, 128)},
    "cpu": {"masks": ("dense", "causal", "document"), "block_qs": (32, 64),
            "block_kvs": (32, 64)},
}


VARIANTS = {
    "gpu": common.Variant("B=2 T=4096 N=16 D=128 bf16, causal / document: Mosaic GPU fwd and "
                          "pallas_triton fwd, fwd_bwd over block_q x block_kv: 32 points, "
                          "~140 s (H200)"),
    "full": common.Variant("pallas_triton, 3 masks x 2 modes x 3 x 3 tiles: 54 points, ~4 min "
                           "(GPU; default on a GPU host)"),
    "cpu": common.Variant("B=1 T=128 N=2 D=32 float32, pallas_triton in interpret mode: "
                          "24 points (default on a CPU host)", cpu=True),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Block-size ablation config; arg "full", "gpu" or "cpu"; none: "cpu" on a CPU host, else
  "full"."""
  arg = common.choose_variant(arg, VARIANTS, default="full")
  c = common.attention_base(small=arg == "cpu")
  grid = _GRID[arg]
  c.implementations = ("pallas_triton",)
  c.masks = grid["masks"]
  c.modes = ("fwd", "fwd_bwd")
  c.block_qs = grid["block_qs"]
  c.block_kvs = grid["block_kvs"]
  c.block_q = grid["block_qs"][0]
  c.block_kv = grid["block_kvs"][0]
  if "extra" in grid:
    # Tile grids per implementation: one zipped (implementation, mode, tiles) axis.
    grids = grid["extra"] + tuple((impl, c.modes, c.block_qs, c.block_kvs)
                                  for impl in c.implementations)
    rows = [(impl, mode, bq, bkv) for impl, modes, bqs, bkvs in grids
            for mode in modes for bq in bqs for bkv in bkvs]
    c.sweep = [dict(zip(("implementation", "mode", "block_q", "block_kv"),
                        map(list, zip(*rows)))), {"mask": c.get_ref("masks")}]
  else:
    c.sweep = [{"implementation": c.get_ref("implementations")},
               {"mask": c.get_ref("masks")}, {"mode": c.get_ref("modes")},
               {"block_q": c.get_ref("block_qs")}, {"block_kv": c.get_ref("block_kvs")}]
  c.report = ml_collections.ConfigDict({
      "columns": ["median_ms", "roofline_ms", "model_bytes", "useful_tflops", "pct_of_peak",
                  "block_density", "compile_s", "max_abs_err", "within_tol"],
      "plots": [{"x": "block_kv", "y": "median_ms", "logx": True, "logy": True},
                {"x": "block_q", "y": "median_ms", "logx": True, "logy": True}],
  })
  common.tag(c, arg, VARIANTS)
  return c
