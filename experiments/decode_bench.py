"""Experiment kind "decode_bench": times (head-sparse) decode attention at one shape per point.

Config fields read by `run_point` (configs/bench_decode_gpu.py sets all of them):

  implementation   a flashjax decode backend ("xla", "pallas_triton", "pallas_tpu",
                   "pallas_mosaic_gpu", which runs pallas_triton's kernel: rows report the
                   name asked for and `kernel`) or "peer:NAME" for a third_party decode peer
                   ("peer:jax_nn_cudnn", "peer:jax_nn_xla", "peer:pallas_decode",
                   "peer:torch_sdpa")
  batch, kv_len    B and the cache length S = S_max
  num_heads, num_kv_heads, head_dim, dtype    Nq, Nkv, D and the dtype of query and cache
  head_density     fraction of KV groups computed per sequence: 1 means head_indices=None;
                   below 1, K = round(head_density * Nkv) distinct random groups per sequence,
                   drawn afresh for every input set. Peers compute every head, so they are
                   "unsupported" (NotImplementedError) below 1; flashjax backends take it.
  num_splits, block_kv, xla_merge    the flashjax `block_sizes`
                   (flashjax.ops.decode.block_sizes.DecodeBlockSizes; None / False: heuristics and
                   defaults); a peer point that sets one is a ValueError. num_warps and
                   num_stages (Triton launch parameters) are optional fields of the same
                   kind: a config without them means None (configs/tune_decode_splits.py
                   `:gpu_tiles` sweeps them)
  ragged           False: every length is S; True: lengths uniform in [S/2, S] (per input set)
  wall_timing      True: time one synchronised call at a time as well (`time_fn`, its own
                   compile); False: one compiled program gives the output to check and the
                   step time (see Timing), one compile per point
  warmup, iters    untimed and timed calls of the wall-clock timer (and of the torch child)
  loop_iters       calls per timed loop; None: enough calls for about `loop_target_ms` per
                   loop, estimated from the wall median (wall_timing) or from the KV bytes at
                   the device's copy ceiling plus 5 us (else; `loop_min_iters` on a device
                   without a known ceiling), clamped to [loop_min_iters, loop_max_iters]
  loop_repeats     timed loops (the loop median is over these)
  input_sets       most input sets to rotate among (each with its own lengths and groups)
  min_rotation_mb  None: use `input_sets` sets; else only as many as needed to rotate through
                   this many MB (so that small caches are not served from the L2 cache)
  memory_budget_gb device bytes a point may use (inputs + the compiled program's temporaries,
                   from XLA's memory analysis); None: 90% of what the device reports free
                   (no limit where it reports nothing, e.g. on CPU). The number of input sets
                   shrinks to fit; a point whose single input set does not fit is
                   "unsupported" with the sizes in its reason.
  torch_memory_gb  the same for the torch child process (estimated: its input sets, K and V
                   expanded to Nq heads for GQA, float32 logits); None: no limit
  torch_keep_alive run torch points in one long-lived child (third_party.torch_peers), ended
                   when the next in-process point starts, so that JAX gets its memory
  chunk_mb         input generation and the error check work on batch chunks of about this
                   size, so neither needs memory proportional to the whole cache
  check_rows       None: check every batch row; n: n rows spread evenly over the batch
                   (first and last included)
  seed, interpret (None: Pallas in interpret mode exactly on CPU), check

Timing: a decode step is often shorter than JAX's dispatch, so in-process points are timed
on the device, many calls inside one jitted fori_loop that rotates the input sets
(`median_us_loop`, the step time `us_per_step`). With wall_timing, `benchmarking.time_fn`
(one synchronised call at a time; `median_us_wall`) and `benchmarking.time_in_loop` run on
separately compiled programs. Without, a single program computes fn on the first set (the
output the check reads) and then loops over `loop_calls` calls; each of its timed runs
counts loop_calls + 1 calls. torch peers run in a child process (third_party.torch_peers)
and are timed with CUDA events (`median_us_events`, their `us_per_step`).

Metrics: `kv_tbps` = bytes of K and V the step must read (the selected groups' valid entries,
`benchmarking.decode_kv_bytes`, averaged over the input sets) / `us_per_step`, in TB/s;
`pct_of_ceiling` of the device's measured copy bandwidth (`benchmarking.device_ceilings`,
when known); `dense_equiv_tbps` = bytes a dense step of the same lengths reads / time (the
head-sparse speed-up shows as dense_equiv_tbps above kv_tbps); `max_abs_err` of the output
of the first input set against the float32 decode reference (the checked rows, in chunks)
and `within_tol` (float32 1e-4, bfloat16 2e-2, float16 5e-3 absolute); the torch child
checks against its own float32 reference. Also: `kv_tbps_wall` (bytes / wall median, with
wall_timing), `compile_s` (ahead-of-time compile of the timed program), `first_call_s`,
`input_sets` and `rotated_mb` (inputs rotated through), `est_memory_gb` (what the budget
check counted), `groups` (K), and for flashjax backends `kernel` (the backend whose kernel
ran) and, for the pallas_triton kernel, `launch_block_kv` / `launch_splits` (the tile and
split count it launched with).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np

import flashjax
from experiments import attention_bench
from experiments.attention_bench import PEER_PREFIX, TOLERANCES
from flashjax import benchmarking
from flashjax.ops.decode import api as decode_api
from flashjax.ops.decode import block_sizes as decode_block_sizes
from flashjax.ops.decode import pallas_triton
from flashjax.ops.decode.reference import decode_reference
import third_party
from third_party import torch_peers

# Threefry temporaries of the chunked input generation reach about 12x the chunk (XLA's
# memory analysis on CPU); the budget keeps that much room besides inputs and program.
_CHUNK_TEMP_FACTOR = 12
_MB = 2**20
_GB = 1e9
# Fixed cost added to the KV-bytes estimate of a step when sizing a timing loop.
_STEP_OVERHEAD_S = 5e-6
# block_sizes fields of a point, passed to flashjax backends (peers refuse them).
_BLOCK_SIZE_FIELDS = ("num_splits", "block_kv", "num_warps", "num_stages", "xla_merge")


def num_groups(head_density: float, num_kv_heads: int) -> int:
  """K = round(head_density * Nkv) KV groups per sequence (at least one).

  Args:
    head_density: fraction of groups computed, in (0, 1].
    num_kv_heads: Nkv.

  Returns:
    K in [1, Nkv].
  """
  if not 0 < head_density <= 1:
    raise ValueError(f"{head_density=} must lie in (0, 1]")
  return max(1, math.floor(head_density * num_kv_heads + 0.5))


def sample_lengths(rng: np.random.Generator, batch: int, kv_len: int,
                   ragged: bool) -> np.ndarray:
  """int32 [B]: all S, or (ragged) uniform in [S/2, S]."""
  if not ragged:
    return np.full((batch,), kv_len, np.int32)
  return rng.integers(kv_len // 2, kv_len + 1, size=batch).astype(np.int32)


def sample_head_indices(rng: np.random.Generator, batch: int, num_kv_heads: int,
                        groups: int) -> np.ndarray:
  """int32 [B, K]: K distinct random KV groups per sequence, ascending in each row."""
  if not 1 <= groups <= num_kv_heads:
    raise ValueError(f"{groups=} must lie in [1, {num_kv_heads=}]")
  order = np.argsort(rng.random((batch, num_kv_heads)), axis=1)
  return np.sort(order[:, :groups], axis=1).astype(np.int32)


def chunk_rows(batch: int, row_bytes: float, limit_bytes: float) -> int:
  """Largest divisor of `batch` whose rows take at most `limit_bytes` (at least 1)."""
  fits = [d for d in range(1, batch + 1) if batch % d == 0 and d * row_bytes <= limit_bytes]
  return max(fits, default=1)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "rows"))
def _random_cache(key: jax.Array, *, shape: tuple[int, ...], dtype: str,
                  rows: int) -> jax.Array:
  """Standard normal [B, ...] of `dtype`, generated `rows` batch rows at a time."""
  batch = shape[0]
  chunks = lax.map(lambda k: jax.random.normal(k, (rows, *shape[1:]), dtype),
                   jax.random.split(key, batch // rows))
  return chunks.reshape(shape)


def _abstract_inputs(config: ml_collections.ConfigDict,
                     groups: int | None) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Shapes of one input set: (q, k, v, lengths[, head_indices])."""
  b, s, d = config.batch, config.kv_len, config.head_dim
  dtype = jnp.dtype(config.dtype)
  cache = jax.ShapeDtypeStruct((b, s, config.num_kv_heads, d), dtype)
  shapes = (jax.ShapeDtypeStruct((b, config.num_heads, d), dtype), cache, cache,
            jax.ShapeDtypeStruct((b,), jnp.int32))
  if groups is not None:
    shapes += (jax.ShapeDtypeStruct((b, groups), jnp.int32),)
  return shapes


