r"""Polar Sparsity end to end: routed decoding speed and accuracy vs batch, context, density.

Experiment kind: polar_sparsity (experiments/polar_sparsity.py). Per model variant ("llama":
GQA, SwiGLU; "opt": MHA, ReLU MLP) the setup trains a byte-level model on the stdlib corpus
(or loads `--config.model_checkpoint.<variant>=DIR`, a train_lm checkpoint of a model with
this config's `model_shapes.<variant>`, or `--config.hf_checkpoint.<variant>=DIR`, a local
Hugging Face OPT / LLaMA checkpoint fed byte ids), collects router data on training rows, trains head
routers per target density (and, for opt, neuron routers with the batch-union k calibrated
per batch size), and saves every RouterSet under <workdir>/setup/<variant>/. Every stage is
skipped when its outputs exist, so a re-run (or a resumed sweep) redoes nothing. The sweep is
model x batch x context x target head density; each row holds tokens/s dense and sparse, the
end-to-end, attention-kernel and MLP-kernel speed-ups, router recalls and validation
perplexity / next-token agreement with the routers in the loop (docs/polar_sparsity.md).

Variants:

  "cpu": tiny models (d_model 64, 3 layers; llama 8 heads / 4 KV heads, opt 4 heads, d_ff
      256) trained for 200 steps on 400 kB of the corpus, float32, xla attention, decode and
      sparse MLP (Pallas in interpret mode would take far longer than the 3-minute budget
      of this variant): 2 models x B {1, 4} x context {16, 32} x density {1, .5} = 16
      points. Measured: 86 s and 96 s for the whole command on a 2-core machine shared with
      other jobs (load averages 3 -> 1.7 and 5 -> 2.5; jax 0.10.2), about 30 s of it the setup
      (training, collection, routers, calibration); a re-run of the finished sweep takes
      3 s, and 8 more points (a third context) 30 s without any setup stage. The numbers
      only show that everything runs: on these tiny CPU models the routers cost more than
      the attention they skip.
  "gpu" (default on a GPU host): stand-in models trained here for a short fixed budget (12
      layers, d_model 1024, bf16; llama 16 heads / 8 KV heads, 142M parameters; opt 16
      heads, 156M; 2000 steps of 32 x 512 tokens, far from converged) until properly
      trained models exist: 2 models x B {1, 8, 32, 64, 128, 256} x
      context {1024, 4096} x density {1, .5, .3} = 72 points. Measured on an H100 (jax
      0.11.2): llama's 36 points 440 s (setup 232 s, of it 164 s training), opt's setup 316 s
      and ~40 s a point that needs a new accuracy evaluation (docs/polar_sparsity.md;
      experiments/run_polar_gpu.sh runs one model under a time limit). The setup runs once per workdir, stage by stage; a command stopped by a
      time limit is run again and goes on from the last finished stage and point (the model
      stage is checkpointed only when its training ends).

  python -m experiments.launch --config=configs/polar_sparsity.py:cpu \
      --workdir=/tmp/fj_polar_cpu
  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.launch \
      --config=configs/polar_sparsity.py:gpu --workdir=/tmp/fj_polar_gpu

Implementations: `attention_impl` (training and prefill) and `decode_impl` (the decode step
and the attention-kernel timing) are TransformerConfig values; None means the device's
default backend (Pallas on a GPU). The routed decode step runs flashjax.sparse_mlp on the
decode backend where it has one (else sparse_mlp's device default); `sparse_mlp_impl` is the
backend of the MLP-kernel timing (`speedup_mlp`), None: the decode step's. The CPU variant
sets "xla" for all three. `interpret` None: Pallas in interpret mode exactly on CPU.

Grid overrides: `--config.models="('opt',)"`, `--config.batches="(1, 64)"`,
`--config.contexts="(4096,)"`, `--config.densities="(1.0, 0.5)"` (new densities or batch
sizes train / calibrate what they need on first use).
"""

from __future__ import annotations

import ml_collections

from configs import common

VARIANTS = {
    "gpu": common.Variant("stand-in 12-layer llama (GQA) and opt (ReLU) models trained here, "
                          "B {1..256} x context {1k, 4k} x density {1, .5, .3}: 72 points "
                          "(GPU; llama half 440 s on an H100; default on a GPU host)"),
    "cpu": common.Variant("tiny llama and opt models, xla: 16 points, ~90 s on 2 cores "
                          "(default on a CPU host)", cpu=True),
}


