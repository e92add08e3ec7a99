"""Latency of SubTransformers on the current device: protocol, cost counts, JSONL dataset.

Protocol (`measure`): `warmup` untimed calls (the first also compiles a plain jitted
function; the tasks below are compiled ahead of time), then `repeats` timed
calls, each ended by `block_until_ready`; the top and bottom `trim` (10 %) of the sorted
times are dropped and the rest averaged (`trimmed_mean`).

Tasks (`subnet_latencies` = `compile_tasks` then `time_tasks`, per batch size), through the
model's own kernels (its `attention_impl` for prefill, `decode_impl` for the cached decode
step):

  prefill_ms   prefill of `prefill_tokens` tokens at batch B into an empty KV cache
  decode_ms    `decode_tokens` cached decode steps at batch B after a prefill of
               `prefill_tokens` (one jitted `fori_loop` carrying the cache, greedy tokens)

`collect_dataset` measures SubTransformers sampled with a generator seeded by (seed, index)
and appends one JSON line per finished sample (flushed and fsynced), so a killed collection
loses no finished sample and a re-run continues at the next index. With `compile_workers` > 1
it compiles that many samples at once in threads, then times them one by one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashjax.search.space import Arch
from flashjax.search.space import SearchSpace
from flashjax.search.supernet import init_sub_cache


def trimmed_mean(samples: Sequence[float], trim: float = 0.1) -> float:
  """Mean after dropping the floor(trim * n) largest and smallest samples.

  Args:
    samples: at least one number.
    trim: fraction dropped at each end, in [0, 0.5).
  """
  values = np.sort(np.asarray(samples, np.float64))
  if values.ndim != 1 or values.size == 0:
    raise ValueError(f"samples must be a non-empty 1-d sequence, got shape {values.shape}")
  if not 0 <= trim < 0.5:
    raise ValueError(f"{trim=} must lie in [0, 0.5)")
  drop = int(np.floor(trim * values.size))
  return float(values[drop:values.size - drop].mean())


def measure(fn: Callable[..., Any], *args: Any, warmup: int = 3, repeats: int = 20,
            trim: float = 0.1) -> dict[str, Any]:
  """Times fn(*args) with the protocol of the module docstring.

  Returns:
    {"mean_ms": trimmed mean, "median_ms", "min_ms", "samples_ms": every timed call,
     "warmup": warmup, "repeats": repeats, "trim": trim}.
  """
  if not isinstance(warmup, int) or warmup < 1:
    raise ValueError(f"{warmup=} must be an int >= 1 (the first call compiles)")
  if not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f"{repeats=} must be a positive int")
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append((time.perf_counter() - start) * 1e3)
  return {"mean_ms": trimmed_mean(samples, trim), "median_ms": float(np.median(samples)),
          "min_ms": float(np.min(samples)), "samples_ms": [round(s, 5) for s in samples],
          "warmup": warmup, "repeats": repeats, "trim": trim}


def arch_cost(arch: Arch, space: SearchSpace, *, vocab_size: int, batch: int,
              prefill_tokens: int, decode_tokens: int, bytes_per_value: int = 4
              ) -> dict[str, float]:
  """Analytic FLOPs and HBM bytes of the two tasks (a roofline-style count).

  Matmul FLOPs are 2 per weight per token (attention projections 4 d n H, SwiGLU 3 d f, the
  output head d V); causal attention 2 * 2 * n H per allowed (query, key) pair. Bytes: every
  weight read once per call (prefill) or per decode step, plus the KV cache written (prefill)
  or read (decode).
  """
  h, d, n_layers = space.head_dim, arch.embed_dim, arch.num_layers
  weights = sum(4 * d * n * h + 3 * d * f for f, n in zip(arch.ffn_dims, arch.head_counts))
  weights += vocab_size * d
  kv_per_token = sum(2 * n * h for n in arch.head_counts)  # values per token, all layers
  heads_total = sum(arch.head_counts)
  t = prefill_tokens
  prefill_flops = 2 * batch * t * weights + 4 * batch * heads_total * h * t * (t + 1) / 2
  prefill_bytes = bytes_per_value * (weights + batch * t * kv_per_token + batch * t * d)
  mean_len = t + (decode_tokens + 1) / 2
  decode_flops = decode_tokens * (2 * batch * weights + 4 * batch * heads_total * h * mean_len)
  decode_bytes = decode_tokens * bytes_per_value * (weights + batch * mean_len * kv_per_token)
  return {"params": float(weights), "prefill_flops": float(prefill_flops),
          "prefill_bytes": float(prefill_bytes), "decode_flops": float(decode_flops),
          "decode_bytes": float(decode_bytes), "num_layers": float(n_layers)}


@dataclasses.dataclass
class CompiledTasks:
  """The two tasks of one SubTransformer, compiled ahead of time (`compile_tasks`)."""
  prefill: Any          # compiled (state, prompt) -> (last logits, cache)
  decode: Any           # compiled (state, cache, first tokens) -> (tokens, cache)
  state: Any            # the model's nnx state
  prompt: jax.Array     # [B, T] int32
  compile_s: float      # seconds spent lowering and compiling both
  lower_s: float        # of them, tracing and lowering (Python; holds the GIL)


def compile_tasks(model: nnx.Module, arch: Arch, head_dim: int, *, batch: int,
                  prefill_tokens: int, decode_tokens: int, seed: int = 0) -> CompiledTasks:
  """Lowers and compiles the prefill and decode tasks of a SubTransformer (module docstring).

  Args:
    model: the SubTransformer as a flashjax Transformer (e.g. SuperTrainer.sub_model(arch)).
    arch: its architecture (per-layer KV cache shapes).
    head_dim: head width.
    batch: sequences B.
    prefill_tokens: prompt tokens T.
    decode_tokens: decode steps n after the prompt.
    seed: the random prompt.
  """
  for name, value in (("batch", batch), ("prefill_tokens", prefill_tokens),
                      ("decode_tokens", decode_tokens)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive int")
  config = model.config
  slots = prefill_tokens + decode_tokens
  if slots > config.max_len:
    raise ValueError(f"prefill_tokens + decode_tokens = {slots} exceeds "
                     f"max_len={config.max_len}")
  start = time.perf_counter()
  graphdef, state = nnx.split(model)
  prompt = jax.random.randint(jax.random.key(seed), (batch, prefill_tokens), 0,
                              config.vocab_size, jnp.int32)

  def prefill(state, prompt):
    empty = init_sub_cache(arch, head_dim, batch, slots, config.compute_dtype)
    logits, cache = nnx.merge(graphdef, state).prefill(prompt, empty)
    return logits[:, -1], cache

  def decode(state, cache, first):
    model = nnx.merge(graphdef, state)

    def body(_, carry):
      tokens, cache = carry
      logits, cache = model.decode_step(tokens, cache)
      return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    return jax.lax.fori_loop(0, decode_tokens, body, (first, cache))

  prefill_lowered = jax.jit(prefill).lower(state, prompt)
  _, cache_shape = jax.eval_shape(prefill, state, prompt)
  first_shape = jax.ShapeDtypeStruct((batch,), jnp.int32)
  decode_lowered = jax.jit(decode).lower(state, cache_shape, first_shape)
  lower_s = time.perf_counter() - start
  return CompiledTasks(prefill_lowered.compile(), decode_lowered.compile(), state, prompt,
                       time.perf_counter() - start, lower_s)


def time_tasks(tasks: CompiledTasks, *, warmup: int = 3, repeats: int = 20,
               trim: float = 0.1) -> dict[str, Any]:
  """Times compiled tasks with the protocol: {"prefill": measure(...), "decode": ...}."""
  protocol = {"warmup": warmup, "repeats": repeats, "trim": trim}
  prefill_timing = measure(tasks.prefill, tasks.state, tasks.prompt, **protocol)
  last, cache = tasks.prefill(tasks.state, tasks.prompt)
  first = jnp.argmax(last, axis=-1).astype(jnp.int32)
  decode_timing = measure(tasks.decode, tasks.state, cache, first, **protocol)
  return {"prefill": prefill_timing, "decode": decode_timing}


def subnet_latencies(model: nnx.Module, arch: Arch, head_dim: int, *, batches: Sequence[int],
                     prefill_tokens: int, decode_tokens: int, warmup: int = 3,
                     repeats: int = 20, trim: float = 0.1, seed: int = 0,
                     compile_workers: int = 1) -> dict[int, dict[str, Any]]:
  """Measured prefill and decode latency of a SubTransformer at each batch size:
  {batch: time_tasks(...)}. The batches' `compile_tasks` (arguments there) run
  `compile_workers` at once in threads (`compiled_in_groups`), then each is timed with the
  protocol (warmup, repeats, trim) alone."""
  def build(batch: int) -> CompiledTasks:
    return compile_tasks(model, arch, head_dim, batch=batch, prefill_tokens=prefill_tokens,
                         decode_tokens=decode_tokens, seed=seed)

  return {batch: time_tasks(tasks, warmup=warmup, repeats=repeats, trim=trim)
          for batch, tasks in compiled_in_groups(batches, build, compile_workers)}


def device_info() -> dict[str, Any]:
  device = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": device.device_kind,
          "jax_version": jax.__version__}


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The complete lines of a JSONL file (a torn last line, left by a kill, is dropped)."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      if not line.endswith("\n"):
        break
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return rows


def append_jsonl(path: str, row: dict[str, Any]) -> None:
  """Appends one line with a single write, flushed and fsynced."""
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _drop_torn_tail(path: str) -> None:
  if not os.path.exists(path):
    return
  with open(path, "rb") as f:
    content = f.read()
  keep = content.rfind(b"\n") + 1
  if keep != len(content):
    with open(path, "r+b") as f:
      f.truncate(keep)


def check_resume(path: str, rows: list[dict[str, Any]], expected: dict[str, Any]) -> None:
  """Refuses to extend a dataset whose finished rows differ from `expected` in any of its
  keys (e.g. measured on another device kind, or another task): one file holds one setting.
  """
  for line, row in enumerate(rows, 1):
    differ = {k: (row.get(k), v) for k, v in expected.items() if row.get(k) != v}
    if differ:
      found = ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in differ.items())
      raise ValueError(f"{path} line {line} has {found}: one dataset holds one "
                       "device and task; resume it where it was made or use a new file")


def sample_arch(space: SearchSpace, seed: int, index: int) -> Arch:
  """The `index`-th SubTransformer of a latency collection (seeded by (seed, index))."""
  return space.sample(np.random.default_rng([seed, index, 11]))


def compiled_in_groups(items: Iterable[Any], build: Callable[[Any], Any], workers: int
                       ) -> Iterator[tuple[Any, Any]]:
  """Yields (item, build(item)) in order, building `workers` items at once in threads; a
  group is yielded only once all of its builds finished, so whatever the caller times
  between them never overlaps a build (a compile). `items` is consumed a group at a time.
  """
  if not isinstance(workers, int) or workers < 1:
    raise ValueError(f"{workers=} must be a positive int")
  pending = iter(items)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    while group := list(itertools.islice(pending, workers)):
      yield from zip(group, list(pool.map(build, group)))


def collect_dataset(path: str, space: SearchSpace, model_for: Callable[[Arch], nnx.Module],
                    *, num_samples: int, batch: int, prefill_tokens: int, decode_tokens: int,
                    vocab_size: int, warmup: int = 3, repeats: int = 20, trim: float = 0.1,
                    seed: int = 0, compile_workers: int = 1,
                    progress: Callable[[int, dict[str, Any]], None] | None = None
                    ) -> list[dict[str, Any]]:
  """Measures `num_samples` sampled SubTransformers into the JSONL file `path` (resumable).

  Args:
    path: the dataset file; its finished lines are kept and the collection continues after
      them.
    space: the design space.
    model_for: arch -> its flashjax Transformer (e.g. SuperTrainer.sub_model).
    num_samples: rows wanted in the file.
    batch, prefill_tokens, decode_tokens: the tasks.
    vocab_size: for the cost counts.
    warmup, repeats, trim: the protocol.
    seed: architecture sampling seed.
    compile_workers: samples compiled at once in threads (XLA compiles without the GIL);
      every compile of a group ends before its samples are timed one by one, so timing never
      overlaps compilation. 1: compile and time each sample in turn.
    progress: called with (index, row) after each new row.

  Returns:
    All rows (previous and new).
  """
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"{num_samples=} must be a positive int")
  if not isinstance(compile_workers, int) or compile_workers < 1:
    raise ValueError(f"{compile_workers=} must be a positive int")
  _drop_torn_tail(path)
  rows = read_jsonl(path)
  info = device_info()
  spec = {"batch": batch, "prefill_tokens": prefill_tokens, "decode_tokens": decode_tokens}
  check_resume(path, rows, {"backend": info["backend"], "device_kind": info["device_kind"],
                            "task": spec})

  def compiled(item):
    index, arch, model = item
    return compile_tasks(model, arch, space.head_dim, batch=batch,
                         prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                         seed=index)

  items = ((i, sample_arch(space, seed, i)) for i in range(len(rows), num_samples))
  models = ((i, arch, model_for(arch)) for i, arch in items)  # built in this thread
  for (index, arch, _), task in compiled_in_groups(models, compiled, compile_workers):
    timing = time_tasks(task, warmup=warmup, repeats=repeats, trim=trim)
    row = {"index": index, "arch": arch.to_dict(), "name": arch.name(),
           "features": [float(v) for v in space.features(arch)],
           "prefill_ms": timing["prefill"]["mean_ms"],
           "decode_ms": timing["decode"]["mean_ms"],
           "prefill_timing": timing["prefill"], "decode_timing": timing["decode"],
           "compile_s": round(task.compile_s, 3), "lower_s": round(task.lower_s, 3),
           "compile_workers": compile_workers,
           "cost": arch_cost(arch, space, vocab_size=vocab_size, batch=batch,
                             prefill_tokens=prefill_tokens, decode_tokens=decode_tokens),
           "task": spec, **info}
    append_jsonl(path, row)
    rows.append(row)
    if progress is not None:
      progress(index, row)
  return rows