def _nbytes(shapes) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in shapes)


def make_inputs(config: ml_collections.ConfigDict, groups: int | None,
                num_sets: int) -> list[tuple[jax.Array, ...]]:
  """`num_sets` fresh input sets (q, k, v, lengths[, head_indices]) from config.seed.

  Args:
    config: the point's config (shapes, dtype, ragged, seed, chunk_mb).
    groups: K selected KV groups per sequence, or None for dense (no head_indices).
    num_sets: how many sets.

  Returns:
    List of tuples: q [B, Nq, D], k / v [B, S, Nkv, D], lengths int32 [B] and, with
    groups, head_indices int32 [B, K] (distinct per row).
  """
  q_shape, cache = _abstract_inputs(config, groups)[:2]
  row_bytes = math.prod(cache.shape[1:]) * jnp.dtype(cache.dtype).itemsize
  rows = chunk_rows(config.batch, row_bytes, config.chunk_mb * _MB)
  sets = []
  for index in range(num_sets):
    rng = np.random.default_rng([config.seed, index])
    kq, kk, kv = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), index), 3)
    inputs = (jax.random.normal(kq, q_shape.shape, q_shape.dtype),
              _random_cache(kk, shape=cache.shape, dtype=config.dtype, rows=rows),
              _random_cache(kv, shape=cache.shape, dtype=config.dtype, rows=rows),
              jnp.asarray(sample_lengths(rng, config.batch, config.kv_len, config.ragged)))
    if groups is not None:
      inputs += (jnp.asarray(sample_head_indices(rng, config.batch, config.num_kv_heads,
                                                 groups)),)
    sets.append(inputs)
  return sets


