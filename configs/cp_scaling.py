r"""Weak and strong scaling of context-parallel attention (experiment cp_scaling).

CPU (fake host devices sharing the CPU cores: checks that the study runs, the timings mean
nothing; ~1 min on 2 cores):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m experiments.launch --config=configs/cp_scaling.py:cpu --workdir=/tmp/fj_cp

GPU (1, 2, 4, 8 GPUs; strong: T = 32k and 128k; weak: 32k and 128k tokens per device, so
up to 1M tokens on 8 GPUs; causal and packed documents; bf16, the xla_chunked backend that
the ring needs for its log-sum-exp). Not run yet: no GPU number exists.

  python -m experiments.launch --config=configs/cp_scaling.py:gpu --workdir=/tmp/fj_cp_gpu

Each row: tokens/s, tokens/s per device, median call time (= per-device time: all devices
run concurrently), strategy / layout and the load-balance ratio of the plan.
"""

from __future__ import annotations

import ml_collections

from configs import common

VARIANTS = {
    "gpu": common.Variant("1-8 GPUs, strong T 32k / 128k, weak 32k / 128k per device (to 1M), "
                          "causal and documents, bf16 (not run yet)"),
    "cpu": common.Variant("1, 2, 4 fake CPU devices, T 256 (strong) / 256 per device (weak), "
                          "causal and documents, float32 (~1 min)", cpu=True),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """cp_scaling config; arg "gpu" (default) or "cpu" (default on a CPU host)."""
  arg = common.choose_variant(arg, VARIANTS, default="gpu")
  small = arg == "cpu"
  c = ml_collections.ConfigDict()
  c.experiment = "cp_scaling"
  c.scalings = ("strong", "weak")
  c.device_counts = (1, 2, 4) if small else (1, 2, 4, 8)
  c.lengths = (256,) if small else (32768, 131072)
  c.masks = ("causal", "documents")
  c.sweep = [{"scaling": c.get_ref("scalings")}, {"devices": c.get_ref("device_counts")},
             {"length": c.get_ref("lengths")}, {"mask": c.get_ref("masks")}]
  c.scaling = "strong"
  c.devices = 1
  c.length = 256
  c.mask = "causal"
  c.batch = 1
  c.num_heads = 2 if small else 8
  c.num_kv_heads = 1 if small else 8
  c.head_dim = 16 if small else 128
  c.dtype = "float32" if small else "bfloat16"
  c.doc_mean_len = 64 if small else 8192
  c.implementation = "xla" if small else "xla_chunked"
  c.strategy = ""  # "": the plan's choice (ring or allgather)
  c.warmup = 1 if small else 2
  c.iters = 3 if small else 20
  c.seed = 0
  c.report = ml_collections.ConfigDict({
      "columns": ["seq_len", "tokens_per_s", "tokens_per_s_per_device", "median_ms",
                  "strategy", "layout", "load_balance", "skipped_pairs"],
      "plots": [{"x": "devices", "y": "tokens_per_s"}],
  })
  common.tag(c, arg, VARIANTS)
  return c
