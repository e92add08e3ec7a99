r"""Hardware-aware Transformer search (HAT) end to end.

Experiment kind: hat_search (experiments/hat_search.py). One sweep axis, `stage`, runs the
pipeline in order: supernet (SuperTransformer trained on the stdlib corpus, one uniformly
sampled SubTransformer per step) -> latency (measured prefill / decode latency of sampled
SubTransformers on this device, JSONL) -> predictor (MLP vs linear cost baseline, held-out
RMSE / MAPE / R^2) -> search (evolution under predicted-latency budgets, fitness the
weight-shared validation loss; Pareto front) -> retrain (the winners and a hand-designed
baseline trained from scratch; true latency, parameters, loss) -> kernel (block-size choice
for Pallas attention from a latency predictor). Each stage is skipped when its outputs
exist; the launcher skips finished stages, so the same command resumes (docs/search.md).

Variants:

  "cpu" (default on a CPU host): a tiny space (embed {32, 64}, layers {1, 2}, FFN {64, 128}
      and heads {2, 4} per layer, head dim 16: 40 SubTransformers), 120 supernet steps of
      8 x 64 tokens on 300 kB of the corpus, 16 latency samples (prefill 32 tokens, 8 decode
      steps, batch 2, xla), HAT's search loop at 12 = 4 + 4 + 4 for 4 generations and two
      budgets, 60 retraining steps, synthetic kernel latencies. Measured: 1 min 46 s for the
      whole command on a 2-core machine shared with other jobs (load average 6-8; jax
      0.10.2), 2 min 39 s at load 9-10 (docs/search.md). The numbers only show that everything runs.
  "gpu": the real run (ran end to end on an H100 with 152 latency samples, 3000 supernet
      and 1200 retraining steps, ~30 min of device time; the defaults below take longer:
      ~8 s a latency sample, 92 ms a supernet step; docs/search.md): embed {512, 640, 768},
      layers {4, 6, 8}, FFN {1024, 2048, 3072} and heads {4, 8, 12} per layer (head dim
      64), bf16, the device's default attention / decode kernels, 20k supernet steps of
      32 x 512 tokens, 200 latency samples (prefill 512 tokens and 64 decode steps at
      batch 8), the 3 x 400 MLP predictor with weight decay 1.0, HAT's search defaults
      (125 = 25 + 50 + 50, p 0.3, 30 generations), three budgets,
      4000 retraining steps, measured pallas_triton kernel latencies over 60 problems x 27
      configurations (block_q, block_kv in {32, 64, 128}, stages {default, 2, 3}; one
      mask of 128 x 128 tiles per problem, two timing rounds).

  python -m experiments.launch --config=configs/hat_search.py:cpu --workdir=/tmp/fj_hat_cpu
  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.launch \
      --config=configs/hat_search.py:gpu --workdir=/tmp/fj_hat_gpu

Outputs: <workdir>/results.jsonl (one row per stage), report.md, hat_report.md (predictor
metrics, search trajectory, Pareto plot, retrained winners vs baseline) and
<workdir>/stages/<stage>/ (checkpoints, latency.jsonl, predictors, search_<i>.json,
pareto.png, trajectory.png, retrain/<name>.json, kernel.jsonl).
"""

from __future__ import annotations

import ml_collections

from configs import common