def kv_bytes(config: ml_collections.ConfigDict,
             sets: list[tuple[Any, ...]]) -> tuple[float, float]:
  """(bytes read, bytes a dense step reads) per step, averaged over the input sets."""
  read, dense = [], []
  for inputs in sets:
    lengths = np.asarray(inputs[3])
    heads = np.asarray(inputs[4]) if len(inputs) > 4 else None
    args = (config.num_kv_heads, config.head_dim, config.dtype)
    read.append(benchmarking.decode_kv_bytes(lengths, *args, head_indices=heads))
    dense.append(benchmarking.decode_kv_bytes(lengths, *args))
  return float(np.mean(read)), float(np.mean(dense))


def check_row_ids(batch: int, check_rows: int | None) -> tuple[int, ...] | None:
  """Batch rows the error check compares: None (all) or `check_rows` spread-out rows.

  Args:
    batch: B.
    check_rows: None or a positive number of rows.

  Returns:
    None when every row is checked, else ascending row ids spread evenly from 0 to B - 1
    (both included from two rows on).
  """
  if check_rows is None:
    return None
  if isinstance(check_rows, bool) or not isinstance(check_rows, int) or check_rows < 1:
    raise ValueError(f"{check_rows=} must be None or a positive int")
  if check_rows >= batch:
    return None
  ids = np.unique(np.linspace(0, batch - 1, check_rows).round().astype(int))
  return tuple(int(i) for i in ids)


