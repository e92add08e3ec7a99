r"""Reproduction: "Efficiently Dispatching Flash Attention for Partially Filled Attention Masks".

The mask suites of Sharma & Geiping (2024, binary block masking), run on
our block-skipping Pallas kernel, with speed-ups over our own kernel on a dense and on a
causal mask (the FlashAttention baselines) for the forward and the backward pass:

  medusa{4,6,8}      tree attention over MEDUSA candidate trees, 3 predictions per head and
                     4-8 heads (trees of depth 4-8, copies filling N tokens)
  alpaca_full        ALPACA-style packing: documents of a skewed (log-normal) length
                     distribution, full attention inside each document
  alpaca_prefix      the same packing, prefix-LM inside each document
  longformer_window  LongFormer windowed attention, 8 keys on each side
  longformer_dilated the same window at dilation 2
  longformer_global  the window plus 16 global tokens
  rcm / random_banded  the synthetic banded-random mask with and without RCM reordering
  dense, causal      the baselines

B=4, 32 heads, D=64, fp16, the backend's default tiles (128 x 64 forward); modes fwd and
fwd_bwd (the backward time is fwd_bwd minus fwd of the same point). Experiment kind:
attention_bench.

The sequence axis zips `seq_lens`, `modes` and `checks`: entry i runs N = seq_lens[i] in
modes[i], checked against the float32 reference when checks[i] (the reference is dense up to
N = 4096 here; checks stay on the small N, where its compile and run are cheap). It is the
outer axis, so a run cut by a time limit loses the last entries' cases, not whole N.

Variants:

  "gpu": 11 cases (medusa6 left out) x {N=1024 fwd (checked), N=8192 fwd, N=8192 fwd_bwd}
      = 33 points: forward speed-ups at 1k and 8k, backward ones at 8k. Estimated on an
      H200 (jax 0.11.2): ~2.5-3.5 s per point (Triton compile of the mask's kernels, 34
      timed calls), ~6 s for the three reference compiles at N=1024 and ~15 s of start-up,
      report and table: about 115 s (budget 120 s).
  "full" (default on a GPU host): the paper's grid, 12 cases x N in {256, ..., 16384} x {fwd,
      fwd_bwd} = 168 points, checked up to N = 2048: about 10 minutes.
  "cpu": B=1, N=2 heads, D=32, float32, 32 x 32 tiles, N = 64 and 128 x both modes, all
      checked, pallas_triton in interpret mode: 48 points in about 55 s on 2 cores (the numbers
      only show that everything runs).

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.launch \
      --config=configs/reproduce_binblkmsk.py:gpu --workdir=/tmp/fj_binblkmsk
  python -m configs.reproduce_binblkmsk --workdir=/tmp/fj_binblkmsk

The second command writes DIR/speedups.md: the paper's table, rows mask x N, columns the
forward and backward speed-ups over the dense and the causal baseline (one table per
implementation), with the block density at the forward tiles.

  python -m experiments.launch --config=configs/reproduce_binblkmsk.py:cpu \
      --workdir=/tmp/fj_binblkmsk_cpu

`--config.seq_lens="(1024, 4096)"` with `--config.modes="('fwd', 'fwd')"` and
`--config.checks="(True, False)"` (same lengths), and `--config.implementations`, change the
grid.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from configs import common

BASELINES = ("dense", "causal")
SPEEDUP_FILE = "speedups.md"
_CASE_FIELDS = ("case", "mask", "window", "window_right", "dilation", "num_global",
                "medusa_heads", "doc_len_dist")
_CASES = (
    ("dense", "dense", 8, 8, 2, 16, 4, "lognormal"),
    ("causal", "causal", 8, 8, 2, 16, 4, "lognormal"),
    ("medusa4", "medusa", 8, 8, 2, 16, 4, "lognormal"),
    ("medusa6", "medusa", 8, 8, 2, 16, 6, "lognormal"),
    ("medusa8", "medusa", 8, 8, 2, 16, 8, "lognormal"),
    ("alpaca_full", "document_full", 8, 8, 2, 16, 4, "lognormal"),
    ("alpaca_prefix", "prefix_lm", 8, 8, 2, 16, 4, "lognormal"),
    ("longformer_window", "sliding_window", 8, 8, 2, 16, 4, "lognormal"),
    ("longformer_dilated", "dilated", 8, 8, 2, 16, 4, "lognormal"),
    ("longformer_global", "global", 8, 8, 2, 16, 4, "lognormal"),
    ("rcm", "random_banded_rcm", 8, 8, 2, 16, 4, "lognormal"),
    ("random_banded", "random_banded", 8, 8, 2, 16, 4, "lognormal"),
)


# Sequence axis per variant: (N, mode, check) entries; cases left out per variant.
_RUNS = {
    "gpu": ((1024, "fwd", True), (8192, "fwd", False), (8192, "fwd_bwd", False)),
    "full": tuple((256 * 2**i, mode, i <= 3) for i in range(7)
                  for mode in ("fwd", "fwd_bwd")),
    "cpu": tuple((n, mode, True) for n in (64, 128) for mode in ("fwd", "fwd_bwd")),
}
_LEFT_OUT = {"gpu": ("medusa6",), "full": (), "cpu": ()}

VARIANTS = {
    "gpu": common.Variant("11 mask cases x {N=1024 fwd, N=8192 fwd, N=8192 fwd_bwd}, B=4 32 "
                          "heads D=64 fp16: 33 points, ~115 s (H200)"),
    "full": common.Variant("the paper's grid, 12 cases x N 256..16384 x 2 modes: 168 points, "
                           "~10 min (GPU; default on a GPU host)"),
    "cpu": common.Variant("B=1 N=2 heads D=32 float32, N = 64 and 128, pallas_triton in "
                          "interpret mode: 48 points (default on a CPU host)", cpu=True),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Paper-reproduction config; arg "full", "gpu" or "cpu"; none: "cpu" on a CPU host, else
  "full"."""
  arg = common.choose_variant(arg, VARIANTS, default="full")
  small = arg == "cpu"
  c = common.attention_base(small)
  if small:
    c.block_q = c.block_kv = 32
    c.doc_len = 16
  else:
    c.batch = 4
    c.num_heads = c.num_kv_heads = 32
    c.head_dim = 64
    c.dtype = "float16"
    c.doc_len = 256  # ALPACA samples: a few hundred tokens
  c.seq_lens, c.modes, c.checks = (tuple(x) for x in zip(*_RUNS[arg]))
  c.implementations = ("pallas_triton",)
  c.case = "dense"
  cases = [row for row in _CASES if row[0] not in _LEFT_OUT[arg]]
  case_axis = {f: [row[i] for row in cases] for i, f in enumerate(_CASE_FIELDS)}
  c.sweep = [{"q_len": c.get_ref("seq_lens"), "kv_len": c.get_ref("seq_lens"),
              "mode": c.get_ref("modes"), "check": c.get_ref("checks")},
             case_axis, {"implementation": c.get_ref("implementations")}]
  c.report = ml_collections.ConfigDict({
      "columns": ["median_ms", "roofline_ms", "block_density", "density", "useful_tflops",
                  "max_abs_err", "within_tol"],
      "plots": [{"x": "q_len", "y": "median_ms", "logx": True, "logy": True}],
  })
  common.tag(c, arg, VARIANTS)
  return c


