"""Experiment kind "hat_search": hardware-aware Transformer search (HAT) end to end.

The sweep is one axis, `stage`, in pipeline order; each stage writes its outputs under
<setup_dir>/<stage>/ and is skipped when its `done.json` exists, so a re-run (the launcher
skips finished points; a failed stage is retried) redoes nothing that finished:

  supernet   trains the SuperTransformer (flashjax.search.supernet) on the stdlib corpus, one
             uniformly sampled SubTransformer per step, checkpointed every
             `checkpoint_every` steps (flashjax.models.checkpoint), resumed from the latest
  latency    measures `latency_samples` sampled SubTransformers (weight-shared) on this
             device through the model's kernels: prefill of `prefill_tokens` tokens and
             `decode_tokens` cached decode steps at batch `latency_batch`
             (flashjax.search.latency; JSONL, resumable per sample); it does not need the
             supernet trained (latency does not depend on the weights)
  predictor  per target (prefill_ms, decode_ms): the MLP predictor on normalised
             architecture features (AdamW with `predictor_weight_decay`) and the linear
             baseline on FLOP / byte / layer counts,
             trained on a random split and scored (RMSE, MAPE, R^2) on the held-out part
  search     per latency budget (`budget_quantiles` of the measured `latency_target`
             values): evolutionary search, constraint predicted latency <= budget, fitness the
             validation loss of the weight-shared SubTransformer (memoised in
             fitness.jsonl); search_<i>.json per budget, the Pareto front of every evaluated
             architecture (predicted latency vs loss), pareto.png, trajectory.png
  retrain    every budget's winner and the hand-designed `baseline` (the same family),
             trained from scratch for `retrain_steps`, then their true latency (the same
             protocol) at `latency_batch` and their decode tokens/s at each
             `retrain_decode_batches` batch, parameters and validation loss; one JSON file
             per architecture
  kernel     block-size choice for Pallas attention: latencies of the `kernel`
             configurations over random problems (shape, density of a random mask of
             `mask_block` tiles, the same mask and inputs for every configuration of a
             problem), measured (`kernel.source="measured"`, `rounds` timing rounds over a
             problem's configurations) or synthetic (`"synthetic"`, the CPU variant), the
             predictor trained on the training problems and its picks scored on held-out ones,
             beside the baselines of one ranking of the configurations for every problem
             (the training problems' best on average, kernel_choice.fit_ranking) and of one
             ranking per head dim (kernel_choice.head_dim_ranking_picker), and the
             noise floor (`kernel_round_agreement`: how often the first round's fastest is
             within tolerance of the second round's)

`hat_report.md` in `report_dir` (default: the launcher's workdir) is rewritten after every
stage from what exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import ml_collections
import numpy as np
from flax import nnx

from experiments import common
from flashjax.models import TransformerConfig
from flashjax.models import checkpoint
from flashjax.models import data
from flashjax.models import training
from flashjax.search import evolution
from flashjax.search import kernel_choice as kc
from flashjax.search import latency
from flashjax.search import predictor as predictor_lib
from flashjax.search import supernet as supernet_lib
from flashjax.search.space import Arch
from flashjax.search.space import SearchSpace

STAGES = ("supernet", "latency", "predictor", "search", "retrain", "kernel")
DONE_FILE = "done.json"
REPORT_FILE = "hat_report.md"
TARGETS = ("prefill_ms", "decode_ms")

# Per process: {setup dir: SuperTrainer} and {(row_len, max_bytes, val_fraction): Corpus}.
_TRAINERS: dict[str, supernet_lib.SuperTrainer] = {}
_CORPORA: dict[tuple[Any, ...], data.Corpus] = {}


def check_point(config: ml_collections.ConfigDict) -> None:
  """Refuses a config the stages cannot run, naming the field (checked before any stage)."""
  for name in ("compile_workers", "latency_samples", "super_steps", "retrain_steps"):
    value = config.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{name}={value!r} must be an int >= 1")
  batches = config.get("retrain_decode_batches")
  if (not isinstance(batches, (tuple, list)) or
      not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batches)):
    raise ValueError(f"config.retrain_decode_batches={batches!r} must be a tuple of ints >= 1")
  decay = config.get("predictor_weight_decay")
  if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay >= 0:
    raise ValueError(f"config.predictor_weight_decay={decay!r} must be a number >= 0")
  if config.search_predictor not in ("mlp", "linear", "best"):
    raise ValueError(f"config.search_predictor={config.search_predictor!r} must be 'mlp', "
                     "'linear' or 'best'")
  k = config.kernel
  for name, least in (("rounds", 1), ("warmup", 1), ("repeats", 1), ("loop_calls", 0)):
    value = k.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise ValueError(f"config.kernel.{name}={value!r} must be an int >= {least}")
  blocks = tuple(k.block_qs) + tuple(k.block_kvs)
  if (not isinstance(k.mask_block, int) or k.mask_block < 1 or
      any(k.mask_block % b for b in blocks)):
    raise ValueError(f"config.kernel.mask_block={k.mask_block!r} must be a multiple of every "
                     f"block_qs / block_kvs {blocks} (each configuration then visits the "
                     "problem's density)")


def setup_dir(config: ml_collections.ConfigDict) -> str:
  """config.setup_dir, else <launcher --workdir>/stages."""
  return common.under_workdir(config.setup_dir, "setup_dir", "stages")


_write_json = common.write_json
_read_json = common.read_json
_interpret = common.interpret


def space(config: ml_collections.ConfigDict) -> SearchSpace:
  s = config.space
  return SearchSpace(tuple(s.embed_dims), tuple(s.layer_counts), tuple(s.ffn_dims),
                     tuple(s.head_counts), s.head_dim)


def base_config(config: ml_collections.ConfigDict) -> TransformerConfig:
  """Variant, vocabulary, max_len, dtypes and implementations of every SubTransformer."""
  m = config.model
  return TransformerConfig(variant=m.variant, vocab_size=data.VOCAB_SIZE, max_len=m.max_len,
                           dtype=m.dtype, param_dtype=m.param_dtype,
                           attention_impl=config.attention_impl,
                           decode_impl=config.decode_impl, interpret=_interpret(config))


def baseline_arch(config: ml_collections.ConfigDict) -> Arch:
  b = config.baseline
  return space(config).check(Arch(b.embed_dim, (b.ffn_dim,) * b.num_layers,
                                  (b.num_heads,) * b.num_layers))


def _optimizer(config: ml_collections.ConfigDict) -> training.OptimizerConfig:
  return training.OptimizerConfig(**config.optimizer.to_dict())


def _corpus(config: ml_collections.ConfigDict) -> data.Corpus:
  key = (config.seq_len + 1, config.corpus_max_bytes, config.val_fraction)
  if key not in _CORPORA:
    _CORPORA[key] = data.load_stdlib_corpus(config.seq_len + 1,
                                            val_fraction=config.val_fraction,
                                            max_bytes=config.corpus_max_bytes or None)
  return _CORPORA[key]


def _val_rows(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  val = _corpus(config).val
  rows = min(config.eval_rows, val.num_rows)
  return val.tokens[:rows], val.segment_ids[:rows]


def _stage_dir(config: ml_collections.ConfigDict, stage: str) -> str:
  path = os.path.join(setup_dir(config), stage)
  os.makedirs(path, exist_ok=True)
  return path


def _done(config: ml_collections.ConfigDict, stage: str) -> dict[str, Any] | None:
  path = os.path.join(setup_dir(config), stage, DONE_FILE)
  return _read_json(path) if os.path.exists(path) else None


def _require(config: ml_collections.ConfigDict, stage: str) -> dict[str, Any]:
  done = _done(config, stage)
  if done is None:
    raise ValueError(f"stage {stage!r} has not finished (no {stage}/{DONE_FILE} under "
                     f"{setup_dir(config)}); run the sweep in order")
  return done


def trainer(config: ml_collections.ConfigDict) -> supernet_lib.SuperTrainer:
  """The SuperTrainer of this setup, restored from the supernet stage's latest checkpoint."""
  root = setup_dir(config)
  if root not in _TRAINERS:
    model = supernet_lib.SuperTransformer(space(config), base_config(config),
                                          rngs=nnx.Rngs(config.seed))
    t = supernet_lib.SuperTrainer(model, _optimizer(config))
    ckpt = checkpoint.Checkpointer(os.path.join(root, "supernet", "checkpoint"),
                                   max_to_keep=1)
    step = ckpt.latest_step()
    if step is not None:
      state, _ = ckpt.restore(step, t.state())
      t.load_state(state)
    ckpt.close()
    _TRAINERS[root] = t
  return _TRAINERS[root]


