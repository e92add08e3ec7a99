r"""Ablation: attention time against mask density, per mask family, against dense kernels.

Issue 7, item 3. Block skipping should make time proportional to the non-empty tiles; this
study measures how closely, and where skipping stops paying, for each mask family: random
whole tiles at a target block density (`random_blocks`), causal documents, causal sliding
windows, MEDUSA trees, LongFormer dilated and global windows, and random_banded without and
with RCM reordering (`random_banded_rcm`: the flashjax kernels get
`BlockMask.from_mask(mask, ..., reorder="rcm")`; peers are "unsupported" there, their
`random_banded` row is the same mask). Each family runs at several parameters (densities)
beside the dense baseline (the `dense` case: our kernel on no mask), on our Pallas kernel and
on cuDNN (`peer:jax_nn_cudnn`, dense / materialised masks) and FlexAttention
(`peer:torch_flex`, block-sparse). Experiment kind: attention_bench.

GPU (default; B=1, T=S=8192, N=16, D=128, bf16, fwd; 25 cases x 3 implementations):

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.launch \
      --config=configs/ablate_mask_density.py --workdir=/tmp/fj_ablate_density
  python -m configs.ablate_mask_density --workdir=/tmp/fj_ablate_density

The second command writes DIR/density_summary.md (per implementation: least-squares fit
time = a + b * block_density, the block density where the fit reaches each dense baseline,
and per row the speed-up over our dense kernel and over cuDNN dense) and
DIR/median_ms_vs_block_density.png (one series per implementation and mask family).

CPU (B=1, T=S=128, N=2, D=32, float32, 32 x 32 tiles, pallas_triton in interpret mode and
the XLA peer; 13 cases x 2 implementations in about 15 s; the numbers only show that
everything runs):

  python -m experiments.launch --config=configs/ablate_mask_density.py:cpu \
      --workdir=/tmp/fj_ablate_density_cpu

`--config.implementations`, `--config.modes="('fwd', 'fwd_bwd')"`, `--config.q_len` /
`--config.kv_len` change the grid.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from configs import ablate_block_size

_CASE_FIELDS = ("case", "mask", "block_density_target", "window", "doc_len", "medusa_heads",
                "band_decay")
_IMPLEMENTATIONS = {
    "gpu": ("pallas_triton", "peer:jax_nn_cudnn", "peer:torch_flex"),
    "cpu": ("pallas_triton", "peer:jax_nn_xla"),
}
DENSE_CASE = "dense"
SUMMARY_FILE = "density_summary.md"
PLOT_FILE = "median_ms_vs_block_density.png"


def _cases(small: bool) -> list[tuple[Any, ...]]:
  """(case, mask, block_density_target, window, doc_len, medusa_heads, band_decay) rows."""
  if small:
    densities, docs, windows = (0.1, 0.3, 0.6), (16, 64), (16, 64)
    dilated, decays, heads = (8,), (0.05,), (4,)
  else:
    densities = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9)
    docs, windows = (128, 512, 2048), (256, 1024, 4096)
    dilated, decays, heads = (64, 256), (0.01, 0.002), (4, 8)
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


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Mask-density ablation config; arg "gpu" (default) or "cpu" (tiny, interpret mode).

  Args:
    arg: "gpu" or "cpu".

  Returns:
    The ConfigDict.
  """
  arg = arg or "gpu"
  if arg not in _IMPLEMENTATIONS:
    raise ValueError(f"{arg=} must be one of {sorted(_IMPLEMENTATIONS)}")
  small = arg == "cpu"
  c = ablate_block_size.attention_base(small)
  c.batch = 1
  c.q_len = c.kv_len = 128 if small else 8192
  if small:
    c.block_q = c.block_kv = 32
  c.implementations = _IMPLEMENTATIONS[arg]
  c.modes = ("fwd",)
  cases = _cases(small)
  case_axis = {f: [row[i] for row in cases] for i, f in enumerate(_CASE_FIELDS)}
  c.case = DENSE_CASE
  c.sweep = [case_axis, {"mode": c.get_ref("modes")},
             {"implementation": c.get_ref("implementations")}]
  c.report = ml_collections.ConfigDict({
      "columns": ["median_ms", "roofline_ms", "block_density", "density", "useful_tflops",
                  "dense_equiv_tflops", "max_abs_err", "within_tol"],
      "plots": [{"x": "case", "y": "median_ms", "logy": True}],
  })
  return c


def _ok_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Flat {point fields, metrics} of the latest ok row per point."""
  latest = {}
  for row in rows:
    latest[row["key"]] = row
  return [{**r["point"], **r["metrics"]} for r in latest.values() if r["status"] == "ok"]


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
  path = os.path.join(workdir, "results.jsonl")
  with open(path) as f:
    rows = []
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a torn last line
  text = summarize(rows)
  with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
    f.write(text)
  if any(math.isfinite(r.get("median_ms", math.nan)) for r in _ok_rows(rows)):
    plot(rows, os.path.join(workdir, PLOT_FILE))
  return text


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  print(write_summary(parser.parse_args().workdir))
