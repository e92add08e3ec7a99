"""Experiment kind "polar_sparsity": routed (Polar Sparsity) decoding, speed and accuracy.

Setup, once per setup directory and model variant (every stage is skipped when its outputs
exist, so a re-run or a resumed sweep does none of it again):

  model       trains a byte-level model on the stdlib corpus (flashjax.models.training) and
              checkpoints it (flashjax.models.checkpoint, the Trainer state, as train_lm
              does), or loads `model_checkpoint.<variant>` (a train_lm checkpoint directory
              of a model with the config's shape) or `hf_checkpoint.<variant>` (a local
              Hugging Face OPT / LLaMA checkpoint, flashjax.models.hf_import) when given
  collect     router data from training rows (flashjax.sparsity.collect), resumable shards
  neurons     (opt, ReLU MLPs) neuron routers, trained once; then per batch size of the
              sweep the union size k_l(B) (calibrate.calibrate_neuron_k, >= `neuron_target`
              union recall, rounded up to `neuron_multiple`) and the union recall reached
  heads       per target head density < 1: per-layer densities from layer importance
              (train.head_densities, layer 0 dense), head routers, and the RouterSet
              (router_checkpoint) with the neuron routers and their k's, saved under
              <setup>/<variant>/routers/d<density>

Each point (model, batch, context, density) then measures, with the point's RouterSet:

  tokens_per_s_dense / tokens_per_s_sparse   batch / median decode-step time
      (`flashjax.sparsity.evaluate.decode_step_time`: the model's decode step timed on the device, `timing_iters`
      steps inside one jitted loop that carries the cache, so the new entry is written in
      place; a cache of `context` random entries per sequence, filled by
      evaluate.filled_cache; sparse = the routers inside the step; the dense step is timed
      once per (batch, context) in a process and shared by the rows of every density)
  speedup_e2e          tokens_per_s_sparse / tokens_per_s_dense
  speedup_attention    kernel level: the time of flashjax.decode_attention over every routed
      layer's head_indices (the trained routers applied to collected validation inputs of
      that layer, `batch` rows, select_heads at the layer's k) against the same number of
      dense calls, at the point's batch and context (time_in_loop, random q / K / V)
  speedup_mlp          (opt) flashjax.sparse_mlp at the calibrated k_l(B) (neurons chosen by
      the routers on collected MLP inputs) against the dense ReLU MLP of the same layers;
      None for llama
  router_us            (+ _p10, _p90) the routers alone: every routed layer's head (and
      neuron) router and its selection (top-k; for neurons the batch union) at the
      point's batch on collected validation inputs, timed in one jitted loop: the part of
      step_us_sparse that the skipped work has to repay
  head_router_recall   mean over routed layers of the best validation top-k recall
  mlp_union_recall     (opt) mean over routed layers of the calibration's union recall at
      k_l(B); mlp_density the mean k_l(B) / F; neuron_k the k_l(B) per layer;
      neuron_router_recall the neuron routers' mean best validation recall (each row keeps as
      many units as fired)
  ppl_dense, ppl_sparse, next_token_agreement   evaluate.teacher_forced on held-out
      validation rows (`eval_rows` rows of `eval_len` tokens, single documents where
      possible), the routers in the loop through the kernels; with neuron routers
      evaluated `batch` rows at a time (the MLP union is the batch's) and cached per
      (variant, density, batch), else (heads are routed per sequence) `eval_batch_size`
      rows at a time and cached per (variant, density), in <setup>/<variant>/eval/
  head_density_mean, head_k (per layer), step_us_dense / step_us_sparse (+ p10 / p90)

Density 1.0 is the dense baseline: no routers at all (heads or neurons), the "sparse" step
is the dense step timed again (its speed-up shows the timing noise), and its perplexities
are equal with agreement 1.0.

Config fields (configs/polar_sparsity.py sets all of them):

  model, batch, context, density   the point (variant "llama" or "opt", B, cache entries,
                                   target mean head density of the routed layers)
  models, densities, batches, contexts   the sweep's lists (routers are trained for every
                                   density < 1 of `densities`, neurons calibrated for
                                   `batches` and `calibration_batches`)
  model_shapes.<variant>           TransformerConfig fields of each variant (vocab_size is
                                   the byte tokenizer's)
  model_checkpoint.<variant>       "" (train here) or a checkpoint directory
  hf_checkpoint.<variant>          "" or a local Hugging Face checkpoint directory of that
                                   family (config.json + *.safetensors), used instead of
                                   training; fed byte ids (no tokenizer here)
  attention_impl, decode_impl, sparse_mlp_impl, interpret   implementations: None means the
                                   device's default; sparse_mlp_impl only sets the MLP-kernel
                                   timing's backend (see configs/polar_sparsity.py)
  seq_len, train_batch_size, train_steps, optimizer, corpus_max_bytes, val_fraction, seed
  collect_batches, collect_batch_size, rows_per_sequence, router_val_fraction
  router_epochs, router_batch_size, router_lr, router_patience, head_router_hidden,
  neuron_rank, neuron_target, neuron_multiple, calibration_batches
  eval_rows, eval_len, eval_prompt_len, eval_batch_size
  timing_iters, timing_repeats
  setup_dir                        "": <launcher --workdir>/setup
  progress                         tqdm bars of the setup stages
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import common
import flashjax
from flashjax import benchmarking
from flashjax.models import Transformer
from flashjax.models import TransformerConfig
from flashjax.models import checkpoint
from flashjax.models import data
from flashjax.models import hf_import
from flashjax.models import training
from flashjax.sparsity import calibrate
from flashjax.sparsity import collect
from flashjax.sparsity import evaluate
from flashjax.sparsity import router_checkpoint
from flashjax.sparsity import routers as routers_lib
from flashjax.sparsity import train

MODELS = ("llama", "opt")
MODEL_FILE = "model.json"
CALIBRATION_FILE = "calibration.json"
DONE_FILE = "done.json"
STAGE_TIMES_FILE = "stage_times.json"

# Loaded setups of this process, {(setup dir, variant): Setup}: points share one load.
_SETUPS: dict[tuple[str, str], "Setup"] = {}


def setup_dir(config: ml_collections.ConfigDict) -> str:
  """The setup directory: config.setup_dir, else <launcher --workdir>/setup."""
  return common.under_workdir(config.setup_dir, "setup_dir", "setup")


def density_name(density: float) -> str:
  """Directory name of a target density's routers, e.g. "d0.5"."""
  return f"d{float(density):g}"