def _precompile(config: ml_collections.ConfigDict, t: supernet_lib.SuperTrainer, *,
                train: bool) -> float:
  """With compile_workers > 1, compiles every bucket's evaluation step (and train step) in
  threads before the stage uses them; returns the wall seconds (0 when skipped)."""
  if config.compile_workers == 1:
    return 0.0  # each shape compiles on first use
  start = time.perf_counter()
  t.precompile(config.seq_len + 1, batch_size=config.batch_size if train else None,
               eval_batch_size=config.eval_batch_size, workers=config.compile_workers)
  return round(time.perf_counter() - start, 2)


def stage_supernet(config: ml_collections.ConfigDict) -> dict[str, Any]:
  directory = _stage_dir(config, "supernet")
  t = trainer(config)
  start = time.perf_counter()
  precompile_s = _precompile(config, t, train=t.step < config.super_steps)
  ckpt = checkpoint.Checkpointer(os.path.join(directory, "checkpoint"), max_to_keep=1)
  first = t.step

  def log(step, arch, metrics):
    if step % max(1, config.super_steps // 10) == 0:
      logging.info("hat_search supernet step %d %s loss %.3f", step, arch.name(),
                   metrics["loss"])

  try:
    history = supernet_lib.train_supernet(
        t, _corpus(config).train, num_steps=config.super_steps,
        batch_size=config.batch_size, optimizer=_optimizer(config), seed=config.seed,
        checkpointer=ckpt, checkpoint_every=config.checkpoint_every, log=log)
  except BaseException:
    _TRAINERS.pop(setup_dir(config), None)  # a retry restarts from the latest checkpoint
    raise
  finally:
    ckpt.close()
  with open(os.path.join(directory, "history.jsonl"), "a") as f:
    for row in history:
      f.write(json.dumps(row) + "\n")
  tokens, segments = _val_rows(config)
  s = space(config)
  done = {"steps": t.step, "resumed_from_step": first,
          "train_s": round(time.perf_counter() - start, 2), "precompile_s": precompile_s,
          "compiled_shapes": len(t.shapes), "space_size": s.size(),
          "val_loss_largest": t.evaluate(s.largest, tokens, segments, config.eval_batch_size),
          "val_loss_smallest": t.evaluate(s.smallest, tokens, segments,
                                          config.eval_batch_size),
          "super_params_m": supernet_lib.super_config(s, base_config(config)).num_params() / 1e6}
  _write_json(os.path.join(directory, DONE_FILE), done)
  return done


def stage_latency(config: ml_collections.ConfigDict) -> dict[str, Any]:
  directory = _stage_dir(config, "latency")
  # No supernet requirement: latency does not depend on the weights, so this stage runs
  # on whatever the supernet holds (its latest checkpoint, else the initial weights), e.g.
  # in a device session of its own before the supernet is trained.
  t = trainer(config)
  start = time.perf_counter()
  rows = latency.collect_dataset(
      os.path.join(directory, "latency.jsonl"), space(config), t.sub_model,
      num_samples=config.latency_samples, batch=config.latency_batch,
      prefill_tokens=config.prefill_tokens, decode_tokens=config.decode_tokens,
      vocab_size=data.VOCAB_SIZE, warmup=config.warmup, repeats=config.repeats,
      trim=config.trim, seed=config.seed, compile_workers=config.compile_workers,
      progress=lambda i, row: logging.info("hat_search latency %d %s prefill %.3f ms decode "
                                           "%.3f ms", i, row["name"], row["prefill_ms"],
                                           row["decode_ms"]))
  done = {"samples": len(rows), "collect_s": round(time.perf_counter() - start, 2),
          "device_kind": rows[-1]["device_kind"],
          **{f"{k}_min": float(min(r[k] for r in rows)) for k in TARGETS},
          **{f"{k}_max": float(max(r[k] for r in rows)) for k in TARGETS}}
  _write_json(os.path.join(directory, DONE_FILE), done)
  return done


def _dataset(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  _require(config, "latency")
  return latency.read_jsonl(os.path.join(setup_dir(config), "latency", "latency.jsonl"))


def _cost_columns(row: dict[str, Any], target: str) -> list[float]:
  task = target.split("_")[0]
  cost = row["cost"]
  return [cost[f"{task}_flops"], cost[f"{task}_bytes"], cost["num_layers"]]


def stage_predictor(config: ml_collections.ConfigDict) -> dict[str, Any]:
  directory = _stage_dir(config, "predictor")
  done = fit_predictors(config, _dataset(config), directory)
  _write_json(os.path.join(directory, DONE_FILE), done)
  return done


def mlp_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The latency MLP's predictor.fit_mlp keyword arguments from the config."""
  return {"hidden": tuple(config.predictor_hidden), "steps": config.predictor_steps,
          "lr": config.predictor_lr, "weight_decay": config.predictor_weight_decay,
          "seed": config.seed}


def fit_predictors(config: ml_collections.ConfigDict, rows: list[dict[str, Any]],
                   directory: str) -> dict[str, Any]:
  """Fits the MLP and the linear cost baseline per target on a random split of latency
  rows, saves the MLPs under `directory` and returns the held-out metrics (usable on a
  partial dataset: `latency.read_jsonl` of an unfinished collection)."""
  train, test = predictor_lib.split_indices(len(rows), config.test_fraction, config.seed)
  x = np.asarray([r["features"] for r in rows], np.float32)
  done: dict[str, Any] = {"train_samples": len(train), "test_samples": len(test)}
  for target in TARGETS:
    y = np.asarray([r[target] for r in rows])
    mlp = predictor_lib.fit_mlp(x[train], y[train], **mlp_settings(config))
    mlp.save(os.path.join(directory, f"mlp_{target}.json"))
    cost = np.asarray([_cost_columns(r, target) for r in rows])
    linear = predictor_lib.fit_linear(cost[train], y[train])
    linear.save(os.path.join(directory, f"linear_{target}.json"))
    for name, pred in (("mlp", mlp.predict(x[test])), ("linear", linear.predict(cost[test]))):
      for metric, value in predictor_lib.metrics(y[test], pred).items():
        done[f"{target}_{name}_{metric}"] = value
    choice = config.search_predictor
    if choice == "best":  # the lower held-out MAPE; the MLP on a tie
      choice = ("mlp" if done[f"{target}_mlp_mape"] <= done[f"{target}_linear_mape"]
                else "linear")
    done[f"{target}_search_predictor"] = choice
  return done


def _predictor(config: ml_collections.ConfigDict) -> Callable[[Arch], float]:
  """arch -> predicted `latency_target` (ms) from the predictor the predictor stage chose
  (`search_predictor`): the MLP on HAT's features or the linear model on cost counts."""
  done = _require(config, "predictor")
  target = config.latency_target
  choice = done[f"{target}_search_predictor"]
  path = os.path.join(setup_dir(config), "predictor", f"{choice}_{target}.json")
  s = space(config)
  if choice == "mlp":
    mlp = predictor_lib.MLPPredictor.load(path)
    return lambda arch: float(mlp.predict(s.features(arch)))
  linear = predictor_lib.LinearPredictor.load(path)
  return lambda arch: float(linear.predict(np.asarray(_cost_columns(
      {"cost": _arch_cost(config, arch)}, target))))


def _arch_cost(config: ml_collections.ConfigDict, arch: Arch) -> dict[str, float]:
  return latency.arch_cost(arch, space(config), vocab_size=data.VOCAB_SIZE,
                           batch=config.latency_batch, prefill_tokens=config.prefill_tokens,
                           decode_tokens=config.decode_tokens)


def budgets(config: ml_collections.ConfigDict) -> list[float]:
  """Latency budgets (ms): `budget_quantiles` of the measured `latency_target` values."""
  if config.latency_target not in TARGETS:
    raise ValueError(f"latency_target={config.latency_target!r} must be one of {TARGETS}")
  values = [r[config.latency_target] for r in _dataset(config)]
  return [float(np.quantile(values, q)) for q in config.budget_quantiles]


def stage_search(config: ml_collections.ConfigDict) -> dict[str, Any]:
  directory = _stage_dir(config, "search")
  s = space(config)
  _require(config, "supernet")
  t = trainer(config)
  pred = _predictor(config)
  tokens, segments = _val_rows(config)
  _precompile(config, t, train=False)
  fitness_path = os.path.join(directory, "fitness.jsonl")
  known = {tuple(r["genes"]): r["val_loss"] for r in latency.read_jsonl(fitness_path)}

  def fitness(genes):
    return t.evaluate(s.decode(genes), tokens, segments, config.eval_batch_size)

  def record(genes, value):
    known[genes] = value
    latency.append_jsonl(fitness_path, {"genes": list(genes), "name": s.decode(genes).name(),
                                        "val_loss": value})

  predicted: dict[tuple[int, ...], float] = {}

  def predicted_ms(genes):
    if genes not in predicted:
      predicted[genes] = pred(s.decode(genes))
    return predicted[genes]

  done: dict[str, Any] = {"budgets_ms": budgets(config)}
  start = time.perf_counter()
  for index, budget in enumerate(done["budgets_ms"]):
    path = os.path.join(directory, f"search_{index}.json")
    if os.path.exists(path):
      continue
    result = evolution.evolve(
        s.gene_choices, fitness, lambda g, b=budget: predicted_ms(g) <= b,
        population=config.population, parents=config.parents, mutations=config.mutations,
        crossovers=config.crossovers, mutate_prob=config.mutate_prob,
        generations=config.generations, seed=config.seed + index, known=known,
        on_evaluate=record)
    arch = s.decode(result.best_genes)
    _write_json(path, {"budget_ms": budget, "arch": arch.to_dict(), "name": arch.name(),
                       "val_loss": result.best_fitness,
                       "predicted_ms": predicted_ms(result.best_genes),
                       "history": result.history})
  results = [_read_json(os.path.join(directory, f"search_{i}.json"))
             for i in range(len(done["budgets_ms"]))]
  points = [(predicted_ms(g), v, s.decode(g).name()) for g, v in known.items()]
  front = evolution.pareto_front(points)
  _write_json(os.path.join(directory, "pareto.json"),
              {"all": points, "front": front, "target": config.latency_target})
  _plot_search(directory, points, front, results, config.latency_target)
  for i, r in enumerate(results):
    done[f"budget{i}_ms"] = r["budget_ms"]
    done[f"budget{i}_val_loss"] = r["val_loss"]
    done[f"budget{i}_predicted_ms"] = r["predicted_ms"]
    done[f"budget{i}_arch"] = r["name"]
  done.update(evaluated=len(known), pareto_points=len(front),
              search_s=round(time.perf_counter() - start, 2))
  _write_json(os.path.join(directory, DONE_FILE), done)
  return done


def _plot_search(directory: str, points: list[Any], front: list[Any], results: list[Any],
                 target: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.scatter([p[0] for p in points], [p[1] for p in points], s=10, c="0.7",
             label="evaluated SubTransformers")
  ax.plot([p[0] for p in front], [p[1] for p in front], "o-", c="C0", label="Pareto front")
  for i, r in enumerate(results):
    ax.axvline(r["budget_ms"], ls=":", c=f"C{i + 1}", label=f"budget {r['budget_ms']:.3g} ms")
  ax.set_xlabel(f"predicted {target} (ms)")
  ax.set_ylabel("validation loss (weight-shared, nats/byte)")
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
  fig.savefig(os.path.join(directory, "pareto.png"), bbox_inches="tight", dpi=100)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, r in enumerate(results):
    ax.plot([h["generation"] for h in r["history"]], [h["best_fitness"] for h in r["history"]],
            "o-", c=f"C{i + 1}", label=f"budget {r['budget_ms']:.3g} ms")
  ax.set_xlabel("generation")
  ax.set_ylabel("best validation loss")
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
  fig.savefig(os.path.join(directory, "trajectory.png"), bbox_inches="tight", dpi=100)
  plt.close(fig)


def _retrain_one(config: ml_collections.ConfigDict, arch: Arch) -> dict[str, Any]:
  s = space(config)
  model = supernet_lib.build_sub_transformer(base_config(config), arch, s.head_dim,
                                             rngs=nnx.Rngs(config.seed))
  opt = _optimizer(config)
  t = training.Trainer(model, opt)
  corpus = _corpus(config)
  start = time.perf_counter()
  for step in range(config.retrain_steps):
    tokens, segments = data.sample_rows(corpus.train, step, config.batch_size, config.seed)
    t.train_step(tokens, segments, training.lr_schedule(step, config.retrain_steps, opt))
  train_s = time.perf_counter() - start
  tokens, segments = _val_rows(config)
  val_loss = t.evaluate(tokens, segments, config.eval_batch_size)
  # The search's batch first, then every `retrain_decode_batches` batch (decode tokens/s).
  batches = [config.latency_batch] + [b for b in config.retrain_decode_batches
                                      if b != config.latency_batch]
  timings = latency.subnet_latencies(
      t.model(), arch, s.head_dim, batches=batches, prefill_tokens=config.prefill_tokens,
      decode_tokens=config.decode_tokens, warmup=config.warmup, repeats=config.repeats,
      trim=config.trim, compile_workers=config.compile_workers)
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(t.params))
  row = {"arch": arch.to_dict(), "name": arch.name(), "val_loss": val_loss,
         "params_m": params / 1e6, "prefill_ms": timings[batches[0]]["prefill"]["mean_ms"],
         "decode_ms": timings[batches[0]]["decode"]["mean_ms"], "train_s": round(train_s, 2),
         **latency.device_info()}
  for batch in config.retrain_decode_batches:
    decode_ms = timings[batch]["decode"]["mean_ms"]
    row[f"decode_ms_b{batch}"] = decode_ms
    row[f"decode_tok_s_b{batch}"] = batch * config.decode_tokens / (decode_ms / 1e3)
  return row


def stage_retrain(config: ml_collections.ConfigDict) -> dict[str, Any]:
  directory = _stage_dir(config, "retrain")
  search = _require(config, "search")
  candidates = {"baseline": baseline_arch(config)}
  for i in range(len(search["budgets_ms"])):
    result = _read_json(os.path.join(setup_dir(config), "search", f"search_{i}.json"))
    candidates[f"budget{i}"] = Arch.from_dict(result["arch"])
  pred = _predictor(config)
  done: dict[str, Any] = {}
  for name, arch in candidates.items():
    path = os.path.join(directory, f"{name}.json")
    if not os.path.exists(path):
      row = _retrain_one(config, arch)
      row["predicted_ms"] = pred(arch)
      _write_json(path, row)
    row = _read_json(path)
    for key in ("val_loss", "params_m", "prefill_ms", "decode_ms", "predicted_ms"):
      done[f"{name}_{key}"] = row[key]
    done[f"{name}_arch"] = row["name"]
    for batch in config.retrain_decode_batches:
      done[f"{name}_decode_tok_s_b{batch}"] = row[f"decode_tok_s_b{batch}"]
  base = done[f"baseline_{config.latency_target}"]
  for name in candidates:
    if name != "baseline":
      done[f"{name}_speedup"] = base / done[f"{name}_{config.latency_target}"]
      done[f"{name}_loss_delta"] = done[f"{name}_val_loss"] - done["baseline_val_loss"]
      for batch in config.retrain_decode_batches:
        key = f"decode_tok_s_b{batch}"
        done[f"{name}_speedup_b{batch}"] = done[f"{name}_{key}"] / done[f"baseline_{key}"]
  _write_json(os.path.join(directory, DONE_FILE), done)
  return done


def _kernel_problems(config: ml_collections.ConfigDict) -> list[tuple[kc.AttentionShape, float]]:
  rng = np.random.default_rng([config.seed, 13])
  k = config.kernel
  problems = []
  for _ in range(k.problems):
    length = int(rng.choice(k.lengths))
    shape = kc.AttentionShape(int(rng.choice(k.batches)), length, length,
                              int(rng.choice(k.heads)), int(rng.choice(k.head_dims)))
    problems.append((shape, float(np.round(rng.uniform(k.min_density, 1.0), 2))))
  return problems


def _measure_problem(config: ml_collections.ConfigDict, index: int,
                     configs: list[kc.KernelCandidate]) -> list[dict[str, Any]]:
  """One problem's rows: every configuration compiled (in threads) on the same mask and
  inputs, then timed in `kernel.rounds` rounds over all of them (alternate rounds in
  reverse order), so slow drift of the device hits every configuration alike; a run makes
  `kernel.loop_calls` + 1 calls (kernel_choice.compile_kernel), a round's time is the
  trimmed mean of `kernel.repeats` runs a call, and a row's latency the mean of its rounds."""
  k = config.kernel
  shape, density = _kernel_problems(config)[index]
  problem = kc.make_problem(shape, density, mask_block=k.mask_block, dtype=k.dtype,
                            seed=index)

  def compiled(cfg):
    try:
      return kc.compile_kernel(problem, cfg, implementation=k.implementation,
                               interpret=_interpret(config), loop_calls=k.loop_calls)
    except Exception as e:  # a configuration the backend refuses (e.g. shared memory)
      logging.warning("kernel config %s on %s failed: %s", cfg, shape, e)
      return None

  kernels = dict(latency.compiled_in_groups(configs, compiled, config.compile_workers))
  rounds: dict[kc.KernelCandidate, list[float]] = {c: [] for c in configs if kernels[c]}
  for r in range(k.rounds):
    for cfg in (configs if r % 2 == 0 else configs[::-1]):
      if cfg not in rounds:
        continue
      try:
        run = latency.measure(kernels[cfg].fn, *kernels[cfg].args, warmup=k.warmup,
                              repeats=k.repeats)
        rounds[cfg].append(run["mean_ms"] / kernels[cfg].calls)
      except Exception as e:  # a failure at run time
        logging.warning("kernel config %s on %s failed to run: %s", cfg, shape, e)
        del rounds[cfg]
  rows = []
  for cfg in configs:
    kernel, times = kernels[cfg], rounds.get(cfg)
    rows.append({"problem": index, "shape": dataclasses.asdict(shape), "density": density,
                 "config": dataclasses.asdict(cfg),
                 "latency_ms": float(np.mean(times)) if times else None,
                 "round_ms": times, "compile_s": round(kernel.compile_s, 3) if kernel else None,
                 "lower_s": round(kernel.lower_s, 3) if kernel else None})
  return rows


def _round_agreement(rows: list[dict[str, Any]], tolerance: float) -> float | None:
  """The noise floor of the pick target: the fraction of problems whose fastest
  configuration in the first timing round is within `tolerance` of the fastest in the
  second (None with fewer than two rounds)."""
  by_problem: dict[int, list[list[float]]] = {}
  for r in rows:
    if r["latency_ms"] is not None and len(r["round_ms"] or ()) > 1:
      by_problem.setdefault(r["problem"], []).append(r["round_ms"][:2])
  if not by_problem:
    return None
  agree = [second[int(np.argmin(first))] <= (1 + tolerance) * min(second)
           for first, second in (zip(*times) for times in by_problem.values())]
  return float(np.mean(agree))


def stage_kernel(config: ml_collections.ConfigDict) -> dict[str, Any]:
  directory = _stage_dir(config, "kernel")
  k = config.kernel
  if k.source not in ("synthetic", "measured"):
    raise ValueError(f"kernel.source={k.source!r} must be 'synthetic' or 'measured'")
  configs = [kc.KernelCandidate(bq, bk, st, ps) for bq in k.block_qs for bk in k.block_kvs
             for st in k.stages for ps in k.persistent]
  path = os.path.join(directory, "kernel.jsonl")
  rows = latency.read_jsonl(path)
  protocol = {"source": k.source, "mask_block": k.mask_block, "rounds": k.rounds}
  if k.source == "measured":
    info = latency.device_info()
    protocol.update(backend=info["backend"], device_kind=info["device_kind"])
  latency.check_resume(path, rows, protocol)
  problems = _kernel_problems(config)
  start = time.perf_counter()
  finished = {r["problem"] for r in rows}
  # A problem's rows are appended together once all its rounds are timed, so a killed
  # stage loses at most the problem it was timing.
  for index, (shape, density) in enumerate(problems):
    if index in finished:
      continue
    if k.source == "synthetic":
      new = [{"problem": index, "shape": dataclasses.asdict(shape), "density": density,
              "config": dataclasses.asdict(cfg),
              "latency_ms": kc.synthetic_latency(shape, density, cfg), "round_ms": None}
             for cfg in configs]
    else:
      new = _measure_problem(config, index, configs)
    for row in new:
      row = {**row, "mask_block": k.mask_block, "rounds": k.rounds, "source": k.source,
             **latency.device_info()}
      latency.append_jsonl(path, row)
      rows.append(row)
  samples = kc.samples_from_kernel_rows(rows)
  held = {(s, d) for s, d in problems[:max(1, round(k.test_fraction * len(problems)))]}
  train = [r for r in samples if (r.shape, r.density) not in held]
  test = [r for r in samples if (r.shape, r.density) in held]
  pred = kc.fit_kernel_predictor(train, hidden=tuple(k.hidden), steps=k.steps, lr=k.lr,
                                 weight_decay=k.weight_decay, seed=config.seed)
  result = kc.evaluate_choices(pred, test, k.tolerance)
  # The baselines: the training problems' single best order of configurations, and one
  # order per head dim.
  ranking = kc.fit_ranking(train)
  fixed = kc.evaluate_picks(kc.ranking_picker(ranking), test, k.tolerance)
  by_head_dim = kc.evaluate_picks(kc.head_dim_ranking_picker(train), test, k.tolerance)
  _write_json(os.path.join(directory, "choices.json"), {
      **result, "ranking": {**fixed, "order": [dataclasses.asdict(c) for c in ranking]},
      "head_dim_ranking": by_head_dim})
  done = {"kernel_source": k.source, "kernel_samples": len(samples),
          "kernel_problems": len(problems), "kernel_test_problems": result["problems"],
          "kernel_pick_within_tolerance": result["within_tolerance"],
          "kernel_mean_slowdown": result["mean_slowdown"],
          "kernel_ranking_within_tolerance": fixed["within_tolerance"],
          "kernel_ranking_mean_slowdown": fixed["mean_slowdown"],
          "kernel_head_dim_ranking_within_tolerance": by_head_dim["within_tolerance"],
          "kernel_head_dim_ranking_mean_slowdown": by_head_dim["mean_slowdown"],
          # every problem held out in turn (the 25 % split above is few problems)
          **{f"kernel_{method}_lopo_within_tolerance": kc.leave_one_problem_out(
              samples, k.tolerance, method=method)["within_tolerance"]
             for method in ("ranking", "head_dim_ranking")},
          "kernel_round_agreement": _round_agreement(rows, k.tolerance),
          "kernel_s": round(time.perf_counter() - start, 2)}
  _write_json(os.path.join(directory, DONE_FILE), done)
  return done


_STAGE_FNS = {"supernet": stage_supernet, "latency": stage_latency,
              "predictor": stage_predictor, "search": stage_search,
              "retrain": stage_retrain, "kernel": stage_kernel}


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def write_report(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes hat_report.md (in `workdir`) from the stage outputs that exist; returns its path."""
  root = setup_dir(config)
  lines = ["# HAT search report", "",
           f"Device: {latency.device_info()['device_kind']} ({jax.default_backend()}); "
           f"search target `{config.latency_target}`; setup `{root}`.", ""]
  supernet = _done(config, "supernet")
  if supernet:
    lines += ["## SuperTransformer", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in supernet.items()] + [""]
  pred = _done(config, "predictor")
  if pred:
    lines += ["## Latency predictor (held-out split)", "",
              f"{pred['train_samples']} training and {pred['test_samples']} held-out "
              "SubTransformers.", "",
              "| target | model | RMSE (ms) | MAPE (%) | R^2 |", "|---|---|---|---|---|"]
    for target in TARGETS:
      for model in ("mlp", "linear"):
        lines.append(f"| {target} | {model} | " + " | ".join(
            _fmt(pred[f"{target}_{model}_{m}"]) for m in ("rmse", "mape", "r2")) + " |")
    lines.append("")
  search_dir = os.path.join(root, "search")
  search = _done(config, "search")
  if search:
    lines += ["## Search", "", "| budget (ms) | best arch | val loss (shared) | predicted ms | "
              "best loss per generation |", "|---|---|---|---|---|"]
    for i in range(len(search["budgets_ms"])):
      r = _read_json(os.path.join(search_dir, f"search_{i}.json"))
      trajectory = ", ".join(f"{h['best_fitness']:.3f}" for h in r["history"])
      lines.append(f"| {r['budget_ms']:.4g} | {r['name']} | {r['val_loss']:.4f} | "
                   f"{r['predicted_ms']:.4g} | {trajectory} |")
    relative = os.path.relpath(search_dir, workdir)
    lines += ["", f"![Pareto front]({os.path.join(relative, 'pareto.png')})", "",
              f"![Search trajectory]({os.path.join(relative, 'trajectory.png')})", ""]
  retrain = _done(config, "retrain")
  if retrain:
    batches = list(config.retrain_decode_batches)
    lines += ["## Retrained from scratch", "",
              f"Prefill and decode ms at batch {config.latency_batch} (the search's target); "
              "decode tokens/s and their speed-up over the baseline at each batch B.", "",
              "| model | arch | params (M) | val loss | prefill ms | decode ms | predicted ms | "
              f"speed-up ({config.latency_target}) vs baseline | " +
              "".join(f"tok/s B={b} | speed-up B={b} | " for b in batches),
              "|---|---|---|---|---|---|---|---|" + "---|---|" * len(batches)]
    names = ["baseline"] + [f"budget{i}" for i in range(len(search["budgets_ms"]))]
    for name in names:
      per_batch = "".join(f" {_fmt(retrain.get(f'{name}_decode_tok_s_b{b}'))} |"
                          f" {_fmt(retrain.get(f'{name}_speedup_b{b}', 1.0))} |"
                          for b in batches)
      lines.append(f"| {name} | {retrain[name + '_arch']} | " + " | ".join(
          _fmt(retrain[f"{name}_{k}"]) for k in ("params_m", "val_loss", "prefill_ms",
                                                 "decode_ms", "predicted_ms")) +
          f" | {_fmt(retrain.get(name + '_speedup', 1.0))} |" + per_batch)
    lines.append("")
  kernel = _done(config, "kernel")
  if kernel:
    lines += ["## Kernel configurations", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in kernel.items()] + [""]
  path = os.path.join(workdir, REPORT_FILE)
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def run_point(config: ml_collections.ConfigDict, point: dict[str, Any]) -> dict[str, Any]:
  """Runs (or, when its done.json exists, reads) one stage; returns its summary metrics."""
  del point
  if config.stage not in _STAGE_FNS:
    raise ValueError(f"stage={config.stage!r} must be one of {STAGES}")
  done = _done(config, config.stage)
  if done is None:
    done = _STAGE_FNS[config.stage](config)
  write_report(config, common.under_workdir(config.report_dir, "report_dir"))
  return done