@functools.partial(jax.jit, static_argnames=("rows", "select"))
def _max_abs_err(out: jax.Array, inputs: tuple[jax.Array, ...], *, rows: int,
                 select: tuple[int, ...] | None = None) -> jax.Array:
  """max |out - reference| over the `select`ed rows (None: all), the float32 reference
  computed `rows` at a time."""
  if select is not None:
    ids = jnp.asarray(select)
    out, inputs = out[ids], tuple(x[ids] for x in inputs)
  query, key_cache, value_cache, lengths, *heads = inputs

  def chunk(index):
    take = lambda x: lax.dynamic_slice_in_dim(x, index * rows, rows)
    f32 = lambda x: take(x).astype(jnp.float32)
    want = decode_reference(f32(query), f32(key_cache), f32(value_cache), take(lengths),
                            head_indices=take(heads[0]) if heads else None)
    return jnp.max(jnp.abs(take(out).astype(jnp.float32) - want))

  return jnp.max(lax.map(chunk, jnp.arange(query.shape[0] // rows)))


def _memory_budget(config: ml_collections.ConfigDict) -> float | None:
  """Device bytes a point may use (see the module docstring), or None for no limit."""
  if config.memory_budget_gb is not None:
    return config.memory_budget_gb * _GB
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    return None
  return 0.9 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0))


def _fit_sets(config: ml_collections.ConfigDict, set_bytes: float, per_set_extra: float,
              fixed_bytes: float, budget: float | None, who: str) -> tuple[int, float]:
  """Number of input sets to use and the bytes they need; NotImplementedError if none fit.

  Args:
    config: for input_sets and min_rotation_mb.
    set_bytes: bytes of one input set.
    per_set_extra: bytes that may be needed once per set besides it (program temporaries:
      the timing loop may keep one per unrolled call).
    fixed_bytes: bytes needed once (outputs, generation and check chunks).
    budget: bytes available, None for no limit.
    who: "device" or "torch child", for the reason.

  Returns:
    (number of sets, bytes needed).
  """
  want = config.input_sets
  if config.min_rotation_mb is not None:
    want = min(want, max(1, math.ceil(config.min_rotation_mb * _MB / set_bytes)))
  need = lambda n: n * (set_bytes + per_set_extra) + fixed_bytes
  if budget is not None:
    if need(1) > budget:
      raise NotImplementedError(
          f"needs {need(1) / _GB:.3g} GB on the {who} ({set_bytes / _GB:.3g} GB of inputs "
          f"+ {(need(1) - set_bytes) / _GB:.3g} GB working memory) > budget "
          f"{budget / _GB:.3g} GB")
    want = max(n for n in range(1, want + 1) if need(n) <= budget)
  return want, need(want)


def _loop_iters(config: ml_collections.ConfigDict, wall_median_s: float) -> int:
  if config.loop_iters is not None:
    return config.loop_iters
  # The wall time includes dispatch, so this slightly undershoots the target loop time.
  calls = math.ceil(config.loop_target_ms * 1e-3 / max(wall_median_s, 1e-9))
  return min(max(calls, config.loop_min_iters), config.loop_max_iters)


def _estimated_loop_iters(config: ml_collections.ConfigDict, groups: int | None) -> int:
  """Calls per timed loop without a wall measurement: KV bytes at the copy ceiling + 5 us."""
  if config.loop_iters is not None:
    return config.loop_iters
  ceilings = benchmarking.device_ceilings(jax.devices()[0].device_kind, config.dtype)
  if not ceilings or "hbm_bytes_per_s" not in ceilings:
    return config.loop_min_iters
  heads = groups or config.num_kv_heads
  most_bytes = (2 * config.batch * config.kv_len * heads * config.head_dim
                * jnp.dtype(config.dtype).itemsize)
  step_s = most_bytes / ceilings["hbm_bytes_per_s"] + _STEP_OVERHEAD_S
  calls = math.ceil(config.loop_target_ms * 1e-3 / step_s)
  return min(max(calls, config.loop_min_iters), config.loop_max_iters)


def _peer(config: ml_collections.ConfigDict, groups: int | None) -> Any:
  """The third_party decode peer of `config.implementation`; unsupported ones raise."""
  name = config.implementation[len(PEER_PREFIX):]
  peers = third_party.decode_peers(interpret=attention_bench.interpret_mode(config))
  if name not in peers:
    raise ValueError(f"unknown decode peer {name=}; known: {sorted(peers)}")
  chosen = {f: config.get(f) for f in _BLOCK_SIZE_FIELDS
            if config.get(f) not in (None, False)}
  if chosen:
    raise ValueError(f"peer {name} has no flashjax block sizes to set: {chosen}")
  if groups is not None:
    raise NotImplementedError(f"peer {name} computes every head; "
                              f"head_density={config.head_density} needs head_indices")
  availability = peers[name].available()
  if not availability:
    raise NotImplementedError(f"peer {name} is not available: {availability.reason}")
  return peers[name]


def _run_torch(config: ml_collections.ConfigDict, peer: Any) -> dict[str, Any]:
  """Times the torch peer in its child process on inputs of the point's shapes."""
  set_bytes = _nbytes(_abstract_inputs(config, None))
  # Working memory besides the inputs: SDPA's float32 logits and, in case its math path
  # serves GQA by expanding K and V to Nq heads, that copy. The child's float32 reference
  # converts a few heads of one batch row at a time (negligible).
  b, s, d, nq = config.batch, config.kv_len, config.head_dim, config.num_heads
  expanded = 0 if nq == config.num_kv_heads else 2 * b * s * nq * d * jnp.dtype(
      config.dtype).itemsize
  working = expanded + 4 * b * nq * s
  budget = None if config.torch_memory_gb is None else config.torch_memory_gb * _GB
  num_sets, need = _fit_sets(config, set_bytes, 0, working, budget, "torch child")
  lengths = sample_lengths(np.random.default_rng([config.seed, 0]), b, config.kv_len,
                           config.ragged)
  case = {k: config[k] for k in ("batch", "num_heads", "num_kv_heads", "head_dim", "dtype",
                                 "kv_len", "warmup", "iters", "seed")}
  rows = check_row_ids(b, config.check_rows)
  case.update(scale=None, input_sets=num_sets, check_rows=None if rows is None else list(rows))
  result = peer.run(case, {"lengths": lengths}, keep_alive=config.torch_keep_alive)
  read = benchmarking.decode_kv_bytes(lengths, config.num_kv_heads, config.head_dim,
                                      config.dtype)
  timing = "events" if result.get("timing") == "cuda_events" else "wall"
  metrics = {
      "us_per_step": 1e3 * result["median_ms"], "step_timing": result.get("timing"),
      f"median_us_{timing}": 1e3 * result["median_ms"],
      f"p10_us_{timing}": 1e3 * result["p10_ms"], f"p90_us_{timing}": 1e3 * result["p90_ms"],
      "compile_s": result["compile_s"], "input_sets": num_sets, "est_memory_gb": need / _GB,
      "kv_bytes": read, "dense_kv_bytes": read, "torch_version": result.get("torch_version"),
  }
  if config.check:
    metrics["max_abs_err"] = result["max_abs_err"]
  return metrics


def _block_sizes(config: ml_collections.ConfigDict) -> decode_block_sizes.DecodeBlockSizes:
  return decode_block_sizes.DecodeBlockSizes(num_splits=config.num_splits, block_kv=config.block_kv,
                                     num_warps=config.get("num_warps"),
                                     num_stages=config.get("num_stages"),
                                     xla_merge=config.xla_merge)


def _flashjax_fn(config: ml_collections.ConfigDict):
  implementation = config.implementation
  interpret = attention_bench.interpret_mode(config) and implementation.startswith("pallas")
  block_sizes = _block_sizes(config)

  def decode(query, key_cache, value_cache, lengths, head_indices=None):
    return flashjax.decode_attention(query, key_cache, value_cache, lengths,
                                     head_indices=head_indices, block_sizes=block_sizes,
                                     implementation=implementation, interpret=interpret)

  return decode


def _flashjax_metrics(config: ml_collections.ConfigDict, groups: int | None) -> dict[str, Any]:
  """The kernel a flashjax implementation runs and, for pallas_triton's, its launch shape."""
  kernel = decode_api.ALIASES.get(config.implementation, config.implementation)
  metrics = {"kernel": kernel}
  if kernel == "pallas_triton":
    block_kv, splits = pallas_triton.launch_shape(
        config.batch, groups or config.num_kv_heads, config.kv_len, _block_sizes(config))
    metrics.update(launch_block_kv=block_kv, launch_splits=splits)
  return metrics


def _loop_program(fn: Any, trips: int):
  """program(sets) -> (fn(*sets[0]), checksum of `trips` iterations calling fn on every set).

  The first output is what the error check reads; the loop is the step timing (as
  benchmarking.time_in_loop: the barrier makes each call depend on the carry, so nothing
  is hoisted out of the loop).
  """

  def program(sets):
    def body(_, acc):
      for inputs in sets:
        inputs, acc = lax.optimization_barrier((inputs, acc))
        acc = acc + jnp.sum(fn(*inputs), dtype=jnp.float32)
      return acc

    return fn(*sets[0]), lax.fori_loop(0, trips, body, jnp.zeros((), jnp.float32))

  return program


def _time_wall_and_loop(config: ml_collections.ConfigDict, fn: Any, groups: int | None,
                        reserve: float, budget: float | None):
  """wall_timing: compiled fn timed call by call, then benchmarking.time_in_loop."""
  shapes = _abstract_inputs(config, groups)
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*shapes).compile()
  compile_s = time.perf_counter() - start
  temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0) or 0
  num_sets, need = _fit_sets(config, _nbytes(shapes), temp, reserve, budget, "device")
  sets = make_inputs(config, groups, num_sets)
  wall = benchmarking.time_fn(compiled, warmup=config.warmup, iters=config.iters,
                              arg_sets=sets)
  loop = benchmarking.time_in_loop(fn, iters=_loop_iters(config, wall.median_s),
                                   repeats=config.loop_repeats, arg_sets=sets)
  metrics = {
      "us_per_step": 1e6 * loop.median_s, "step_timing": "loop",
      "median_us_loop": 1e6 * loop.median_s, "p10_us_loop": 1e6 * loop.p10_s,
      "p90_us_loop": 1e6 * loop.p90_s, "loop_calls": loop.calls_per_sample,
      "median_us_wall": 1e6 * wall.median_s, "p10_us_wall": 1e6 * wall.p10_s,
      "p90_us_wall": 1e6 * wall.p90_s, "compile_s": compile_s,
      "first_call_s": wall.compile_s, "est_memory_gb": need / _GB,
  }
  out = compiled(*sets[0]) if config.check else None
  return metrics, sets, out