def _check_max_len(config: ml_collections.ConfigDict, name: str, max_len: int) -> None:
  """ValueError naming `name` unless a model of max_len positions holds every sequence the
  study feeds it (contexts, eval_len and seq_len, plus one decoded token)."""
  needed = max(max(config.contexts), config.eval_len, config.seq_len) + 1
  if max_len < needed:
    raise ValueError(f"{name}={max_len} must be >= {needed} (contexts, eval_len and "
                     "seq_len, plus one decoded token)")


def model_config(config: ml_collections.ConfigDict, variant: str) -> TransformerConfig:
  """The TransformerConfig of `variant`: its shape fields, the byte vocabulary and the
  config's implementations."""
  if variant not in MODELS:
    raise ValueError(f"model={variant!r} must be one of {MODELS}")
  fields = dict(config.model_shapes[variant].to_dict())
  fields.update(variant=variant, vocab_size=data.VOCAB_SIZE,
                attention_impl=config.attention_impl, decode_impl=config.decode_impl,
                interpret=common.interpret(config))
  _check_max_len(config, f"model_shapes.{variant}.max_len", fields["max_len"])
  return TransformerConfig(**fields)


def _optimizer(config: ml_collections.ConfigDict) -> training.OptimizerConfig:
  return training.OptimizerConfig(**config.optimizer.to_dict())


def _corpus(config: ml_collections.ConfigDict, row_len: int) -> data.Corpus:
  return data.load_stdlib_corpus(row_len, val_fraction=config.val_fraction,
                                 max_bytes=config.corpus_max_bytes or None)


