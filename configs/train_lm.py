r"""Byte-level LLaMA-style language model on the Python standard library (experiment train_lm).

CPU (a tiny model: training-step throughput and a 40-step training on 2 MB of the corpus,
each with the xla and the pallas_triton (interpret mode) attention; ~26 s on 2 cores):

  python -m experiments.launch --config=configs/train_lm.py:cpu --workdir=/tmp/fj_lm

GPU training, one command under 10 minutes: a 35.7M-parameter model with flashjax's
pallas_triton attention for a 7-minute loop budget (the cosine schedule is fitted to the
budget after 20 timed steps), then validation loss and generation samples:

  python -m experiments.launch --config=configs/train_lm.py:gpu --workdir=/tmp/fj_lm_gpu \
      --config.checkpoint_dir=/tmp/fj_lm_ckpt

GPU throughput (a few minutes): training-step tokens/s of the same model with each attention
implementation (flashjax pallas_triton, cuDNN through jax.nn, flashjax xla):

  python -m experiments.launch --config=configs/train_lm.py:gpu_throughput \
      --workdir=/tmp/fj_lm_tput

Re-running a command with the same workdir resumes: finished points are skipped and an
interrupted training continues from its last checkpoint. Outputs: the launcher's
results.jsonl / report.md, and per run `<workdir>/<mode>_<impl>/` with history.jsonl and
loss_curve.png.
"""

from __future__ import annotations

import ml_collections

from configs import common

# Attention implementations timed on GPU: flashjax's Pallas Triton kernel, cuDNN through
# jax.nn, flashjax's XLA backend.
_GPU_IMPLS = ("pallas_triton", "jax_nn_cudnn", "xla")

VARIANTS = {
    "cpu": common.Variant("a tiny byte-level model: throughput and a 40-step training with xla "
                          "and pallas_triton (interpret mode) (the default)", cpu=True),
    "gpu": common.Variant("a 35.7M-parameter model trained for a 7-minute budget on "
                          "pallas_triton, then validation loss and samples (GPU)"),
    "gpu_throughput": common.Variant("training-step tokens/s with pallas_triton, cuDNN and xla "
                                     "(GPU, a few minutes)"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """train_lm config; arg "cpu" (default), "gpu" or "gpu_throughput" (module docstring)."""
  arg = common.choose_variant(arg, VARIANTS, default="cpu")
  small = arg == "cpu"

  c = ml_collections.ConfigDict()
  c.experiment = "train_lm"
  # Product of the two lists; `--config.attention_impls="('xla',)"` changes the sweep.
  c.modes = ("throughput", "train") if small else (
      ("throughput",) if arg == "gpu_throughput" else ("train",))
  c.attention_impls = ("xla", "pallas_triton") if small else (
      _GPU_IMPLS if arg == "gpu_throughput" else ("pallas_triton",))
  c.sweep = [{"mode": c.get_ref("modes")}, {"attention_impl": c.get_ref("attention_impls")}]
  c.mode = "train"
  c.attention_impl = "xla"

  c.model = ml_collections.ConfigDict({
      "variant": "llama",
      "d_model": 64 if small else 512,
      "num_layers": 2 if small else 12,
      "num_heads": 4 if small else 8,
      "num_kv_heads": 2 if small else 4,
      "d_ff": 192 if small else 1408,
      "max_len": 128 if small else 1024,
      "dtype": "float32" if small else "bfloat16",
      "param_dtype": "float32",
      "decode_impl": ml_collections.FieldReference(None, field_type=str),
      "interpret": ml_collections.FieldReference(None, field_type=bool),
      "block_q": ml_collections.FieldReference(None, field_type=int),
      "block_kv": ml_collections.FieldReference(None, field_type=int),
  })
  c.seq_len = 64 if small else 1024
  c.batch_size = 16 if small else 32

  c.num_steps = 40 if small else 0  # 0: fit the cosine to time_budget_s
  c.time_budget_s = 60.0 if small else 420.0
  c.calibration_steps = 20
  c.optimizer = common.adamw(3e-3 if small else 1.5e-3, 10 if small else 200)

  c.eval_every = 20 if small else 250
  c.eval_rows = 64 if small else 512
  c.eval_batch_size = 32
  c.log_every = 5 if small else 25
  c.checkpoint_every = 20 if small else 1000
  c.checkpoint_backend = "auto"
  c.run_dir = ""
  c.checkpoint_dir = ""

  c.corpus_max_bytes = 2_000_000 if small else 0  # 0: the whole stdlib
  c.val_fraction = 0.05
  c.data_seed = 0
  c.seed = 0

  c.throughput_warmup = 2 if small else 3
  c.throughput_iters = 5 if small else 20
  c.throughput_input_sets = 2 if small else 3

  c.sample_prompt = "def fibonacci(n):\n"
  c.sample_tokens = 48 if small else 300
  c.sample_temperature = 0.8
  c.sample_top_k = 40
  c.progress = True
  # None: one device. A mesh spec ("data:2,model:2"; axes data / fsdp / model) shards the
  # parameters, optimizer state and batches over jax.devices() (flashjax.distributed).
  c.mesh = ml_collections.FieldReference(None, field_type=str)

  c.report = ml_collections.ConfigDict({
      "columns": ["tokens_per_s", "model_tflops", "pct_of_peak", "median_ms", "compile_s",
                  "initial_loss", "steps", "val_loss", "val_ppl", "val_bits_per_byte",
                  "train_time_s"],
      "plots": [{"x": "attention_impl", "y": "tokens_per_s"}],
  })
  common.tag(c, arg, VARIANTS)
  return c
