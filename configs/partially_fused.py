r"""Study: the partially fused softmax beside FlashAttention and unfused XLA, and the IO model.

Times three forward algorithms on the same inputs (experiment kind attention_bench, every
point checked against the float32 reference): `partially_fused` (two Pallas kernels, the
T x S scores written once and read once: docs/partially_fused.md), `pallas_triton`
(FlashAttention) and `xla` (unfused: scores and probabilities materialised), across sequence
lengths, head dims and the two masks partially_fused takes (dense, causal), and sets each
shape's measured winner beside the one `flashjax.io_model.predict_partially_fused` predicts
(the rule `io_model.prefer_partially_fused` is written against).

Shapes: T = S in {512, 1k, 2k, 4k, 8k}, plus T = 512 against S = 16k and 64k (K/V larger
than L2, re-read by FlashAttention once per query tile), x D {64, 128}. The model compares
against FlashAttention at the tiles pallas_triton ran (its row's fwd_tiles): at the default
128 x 64 it predicts FlashAttention ahead everywhere on these shapes; with small query tiles
(`--config.block_q=16`, which partially_fused takes too) it predicts partially_fused ahead
at T = 512, S = 64k (io_model's tests).

  "gpu" (default on a GPU host): B=1, N=8, bf16, loop timing: 3 x 7 x 2 x 2 = 84 points;
      3-10 s a point with its check (the partially_fused points of a first, cut H200 run:
      24 in 175 s), so about 10 minutes: under the device's 10-minute limit run it twice
      with `timeout` (the launcher resumes the workdir).
  "cpu" (default on a CPU host): B=1, N=2, float32, T = S in {64, 128} and T = 32 against
      S = 256, D {16, 32}, Pallas in interpret mode: 3 x 3 x 2 x 2 = 36 points; the numbers
      only show that everything runs, and the CPU has no ceilings, so the predicted column
      is for `prediction_device` (an H100 by default there: labelled, not a CPU claim).

  python -m experiments.launch --config=configs/partially_fused.py:gpu --workdir=/tmp/fj_pf
  python -m configs.partially_fused --workdir=/tmp/fj_pf

The second command writes DIR/partially_fused_summary.md: per (mask, D, T, S) the median ms
of each algorithm, the measured winner, the modelled ms of each (dense rows; the model does
not count causal's skipped tiles) and the predicted winner, and how often the two agree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from configs import common
from experiments import report
from flashjax import io_model

IMPLEMENTATIONS = ("partially_fused", "pallas_triton", "xla")
# The io_model prediction's names of the three algorithms, per implementation.
_MODELLED = {"partially_fused": "partially_fused_ms", "pallas_triton": "flash_ms",
             "xla": "naive_ms"}
SUMMARY_FILE = "partially_fused_summary.md"

_GRIDS = {
    "gpu": {"lengths": [(512, 512), (1024, 1024), (2048, 2048), (4096, 4096), (8192, 8192),
                        (512, 16384), (512, 65536)],
            "head_dims": (64, 128)},
    "cpu": {"lengths": [(64, 64), (128, 128), (32, 256)], "head_dims": (16, 32)},
}

VARIANTS = {
    "gpu": common.Variant("B=1 N=8 bf16 fwd: partially_fused, pallas_triton and xla x 7 "
                          "(T, S) x D {64, 128} x dense / causal: 84 points (~10 min on an H200)"),
    "cpu": common.Variant("B=1 N=2 float32, interpret mode: 3 implementations x 3 (T, S) x "
                          "D {16, 32} x dense / causal: 36 points (default on a CPU host)",
                          cpu=True),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Partially fused study config; arg "gpu" or "cpu"; none: "cpu" on a CPU host, else "gpu"."""
  arg = common.choose_variant(arg, VARIANTS, default="gpu")
  small = arg == "cpu"
  grid = _GRIDS[arg]
  c = common.attention_base(small)
  c.num_heads = c.num_kv_heads = 2 if small else 8
  c.batch = 1
  c.implementations = IMPLEMENTATIONS
  c.masks = ("dense", "causal")
  c.head_dims = grid["head_dims"]
  # Implementations innermost: a run cut by a time limit loses whole shapes, and every
  # finished shape has all three algorithms to compare.
  c.sweep = [{"q_len": [t for t, _ in grid["lengths"]],
              "kv_len": [s for _, s in grid["lengths"]]},
             {"head_dim": c.get_ref("head_dims")}, {"mask": c.get_ref("masks")},
             {"implementation": c.get_ref("implementations")}]
  c.timing = "wall" if small else "loop"
  # The device whose ceilings the predicted column uses (None: the one that ran).
  c.prediction_device = "NVIDIA H100 80GB HBM3" if small else None
  c.report = ml_collections.ConfigDict({
      "columns": ["median_ms", "roofline_ms", "model_algorithm", "backend", "max_abs_err",
                  "within_tol", "check"],
      "plots": [{"x": "q_len", "y": "median_ms", "logx": True, "logy": True}],
  })
  common.tag(c, arg, VARIANTS)
  return c


