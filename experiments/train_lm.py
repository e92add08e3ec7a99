"""Experiment kind "train_lm": a byte-level language model trained on the Python stdlib.

One point is one run, in one of two modes:

  train        trains `model` with `attention_impl` until `num_steps` (0: as many as fit in
               `time_budget_s`, estimated after `calibration_steps`) or the time budget,
               evaluating on the held-out files every `eval_every` steps, checkpointing every
               `checkpoint_every` steps (a re-run resumes from the latest checkpoint), then
               reports validation loss / perplexity, tokens/s and generation samples, and
               draws `loss_curve.png`.
  throughput   times `throughput_iters` training steps after a warm-up (flashjax.benchmarking
               .time_fn, rotating `throughput_input_sets` batches) and reports tokens/s,
               the compile time of the first step and its loss (`initial_loss`: same seed
               and batch for every implementation, so the rows must agree).

Config fields (configs/train_lm.py sets all of them):

  mode, attention_impl          the two above; attention_impl is a TransformerConfig value
                                ("xla", "pallas_triton", "jax_nn_cudnn", ...)
  model                         ConfigDict of TransformerConfig fields (vocab_size is the
                                byte tokenizer's); model.interpret None: Pallas backends in
                                interpret mode exactly on CPU
  seq_len, batch_size           rows of seq_len + 1 tokens (inputs and shifted targets)
  num_steps, time_budget_s, calibration_steps
  optimizer                     ConfigDict of training.OptimizerConfig fields
  eval_every, eval_rows, eval_batch_size, log_every, checkpoint_every, checkpoint_backend
  run_dir                       "" : <launcher --workdir>/<mode>_<attention_impl>
  checkpoint_dir                "" : <run_dir>/checkpoints
  corpus_max_bytes, val_fraction, data_seed, seed
  throughput_warmup, throughput_iters, throughput_input_sets
  sample_prompt, sample_tokens, sample_temperature, sample_top_k
  progress                      tqdm bar over training steps
  mesh                          None: one device; a mesh spec "data:2,model:2" (axes data /
                                fsdp / model, sizes multiplying to the device count):
                                parameters, optimizer state and batches sharded
                                (flashjax.distributed; batch_size divisible by data x fsdp)

Files in run_dir: history.jsonl (train loss / lr / grad norm every `log_every` steps and
val loss at every evaluation; entries past the restored step are dropped on resume),
loss_curve.png, checkpoints/.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from experiments import common
from flashjax import benchmarking
from flashjax.models import Transformer
from flashjax.models import TransformerConfig
from flashjax.models import checkpoint
from flashjax.models import data
from flashjax.models import generation
from flashjax.models import training

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

MODES = ("train", "throughput")
HISTORY_FILE = "history.jsonl"
PLOT_FILE = "loss_curve.png"


def model_config(config: ml_collections.ConfigDict) -> TransformerConfig:
  """The TransformerConfig of a point (byte vocabulary, attention_impl, interpret)."""
  fields = dict(config.model.to_dict())
  if fields.get("interpret") is None:
    fields["interpret"] = jax.default_backend() == "cpu"
  fields["interpret"] = bool(fields["interpret"])
  fields["vocab_size"] = data.VOCAB_SIZE
  fields["attention_impl"] = config.attention_impl
  if fields["max_len"] < config.seq_len:
    raise ValueError(f"model.max_len={fields['max_len']} < seq_len={config.seq_len}")
  return TransformerConfig(**fields)


def _check_available(attention_impl: Any) -> None:
  if attention_impl == "jax_nn_cudnn" and jax.default_backend() != "gpu":
    raise NotImplementedError(f"{attention_impl=} needs a GPU, backend is "
                              f"{jax.default_backend()!r}")


def _run_dir(config: ml_collections.ConfigDict) -> str:
  return common.under_workdir(config.run_dir, "run_dir",
                              f"{config.mode}_{config.attention_impl}")


def _sample(model: nnx.Module, config: ml_collections.ConfigDict, greedy: bool) -> str:
  prompt = np.concatenate([[data.BOS_ID], data.encode(config.sample_prompt)])[None]
  out = generation.generate(
      model, jnp.asarray(prompt, jnp.int32), max_new_tokens=config.sample_tokens,
      temperature=0.0 if greedy else config.sample_temperature,
      top_k=None if greedy else config.sample_top_k, stop_tokens=data.EOS_ID,
      rng=jax.random.key(config.seed))
  tokens = np.asarray(out.tokens[0, :int(out.lengths[0])])
  return config.sample_prompt + data.decode(tokens)


def _read_history(path: str, upto: int) -> list[dict[str, Any]]:
  """History entries with step <= upto (a torn last line is dropped)."""
  if not os.path.exists(path):
    return []
  entries = []
  with open(path) as f:
    for line in f:
      try:
        entry = json.loads(line)
      except json.JSONDecodeError:
        continue
      if entry["step"] <= upto:
        entries.append(entry)
  return entries


def _write_history(path: str, entries: list[dict[str, Any]]) -> None:
  with open(path + ".tmp", "w") as f:
    for entry in entries:
      f.write(json.dumps(entry) + "\n")
  os.replace(path + ".tmp", path)


def plot_history(entries: list[dict[str, Any]], path: str, title: str) -> None:
  """Train and validation loss against step, saved as a PNG."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  train = [(e["step"], e["loss"]) for e in entries if "loss" in e]
  val = [(e["step"], e["val_loss"]) for e in entries if "val_loss" in e]
  if train:
    ax.plot(*zip(*train), label="train", lw=1)
  if val:
    ax.plot(*zip(*val), "o-", label="validation", lw=1.5, ms=3)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / byte)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _optimizer_config(config: ml_collections.ConfigDict) -> training.OptimizerConfig:
  return training.OptimizerConfig(**config.optimizer.to_dict())