def stage_model(config: ml_collections.ConfigDict, variant: str, directory: str
                ) -> tuple[Transformer, dict[str, Any]]:
  """Trains (or loads) the model of `variant`; the checkpoint and model.json are its outputs.

  Returns:
    (the model, info: {"source", "params_m", "steps", "val_loss", "train_s"}).
  """
  hf_dir = config.hf_checkpoint.get(variant, "") or ""
  if hf_dir:
    return _hf_model(config, variant, hf_dir, os.path.join(directory, MODEL_FILE))
  mc = model_config(config, variant)
  trainer = training.Trainer(Transformer(mc, rngs=nnx.Rngs(config.seed)), _optimizer(config))
  source = config.model_checkpoint.get(variant, "") or ""
  ckpt_dir = source or os.path.join(directory, "checkpoint")
  info_path = os.path.join(directory, MODEL_FILE)
  ckpt = checkpoint.Checkpointer(ckpt_dir, max_to_keep=1)
  try:
    step = ckpt.latest_step()
    if source and step is None:
      raise ValueError(f"model_checkpoint.{variant}={source!r} holds no checkpoint")
    if step is not None:  # a given checkpoint, or this stage's (saved once training ended)
      state, _ = ckpt.restore(step, trainer.state())
      trainer.load_state(state)
      if not os.path.exists(info_path):
        common.write_json(info_path, {"source": source or "trained", "steps": trainer.step,
                                "params_m": mc.num_params() / 1e6, "val_loss": None})
      return trainer.model(), common.read_json(info_path)
    start = time.perf_counter()
    corpus = _corpus(config, config.seq_len + 1)
    opt = _optimizer(config)
    for step in range(config.train_steps):
      tokens, segments = data.sample_rows(corpus.train, step, config.train_batch_size,
                                          config.seed)
      metrics = trainer.train_step(tokens, segments,
                                   training.lr_schedule(step, config.train_steps, opt))
    loss = float(metrics["loss"]) if config.train_steps else None
    rows = min(config.eval_rows * 4, corpus.val.num_rows)
    val_loss = trainer.evaluate(corpus.val.tokens[:rows], corpus.val.segment_ids[:rows],
                                batch_size=32)
    ckpt.save(trainer.step, trainer.state(), {"num_steps": config.train_steps})
    info = {"source": "trained", "params_m": mc.num_params() / 1e6, "steps": trainer.step,
            "train_loss": loss, "val_loss": val_loss,
            "train_s": time.perf_counter() - start}
    common.write_json(info_path, info)
    logging.info("polar_sparsity: trained %s: %s", variant, info)
    return trainer.model(), info
  finally:
    ckpt.close()


def _hf_model(config: ml_collections.ConfigDict, variant: str, path: str, info_path: str
              ) -> tuple[Transformer, dict[str, Any]]:
  """A local Hugging Face checkpoint of the variant's family, on the config's dtypes and
  implementations. Its inputs are the corpus bytes (ids < data.VOCAB_SIZE): the study has
  no Hugging Face tokenizer, so only a model whose ids are bytes sees real text."""
  config_path = os.path.join(path, "config.json")
  family = common.read_json(config_path).get("model_type") if os.path.exists(config_path) else None
  if family != variant:
    raise ValueError(f"hf_checkpoint.{variant}={path!r} holds model_type={family!r}, "
                     f"not {variant!r}")
  shape = config.model_shapes[variant]
  model = hf_import.load_hf_checkpoint(
      path, dtype=shape.dtype, param_dtype=shape.param_dtype,
      attention_impl=config.attention_impl, decode_impl=config.decode_impl,
      interpret=common.interpret(config))
  mc = model.config
  if mc.vocab_size < data.VOCAB_SIZE:
    raise ValueError(f"hf_checkpoint.{variant}={path!r}: vocab_size={mc.vocab_size} must be "
                     f">= {data.VOCAB_SIZE} (the study feeds byte ids)")
  _check_max_len(config, f"hf_checkpoint.{variant}={path!r}: max_len", mc.max_len)
  info = {"source": f"hf:{path}", "params_m": mc.num_params() / 1e6, "steps": None,
          "val_loss": None}
  common.write_json(info_path, info)
  return model, info


def _collect_batches(config: ml_collections.ConfigDict) -> list[tuple[np.ndarray, np.ndarray]]:
  """The training rows router data is collected on: (tokens, segment_ids) batches."""
  corpus = _corpus(config, config.seq_len)
  rng = np.random.default_rng([config.seed, 1])
  batches = []
  for _ in range(config.collect_batches):
    rows = rng.integers(0, corpus.train.num_rows, size=config.collect_batch_size)
    batches.append((corpus.train.tokens[rows], corpus.train.segment_ids[rows]))
  return batches


def stage_collect(config: ml_collections.ConfigDict, model: Transformer, directory: str
                  ) -> None:
  """Router data of the model (collect.collect; resumable shard by shard)."""
  if os.path.exists(os.path.join(directory, DONE_FILE)):
    return
  stats = collect.collect(model, _collect_batches(config), directory,
                          rows_per_sequence=config.rows_per_sequence, seed=config.seed,
                          progress=config.progress)
  common.write_json(os.path.join(directory, DONE_FILE), stats)