def _time_one_program(config: ml_collections.ConfigDict, fn: Any, groups: int | None,
                      reserve: float, budget: float | None):
  """No wall timing: one compiled `_loop_program` gives the checked output and the times."""
  shapes = _abstract_inputs(config, groups)
  set_bytes = _nbytes(shapes)
  calls = _estimated_loop_iters(config, groups)
  num_sets, _ = _fit_sets(config, set_bytes, 0, reserve, budget, "device")
  while True:
    trips = -(-calls // num_sets)
    start = time.perf_counter()
    compiled = jax.jit(_loop_program(fn, trips)).lower((shapes,) * num_sets).compile()
    compile_s = time.perf_counter() - start
    temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0) or 0
    fits, need = _fit_sets(config, set_bytes, 0, reserve + temp, budget, "device")
    if fits >= num_sets:
      break
    num_sets = fits  # the program's temporaries leave room for fewer sets: recompile
  sets = make_inputs(config, groups, num_sets)
  start = time.perf_counter()
  out, _ = jax.block_until_ready(compiled(tuple(sets)))
  first_call_s = time.perf_counter() - start
  per_call = []
  for _ in range(config.loop_repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(tuple(sets)))
    per_call.append((time.perf_counter() - start) / (trips * num_sets + 1))
  median, p10, p90 = np.percentile(per_call, [50, 10, 90])
  metrics = {
      "us_per_step": 1e6 * median, "step_timing": "loop", "median_us_loop": 1e6 * median,
      "p10_us_loop": 1e6 * p10, "p90_us_loop": 1e6 * p90, "loop_calls": trips * num_sets,
      "compile_s": compile_s, "first_call_s": first_call_s, "est_memory_gb": need / _GB,
  }
  return metrics, sets, out


