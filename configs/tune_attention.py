r"""Block-size tuning of the Pallas attention forward: search, check, record.

Experiment kind attention_tune: for every (implementation, shape, mask) point it times the
backend's heuristic tiles and every candidate of the backend's search space (`search_space`
in flashjax/ops/attention/<backend>.py), checks the winner against the float32
reference and records it, under the point's tuning key, in the user tuning cache
($FLASHJAX_TUNING_DIR or ~/.cache/flashjax/tuning/<device>.json; `--config.tuning_file`
names another file). `dot_product_attention` then uses the recorded tiles by default
(docs/autotune.md). Timing: attention_bench's wall-clock median of 20 calls over 2 input
sets after 2 warm-up calls, forward only (`--config.modes="('fwd_bwd',)"` tunes the forward
tiles on forward + backward time instead).

Variants (GPU: N = 32 query and KV heads, bf16; masks dense, causal and causal documents of
mean length 512; (D, B, T = S) in {(128, 4, 4096), (128, 1, 16384), (64, 8, 2048)}):

  "gpu" (default on a GPU host): pallas_mosaic_gpu, 16 candidates (block_q {64, 128} x block_kv
      {64, 128} x num_stages {2, 3} x persistent {off, on}) + the heuristic per point, 9 points.
      Estimate on an H200 (jax 0.11.2): 1.5-3 s per candidate (Mosaic GPU compile 1.2-2.2 s,
      docs/results/attention_mosaic_h200_2026-11-22, plus 22 calls of at most 9 ms); 128 x 128
      tiles with 3 stages overflow shared memory at D = 128 and fail at trace time (~0 s): ~15
      compiles per point, ~30 s, plus the check (5-15 s for a new shape's reference): ~40 s per
      point, ~6-7 minutes with start-up and report.
  "gpu_triton": the same points on pallas_triton, 24 candidates (block_q {64, 128} x
      block_kv {32, 64, 128} x num_warps {4, 8} x num_stages {2, 3}) + the heuristic:
      ~55 s per point, ~8-9 minutes; under a 10-minute limit run it as
      `timeout 540 ...` and run the same command again (the launcher resumes the workdir).
  "cpu": B=1, T=S=128, N=2, D=32, float32, pallas_triton in interpret mode, 3 candidates
      (32x32, 64x32, 32x64) + the heuristic, 3 masks: 3 points in ~10 s on 2 cores, recorded
      in $TMPDIR/flashjax_tune_cpu/cpu.json, never in the user cache (the numbers only show
      that everything runs; interpret-mode calls never look tuning up).

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.launch \
      --config=configs/tune_attention.py:gpu --workdir=/tmp/fj_tune_mosaic
  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.launch \
      --config=configs/tune_attention.py:gpu_triton --workdir=/tmp/fj_tune_triton
  python -m configs.tune_attention --workdir=/tmp/fj_tune_mosaic
  python -m experiments.launch --config=configs/tune_attention.py:cpu \
      --workdir=/tmp/fj_tune_cpu

The third command writes DIR/tuning_summary.md: one table per tuning key with every
candidate's time (or error) against the heuristic. report.md has one row per key (winner,
best and heuristic ms, speed-up, failed candidates, check). To ship the measured defaults,
copy the tuning file to flashjax/ops/attention/tuned/<device slug>.json.

Grid overrides: `--config.implementations`, `--config.masks`, and the zipped shape axis
`--config.head_dims`, `--config.batches`, `--config.seq_lens` (tuples of equal length);
`--config.tuning_file`, `--config.record=False`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from configs import common
from experiments import report

SUMMARY_FILE = "tuning_summary.md"
_GPU_SHAPES = {"head_dims": (128, 128, 64), "batches": (4, 1, 8),
               "seq_lens": (4096, 16384, 2048)}
_VARIANTS = {
    "gpu": {"implementations": ("pallas_mosaic_gpu",), **_GPU_SHAPES},
    "gpu_triton": {"implementations": ("pallas_triton",), **_GPU_SHAPES},
    "cpu": {"implementations": ("pallas_triton",), "head_dims": (32,), "batches": (1,),
            "seq_lens": (128,)},
}
_CPU_CANDIDATES = ({"block_q": 32, "block_kv": 32}, {"block_q": 64, "block_kv": 32},
                   {"block_q": 32, "block_kv": 64})

VARIANTS = {
    "gpu": common.Variant("pallas_mosaic_gpu, 16 candidate tilings x 9 points (bf16 N=32; dense, "
                          "causal, document), ~6-7 min (H200; default on a GPU host)"),
    "gpu_triton": common.Variant("the same points on pallas_triton, 24 candidates, ~8-9 min "
                                 "(H200)"),
    "cpu": common.Variant("B=1 T=128 N=2 D=32 float32, pallas_triton in interpret mode, 3 "
                          "candidates x 3 points, records to $TMPDIR only (default on a CPU "
                          "host)", cpu=True),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Tuning config; arg "gpu", "gpu_triton" or "cpu"; none: "cpu" on a CPU host, else "gpu"."""
  arg = common.choose_variant(arg, VARIANTS, default="gpu")
  small = arg == "cpu"
  variant = _VARIANTS[arg]
  c = common.attention_base(small)
  c.experiment = "attention_tune"
  if not small:
    c.num_heads = c.num_kv_heads = 32
    c.warmup = 2
    c.iters = 20
  c.implementations = variant["implementations"]
  c.implementation = variant["implementations"][0]
  c.masks = ("dense", "causal", "document")
  c.modes = ("fwd",)
  c.head_dims = variant["head_dims"]
  c.batches = variant["batches"]
  c.seq_lens = variant["seq_lens"]
  c.candidates = [dict(x) for x in _CPU_CANDIDATES] if small else None
  # A typed placeholder, so `--config.tuning_file=PATH` can override the GPU variants' None.
  c.tuning_file = ml_collections.FieldReference(
      os.path.join(tempfile.gettempdir(), "flashjax_tune_cpu", "cpu.json") if small else None,
      field_type=str)
  c.record = True
  c.sweep = [{"implementation": c.get_ref("implementations")},
             {"head_dim": c.get_ref("head_dims"), "batch": c.get_ref("batches"),
              "q_len": c.get_ref("seq_lens"), "kv_len": c.get_ref("seq_lens")},
             {"mode": c.get_ref("modes")}, {"mask": c.get_ref("masks")}]
  c.report = ml_collections.ConfigDict({
      "columns": ["causal", "density_bucket", "winner", "best", "best_ms", "heuristic_ms",
                  "speedup", "candidates_ok", "candidates_failed", "compile_s_total",
                  "max_abs_err", "within_tol", "recorded"],
      "plots": [{"x": "mask", "y": "speedup"}],
  })
  common.tag(c, arg, VARIANTS)
  return c


