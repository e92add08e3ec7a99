r"""Ablation: attention time against mask density, per mask family, against dense kernels.

Block skipping should make time proportional to the non-empty tiles; this
study measures how closely, and where skipping stops paying, for each mask family: random
whole tiles at a target block density (`random_blocks`, 128 x 128 pattern tiles on GPU, the
sparse block of FlexAttention, so the pattern is whole tiles for both block-sparse kernels),
causal documents, causal sliding windows, MEDUSA trees, LongFormer dilated and global
windows, and random_banded without and with RCM reordering (`random_banded_rcm`: the flashjax
kernels get `BlockMask.from_mask(mask, ..., reorder="rcm")`; peers are "unsupported" there,
their `random_banded` row is the same mask). Each family runs at one or more parameters
beside the dense baseline (the `dense` case: each implementation on no mask), on our Pallas
kernel (pallas_triton, and on "gpu" the Pallas Mosaic GPU forward at its default tiles), on
cuDNN (`peer:jax_nn_cudnn`, dense / materialised masks) and on FlexAttention
(`peer:torch_flex`, block-sparse). Experiment kind: attention_bench.

The sweep is one zipped axis of (case, implementation) points (the dense case of every
implementation first, then each implementation's other cases), times the `modes` axis:
every case runs on pallas_triton (and pallas_mosaic_gpu on "gpu"), the peers run on the
cases listed in _GRIDS.

Variants (GPU: B=1, T=S=8192, N=16, D=128, bf16, fwd, 128 x 64 tiles; every point checked
against the float32 reference, dense at this size):

  "gpu": 14 cases (dense; random_blocks .05 .1 .2 .4 .7; document 512, 2048; window 1024;
      medusa 4; dilated and global 256; random_banded and random_banded_rcm decay .01) on
      pallas_triton and on pallas_mosaic_gpu, cuDNN on dense / blocks0.1 / doc512 / win1024,
      FlexAttention on dense / blocks0.1: 34 points. Estimated on an H200 (jax 0.11.2): ~3 s
      per pallas_triton point, ~3.5 s per pallas_mosaic_gpu point (compile 2-4 s), ~2 s per
      cuDNN point, ~25 s per FlexAttention point (a torch child process with its own
      torch.compile; measured 20-30 s), ~12 s for the two reference compiles, ~15 s of
      start-up, report and summary: about 180 s (Mosaic GPU's sparse cases run last).
  "full" (default on a GPU host): 25 cases (random_blocks .02 ... .9, documents 128 / 512 /
      2048, windows 256 / 1k / 4k, medusa 4 / 8, dilated and global 64 / 256, both banded
      families at decay .01 / .002) on all three implementations: 75 points, about 12-13 minutes
      (the FlexAttention children dominate).
  "cpu": B=1, T=S=128, N=2, D=32, float32, 32 x 32 tiles, 13 cases on pallas_triton
      (interpret mode) and the XLA peer: 26 points in about 11 s on 2 cores (the numbers
      only show that everything runs; Mosaic GPU interpret mode is too slow for this grid).

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.launch \
      --config=configs/ablate_mask_density.py:gpu --workdir=/tmp/fj_ablate_density
  python -m configs.ablate_mask_density --workdir=/tmp/fj_ablate_density

The second command writes DIR/density_summary.md (per implementation: least-squares fit
time = a + b * block_density, the block density where the fit reaches each dense baseline,
and per row the speed-up over our dense kernel and over cuDNN dense) and
DIR/median_ms_vs_block_density.png (one series per implementation and mask family).

`--config.modes="('fwd', 'fwd_bwd')"` adds the backward; `--config.q_len` / `--config.kv_len`
change the shape. The (case, implementation) points are fixed by the variant.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from configs import common
from experiments import report

_CASE_FIELDS = ("case", "mask", "block_density_target", "window", "doc_len", "medusa_heads",
                "band_decay")
DENSE_CASE = "dense"
SUMMARY_FILE = "density_summary.md"
PLOT_FILE = "median_ms_vs_block_density.png"
_CUDNN, _FLEX = "peer:jax_nn_cudnn", "peer:torch_flex"
# Family parameters per variant, and per implementation the cases it runs (None: all).
_GRIDS = {
    "gpu": {"densities": (0.05, 0.1, 0.2, 0.4, 0.7), "docs": (512, 2048),
            "windows": (1024,), "dilated": (256,), "decays": (0.01,), "heads": (4,),
            "implementations": {"pallas_triton": None,
                                _CUDNN: (DENSE_CASE, "blocks0.1", "doc512", "win1024"),
                                _FLEX: (DENSE_CASE, "blocks0.1"),
                                "pallas_mosaic_gpu": None}},
    "full": {"densities": (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9),
             "docs": (128, 512, 2048), "windows": (256, 1024, 4096), "dilated": (64, 256),
             "decays": (0.01, 0.002), "heads": (4, 8),
             "implementations": {"pallas_triton": None, _CUDNN: None, _FLEX: None}},
    "cpu": {"densities": (0.1, 0.3, 0.6), "docs": (16, 64), "windows": (16, 64),
            "dilated": (8,), "decays": (0.05,), "heads": (4,),
            "implementations": {"pallas_triton": None, "peer:jax_nn_xla": None}},
}


def _cases(grid: Mapping[str, Any]) -> list[tuple[Any, ...]]:
  """(case, mask, block_density_target, window, doc_len, medusa_heads, band_decay) rows."""
  densities, docs, windows = grid["densities"], grid["docs"], grid["windows"]
  dilated, decays, heads = grid["dilated"], grid["decays"], grid["heads"]
  window0, doc0, decay0 = windows[0], docs[0], decays[0]
  rows = [(DENSE_CASE, "dense", 1.0, window0, doc0, heads[0], decay0)]
  rows += [(f"blocks{d:g}", "random_blocks", d, window0, doc0, heads[0], decay0)
           for d in densities]
  rows += [(f"doc{n}", "document", 1.0, window0, n, heads[0], decay0) for n in docs]
  rows += [(f"win{w}", "sliding_window", 1.0, w, doc0, heads[0], decay0) for w in windows]
  rows += [(f"medusa{h}", "medusa", 1.0, window0, doc0, h, decay0) for h in heads]
  rows += [(f"dilated{w}", "dilated", 1.0, w, doc0, heads[0], decay0) for w in dilated]
  rows += [(f"global{w}", "global", 1.0, w, doc0, heads[0], decay0) for w in dilated]
  for family in ("random_banded", "random_banded_rcm"):
    rows += [(f"{family}{d:g}", family, 1.0, window0, doc0, heads[0], d) for d in decays]
  return rows


def _points_axis(grid: Mapping[str, Any]) -> dict[str, list[Any]]:
  """The zipped (case fields, implementation) axis: every dense baseline first."""
  cases = _cases(grid)
  names = {row[0] for row in cases}
  pairs = []
  for impl, only in grid["implementations"].items():
    if only is not None and not set(only) <= names:
      raise ValueError(f"{impl=}: cases {sorted(set(only) - names)} are not in the grid")
    pairs += [(row, impl) for row in cases
              if row[0] != DENSE_CASE and (only is None or row[0] in only)]
  pairs = [(cases[0], impl) for impl in grid["implementations"]] + pairs
  axis = {f: [row[i] for row, _ in pairs] for i, f in enumerate(_CASE_FIELDS)}
  axis["implementation"] = [impl for _, impl in pairs]
  return axis

VARIANTS = {
    "gpu": common.Variant("B=1 T=8192 N=16 D=128 bf16 fwd, 14 cases on pallas_triton and "
                          "Mosaic GPU, cuDNN and FlexAttention on a few: 34 points, ~180 s "
                          "(H200)"),
    "full": common.Variant("25 cases on pallas_triton, cuDNN and FlexAttention: 75 points, "
                           "~12-13 min (GPU; default on a GPU host)"),
    "cpu": common.Variant("B=1 T=128 N=2 D=32 float32, 13 cases on pallas_triton (interpret "
                          "mode) and the XLA peer: 26 points (default on a CPU host)", cpu=True),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Mask-density ablation config; arg "full", "gpu" or "cpu"; none: "cpu" on CPU, else "full"."""
  arg = common.choose_variant(arg, VARIANTS, default="full")
  small = arg == "cpu"
  c = common.attention_base(small)
  c.batch = 1
  c.q_len = c.kv_len = 128 if small else 8192
  if small:
    c.block_q = c.block_kv = 32
  else:
    c.mask_block = 128  # FlexAttention's sparse block: whole tiles for both kernels
  c.modes = ("fwd",)
  c.case = DENSE_CASE
  c.sweep = [_points_axis(_GRIDS[arg]), {"mode": c.get_ref("modes")}]
  c.report = ml_collections.ConfigDict({
      "columns": ["median_ms", "roofline_ms", "block_density", "density", "useful_tflops",
                  "dense_equiv_tflops", "max_abs_err", "within_tol"],
      "plots": [{"x": "case", "y": "median_ms", "logy": True}],
  })
  common.tag(c, arg, VARIANTS)
  return c