def _run_in_process(config: ml_collections.ConfigDict, fn: Any,
                    groups: int | None) -> dict[str, Any]:
  """Compiles, sizes the input sets to the memory budget, times and checks `fn`."""
  torch_peers.close_child()  # a kept-alive torch child would hold device memory
  out_bytes = config.batch * config.num_heads * config.head_dim * 4
  reserve = _CHUNK_TEMP_FACTOR * config.chunk_mb * _MB + out_bytes
  timer = _time_wall_and_loop if config.wall_timing else _time_one_program
  metrics, sets, out = timer(config, fn, groups, reserve, _memory_budget(config))
  read, dense = kv_bytes(config, sets)
  metrics.update(input_sets=len(sets), rotated_mb=len(sets) * _nbytes(sets[0]) / _MB,
                 kv_bytes=read, dense_kv_bytes=dense)
  if "median_us_wall" in metrics:
    metrics["kv_tbps_wall"] = read / metrics["median_us_wall"] / 1e6
  if config.check:
    select = check_row_ids(config.batch, config.check_rows)
    checked = config.batch if select is None else len(select)
    # Per batch row the reference holds float32 K and V, cast and repeated to Nq heads.
    row_bytes = 8 * config.kv_len * config.head_dim * (config.num_heads + config.num_kv_heads)
    rows = chunk_rows(checked, row_bytes, config.chunk_mb * _MB)
    metrics["max_abs_err"] = float(_max_abs_err(out, sets[0], rows=rows, select=select))
  return metrics


