r"""Reproduction: "Efficiently Dispatching Flash Attention for Partially Filled Attention Masks".

The application masks of Sharma & Geiping (2024, binary block masking; arXiv 2409.15097),
run on our block-skipping Pallas kernel, with speed-ups over FlashAttention on a dense and on
a causal mask for the forward and the backward pass.

Where the masks come from. The paper's PDF could only be read here as far as its abstract
(the experiment section was not reachable), so the definitions follow the authors' public
code (github.com/agshar96/BINFLASH: tree_attention/base_tree_attention.py,
efficient_transformers/longformer.py, alpaca_datasets/*.py, utils.py
create_symmetric_sparse_matrix, benchmarking_codes/*.py), written again on flashjax.masks:

  medusa             one MEDUSA candidate tree, 3 predictions per head, as deep as fits N
                     (families.medusa_padded), rootless, parent-only: node k attends to
                     itself and its parent. Padded to N; the authors' padding rows are empty,
                     ours attend to themselves (no empty rows). The authors time it at N =
                     the next power of two of the tree (heads 4..8: N 128, 512, 2048, 4096,
                     16384) against causal FlashAttention.
  alpaca_full        ALPACA samples packed back to back, causal inside each sample
                     (instruction + input + output). The authors tokenise the real data set
                     (bert-base-uncased); its length statistics are not in the code and the
                     data set is not read here: lengths are log-normal (sigma 0.75) with mean
                     ALPACA_MEAN_LEN, an assumption, and the last sample is cut at N (the
                     authors drop it and leave the tail empty).
  alpaca_prefix      the same packing as prefix-LM: the prompt (instruction + input,
                     ALPACA_PROMPT_FRAC of each sample, assumed) attends bidirectionally, the
                     output causally to the prompt and itself.
  longformer_window  symmetric window, 4 keys on each side (window_size 8 in the code).
  longformer_dilated the window at dilation 2 (keys i +- 2k, k <= 4); the dilation of the
                     authors' run is not in the code they published: 2 is our choice.
  longformer_global  the window plus global tokens: the first two and log2(N) - 2 random
                     others (families.longformer_global).
  random_banded      the synthetic mask: key j allowed with probability
                     max(0.5 exp(-0.3 |i - j|), 2e-4), diagonal always, symmetric as the
                     authors' (each pair j > i drawn once and mirrored:
                     masks.random_banded(symmetric=True)).
  rcm                the same mask, Reverse Cuthill-McKee reordered (BlockMask reorder="rcm").
  permuted_band      not in the paper: the band |i - j| <= PERMUTED_BAND_WINDOW with both axes
                     relabelled by one random permutation (families.permuted_band): nearly
                     every tile non-empty, a band in disguise, where RCM should help.
  permuted_band_rcm  the same mask, RCM reordered.
  dense, causal      the FlashAttention baselines.

B=4, 32 heads, D=64, fp16, the backend's default tiles; modes fwd and fwd_bwd (the backward
time is fwd_bwd minus fwd of the same point). Baselines run on our kernel (dense / causal
masks) and on peers from third_party: torch SDPA (FlashAttention, "peer:torch_sdpa"), cuDNN
through jax.nn ("peer:jax_nn_cudnn"); FlexAttention ("peer:torch_flex") runs every mask but
the two RCM-reordered ones as a second mask-aware implementation. Experiment kind:
attention_bench, with `rcm_report` on: every square single-row mask gets RCM's density,
bandwidth and tile density before / after (rcm_* fields), and every row its host preprocessing
apart from the kernel time (mask_build_ms, block_mask_ms: mask -> BlockMask at the forward
tiles, the RCM ordering included for rcm).

The sequence axis zips `seq_lens`, `modes` and `checks`: entry i runs N = seq_lens[i] in
modes[i], checked against the float32 reference when checks[i]. It is the outer axis, so a
run cut by a time limit loses the last entries' cases, not whole N.

Variants (no GPU run of this grid exists yet: the times below are estimates):

  "gpu": 12 cases on pallas_triton, dense / causal on cuDNN, and the flag-loop ablation
      (pallas_triton with dispatch lists / flags on causal and longformer_window) x {N=1024
      fwd (checked), N=8192 fwd, N=8192 fwd_bwd} = 54 points; estimate (from the earlier grid
      of this study on an H200, jax 0.11.2) 2.5-3.5 s per point, ~6 s of reference compiles
      and ~15 s of start-up: about 185 s, over the 140 s budget of
      experiments/run_gpu_studies.sh: a cut run loses the last ablation points of N=8192
      fwd_bwd first. Torch SDPA and FlexAttention (child processes) are left to "full".
  "full" (default on a GPU host): N in {256, ..., 16384} x {fwd, fwd_bwd}, every point checked
      (the harness sizes the float32 reference to the device's memory: query chunks, then
      batch-row subsets, recorded in `check`); pallas_triton on the 12 cases, torch SDPA and
      cuDNN on dense / causal, FlexAttention on 10 cases, the flag-loop ablation (lists / flags
      on causal, alpaca_full, longformer_window, random_banded): 34 x 14 = 476 points; about
      30-40 minutes (estimate: 3-5 s a checked point; FlexAttention runs in the kept-alive
      torch child, 1-3 s of compile a point in the H200 quickstart), so three or four
      device calls resumed in one workdir.
  "cpu": B=1, 2 heads, D=32, float32, 32 x 32 tiles, {N=64 fwd, N=64 fwd_bwd, N=128 fwd},
      all checked, pallas_triton in interpret mode on the 12 cases and the XLA peer on dense
      / causal, and causal with dispatch flags (its lists side: the main causal points at
      the same tiles): 45 points (the numbers only show that everything runs).

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.launch \
      --config=configs/reproduce_binblkmsk.py:gpu --workdir=/tmp/fj_binblkmsk
  python -m configs.reproduce_binblkmsk --workdir=/tmp/fj_binblkmsk

The second command writes DIR/speedups.md: the paper's table, rows mask x N, columns the
forward, backward and forward + backward speed-ups over the dense and the causal baseline,
one table per (implementation, baseline implementation), with the authors' forward +
backward speed-up beside ours (PAPER_SPEEDUPS) and the host preprocessing; then the RCM
table (bandwidth and tile density before / after) and the flag-loop ablation
(`dispatch_table`: lists ms, flags ms, flags / lists per mask, N and mode).

The flag-loop ablation: the paper's kernel visits every kv tile of a query block and skips
an empty one by its flag; ours walks compacted lists of the non-empty tiles.
`BlockSizes(dispatch="flags")` (config field `dispatch`, DISPATCH_ABLATION) runs the paper's
form in pallas_triton's forward (a branch per tile on the BlockMask's tile kinds; the
backward keeps the lists, so fwd_bwd points differ only in their forward). Both forms run at
the same forward tiles (BlockSizes' 128 x 64 on GPU, the config's 32 x 32 on CPU).

`--config.seq_lens="(1024, 4096)"` with `--config.modes="('fwd', 'fwd')"` and
`--config.checks="(True, False)"` (same lengths) change the grid.

Not reproduced: the paper's "dense" kernel variant (contiguous all-ones tiles handled
apart). No GPU numbers of the flag-loop ablation exist yet.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from configs import common
from experiments import report

BASELINES = ("dense", "causal")
SPEEDUP_FILE = "speedups.md"
_SDPA, _CUDNN, _FLEX, _XLA = ("peer:torch_sdpa", "peer:jax_nn_cudnn", "peer:torch_flex",
                              "peer:jax_nn_xla")
# Assumed ALPACA statistics (see the module docstring): mean tokens per sample and the
# prompt's share of it.
ALPACA_MEAN_LEN = 128
ALPACA_PROMPT_FRAC = 0.4
MEDUSA_TOPK = 3
LONGFORMER_WINDOW = 4  # keys on each side (the authors' window_size 8)
LONGFORMER_DILATION = 2
# Half width of the permuted band: LongFormer's window, so that after RCM the mask is about
# the longformer_window case and their times can be compared.
PERMUTED_BAND_WINDOW = 4
# The synthetic mask: P(allowed) = max(peak * exp(-decay |i - j|), floor).
BAND_PEAK, BAND_DECAY, BAND_FLOOR = 0.5, 0.3, 2e-4

_CASE_FIELDS = ("case", "mask", "window", "window_right", "dilation", "prefix_frac")
_W, _D = LONGFORMER_WINDOW, LONGFORMER_DILATION
CASES = (
    ("dense", "dense", _W, 0, _D, None),
    ("causal", "causal", _W, 0, _D, None),
    ("medusa", "medusa_padded", _W, 0, _D, None),
    ("alpaca_full", "document", _W, 0, _D, None),
    ("alpaca_prefix", "prefix_lm", _W, 0, _D, ALPACA_PROMPT_FRAC),
    ("longformer_window", "sliding_window", _W, _W, _D, None),
    ("longformer_dilated", "dilated", _W, 0, _D, None),
    ("longformer_global", "longformer_global", _W, 0, _D, None),
    ("random_banded", "random_banded", _W, 0, _D, None),
    ("rcm", "random_banded_rcm", _W, 0, _D, None),
    # Not in the paper: a band scrambled by one random permutation of both axes, where RCM
    # should help (its ordering recovers the band): window = the band's half width.
    ("permuted_band", "permuted_band", PERMUTED_BAND_WINDOW, 0, _D, None),
    ("permuted_band_rcm", "permuted_band_rcm", PERMUTED_BAND_WINDOW, 0, _D, None),
)
CASE_NAMES = tuple(row[0] for row in CASES)

# The authors' published measurements (github.com/agshar96/BINFLASH, commit 5cd7dfe,
# benchresult_applications/<dir>/<name>-combined.csv: forward + backward ms of "Base Flash
# Attention" and "Binary Block Masking", B=4, 32 heads, D=64, fp16; the combined file is the
# sum of the fwd and bwd files). These runs are the ones behind the paper's figures as far
# as the repository says; the paper's own tables could not be read here. Per case: the
# file, the FlashAttention baseline mask, and N -> (FlashAttention ms, binary block masking
# ms). MEDUSA's N is the tree's padded length (heads 4..8 with 3 predictions per head).
PAPER_SPEEDUPS = {
    "medusa": {
        "source": "MEDUSA_HEADS/MEDUSA_HEADS-combined.csv", "baseline": "causal",
        "ms": {128: (0.280186, 0.2873), 512: (1.573071, 1.119772),
               2048: (18.812289, 4.869082), 4096: (65.820234, 13.82421),
               16384: (1013.041168, 108.040806)}},
    "alpaca_full": {
        "source": "alpaca_Full_Mask/Alpaca_Full-combined.csv", "baseline": "dense",
        "ms": {256: (0.588491, 0.595227), 512: (1.493626, 1.23554),
               1024: (4.493996, 2.669865), 2048: (15.293025, 5.461732),
               4096: (54.932516, 13.359401), 8192: (220.28006, 33.183572),
               16384: (918.085617, 95.338239)}},
    "alpaca_prefix": {
        "source": "alpaca_Prefix_Mask/Alpaca_Prefix-combined.csv", "baseline": "dense",
        "ms": {256: (0.580057, 0.594947), 512: (1.498893, 1.315289),
               1024: (4.451853, 2.640389), 2048: (15.056873, 5.682076),
               4096: (54.318478, 13.819726), 8192: (213.923496, 33.804879),
               16384: (909.902069, 97.336577)}},
    "longformer_window": {
        "source": "LongFormer/Windowed/Longformer_Windowed-combined.csv", "baseline": "dense",
        "ms": {256: (0.664306, 0.575258), 512: (2.05481, 1.147903),
               1024: (7.507085, 2.472957), 2048: (28.739509, 5.550759),
               4096: (108.278717, 12.588493), 8192: (441.91552, 32.990262),
               16384: (1838.082092, 101.49345)}},
    "longformer_dilated": {
        "source": "LongFormer/Dilated/Longformer_Dilated-combined.csv", "baseline": "dense",
        "ms": {256: (0.656844, 0.565405), 512: (2.041731, 1.147952),
               1024: (7.099684, 2.426362), 2048: (26.052311, 5.286035),
               4096: (106.162171, 12.774751), 8192: (418.368332, 32.868166),
               16384: (1738.337249, 103.401984)}},
    "longformer_global": {
        "source": "LongFormer/Global/Longformer_Global-combined.csv", "baseline": "dense",
        "ms": {256: (0.658417, 0.692214), 512: (2.055525, 2.082821),
               1024: (7.379938, 6.265016), 2048: (28.182273, 16.482301),
               4096: (110.082596, 40.525026), 8192: (430.431214, 111.4228),
               16384: (1786.954742, 251.454464)}},
    "random_banded": {
        "source": "RCM/RCM-combined.csv (Binary Block Masking)", "baseline": "dense",
        "ms": {256: (0.65993, 0.680369), 512: (2.135699, 1.897267),
               1024: (7.466396, 5.548199), 2048: (28.586125, 18.016124),
               4096: (109.930212, 65.90226), 8192: (435.861328, 237.533188),
               16384: (1799.329742, 844.0177)}},
    "rcm": {
        "source": "RCM/RCM-combined.csv (Binary Block Masking with RCM)", "baseline": "dense",
        "ms": {256: (0.65993, 0.522712), 512: (2.135699, 1.016592),
               1024: (7.466396, 2.089242), 2048: (28.586125, 4.821249),
               4096: (109.930212, 12.043148), 8192: (435.861328, 32.31721),
               16384: (1799.329742, 168.44698)}},
}


def paper_speedup(case: str, n: int) -> tuple[float, str] | None:
  """(FlashAttention ms / binary block masking ms, baseline mask) of PAPER_SPEEDUPS at N."""
  entry = PAPER_SPEEDUPS.get(case)
  if entry is None or n not in entry["ms"]:
    return None
  base, ours = entry["ms"][n]
  return base / ours, entry["baseline"]


# Sequence axis per variant: (N, mode, check) entries.
_RUNS = {
    "gpu": ((1024, "fwd", True), (8192, "fwd", False), (8192, "fwd_bwd", False)),
    "full": tuple((256 * 2**i, mode, True) for i in range(7) for mode in ("fwd", "fwd_bwd")),
    "cpu": ((64, "fwd", True), (64, "fwd_bwd", True), (128, "fwd", True)),
}
# The flag-loop ablation per variant: the cases pallas_triton also runs with an explicit
# BlockSizes.dispatch, and the forms. "cpu" adds flags only: its main pallas_triton points
# already run at the config's 32 x 32 tiles, so they are the lists side.
DISPATCH_ABLATION = {
    "gpu": (("causal", "longformer_window"), ("lists", "flags")),
    "full": (("causal", "alpaca_full", "longformer_window", "random_banded"),
             ("lists", "flags")),
    "cpu": (("causal",), ("flags",)),
}
# Per variant, implementation -> the cases it runs (None: all).
_IMPLEMENTATIONS = {
    "gpu": {"pallas_triton": None, _CUDNN: BASELINES},
    "full": {"pallas_triton": None, _SDPA: BASELINES, _CUDNN: BASELINES,
             _FLEX: tuple(c for c in CASE_NAMES if c not in ("rcm", "permuted_band_rcm"))},
    "cpu": {"pallas_triton": None, _XLA: BASELINES},
}

VARIANTS = {
    "gpu": common.Variant("12 mask cases on pallas_triton, dense / causal on cuDNN, the "
                          "flag-loop ablation on 2 cases x {N=1024 fwd, N=8192 fwd, N=8192 "
                          "fwd_bwd}, B=4 32 heads D=64 fp16: 54 points, ~185 s (estimate)"),
    "full": common.Variant("the paper's grid, N 256..16384 x 2 modes, pallas_triton, SDPA, "
                           "cuDNN and FlexAttention, the flag-loop ablation: 476 points, "
                           "~30-40 min (estimate; default on a GPU host)"),
    "cpu": common.Variant("B=1 N=2 heads D=32 float32, N = 64 and 128, pallas_triton in "
                          "interpret mode, the XLA peer, one flags point per N: 45 points "
                          "(default on a CPU host)",
                          cpu=True),
}


def _points_axis(implementations: Mapping[str, Sequence[str] | None],
                 ablation: tuple[Sequence[str], Sequence[str]] = ((), ())
                 ) -> dict[str, list]:
  """The zipped (case fields, implementation, dispatch) axis: baselines first, then the
  masked cases (dispatch None: the backend's default), then the flag-loop ablation
  (pallas_triton on ablation[0]'s cases with each BlockSizes.dispatch of ablation[1])."""
  cases, dispatches = ablation
  pairs = []
  for impl, only in implementations.items():
    if only is not None and not set(only) <= set(CASE_NAMES):
      raise ValueError(f"{impl=}: cases {sorted(set(only) - set(CASE_NAMES))} are not in "
                       f"{CASE_NAMES}")
    pairs += [(row, impl, None) for row in CASES if only is None or row[0] in only]
  pairs.sort(key=lambda pair: pair[0][0] not in BASELINES)  # stable: baselines first
  if not set(cases) <= set(CASE_NAMES):
    raise ValueError(f"ablation cases {sorted(set(cases) - set(CASE_NAMES))} are not in "
                     f"{CASE_NAMES}")
  pairs += [(row, "pallas_triton", dispatch) for row in CASES if row[0] in cases
            for dispatch in dispatches]
  axis = {f: [row[i] for row, _, _ in pairs] for i, f in enumerate(_CASE_FIELDS)}
  axis["implementation"] = [impl for _, impl, _ in pairs]
  axis["dispatch"] = [dispatch for _, _, dispatch in pairs]
  return axis


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
    c.doc_len = ALPACA_MEAN_LEN
  c.doc_len_dist = "lognormal"
  c.band_peak, c.band_decay, c.band_floor = BAND_PEAK, BAND_DECAY, BAND_FLOOR
  c.band_symmetric = True  # as the authors' matrix: upper triangle drawn, then mirrored
  c.medusa_heads = ml_collections.FieldReference(None, field_type=int)  # deepest that fits
  c.medusa_topk = MEDUSA_TOPK
  c.prefix_frac = ml_collections.FieldReference(None, field_type=float)
  c.rcm_report = True
  c.seq_lens, c.modes, c.checks = (tuple(x) for x in zip(*_RUNS[arg]))
  c.case = "dense"
  c.dispatch = ml_collections.FieldReference(None, field_type=str)
  c.sweep = [{"q_len": c.get_ref("seq_lens"), "kv_len": c.get_ref("seq_lens"),
              "mode": c.get_ref("modes"), "check": c.get_ref("checks")},
             _points_axis(_IMPLEMENTATIONS[arg], DISPATCH_ABLATION[arg])]
  c.report = ml_collections.ConfigDict({
      "columns": ["median_ms", "roofline_ms", "block_density", "density", "block_mask_ms",
                  "useful_tflops", "max_abs_err", "within_tol"],
      "plots": [{"x": "q_len", "y": "median_ms", "logx": True, "logy": True}],
  })
  common.tag(c, arg, VARIANTS)
  return c


def speedups(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Speed-ups of every case over the dense and causal baselines at the same N.

  Forward: baseline fwd time / case fwd time; backward: the backward time of a point is its
  fwd_bwd time minus its fwd time; total: baseline fwd_bwd / case fwd_bwd (the authors'
  forward + backward). Every implementation that ran a case is compared with every
  implementation that ran the dense / causal baselines at that N.

  Args:
    rows: results.jsonl rows (the latest row per point counts; only status ok; the
      flag-loop ablation's points, those with a dispatch, are left to `dispatch_table`).

  Returns:
    One dict per (implementation, baseline implementation, case, N) with block_density,
    mask_build_ms, block_mask_ms (forward point), {fwd, bwd, total}_vs_{dense, causal}
    where both times exist, and paper_total / paper_baseline where PAPER_SPEEDUPS has N.
  """
  times: dict[tuple[str, str, int], dict[str, float]] = {}
  extra: dict[tuple[str, str, int], dict[str, Any]] = {}
  for row in report.latest_ok_rows(rows):
    p, m = row["point"], row["metrics"]
    if p.get("dispatch") is not None:
      continue  # the flag-loop ablation: dispatch_table
    key = (p["implementation"], p["case"], p["q_len"])
    times.setdefault(key, {})[p["mode"]] = m["median_ms"]
    if p["mode"] == "fwd" or key not in extra:
      extra[key] = {name: m.get(name) for name in ("block_density", "mask_build_ms",
                                                   "block_mask_ms")}
  for t in times.values():
    if "fwd" in t and "fwd_bwd" in t:
      t["bwd"] = t["fwd_bwd"] - t["fwd"]
    if "fwd_bwd" in t:
      t["total"] = t["fwd_bwd"]
  baseline_impls = sorted({impl for impl, case, _ in times if case in BASELINES})
  order = {name: i for i, name in enumerate(CASE_NAMES)}
  out = []
  for key in sorted(times, key=lambda k: (k[0], order.get(k[1], len(order)), k[1], k[2])):
    impl, case, n = key
    for base_impl in baseline_impls:
      entry = {"implementation": impl, "baseline_implementation": base_impl, "case": case,
               "N": n, **extra[key]}
      for pass_ in ("fwd", "bwd", "total"):
        for base in BASELINES:
          base_t = times.get((base_impl, base, n), {}).get(pass_)
          t = times[key].get(pass_)
          if base_t is not None and t is not None and t > 0:
            entry[f"{pass_}_vs_{base}"] = base_t / t
      paper = paper_speedup(case, n)
      if paper is not None:
        entry["paper_total"], entry["paper_baseline"] = paper
      out.append(entry)
  return out


def _cell(value: Any, fmt: str = ".2f") -> str:
  return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else (
      format(value, fmt))


def speedup_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """The paper's table in markdown: rows mask x N, columns the speed-ups over dense and
  causal FlashAttention, the authors' forward + backward speed-up beside ours, and the host
  preprocessing (mask -> BlockMask); one table per (implementation, baseline)."""
  columns = [f"{p}_vs_{b}" for p in ("fwd", "bwd", "total") for b in BASELINES]
  lines = []
  entries = speedups(rows)
  for impl, base_impl in sorted({(e["implementation"], e["baseline_implementation"])
                                 for e in entries}):
    lines += [f"## {impl} vs FlashAttention baselines on {base_impl}", "",
              "| mask | N | block density | fwd vs dense | fwd vs causal | bwd vs dense | "
              "bwd vs causal | fwd+bwd vs dense | fwd+bwd vs causal | paper fwd+bwd | "
              "BlockMask ms |", "|---" * 11 + "|"]
    for e in entries:
      if (e["implementation"], e["baseline_implementation"]) != (impl, base_impl):
        continue
      cells = [_cell(e.get(c)) for c in columns]
      paper = "-"
      if "paper_total" in e:
        paper = f"{e['paper_total']:.2f} (vs {e['paper_baseline']})"
      lines.append(f"| {e['case']} | {e['N']} | {_cell(e['block_density'], '.3f')} | "
                   + " | ".join(cells) + f" | {paper} | {_cell(e['block_mask_ms'], '.1f')} |")
    lines.append("")
  return "\n".join(lines)


RCM_COLUMNS = ("rcm_density", "rcm_bandwidth_before", "rcm_bandwidth_after",
               "rcm_block_density_before", "rcm_block_density_after", "rcm_ms")


def rcm_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Markdown: per square single-row mask case and N (forward points of the first
  implementation that reported them), what RCM does: RCM_COLUMNS."""
  seen = {}
  for row in report.latest_ok_rows(rows):
    p, m = row["point"], row["metrics"]
    if m.get("rcm_status") != "ok":
      continue
    seen.setdefault((p["case"], p["q_len"]), m)
  order = {name: i for i, name in enumerate(CASE_NAMES)}
  lines = ["## Reverse Cuthill-McKee: density, bandwidth and tile density before / after", "",
           "| mask | N | " + " | ".join(RCM_COLUMNS) + " |", "|---" * (2 + len(RCM_COLUMNS))
           + "|"]
  for case, n in sorted(seen, key=lambda k: (order.get(k[0], len(order)), k[0], k[1])):
    m = seen[(case, n)]
    cells = [_cell(m.get(c), ".4g") for c in RCM_COLUMNS]
    lines.append(f"| {case} | {n} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def dispatch_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The flag-loop ablation: per (case, N, mode, forward tiles) where pallas_triton ran both
  forward dispatch forms, the lists and flags times and flags / lists.

  A row's form is the one that ran (metric fwd_dispatch); the ablation's own points (with a
  dispatch) are preferred over the main points (dispatch None, the lists by default) of the
  same key, so "cpu" pairs its flags points with the main lists points at the same tiles.

  Args:
    rows: results.jsonl rows (latest per point, status ok).

  Returns:
    Dicts with case, N, mode, fwd_tiles, block_density, lists_ms, flags_ms, flags_over_lists,
    in CASE_NAMES order.
  """
  found: dict[tuple[Any, ...], dict[str, tuple[bool, Mapping[str, Any]]]] = {}
  for row in report.latest_ok_rows(rows):
    p, m = row["point"], row["metrics"]
    form = m.get("fwd_dispatch")
    if p["implementation"] != "pallas_triton" or form is None:
      continue
    key = (p["case"], p["q_len"], p["mode"], m.get("fwd_tiles"))
    explicit = p.get("dispatch") is not None
    seen = found.setdefault(key, {})
    if form not in seen or explicit or not seen[form][0]:
      seen[form] = (explicit, m)
  order = {name: i for i, name in enumerate(CASE_NAMES)}
  out = []
  for key in sorted(found, key=lambda k: (order.get(k[0], len(order)), k[0], k[1], k[2])):
    forms = found[key]
    if set(forms) != {"lists", "flags"} or not any(e for e, _ in forms.values()):
      continue  # both forms, at least one from the ablation
    lists, flags = forms["lists"][1], forms["flags"][1]
    case, n, mode, tiles = key
    out.append({"case": case, "N": n, "mode": mode, "fwd_tiles": tiles,
                "block_density": flags.get("block_density"), "lists_ms": lists["median_ms"],
                "flags_ms": flags["median_ms"],
                "flags_over_lists": flags["median_ms"] / lists["median_ms"]})
  return out


def dispatch_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Markdown of `dispatch_rows`: the paper's flag loop against our compacted lists."""
  lines = ["## Flag-loop ablation: pallas_triton forward, every kv tile (flags) vs the "
           "compacted lists", "",
           "| mask | N | mode | tiles | block density | lists ms | flags ms | flags / lists |",
           "|---" * 8 + "|"]
  for e in dispatch_rows(rows):
    lines.append(f"| {e['case']} | {e['N']} | {e['mode']} | {e['fwd_tiles']} | "
                 f"{_cell(e['block_density'], '.3f')} | {_cell(e['lists_ms'], '.3f')} | "
                 f"{_cell(e['flags_ms'], '.3f')} | {_cell(e['flags_over_lists'])} |")
  return "\n".join(lines) + "\n"


def write_speedups(workdir: str) -> str:
  """Writes DIR/speedups.md from DIR/results.jsonl and returns its text."""
  rows = report.read_rows(workdir)
  text = ("# Speed-up over FlashAttention on dense and causal masks\n\n"
          "paper fwd+bwd: the authors' published forward + backward speed-up of binary block "
          "masking over their FlashAttention baseline (configs/reproduce_binblkmsk.py, "
          "PAPER_SPEEDUPS), against the mask named.\n\n"
          + speedup_table(rows) + "\n" + rcm_table(rows) + "\n" + dispatch_table(rows))
  with open(os.path.join(workdir, SPEEDUP_FILE), "w") as f:
    f.write(text)
  return text


if __name__ == "__main__":
  common.rewrite_main(__doc__, write_speedups)
