r"""Side-by-side attention benchmark on a GPU: flashjax kernels vs cuDNN, XLA, Pallas and torch.

The cases of the Pallas-kernel issues (bf16, N=32): dense causal and non-causal forward at
B=4 T=4k and B=1 T=16k (D=128) and B=8 T=2k (D=64); forward+backward at B=4 T=4k; causal
document masks at B=2 T=8k (mean document 512 and 2048), forward and forward+backward; a
causal 1k sliding window at B=1 T=16k; MEDUSA-style tree and LongFormer (dilated, global)
masks at 4k-8k. Every point is checked against the float32 reference in the same run, on the
batch rows and query chunks that fit the device's memory (`check_budget_gb`); times are
device-side loop timings with the wall-clock time beside them (`timing="both"`), and every
flashjax row names the backend and tiles that ran.

  python -m experiments.launch --config=configs/bench_attention_gpu.py --workdir=/tmp/fj_bench

`--config.implementations="('pallas_triton', 'peer:jax_nn_cudnn')"` narrows the columns;
`--config.case_set=masked` runs only the masked cases (`dense`, `masked`, `all`).

Run time: on an H100 80GB the 16 cases with four implementations (pallas_mosaic_gpu, cuDNN,
torch SDPA, FlexAttention: 64 points) took ~620 s, more than one 10-minute device command;
run it under `timeout` and run the same command again with the same workdir, which resumes
at the first unfinished point (the v5 table in docs/performance.md ran that way, 56 + 8
points on one warm machine). All seven implementations take about twice as long.
"""

from __future__ import annotations

import ml_collections

from configs import common

IMPLEMENTATIONS = ("pallas_triton", "pallas_mosaic_gpu", "peer:jax_nn_cudnn", "peer:jax_nn_xla",
                   "peer:pallas_triton_mha", "peer:torch_sdpa", "peer:torch_flex")

# (name, batch, q_len, head_dim, mask, mode, doc_len, window)
_DENSE_SHAPES = {"B4-T4k": (4, 4096, 128), "B1-T16k": (1, 16384, 128),
                 "B8-T2k-D64": (8, 2048, 64)}
_DENSE = tuple((name, *_DENSE_SHAPES[name], mask, mode, 512, 1024)
               for name, mode in (("B4-T4k", "fwd"), ("B1-T16k", "fwd"), ("B8-T2k-D64", "fwd"),
                                  ("B4-T4k", "fwd_bwd"))
               for mask in ("dense", "causal"))
_MASKED = (
    ("B2-T8k-doc512", 2, 8192, 128, "document", "fwd", 512, 1024),
    ("B2-T8k-doc2048", 2, 8192, 128, "document", "fwd", 2048, 1024),
    ("B2-T8k-doc512", 2, 8192, 128, "document", "fwd_bwd", 512, 1024),
    ("B2-T8k-doc2048", 2, 8192, 128, "document", "fwd_bwd", 2048, 1024),
    ("B1-T16k-win1k", 1, 16384, 128, "sliding_window", "fwd", 512, 1024),
    ("B1-T4k-tree", 1, 4096, 128, "tree", "fwd", 512, 1024),
    ("B1-T8k-dilated", 1, 8192, 128, "dilated", "fwd", 512, 256),
    ("B1-T8k-global", 1, 8192, 128, "global", "fwd", 512, 256),
)
CASE_SETS = {"dense": _DENSE, "masked": _MASKED, "all": _DENSE + _MASKED}
VARIANTS = {
    "all": common.Variant("the 16 dense and masked cases x 7 implementations (GPU; default)"),
    "dense": common.Variant("dense / causal forward and fwd_bwd cases only (GPU)"),
    "masked": common.Variant("document, window, tree, dilated and global cases only (GPU)"),
}
# What a CPU host runs instead (this benchmark has no CPU-sized cases).
CPU_ALTERNATIVE = "configs/quickstart.py:cpu"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Benchmark config; arg selects the case set ("all" by default, "dense", "masked")."""
  case_set = common.choose_variant(arg, VARIANTS, default="all")
  cases = CASE_SETS[case_set]
  c = ml_collections.ConfigDict()
  c.experiment = "attention_bench"
  c.implementations = IMPLEMENTATIONS
  fields = ("case", "batch", "q_len", "head_dim", "mask", "mode", "doc_len", "window")
  case_axis = {f: [row[i] for row in cases] for i, f in enumerate(fields)}
  case_axis["kv_len"] = case_axis["q_len"]
  c.sweep = [case_axis, {"implementation": c.get_ref("implementations")}]
  c.case = cases[0][0]
  c.implementation = IMPLEMENTATIONS[0]
  c.mask = "dense"
  c.mode = "fwd"
  c.batch = 4
  c.q_len = c.kv_len = 4096
  c.num_heads = c.num_kv_heads = 32
  c.head_dim = 128
  c.dtype = "bfloat16"
  c.block_q = ml_collections.FieldReference(None, field_type=int)
  c.block_kv = ml_collections.FieldReference(None, field_type=int)

  common.mask_fields(c, False, window=1024, doc_len=512, num_global=32)

  # Headline times from one jitted loop of `iters` calls (device time: dispatch paid once;
  # sub-millisecond rows timed call by call varied 2x between runs), wall time beside them.
  c.timing = "both"
  c.warmup = 3
  c.iters = 30
  c.input_sets = 2
  c.seed = 0
  c.interpret = False
  c.check = True
  # The float32 reference check runs on as many batch rows and as large query chunks as
  # fit this budget (None: half the device's free memory); every row records what it checked.
  c.check_budget_gb = ml_collections.FieldReference(None, field_type=float)
  c.check_rows = ml_collections.FieldReference(None, field_type=int)

  c.report = ml_collections.ConfigDict({
      "columns": ["median_ms", "timing_method", "wall_median_ms", "useful_tflops",
                  "dense_equiv_tflops", "pct_of_peak", "compile_s", "density",
                  "block_density", "backend", "fwd_tiles", "dq_tiles", "dkdv_tiles",
                  "tiles_from", "max_abs_err", "within_tol", "check", "check_batch_rows"],
      "plots": [{"x": "case", "y": "median_ms", "logy": True}],
  })
  common.tag(c, case_set, VARIANTS, cpu_alternative=CPU_ALTERNATIVE)
  return c