def speedups(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Speed-ups of every case over the dense and causal baselines at the same N.

  Forward: baseline fwd time / case fwd time. Backward: the backward time of a point is
  its fwd_bwd time minus its fwd time.

  Args:
    rows: results.jsonl rows (the latest row per point counts; only status ok).

  Returns:
    One dict per (implementation, case, N) with the block density and, where both times
    exist, fwd_vs_dense, fwd_vs_causal, bwd_vs_dense, bwd_vs_causal.
  """
  latest = {}
  for row in rows:
    latest[row["key"]] = row
  times: dict[tuple[str, str, int], dict[str, float]] = {}
  density: dict[tuple[str, str, int], float] = {}
  for row in latest.values():
    if row["status"] != "ok":
      continue
    p, m = row["point"], row["metrics"]
    key = (p["implementation"], p["case"], p["q_len"])
    times.setdefault(key, {})[p["mode"]] = m["median_ms"]
    if p["mode"] == "fwd":
      density[key] = m["block_density"]
  for t in times.values():
    if "fwd" in t and "fwd_bwd" in t:
      t["bwd"] = t["fwd_bwd"] - t["fwd"]
  out = []
  order = {row[0]: i for i, row in enumerate(_CASES)}
  for key in sorted(times, key=lambda k: (k[0], order.get(k[1], len(order)), k[1], k[2])):
    impl, case, n = key
    entry = {"implementation": impl, "case": case, "N": n,
             "block_density": density.get(key)}
    for pass_ in ("fwd", "bwd"):
      for base in BASELINES:
        base_t, t = times.get((impl, base, n), {}).get(pass_), times[key].get(pass_)
        if base_t is not None and t is not None and t > 0:
          entry[f"{pass_}_vs_{base}"] = base_t / t
    out.append(entry)
  return out


def speedup_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """The paper's table in markdown: rows mask x N, columns the four speed-ups."""
  columns = [f"{p}_vs_{b}" for p in ("fwd", "bwd") for b in BASELINES]
  lines = []
  entries = speedups(rows)
  for impl in sorted({e["implementation"] for e in entries}):
    lines += [f"## {impl}", "", "| mask | N | block density | fwd vs dense | fwd vs causal | "
              "bwd vs dense | bwd vs causal |", "|---" * 7 + "|"]
    for e in (e for e in entries if e["implementation"] == impl):
      cells = ["-" if e.get(c) is None else f"{e[c]:.2f}" for c in columns]
      bd = "-" if e["block_density"] is None else f"{e['block_density']:.3f}"
      lines.append(f"| {e['case']} | {e['N']} | {bd} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def write_speedups(workdir: str) -> str:
  """Writes DIR/speedups.md from DIR/results.jsonl and returns its text."""
  rows = []
  with open(os.path.join(workdir, "results.jsonl")) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a torn last line
  text = "# Speed-up over FlashAttention on dense and causal masks\n\n" + speedup_table(rows)
  with open(os.path.join(workdir, SPEEDUP_FILE), "w") as f:
    f.write(text)
  return text


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  print(write_speedups(parser.parse_args().workdir))