def _shapes(small: bool) -> ml_collections.ConfigDict:
  if small:
    common_fields = {"d_model": 64, "num_layers": 3, "max_len": 128, "dtype": "float32",
                     "param_dtype": "float32"}
    llama = {**common_fields, "num_heads": 8, "num_kv_heads": 4, "d_ff": 192}
    opt = {**common_fields, "num_heads": 4, "d_ff": 256}
  else:
    common_fields = {"d_model": 1024, "num_layers": 12, "max_len": 4160, "dtype": "bfloat16",
                     "param_dtype": "float32"}
    llama = {**common_fields, "num_heads": 16, "num_kv_heads": 8, "d_ff": 2816}
    opt = {**common_fields, "num_heads": 16, "d_ff": 4096}
  return ml_collections.ConfigDict({"llama": llama, "opt": opt})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Polar Sparsity study config; arg "cpu" or "gpu"; None: "cpu" on a CPU host, else "gpu"."""
  arg = common.choose_variant(arg, VARIANTS, default="gpu")
  small = arg == "cpu"
  c = ml_collections.ConfigDict()
  c.experiment = "polar_sparsity"

  c.models = ("llama", "opt")
  c.batches = (1, 4) if small else (1, 8, 32, 64, 128, 256)
  c.contexts = (16, 32) if small else (1024, 4096)
  c.densities = (1.0, 0.5) if small else (1.0, 0.5, 0.3)
  c.sweep = [{"model": c.get_ref("models")}, {"density": c.get_ref("densities")},
             {"batch": c.get_ref("batches")}, {"context": c.get_ref("contexts")}]
  c.model = "llama"
  c.batch = 1
  c.context = c.contexts[0]
  c.density = 1.0

  c.model_shapes = _shapes(small)
  c.model_checkpoint = ml_collections.ConfigDict({"llama": "", "opt": ""})
  # A local Hugging Face checkpoint per variant instead (its ids are the corpus bytes).
  c.hf_checkpoint = ml_collections.ConfigDict({"llama": "", "opt": ""})
  common.model_implementations(c, "xla" if small else None, "attention_impl", "decode_impl",
                               "sparse_mlp_impl")

  # Model training (skipped with a model_checkpoint or hf_checkpoint).
  c.seq_len = 64 if small else 512
  c.train_batch_size = 16 if small else 32
  c.train_steps = 200 if small else 2000
  c.optimizer = common.adamw(3e-3 if small else 1e-3, 30 if small else 200)
  c.corpus_max_bytes = 400_000 if small else 0  # 0: the whole stdlib
  c.val_fraction = 0.05
  c.seed = 0

  # Router data and training.
  c.collect_batches = 8 if small else 32
  c.collect_batch_size = 8 if small else 32
  c.rows_per_sequence = 16 if small else 32
  c.router_val_fraction = 0.25 if small else 0.1
  c.router_epochs = 8 if small else 20
  c.router_batch_size = 64 if small else 256
  c.router_lr = 3e-3 if small else 1e-3
  c.router_patience = 3
  c.head_router_hidden = 0  # 0: Linear(d, G); else the hidden width of d -> hidden -> G
  c.neuron_rank = 16 if small else 128
  c.neuron_target = 0.99
  c.neuron_multiple = 32 if small else 128
  c.calibration_batches = ()  # calibrated besides `batches`

  # Accuracy (teacher forcing) and timing.
  c.eval_rows = 4 if small else 32
  c.eval_len = 48 if small else 512
  c.eval_prompt_len = 16 if small else 128
  c.eval_batch_size = 4 if small else 64  # rows per call where the batch does not matter
  c.timing_iters = 20 if small else 50
  c.timing_repeats = 3 if small else 5

  c.setup_dir = ""  # "": <workdir>/setup
  c.progress = not small

  c.report = ml_collections.ConfigDict({
      "columns": ["tokens_per_s_dense", "tokens_per_s_sparse", "speedup_e2e",
                  "speedup_attention", "speedup_mlp", "router_us", "head_router_recall",
                  "mlp_union_recall",
                  "head_density_mean", "mlp_density", "ppl_dense", "ppl_sparse",
                  "next_token_agreement"],
      "plots": [{"x": "batch", "y": "speedup_e2e", "logx": True},
                {"x": "batch", "y": "speedup_attention", "logx": True},
                {"x": "batch", "y": "speedup_mlp", "logx": True},
                {"x": "density", "y": "ppl_sparse"},
                {"x": "density", "y": "next_token_agreement"}],
  })
  common.tag(c, arg, VARIANTS)
  return c