def _fit_config(config: ml_collections.ConfigDict) -> train.RouterTrainConfig:
  return train.RouterTrainConfig(epochs=config.router_epochs, batch_size=config.router_batch_size,
                                 learning_rate=config.router_lr, patience=config.router_patience,
                                 seed=config.seed)


def _calibration_batches(config: ml_collections.ConfigDict) -> list[int]:
  return sorted({int(b) for b in tuple(config.batches) + tuple(config.calibration_batches)})


def stage_neurons(config: ml_collections.ConfigDict, directory: str, data_dir: str
                  ) -> tuple[list[Any], dict[str, Any]]:
  """(opt) Neuron routers (trained once) and their calibration for every batch size.

  Returns:
    (neuron routers per layer, calibration {"<B>": {"k": [per layer], "union_recall",
    "density"}, "recall": [per layer oracle-budget recall or None]}).
  """
  routers_dir = os.path.join(directory, "neurons")
  if os.path.exists(os.path.join(routers_dir, router_checkpoint.META_FILE)):
    saved = router_checkpoint.load_routers(routers_dir)
    neurons, recall = saved.neuron_routers, saved.meta["recall"]
  else:
    neurons, metrics = train.train_neuron_routers(
        data_dir, rank=config.neuron_rank, dense_layers=(0,), config=_fit_config(config),
        val_fraction=config.router_val_fraction)
    recall = [None if m is None else m["best_recall"] for m in metrics]
    num_layers = len(neurons)
    router_checkpoint.save_routers(routers_dir, router_checkpoint.RouterSet(
        [None] * num_layers, neurons, [1.0] * num_layers, meta={"recall": recall}))
  path = os.path.join(directory, CALIBRATION_FILE)
  table = common.read_json(path) if os.path.exists(path) else {}
  missing = [b for b in _calibration_batches(config) if str(b) not in table]
  if missing:
    ks = calibrate.calibrate_neuron_k(neurons, data_dir, missing, split="val",
                                      val_fraction=config.router_val_fraction,
                                      target=config.neuron_target,
                                      multiple=config.neuron_multiple, seed=config.seed)
    for b in missing:
      table[str(b)] = _union_stats(neurons, data_dir, config, b, ks[b])
    common.write_json(path, table)
  table["recall"] = recall
  return neurons, table


def _union_stats(neurons: Sequence[Any], data_dir: str, config: ml_collections.ConfigDict,
                 batch: int, ks: Sequence[int | None]) -> dict[str, Any]:
  """Mean union recall and density at k_l(B) over the routed layers (validation rows)."""
  recalls, densities = [], []
  for layer, (router, k) in enumerate(zip(neurons, ks)):
    if router is None:
      continue
    rows = collect.load_layer(data_dir, layer, split="val",
                              val_fraction=config.router_val_fraction)
    logits = calibrate.router_logits(router, rows["mlp_x"])
    picks = calibrate.sample_batches(logits.shape[0], batch, 32, config.seed + layer)
    curve = np.mean([calibrate.union_recall_curve(logits[r], rows["fired"][r])
                     for r in picks], axis=0)
    recalls.append(float(curve[k - 1]))
    densities.append(k / router.d_ff)
  return {"k": list(ks), "union_recall": float(np.mean(recalls)) if recalls else None,
          "density": float(np.mean(densities)) if densities else None}


def stage_heads(config: ml_collections.ConfigDict, directory: str, data_dir: str,
                density: float, neurons: list[Any] | None, calibration: dict[str, Any] | None
                ) -> router_checkpoint.RouterSet:
  """Head routers of one target density, saved as a RouterSet with the neuron routers.

  An existing set is loaded; it is saved again only when the calibrated batch sizes grew.
  """
  routers_dir = os.path.join(directory, "routers", density_name(density))
  neuron_k = {}
  if neurons is not None:
    neuron_k = {int(b): tuple(v["k"]) for b, v in calibration.items() if b != "recall"}
  if os.path.exists(os.path.join(routers_dir, router_checkpoint.META_FILE)):
    saved = router_checkpoint.load_routers(routers_dir)
    if saved.neuron_k == neuron_k:
      return saved
    saved.neuron_k = neuron_k
    router_checkpoint.save_routers(routers_dir, saved)
    return saved
  densities, importance = train.head_densities(data_dir, density,
                                               val_fraction=config.router_val_fraction)
  heads, metrics = train.train_head_routers(
      data_dir, densities, hidden=config.head_router_hidden or None, config=_fit_config(config),
      val_fraction=config.router_val_fraction)
  num_layers = len(heads)
  meta = {"target_density": float(density), "importance": importance,
          "head_recall": [None if m is None else m["best_recall"] for m in metrics],
          "head_k": [None if m is None else m["k"] for m in metrics]}
  routers = router_checkpoint.RouterSet(
      heads, list(neurons) if neurons is not None else [None] * num_layers, densities,
      neuron_k, meta=meta)
  router_checkpoint.save_routers(routers_dir, routers)
  return routers