def _prediction(row: Mapping[str, Any], flash_tiles: str | None,
                device: str | None) -> dict[str, float] | None:
  """The io_model's modelled ms per implementation for a dense row's shape (FlashAttention at
  `flash_tiles`, "QxK", else the model's 128 x 64), or None."""
  if device is None or row["mask"] != "dense":
    return None
  block_q, block_kv = map(int, (flash_tiles or "128x64").split("x"))
  try:
    p = io_model.predict_partially_fused(
        row["q_len"], row["kv_len"], row["head_dim"], row["dtype"], device,
        batch=row["batch"], num_heads=row["num_heads"], num_kv_heads=row["num_kv_heads"],
        block_q=block_q, block_kv=block_kv)
  except ValueError:  # no ceilings or L2 size for this device kind
    return None
  return {impl: getattr(p, field) for impl, field in _MODELLED.items()}


def summarize(rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> str:
  """Markdown: measured and predicted winners per shape (module docstring).

  Args:
    rows: results.jsonl rows (the latest ok row per point counts).
    config: the study config (config.json): its prediction_device, shapes and dtype.

  Returns:
    The markdown text.
  """
  device = config.get("prediction_device")
  flat = [{**config, **r["point"], **r["metrics"]} for r in report.latest_ok_rows(rows)]
  ran = flat[0].get("roofline_device") if flat else None
  device = device or ran
  shapes = sorted({(r["mask"], r["head_dim"], r["q_len"], r["kv_len"]) for r in flat})
  lines = ["# Partially fused softmax vs FlashAttention vs unfused XLA", "",
           f"Measured on {ran or 'no device'}. Predicted: "
           f"flashjax.io_model.predict_partially_fused on {device or 'no device'} ceilings "
           "(dense rows only).", ""]
  if device != ran:
    lines += ["The prediction is for another device than the one measured: the agreement "
              "below is not a test of the model.", ""]
  head = " | ".join(f"{impl} ms" for impl in IMPLEMENTATIONS)
  lines += [f"| mask | D | T | S | {head} | measured winner | predicted winner | "
            "agree |", "|---" * (7 + len(IMPLEMENTATIONS)) + "|"]
  agree = total = 0
  for shape in shapes:
    got = {r["implementation"]: r for r in flat
           if (r["mask"], r["head_dim"], r["q_len"], r["kv_len"]) == shape
           and r.get("within_tol") is not False}
    measured = {impl: got[impl]["median_ms"] for impl in IMPLEMENTATIONS if impl in got}
    # A winner needs a race: at least two algorithms measured on the shape.
    winner = min(measured, key=measured.get) if len(measured) > 1 else "-"
    flash_tiles = got["pallas_triton"].get("fwd_tiles") if "pallas_triton" in got else None
    predicted = _prediction(next(iter(got.values())), flash_tiles, device) if got else None
    pick = min(predicted, key=predicted.get) if predicted else "-"
    match = "-"
    if predicted and len(measured) == len(IMPLEMENTATIONS):
      total += 1
      agree += pick == winner
      match = "yes" if pick == winner else "no"
    cells = " | ".join(
        (f"{measured[i]:.4g}" if i in measured else "-")
        + (f" ({predicted[i]:.3g})" if predicted else "") for i in IMPLEMENTATIONS)
    lines.append(f"| {shape[0]} | {shape[1]} | {shape[2]} | {shape[3]} | {cells} | {winner} | "
                 f"{pick} | {match} |")
  lines += ["", "Cells: measured median ms (modelled ms). A point that failed its check is "
            "left out.", f"Prediction agrees with the measurement on {agree} of {total} "
            "dense shapes with all three measured."]
  return "\n".join(lines) + "\n"


def write_summary(workdir: str) -> str:
  """Writes DIR/partially_fused_summary.md from DIR/results.jsonl; returns the markdown."""
  config = report.read_config(workdir)
  text = summarize(report.read_rows(workdir), config)
  with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
    f.write(text)
  return text


if __name__ == "__main__":
  common.rewrite_main(__doc__, write_summary)
