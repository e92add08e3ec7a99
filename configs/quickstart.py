r"""Quickstart study: flashjax.dot_product_attention over mask families and implementations.

CPU (the default there; small shapes, Pallas backends in interpret mode, ~15 s on 2 cores):

  python -m experiments.launch --config=configs/quickstart.py --workdir=/tmp/fj_quick

GPU (B=2, T=S=4096, N=16, D=128, bf16; flashjax backends beside cuDNN, Pallas and torch
peers):

  python -m experiments.launch --config=configs/quickstart.py:gpu --workdir=/tmp/fj_gpu

Each point times one (implementation, mask) pair, checks its output against the float32
reference in the same run, and reports time, useful TFLOP/s, mask density and block density.
Change the lists with e.g. `--config.implementations="('xla', 'pallas_triton')"` or
`--config.masks="('causal', 'document')"`; `--config.iters=50` etc. for the rest.
CPU timings only show that everything runs (interpret mode is not a performance number).
"""

from __future__ import annotations

import importlib

import jax
import ml_collections

from configs import common

# flashjax backends tried per platform (the ones whose module imports are kept).
_BACKENDS = {
    "cpu": ("xla", "pallas_triton", "pallas_tpu"),  # Pallas in interpret mode
    "gpu": ("xla", "pallas_triton", "pallas_mosaic_gpu"),
    "tpu": ("xla", "pallas_tpu"),
}
_PEERS = {
    "cpu": ("jax_nn_xla",),
    "gpu": ("jax_nn_cudnn", "pallas_triton_mha", "torch_sdpa", "torch_flex"),
    "tpu": ("jax_nn_xla",),
}
MASKS = ("dense", "causal", "sliding_window", "document", "tree", "random_banded")
VARIANTS = {
    "cpu": common.Variant("B=1 T=S=512 N=4 D=64 float32, xla and the Pallas backends in "
                          "interpret mode x 6 masks (default on a CPU host)", cpu=True),
    "gpu": common.Variant("B=2 T=S=4096 N=16 D=128 bf16, the flashjax backends beside cuDNN, "
                          "Pallas and torch peers x 6 masks (default on a GPU or TPU host)"),
}


def _importable_backends(names: tuple[str, ...]) -> tuple[str, ...]:
  found = []
  for name in names:
    try:
      importlib.import_module(f"flashjax.ops.attention.{name}")
    except ImportError:
      continue
    found.append(name)
  return tuple(found)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Quickstart config; arg "cpu" (small float32 shapes) or "gpu" (benchmark shapes, bfloat16;
  the TPU backends on a TPU host); none: "cpu" when JAX runs on CPU, else "gpu"."""
  platform = jax.default_backend()
  arg = common.choose_variant(arg, VARIANTS, default="gpu", cpu=platform == "cpu")
  small = arg == "cpu"
  backend_key = "cpu" if small else ("tpu" if platform == "tpu" else "gpu")

  c = ml_collections.ConfigDict()
  c.experiment = "attention_bench"
  c.implementations = (_importable_backends(_BACKENDS[backend_key])
                       + tuple(f"peer:{p}" for p in _PEERS[backend_key]))
  c.masks = MASKS
  # Product of the two lists; the fields below are what each point runs with.
  c.sweep = [{"implementation": c.get_ref("implementations")}, {"mask": c.get_ref("masks")}]
  c.implementation = "xla"
  c.mask = "dense"

  c.batch = 1 if small else 2
  c.q_len = c.kv_len = 512 if small else 4096
  c.num_heads = c.num_kv_heads = 4 if small else 16
  c.head_dim = 64 if small else 128
  c.dtype = "float32" if small else "bfloat16"
  # Tiles of the Pallas backends. GPU / TPU: None, each backend's defaults (its tuning table
  # where one matches the device, else its heuristics: what a user gets; rows record the
  # tiles that ran as fwd_tiles / tiles_from, and the block density is at those tiles). CPU:
  # 128 x 128 for every backend (pallas_tpu needs multiples of 128 along kv).
  c.block_q = ml_collections.FieldReference(128 if small else None, field_type=int)
  c.block_kv = ml_collections.FieldReference(128 if small else None, field_type=int)
  c.mode = "fwd"

  # Mask family parameters (sliding window / dilated / global: window; document and
  # prefix_lm: mean document length; tree: parent within tree_span earlier nodes).
  common.mask_fields(c, small, window=64 if small else 512, doc_len=64 if small else 512,
                     num_global=8 if small else 32)

  # GPU / TPU: device-side loop timing as the headline, wall time beside it.
  c.timing = "wall" if small else "both"
  c.warmup = 2 if small else 5
  c.iters = 20 if small else 50
  c.input_sets = 1 if small else 3
  c.seed = 0
  c.interpret = ml_collections.FieldReference(None, field_type=bool)
  c.check = True
  # The torch peers in one child process (torch's and inductor's start-up paid once).
  c.torch_keep_alive = True

  c.report = ml_collections.ConfigDict({
      "columns": ["median_ms", "timing_method", "compile_s", "useful_tflops", "pct_of_peak",
                  "density", "block_density", "backend", "fwd_tiles", "max_abs_err",
                  "within_tol", "check"],
      "plots": [{"x": "mask", "y": "median_ms", "logy": True},
                {"x": "mask", "y": "useful_tflops"}],
  })
  common.tag(c, arg, VARIANTS)
  return c