VARIANTS = {
    "gpu": common.Variant("HAT on a 3-8 layer byte LM space: supernet 20k steps, 200 latency "
                          "samples, 125-candidate evolution x 30 generations, 3 budgets, "
                          "retraining, pallas kernel-config picks (GPU)"),
    "cpu": common.Variant("tiny space (40 SubTransformers), every stage end to end in a few "
                          "minutes on 2 cores (default on a CPU host)", cpu=True),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """HAT search study config; arg "cpu" or "gpu"; None: "cpu" on a CPU host, else "gpu"."""
  arg = common.choose_variant(arg, VARIANTS, default="gpu")
  small = arg == "cpu"
  c = ml_collections.ConfigDict()
  c.experiment = "hat_search"
  c.stages = ("supernet", "latency", "predictor", "search", "retrain", "kernel")
  c.sweep = [{"stage": c.get_ref("stages")}]
  c.stage = "supernet"

  if small:
    c.space = ml_collections.ConfigDict({
        "embed_dims": (32, 64), "layer_counts": (1, 2), "ffn_dims": (64, 128),
        "head_counts": (2, 4), "head_dim": 16})
    c.model = ml_collections.ConfigDict({"variant": "llama", "max_len": 128,
                                         "dtype": "float32", "param_dtype": "float32"})
    c.baseline = ml_collections.ConfigDict({"embed_dim": 64, "num_layers": 2,
                                            "ffn_dim": 128, "num_heads": 4})
  else:
    c.space = ml_collections.ConfigDict({
        "embed_dims": (512, 640, 768), "layer_counts": (4, 6, 8),
        "ffn_dims": (1024, 2048, 3072), "head_counts": (4, 8, 12), "head_dim": 64})
    c.model = ml_collections.ConfigDict({"variant": "llama", "max_len": 1024,
                                         "dtype": "bfloat16", "param_dtype": "float32"})
    c.baseline = ml_collections.ConfigDict({"embed_dim": 768, "num_layers": 8,
                                            "ffn_dim": 3072, "num_heads": 12})
  common.model_implementations(c, "xla" if small else None, "attention_impl", "decode_impl")

  # Supernet training (and the retraining's optimizer, corpus and batch).
  c.seq_len = 64 if small else 512
  c.batch_size = 8 if small else 32
  c.super_steps = 120 if small else 20000
  c.checkpoint_every = 40 if small else 1000
  c.optimizer = common.adamw(3e-3 if small else 1e-3, 20 if small else 500)
  c.corpus_max_bytes = 300_000 if small else 0  # 0: the whole stdlib
  c.val_fraction = 0.05
  c.eval_rows = 8 if small else 64
  c.eval_batch_size = 8 if small else 32
  c.seed = 0

  # Latency dataset (the protocol also times the retrained models).
  c.latency_samples = 16 if small else 200
  c.latency_batch = 2 if small else 8
  c.prefill_tokens = 32 if small else 512
  c.decode_tokens = 8 if small else 64
  c.warmup = 2 if small else 5
  c.repeats = 10 if small else 50
  c.trim = 0.1
  # Samples (latency) and kernel configurations (kernel) compiled at once in threads before
  # they are timed one by one (flashjax.search.latency.collect_dataset).
  c.compile_workers = 1 if small else 8

  # Predictor.
  c.predictor_hidden = (64, 64, 64) if small else (400, 400, 400)
  c.predictor_steps = 800 if small else 5000
  c.predictor_lr = 3e-3 if small else 1e-3
  # AdamW decay of the MLP: on the 152 H100 rows it took the decode MLP from 7.0 % MAPE to
  # 3.6 % out of fold (0.1: 4.6 %, 0.3: 4.1 %, 3.0: 4.1 %; docs/search.md).
  c.predictor_weight_decay = 0.0 if small else 1.0
  c.test_fraction = 0.25 if small else 0.2
  # The predictor the search's latency constraint (and the retrain rows) use: "mlp" (HAT's),
  # "linear" (least squares on FLOPs, bytes, layers) or "best" (lower held-out MAPE).
  c.search_predictor = "best"

  # Search.
  c.latency_target = "decode_ms"
  c.budget_quantiles = (0.3, 0.7) if small else (0.2, 0.4, 0.6)
  c.population = 12 if small else 125
  c.parents = 4 if small else 25
  c.mutations = 4 if small else 50
  c.crossovers = 4 if small else 50
  c.mutate_prob = 0.3
  c.generations = 4 if small else 30

  # Retraining from scratch; the retrained models' decode tokens/s is also measured at these
  # batches (speed-ups over the baseline at B = 1 and B = 32 on the GPU).
  c.retrain_steps = 60 if small else 4000
  c.retrain_decode_batches = (1, 4) if small else (1, 32)

  # Kernel configurations.
  c.kernel = ml_collections.ConfigDict({
      "source": "synthetic" if small else "measured",
      "implementation": "pallas_triton", "dtype": "bfloat16",
      "problems": 40 if small else 60, "test_fraction": 0.25,
      # A problem's mask: random mask_block x mask_block tiles at its density, the same
      # mask and inputs for all its configurations; measured configurations are timed in
      # `rounds` rounds over the problem (their mean; two rounds also give the noise floor,
      # kernel_round_agreement).
      "mask_block": 128, "rounds": 1 if small else 2,
      # a timed run makes loop_calls + 1 attention calls, loop_calls of them in a device loop
      # (per-call dispatch weighs on ~0.1 ms kernels); warmup and repeats are runs per round
      "loop_calls": 4, "warmup": 2, "repeats": 3 if small else 10,
      "lengths": (512, 1024, 2048, 4096, 8192), "batches": (1, 2, 4, 8),
      "heads": (8, 16, 32), "head_dims": (64, 128), "min_density": 0.1,
      "block_qs": (32, 64, 128), "block_kvs": (32, 64, 128), "stages": (0, 2, 3),
      # persistent grids are a pallas_mosaic_gpu option: add True with that implementation
      "persistent": (False,),
      # the MLP's AdamW decay: on an H100's 60 measured problems, picks held out in turn
      # within 5 %: 68 % without, 72 % at 1.0 (earlier protocol: 35 % / 48 %; docs/search.md)
      "hidden": (64, 64), "steps": 1500, "lr": 3e-3, "weight_decay": 0.0 if small else 1.0,
      "tolerance": 0.05})

  c.setup_dir = ""  # "": <launcher --workdir>/stages
  c.report_dir = ""  # "": the launcher's --workdir (hat_report.md)

  c.report = ml_collections.ConfigDict({
      "columns": ["steps", "val_loss_largest", "val_loss_smallest", "compiled_shapes",
                  "samples", "device_kind", "decode_ms_mlp_mape", "decode_ms_mlp_r2",
                  "decode_ms_linear_mape", "decode_ms_linear_r2", "decode_ms_search_predictor",
                  "prefill_ms_mlp_mape", "prefill_ms_mlp_r2", "budget0_arch",
                  "budget0_val_loss", "evaluated",
                  "baseline_val_loss", "baseline_decode_ms", "budget0_speedup",
                  "budget0_loss_delta", "budget0_speedup_b1",
                  f"budget0_speedup_b{c.retrain_decode_batches[-1]}",
                  "kernel_pick_within_tolerance", "kernel_ranking_within_tolerance",
                  "kernel_round_agreement"],
      "plots": []})
  common.tag(c, arg, VARIANTS)
  return c