def _ok_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Flat {point fields, metrics} of the latest ok row per point."""
  return [{**r["point"], **r["metrics"]} for r in report.latest_ok_rows(rows)]


def fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
  """Least-squares y = a + b * x.

  Args:
    x: [n] abscissae (at least two distinct values).
    y: [n] ordinates.

  Returns:
    (a, b, r2), r2 the coefficient of determination (1 when y is constant and fitted).
  """
  x, y = np.asarray(x, float), np.asarray(y, float)
  if x.shape != y.shape or x.size < 2 or np.ptp(x) == 0:
    raise ValueError(f"need >= 2 points with distinct x: {x.shape=}, {y.shape=}")
  b, a = np.polyfit(x, y, 1)
  residual = float(np.sum((y - (a + b * x))**2))
  total = float(np.sum((y - y.mean())**2))
  return float(a), float(b), 1.0 if total == 0 else 1.0 - residual / total


def summarize(rows: Sequence[Mapping[str, Any]]) -> str:
  """Markdown summary of a mask-density workdir's rows (see the module docstring).

  Args:
    rows: results.jsonl rows (any order; the latest row per point counts).

  Returns:
    The markdown text.
  """
  flat = _ok_rows(rows)
  dense = {(r["implementation"], r["mode"]): r["median_ms"] for r in flat
           if r["case"] == DENSE_CASE}
  cudnn = {mode: ms for (impl, mode), ms in dense.items() if impl == "peer:jax_nn_cudnn"}
  lines = ["# Time against block density", ""]
  lines += ["| implementation | mode | a (ms) | b (ms per unit block density) | r2 | "
            "break-even block density vs own dense | vs cuDNN dense |", "|---" * 7 + "|"]
  groups = sorted({(r["implementation"], r["mode"]) for r in flat})
  for impl, mode in groups:
    sub = [r for r in flat if (r["implementation"], r["mode"]) == (impl, mode)]
    bds = [r["block_density"] for r in sub]
    if len(set(bds)) < 2:
      continue
    a, b, r2 = fit_line(bds, [r["median_ms"] for r in sub])
    even = lambda base: "-" if base is None or b <= 0 else f"{(base - a) / b:.3g}"
    lines.append(f"| {impl} | {mode} | {a:.4g} | {b:.4g} | {r2:.3f} | "
                 f"{even(dense.get((impl, mode)))} | {even(cudnn.get(mode))} |")
  lines += ["", "| case | mask | mode | implementation | block density | median ms | "
            "speed-up vs own dense | vs cuDNN dense |", "|---" * 8 + "|"]
  for r in flat:
    own, ref = dense.get((r["implementation"], r["mode"])), cudnn.get(r["mode"])
    ratio = lambda base: "-" if base is None else f"{base / r['median_ms']:.3g}"
    lines.append(f"| {r['case']} | {r['mask']} | {r['mode']} | {r['implementation']} | "
                 f"{r['block_density']:.3g} | {r['median_ms']:.4g} | {ratio(own)} | "
                 f"{ratio(ref)} |")
  return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  """median_ms against block_density, one series per (implementation, mode, mask)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  flat = _ok_rows(rows)
  fig = Figure(figsize=(8, 5))
  ax = fig.add_subplot()
  for series in sorted({(r["implementation"], r["mode"], r["mask"]) for r in flat}):
    pts = sorted((r["block_density"], r["median_ms"]) for r in flat
                 if (r["implementation"], r["mode"], r["mask"]) == series)
    ax.plot(*zip(*pts), marker="o", label=" ".join(series))
  ax.set_xlabel("block density (non-empty tiles)")
  ax.set_ylabel("median ms")
  ax.legend(fontsize=6)
  fig.savefig(path, dpi=120)


def write_summary(workdir: str) -> str:
  """Writes DIR/density_summary.md and the plot from DIR/results.jsonl; returns the md."""
  rows = report.read_rows(workdir)
  text = summarize(rows)
  with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
    f.write(text)
  if any(math.isfinite(r.get("median_ms", math.nan)) for r in _ok_rows(rows)):
    plot(rows, os.path.join(workdir, PLOT_FILE))
  return text


if __name__ == "__main__":
  common.rewrite_main(__doc__, write_summary)