def run_point(config: ml_collections.ConfigDict, point: dict[str, Any]) -> dict[str, Any]:
  """Times one (implementation, batch, kv_len, heads, head density) decode point.

  Args:
    config: the study config with the point's fields already set (module docstring).
    point: the sweep point (unused beyond config; recorded by the launcher).

  Returns:
    Metrics: step time (loop, and wall with wall_timing, or CUDA events for torch), KV
    bandwidth and % of the copy ceiling, dense-equivalent bandwidth, KV bytes, input sets,
    error against the float32 reference, the kernel and launch shape of flashjax backends.

  Raises:
    NotImplementedError: a peer below head density 1, an unavailable peer or backend, or a
      point over the memory budget (the launcher records "unsupported").
    ValueError: bad config values (a peer with block sizes, an unknown peer, ...).
  """
  del point
  groups = num_groups(config.head_density, config.num_kv_heads)
  if config.head_density == 1:
    groups = None  # dense: head_indices=None
  check_row_ids(config.batch, config.check_rows)  # bad values fail before any work
  if config.implementation.startswith(PEER_PREFIX):
    peer = _peer(config, groups)
    if isinstance(peer, third_party.TorchPeer):
      metrics = _run_torch(config, peer)
    else:
      metrics = _run_in_process(config, peer.make(), groups)
  else:
    extra = _flashjax_metrics(config, groups)
    metrics = _run_in_process(config, _flashjax_fn(config), groups)
    metrics.update(extra)

  seconds = metrics["us_per_step"] * 1e-6
  metrics.update(groups=groups or config.num_kv_heads,
                 kv_tbps=metrics["kv_bytes"] / seconds / 1e12,
                 dense_equiv_tbps=metrics["dense_kv_bytes"] / seconds / 1e12)
  ceilings = benchmarking.device_ceilings(jax.devices()[0].device_kind, config.dtype)
  if ceilings and "hbm_bytes_per_s" in ceilings:
    metrics["pct_of_ceiling"] = benchmarking.percent_of_ceiling(
        metrics["kv_bytes"] / seconds, ceilings["hbm_bytes_per_s"])
  if "max_abs_err" in metrics:
    # NaN never passes.
    metrics["within_tol"] = metrics["max_abs_err"] <= TOLERANCES.get(config.dtype, 1e-4)
  return metrics