def summarize(rows: Sequence[Mapping[str, Any]]) -> str:
  """Markdown: per tuning key (latest ok row per point), every candidate against the heuristic.

  Args:
    rows: results.jsonl rows of an attention_tune workdir.

  Returns:
    The markdown text.
  """
  lines = ["# Block-size tuning", ""]
  for row in report.latest_rows(rows):
    if row["status"] != "ok":
      continue
    point, m = row["point"], row["metrics"]
    heuristic = m.get("heuristic_ms")
    lines += [f"## {json.dumps(point, sort_keys=True)}", "",
              f"key `{m['tuning_key']}`; winner {m['winner']} `{m['best']}` "
              f"({m['best_ms']:.4g} ms), heuristic "
              + ("failed" if heuristic is None else f"{heuristic:.4g} ms"), "",
              "| candidate | ms | heuristic ms / ms | error |", "|---|---|---|---|"]
    candidates = json.loads(m["candidates"])
    candidates.sort(key=lambda c: (c.get("ms") is None, c.get("ms") or 0.0))
    for cand in candidates:
      ms = cand.get("ms")
      ratio = "-" if ms is None or heuristic is None else f"{heuristic / ms:.3f}"
      error = cand.get("error", "").replace("|", "/").replace("\n", " ")[:160]
      lines.append(f"| {cand['label']} | {'-' if ms is None else f'{ms:.4g}'} | {ratio} | "
                   f"{error} |")
    lines.append("")
  return "\n".join(lines)


def write_summary(workdir: str) -> str:
  """Writes DIR/tuning_summary.md from DIR/results.jsonl; returns the markdown."""
  text = summarize(report.read_rows(workdir))
  with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
    f.write(text)
  return text


if __name__ == "__main__":
  common.rewrite_main(__doc__, write_summary)