def inference_copy(model: Transformer) -> Transformer:
  """The model with its parameters in the compute dtype (param_dtype = config.dtype)."""
  mc = model.config
  if mc.param_dtype == mc.dtype:
    return model
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda p: p.astype(mc.compute_dtype)
                       if jnp.issubdtype(p.dtype, jnp.floating) else p, state)
  copy = nnx.merge(graphdef, state)
  copy.config = dataclasses.replace(mc, param_dtype=mc.dtype)
  return copy


class _StageClock:
  """Wall seconds of each setup stage run in this process, appended to a JSON file
  ({stage: [seconds of each run]}; a stage skipped because its outputs exist takes ~0 s)."""

  def __init__(self, path: str):
    self.path = path

  @contextlib.contextmanager
  def __call__(self, stage: str):
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    table = common.read_json(self.path) if os.path.exists(self.path) else {}
    table.setdefault(stage, []).append(round(seconds, 2))
    common.write_json(self.path, table)
    logging.info("polar_sparsity: stage %s took %.1f s", stage, seconds)


class Setup:
  """A variant's model, its routers per density and the data the points need."""

  def __init__(self, config: ml_collections.ConfigDict, variant: str):
    root = os.path.join(setup_dir(config), variant)
    os.makedirs(root, exist_ok=True)
    self.root = root
    self.variant = variant
    self.data_dir = os.path.join(root, "collect")
    clock = _StageClock(os.path.join(root, STAGE_TIMES_FILE))
    with clock("model"):
      trained, self.model_info = stage_model(config, variant, root)
    # Decoding reads the weights every step: hold them in the compute dtype (as inference
    # does), not as the float32 training copies a step would convert in full each time
    # (which would also read every fc1 row the sparse MLP skips).
    self.model = inference_copy(trained)
    with clock("collect"):
      stage_collect(config, self.model, self.data_dir)
    self.neurons, self.calibration = None, None
    if collect.read_meta(self.data_dir)["relu_layers"]:
      with clock("neurons"):
        self.neurons, self.calibration = stage_neurons(config, root, self.data_dir)
    self.routers = {}
    for density in config.densities:
      if density < 1:
        with clock(f"heads_{density_name(density)}"):
          self.routers[float(density)] = stage_heads(config, root, self.data_dir, density,
                                                     self.neurons, self.calibration)
    self._val_rows: dict[int, dict[str, np.ndarray]] = {}
    # Dense decode-step timings per (batch, context), shared by the densities' rows.
    self.dense_timings: dict[tuple[int, int], benchmarking.Timing] = {}

  def routers_for(self, config: ml_collections.ConfigDict,
                  density: float) -> router_checkpoint.RouterSet | None:
    """The RouterSet of a density (None at 1.0), set up now if the sweep grew."""
    if density >= 1:
      return None
    if float(density) not in self.routers:
      self.routers[float(density)] = stage_heads(config, self.root, self.data_dir, density,
                                                 self.neurons, self.calibration)
    return self.routers[float(density)]

  def calibration_for(self, config: ml_collections.ConfigDict, batch: int) -> dict[str, Any]:
    if str(batch) not in self.calibration:
      config = ml_collections.ConfigDict(config.to_dict())
      with config.unlocked():
        config.calibration_batches = tuple(config.calibration_batches) + (batch,)
      self.neurons, self.calibration = stage_neurons(config, self.root, self.data_dir)
      for density in list(self.routers):
        self.routers[density] = stage_heads(config, self.root, self.data_dir, density,
                                            self.neurons, self.calibration)
    return self.calibration[str(batch)]

  def val_rows(self, layer: int, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    if layer not in self._val_rows:
      self._val_rows[layer] = collect.load_layer(self.data_dir, layer, split="val",
                                                 val_fraction=config.router_val_fraction)
    return self._val_rows[layer]


def get_setup(config: ml_collections.ConfigDict, variant: str) -> Setup:
  """The variant's Setup (built or loaded once per process and setup directory)."""
  key = (os.path.abspath(setup_dir(config)), variant)
  if key not in _SETUPS:
    _SETUPS[key] = Setup(config, variant)
  return _SETUPS[key]


def _timing_metrics(prefix: str, timing: benchmarking.Timing) -> dict[str, float]:
  return {f"{prefix}": 1e6 * timing.median_s, f"{prefix}_p10": 1e6 * timing.p10_s,
          f"{prefix}_p90": 1e6 * timing.p90_s}


def _sample_rows(num_rows: int, batch: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng([seed, batch, 7])
  return rng.choice(num_rows, batch, replace=batch > num_rows)


def attention_speedup(config: ml_collections.ConfigDict, setup: Setup,
                      routers: router_checkpoint.RouterSet) -> dict[str, Any]:
  """decode_attention over the routed layers with routed head_indices vs dense calls."""
  mc = setup.model.config
  batch, context = config.batch, config.context
  head_k = routers.head_k()
  indices = []
  for layer, (router, k) in enumerate(zip(routers.head_routers, head_k)):
    if router is None:
      continue
    rows = setup.val_rows(layer, config)["attn_x"]
    x = jnp.asarray(rows[_sample_rows(rows.shape[0], batch, config.seed + layer)])
    indices.append(routers_lib.select_heads(router(x), k))
  if not indices:
    return {"speedup_attention": None}
  keys = jax.random.split(jax.random.key(config.seed), 3)
  dtype = mc.compute_dtype
  n = len(indices)
  # One query per routed layer: identical dense calls (same q, no head_indices) would be
  # merged into one by XLA's common-subexpression elimination, timing 1 call instead of n.
  qs = jax.random.normal(keys[0], (n, batch, mc.num_heads, mc.head_dim),
                         jnp.float32).astype(dtype)
  cache_shape = (batch, context, mc.num_kv_heads, mc.head_dim)
  k_cache = jax.random.normal(keys[1], cache_shape, jnp.float32).astype(dtype)
  v_cache = jax.random.normal(keys[2], cache_shape, jnp.float32).astype(dtype)
  lengths = jnp.full((batch,), context, jnp.int32)
  impl, interpret = mc.decode_impl, mc.interpret

  def run(qs, k_cache, v_cache, lengths, *heads):
    return sum(flashjax.decode_attention(q, k_cache, v_cache, lengths, head_indices=h,
                                         implementation=impl, interpret=interpret)
               .astype(jnp.float32) for q, h in zip(qs, heads))

  dense = benchmarking.time_in_loop(lambda *a: run(*a[:4], *([None] * n)), qs, k_cache,
                                    v_cache, lengths, iters=config.timing_iters,
                                    repeats=config.timing_repeats)
  sparse = benchmarking.time_in_loop(run, qs, k_cache, v_cache, lengths, *indices,
                                     iters=config.timing_iters, repeats=config.timing_repeats)
  return {"speedup_attention": dense.median_s / sparse.median_s,
          **_timing_metrics("attention_us_dense", dense),
          **_timing_metrics("attention_us_sparse", sparse)}


def router_cost(config: ml_collections.ConfigDict, setup: Setup,
                routers: router_checkpoint.RouterSet) -> dict[str, Any]:
  """Device time of the routers alone: every routed layer's head (and neuron) router and
  its selection (policy.heads / policy.neurons) at the point's batch, on collected
  validation inputs of that layer in the compute dtype, inside one jitted loop."""
  policy = routers.policy()
  dtype = setup.model.config.compute_dtype
  inputs = []  # (layer, attention x or None, MLP x or None)
  for layer in range(len(routers.head_routers)):
    rows = setup.val_rows(layer, config)
    pick = _sample_rows(rows["attn_x"].shape[0], config.batch, config.seed + layer)
    attn = routers.head_routers[layer] is not None
    mlp = policy.neuron_budget(layer, config.batch) is not None
    if attn or mlp:
      inputs.append((layer, jnp.asarray(rows["attn_x"][pick], dtype) if attn else None,
                     jnp.asarray(rows["mlp_x"][pick], dtype) if mlp else None))
  if not inputs:
    return {"router_us": None}
  graphdef, state = nnx.split(policy)
  layers = tuple(layer for layer, _, _ in inputs)
  xs = [(a, m) for _, a, m in inputs]

  def run(state, xs):
    policy = nnx.merge(graphdef, state)
    total = jnp.zeros((), jnp.int32)
    for layer, (attn_x, mlp_x) in zip(layers, xs):
      if attn_x is not None:
        total += jnp.sum(policy.heads(layer, attn_x))
      if mlp_x is not None:
        total += jnp.sum(policy.neurons(layer, mlp_x))
    return total

  timing = benchmarking.time_in_loop(run, state, xs, iters=config.timing_iters,
                                     repeats=config.timing_repeats)
  return _timing_metrics("router_us", timing)


def mlp_speedup(config: ml_collections.ConfigDict, setup: Setup,
                routers: router_checkpoint.RouterSet) -> dict[str, Any]:
  """(opt) sparse_mlp at the calibrated k over the routed layers vs their dense MLPs."""
  policy = routers.policy()
  batch = config.batch
  layers, xs, picks = [], [], []
  for layer, router in enumerate(routers.neuron_routers):
    if router is None:
      continue
    rows = setup.val_rows(layer, config)["mlp_x"]
    x = jnp.asarray(rows[_sample_rows(rows.shape[0], batch, config.seed + layer)])
    x = x.astype(setup.model.config.compute_dtype)
    layers.append(layer)
    xs.append(x)
    picks.append(routers_lib.select_neurons(router(x), policy.neuron_budget(layer, batch)))
  if not layers:
    return {"speedup_mlp": None}
  graphdef, state = nnx.split(setup.model)
  impl = setup.model.layers[layers[0]].sparse_mlp_impl
  if config.sparse_mlp_impl is not None:
    impl = config.sparse_mlp_impl
  interpret = setup.model.config.interpret

  def dense_fn(state, *xs):
    model = nnx.merge(graphdef, state)
    return sum(model.layers[l].mlp(x).astype(jnp.float32) for l, x in zip(layers, xs))

  def sparse_fn(state, *args):
    model = nnx.merge(graphdef, state)
    xs, idx = args[:len(layers)], args[len(layers):]
    return sum(model.layers[l].mlp.sparse(x, i, implementation=impl, interpret=interpret)
               .astype(jnp.float32) for l, x, i in zip(layers, xs, idx))

  dense = benchmarking.time_in_loop(dense_fn, state, *xs, iters=config.timing_iters,
                                    repeats=config.timing_repeats)
  sparse = benchmarking.time_in_loop(sparse_fn, state, *xs, *picks, iters=config.timing_iters,
                                     repeats=config.timing_repeats)
  return {"speedup_mlp": dense.median_s / sparse.median_s,
          **_timing_metrics("mlp_us_dense", dense), **_timing_metrics("mlp_us_sparse", sparse)}


def eval_rows(config: ml_collections.ConfigDict, count: int) -> np.ndarray:
  """`count` held-out validation rows of eval_len tokens, single-document rows first."""
  corpus = _corpus(config, config.eval_len)
  segments = corpus.val.segment_ids
  single = np.flatnonzero(np.all(segments == segments[:, :1], axis=1))
  order = np.concatenate([single, np.setdiff1d(np.arange(corpus.val.num_rows), single)])
  if count > order.size:  # fewer rows than asked: repeat them
    order = np.resize(order, count)
  return corpus.val.tokens[order[:count]]


def accuracy(config: ml_collections.ConfigDict, setup: Setup,
             routers: router_checkpoint.RouterSet | None) -> dict[str, Any]:
  """teacher_forced scores, cached on disk per density (and batch where it matters).

  Only the MLP union depends on the batch (heads are routed per sequence), so a policy with
  neuron routers is evaluated `batch` rows at a time and cached per (density, batch); any
  other (head routers only, or dense) `eval_batch_size` rows at a time, once per density.
  """
  batch_matters = routers is not None and any(r is not None for r in routers.neuron_routers)
  batch = config.batch if batch_matters else config.eval_batch_size
  name = density_name(config.density if routers else 1.0)
  path = os.path.join(setup.root, "eval", f"{name}_b{batch}.json" if batch_matters
                      else f"{name}.json")
  if os.path.exists(path):
    return common.read_json(path)
  count = -(-max(config.eval_rows, batch) // batch) * batch
  tokens = eval_rows(config, count)
  policy = None if routers is None else routers.policy()
  totals = {"nll_dense": 0.0, "nll_sparse": 0.0, "agree": 0.0, "tokens": 0}
  for start in range(0, count, batch):
    scores = evaluate.teacher_forced(setup.model, policy, tokens[start:start + batch],
                                     prompt_len=config.eval_prompt_len)
    n = scores["tokens"]
    totals["nll_dense"] += scores["nll_dense"] * n
    totals["nll_sparse"] += scores["nll_sparse"] * n
    totals["agree"] += scores["next_token_agreement"] * n
    totals["tokens"] += n
  n = totals["tokens"]
  result = {"nll_dense": totals["nll_dense"] / n, "nll_sparse": totals["nll_sparse"] / n,
            "next_token_agreement": totals["agree"] / n, "eval_tokens": n,
            "eval_rows": count}
  result["ppl_dense"] = math.exp(result["nll_dense"])
  result["ppl_sparse"] = math.exp(result["nll_sparse"])
  if routers is None:  # the same dense step twice: equal by construction
    result.update(ppl_sparse=result["ppl_dense"], nll_sparse=result["nll_dense"])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  common.write_json(path, result)
  return result


def run_point(config: ml_collections.ConfigDict, point: dict[str, Any]) -> dict[str, Any]:
  """Measures one (model, batch, context, density) point (module docstring).

  Args:
    config: the study config with the point's fields set.
    point: the sweep point (recorded by the launcher).

  Returns:
    The metrics of the module docstring.
  """
  del point
  if not 0 < config.density <= 1:
    raise ValueError(f"density={config.density} must lie in (0, 1]")
  setup = get_setup(config, config.model)
  routers = setup.routers_for(config, config.density)
  model = setup.model
  metrics: dict[str, Any] = {"params_m": setup.model_info["params_m"],
                             "model_val_loss": setup.model_info.get("val_loss"),
                             "decode_impl": str(model.config.decode_impl)}
  if routers is not None and setup.neurons is not None:
    setup.calibration_for(config, config.batch)
    routers = setup.routers[float(config.density)]
  policy = None if routers is None else routers.policy()

  cache = evaluate.filled_cache(model, config.batch, config.context, seed=config.seed)
  timing = dict(iters=config.timing_iters, repeats=config.timing_repeats, seed=config.seed)
  key = (config.batch, config.context)
  if key not in setup.dense_timings:
    setup.dense_timings[key], cache = evaluate.decode_step_time(model, None, cache, **timing)
  dense = setup.dense_timings[key]
  # At density 1.0 the dense step is timed again (the speed-up shows the noise).
  sparse, cache = evaluate.decode_step_time(model, policy, cache, **timing)
  metrics.update(tokens_per_s_dense=config.batch / dense.median_s,
                 tokens_per_s_sparse=config.batch / sparse.median_s,
                 speedup_e2e=dense.median_s / sparse.median_s, step_timing=dense.method,
                 **_timing_metrics("step_us_dense", dense),
                 **_timing_metrics("step_us_sparse", sparse))
  del cache

  metrics.update(speedup_attention=None, speedup_mlp=None, router_us=None,
                 head_router_recall=None,
                 mlp_union_recall=None, mlp_density=None, head_density_mean=1.0,
                 head_k=None)
  if routers is not None:
    metrics.update(attention_speedup(config, setup, routers))
    metrics.update(router_cost(config, setup, routers))
    recalls = [r for r in routers.meta["head_recall"] if r is not None]
    metrics["head_router_recall"] = float(np.mean(recalls)) if recalls else None
    routed = [d for r, d in zip(routers.head_routers, routers.head_densities) if r is not None]
    metrics["head_density_mean"] = float(np.mean(routed)) if routed else 1.0
    metrics["head_k"] = list(routers.head_k())
    if setup.neurons is not None:
      stats = setup.calibration[str(config.batch)]
      recalls = [r for r in setup.calibration["recall"] if r is not None]
      metrics.update(mlp_union_recall=stats["union_recall"], mlp_density=stats["density"],
                     neuron_k=stats["k"],
                     neuron_router_recall=float(np.mean(recalls)) if recalls else None)
      metrics.update(mlp_speedup(config, setup, routers))
  metrics.update(accuracy(config, setup, routers))
  return metrics