def _mesh(config: ml_collections.ConfigDict) -> Any:
  """The point's jax.sharding.Mesh, or None (config.mesh None or "")."""
  spec = config.get("mesh")
  if not spec:
    return None
  from flashjax import distributed  # pylint: disable=import-outside-toplevel
  return distributed.make_mesh(spec)


def _trainer(config: ml_collections.ConfigDict, mc: TransformerConfig) -> training.Trainer:
  return training.Trainer(Transformer(mc, rngs=nnx.Rngs(config.seed)),
                          _optimizer_config(config), mesh=_mesh(config))


def run_throughput(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Times training steps of one attention implementation (module docstring)."""
  mc = model_config(config)
  corpus = data.load_stdlib_corpus(config.seq_len + 1, val_fraction=config.val_fraction,
                                   max_bytes=config.corpus_max_bytes or None)
  trainer = _trainer(config, mc)
  arg_sets = [data.sample_rows(corpus.train, i, config.batch_size, config.data_seed)
              for i in range(config.throughput_input_sets)]
  arg_sets = [trainer.shard_batch(*batch) if trainer.mesh is not None
              else tuple(jnp.asarray(a) for a in batch) for batch in arg_sets]
  lr = config.optimizer.peak_lr
  start = time.perf_counter()
  # The first step compiles; its loss (same seed and batch for every implementation) is
  # the cross-implementation check of the run.
  initial_loss = float(trainer.train_step(*arg_sets[0], lr)["loss"])
  compile_s = time.perf_counter() - start
  timing = benchmarking.time_fn(lambda t, s: trainer.train_step(t, s, lr),
                                warmup=config.throughput_warmup,
                                iters=config.throughput_iters, arg_sets=arg_sets)
  final_loss = float(trainer.train_step(*arg_sets[0], lr)["loss"])
  tokens = config.batch_size * config.seq_len
  metrics = {"params_m": mc.num_params() / 1e6, "tokens_per_s": tokens / timing.median_s,
             **timing.summary(), "compile_s": compile_s, "initial_loss": initial_loss,
             "loss_after": final_loss,
             "finite": math.isfinite(initial_loss) and math.isfinite(final_loss),
             "mesh": config.get("mesh") or None, "devices": _devices(trainer)}
  metrics.update(_flops_metrics(mc, config.seq_len, tokens / timing.median_s))
  return metrics


def _devices(trainer: training.Trainer) -> int:
  return 1 if trainer.mesh is None else int(trainer.mesh.devices.size)


def _flops_metrics(mc: TransformerConfig, seq_len: int, tokens_per_s: float) -> dict[str, Any]:
  flops = training.train_flops_per_token(mc, seq_len) * tokens_per_s
  out = {"model_tflops": flops / 1e12}
  ceilings = benchmarking.device_ceilings(jax.devices()[0].device_kind, mc.compute_dtype)
  if ceilings and "flops_per_s" in ceilings:
    out["pct_of_peak"] = benchmarking.percent_of_ceiling(flops, ceilings["flops_per_s"])
  return out


def run_train(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Trains (or resumes) one model and reports its metrics (module docstring)."""
  start = time.perf_counter()
  mc = model_config(config)
  run_dir = _run_dir(config)
  os.makedirs(run_dir, exist_ok=True)
  corpus = data.load_stdlib_corpus(config.seq_len + 1, val_fraction=config.val_fraction,
                                   max_bytes=config.corpus_max_bytes or None)
  opt = _optimizer_config(config)
  trainer = _trainer(config, mc)
  ckpt = checkpoint.Checkpointer(config.checkpoint_dir or os.path.join(run_dir, "checkpoints"),
                                 backend=config.checkpoint_backend)
  meta: dict[str, Any] = {}
  resumed_from = ckpt.latest_step()
  if resumed_from is not None:
    state, meta = ckpt.restore(resumed_from, trainer.state())
    trainer.load_state(state)
  num_steps = int(meta.get("num_steps") or config.num_steps)
  spent_s = float(meta.get("train_time_s", 0.0))
  history_path = os.path.join(run_dir, HISTORY_FILE)
  history = _read_history(history_path, trainer.step)
  _write_history(history_path, history)
  val_rows = min(config.eval_rows, corpus.val.num_rows)
  val_tokens, val_segments = corpus.val.tokens[:val_rows], corpus.val.segment_ids[:val_rows]
  tokens_per_step = config.batch_size * config.seq_len

  def save(meta_update: dict[str, Any]) -> None:
    meta.update(meta_update)
    if ckpt.latest_step() != trainer.step:
      ckpt.save(trainer.step, trainer.state(), meta)

  def log(entry: dict[str, Any]) -> None:
    history.append(entry)
    with open(history_path, "a") as f:
      f.write(json.dumps(entry) + "\n")

  bar = tqdm.tqdm(total=num_steps or None, initial=trainer.step, unit="step",
                  desc=f"train_lm {config.attention_impl}", disable=not config.progress)
  loop_start = time.perf_counter()
  excluded_s = 0.0  # evaluation and checkpoint time, kept out of tokens/s
  compile_s = None
  timed_steps, timed_since = 0, None
  stopped_by = "num_steps"
  metrics = None
  while num_steps == 0 or trainer.step < num_steps:
    elapsed = spent_s + time.perf_counter() - loop_start
    if elapsed >= config.time_budget_s:
      stopped_by = "time_budget"
      break
    step = trainer.step
    tokens, segments = data.sample_rows(corpus.train, step, config.batch_size,
                                        config.data_seed)
    lr = training.lr_schedule(step, num_steps or 10**9, opt)
    metrics = trainer.train_step(tokens, segments, lr)
    if compile_s is None:
      jax.block_until_ready(metrics)
      compile_s = time.perf_counter() - loop_start
      timed_since, excluded_s = time.perf_counter(), 0.0
    else:
      timed_steps += 1
    bar.update()
    if num_steps == 0 and timed_steps == config.calibration_steps:
      jax.block_until_ready(metrics)
      per_step = (time.perf_counter() - timed_since) / timed_steps
      remaining = config.time_budget_s - (spent_s + time.perf_counter() - loop_start)
      num_steps = trainer.step + max(1, int(0.9 * remaining / per_step))
      bar.total = num_steps
      bar.refresh()
    if trainer.step % config.log_every == 0 or trainer.step == num_steps:
      entry = {"step": trainer.step, "lr": lr, **{k: float(v) for k, v in metrics.items()}}
      if timed_steps:
        entry["tokens_per_s"] = timed_steps * tokens_per_step / (
            time.perf_counter() - timed_since - excluded_s)
      log(entry)
      bar.set_postfix(loss=f"{entry['loss']:.3f}")
    if trainer.step % config.eval_every == 0:
      t = time.perf_counter()
      log({"step": trainer.step,
           "val_loss": trainer.evaluate(val_tokens, val_segments, config.eval_batch_size)})
      excluded_s += time.perf_counter() - t
    if trainer.step % config.checkpoint_every == 0:
      t = time.perf_counter()
      save({"num_steps": num_steps, "train_time_s": spent_s + t - loop_start})
      excluded_s += time.perf_counter() - t
  bar.close()
  if metrics is not None:
    jax.block_until_ready(metrics)
  train_time_s = spent_s + time.perf_counter() - loop_start
  tokens_per_s = None
  if timed_steps:
    tokens_per_s = timed_steps * tokens_per_step / (
        time.perf_counter() - timed_since - excluded_s)
  save({"num_steps": num_steps, "train_time_s": train_time_s})
  ckpt.close()

  last = history[-1] if history else {}
  if last.get("step") == trainer.step and "val_loss" in last:
    val_loss = last["val_loss"]
  else:
    val_loss = trainer.evaluate(val_tokens, val_segments, config.eval_batch_size)
    log({"step": trainer.step, "val_loss": val_loss})
  title = (f"{mc.variant} {mc.num_params() / 1e6:.1f}M params, {config.attention_impl}, "
           f"T={config.seq_len}, B={config.batch_size}")
  plot_history(history, os.path.join(run_dir, PLOT_FILE), title)
  model = trainer.model()
  result = {
      "params_m": mc.num_params() / 1e6, "steps": trainer.step, "num_steps": num_steps,
      "stopped_by": stopped_by, "resumed_from": resumed_from,
      "train_loss": next((e["loss"] for e in reversed(history) if "loss" in e), None),
      "val_loss": val_loss, "val_ppl": math.exp(val_loss),
      "val_bits_per_byte": val_loss / math.log(2), "eval_rows": val_rows,
      "tokens_per_s": tokens_per_s, "compile_s": compile_s, "train_time_s": train_time_s,
      "tokens_seen": trainer.step * tokens_per_step, "run_dir": run_dir,
      "checkpoint_backend": ckpt.backend, "mesh": config.get("mesh") or None,
      "devices": _devices(trainer),
      "sample_greedy": _sample(model, config, greedy=True),
      "sample": _sample(model, config, greedy=False),
      "wall_s": time.perf_counter() - start, **corpus.summary(),
  }
  if tokens_per_s:
    result.update(_flops_metrics(mc, config.seq_len, tokens_per_s))
  return result


def run_point(config: ml_collections.ConfigDict, point: dict[str, Any]) -> dict[str, Any]:
  """Runs one point: `config.mode` "train" or "throughput" (module docstring)."""
  del point  # the config already holds the point's fields
  if config.mode not in MODES:
    raise ValueError(f"mode={config.mode!r} must be one of {MODES}")
  _check_available(config.attention_impl)
  if config.mode == "throughput":
    return run_throughput(config)
  return run_train(config)
