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
separately compiled programs. Without, a single program (`benchmarking.output_and_loop`)
computes fn on the first set (the output the check reads) and then loops over `loop_calls`
calls; each of its timed runs (`benchmarking.time_program`) counts loop_calls + 1 calls.
Inputs, KV bytes and the error check come from flashjax.workloads, the memory budget and
the fitting of input sets to it from flashjax.benchmarking. torch peers run in a child process (third_party.torch_peers)
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

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import flashjax
from experiments import attention_bench
from experiments.attention_bench import PEER_PREFIX, TOLERANCES
from flashjax import benchmarking
from flashjax import workloads
from flashjax.ops.decode import api as decode_api
from flashjax.ops.decode import block_sizes as decode_block_sizes
from flashjax.ops.decode import pallas_triton
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


def _input_shapes(config: ml_collections.ConfigDict,
                  groups: int | None) -> tuple[jax.ShapeDtypeStruct, ...]:
  return workloads.decode_input_shapes(
      batch=config.batch, kv_len=config.kv_len, num_heads=config.num_heads,
      num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=config.dtype,
      groups=groups)


def make_inputs(config: ml_collections.ConfigDict, groups: int | None,
                num_sets: int) -> list[tuple[jax.Array, ...]]:
  """`num_sets` input sets of the point (flashjax.workloads.decode_inputs)."""
  return workloads.decode_inputs(
      batch=config.batch, kv_len=config.kv_len, num_heads=config.num_heads,
      num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=config.dtype,
      groups=groups, num_sets=num_sets, seed=config.seed, ragged=config.ragged,
      chunk_bytes=config.chunk_mb * _MB)


def _fit_sets(config: ml_collections.ConfigDict, set_bytes: float, per_set_extra: float,
              fixed_bytes: float, budget: float | None, who: str) -> tuple[int, float]:
  """benchmarking.fit_input_sets with the point's input_sets and min_rotation_mb."""
  rotation = None if config.min_rotation_mb is None else config.min_rotation_mb * _MB
  return benchmarking.fit_input_sets(set_bytes, per_set_extra, fixed_bytes, budget,
                                     max_sets=config.input_sets,
                                     min_rotation_bytes=rotation, where=who)


def _loop_iters(config: ml_collections.ConfigDict, wall_median_s: float) -> int:
  if config.loop_iters is not None:
    return config.loop_iters
  # The wall time includes dispatch, so this slightly undershoots the target loop time.
  return benchmarking.loop_calls(config.loop_target_ms * 1e-3, wall_median_s,
                                 config.loop_min_iters, config.loop_max_iters)


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
  return benchmarking.loop_calls(config.loop_target_ms * 1e-3, step_s,
                                 config.loop_min_iters, config.loop_max_iters)


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
  set_bytes = workloads.nbytes(_input_shapes(config, None))
  # Working memory besides the inputs: SDPA's float32 logits and, in case its math path
  # serves GQA by expanding K and V to Nq heads, that copy. The child's float32 reference
  # converts a few heads of one batch row at a time (negligible).
  b, s, d, nq = config.batch, config.kv_len, config.head_dim, config.num_heads
  expanded = 0 if nq == config.num_kv_heads else 2 * b * s * nq * d * jnp.dtype(
      config.dtype).itemsize
  working = expanded + 4 * b * nq * s
  budget = None if config.torch_memory_gb is None else config.torch_memory_gb * _GB
  num_sets, need = _fit_sets(config, set_bytes, 0, working, budget, "torch child")
  lengths = workloads.sample_lengths(np.random.default_rng([config.seed, 0]), b,
                                     config.kv_len, config.ragged)
  case = {k: config[k] for k in ("batch", "num_heads", "num_kv_heads", "head_dim", "dtype",
                                 "kv_len", "warmup", "iters", "seed")}
  rows = workloads.check_row_ids(b, config.check_rows)
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


def _time_wall_and_loop(config: ml_collections.ConfigDict, fn: Any, groups: int | None,
                        reserve: float, budget: float | None):
  """wall_timing: compiled fn timed call by call, then benchmarking.time_in_loop."""
  shapes = _input_shapes(config, groups)
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*shapes).compile()
  compile_s = time.perf_counter() - start
  temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0) or 0
  num_sets, need = _fit_sets(config, workloads.nbytes(shapes), temp, reserve, budget,
                             "device")
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
  """No wall timing: one compiled `benchmarking.output_and_loop` program gives the checked
  output and the times."""
  shapes = _input_shapes(config, groups)
  set_bytes = workloads.nbytes(shapes)
  calls = _estimated_loop_iters(config, groups)
  num_sets, _ = _fit_sets(config, set_bytes, 0, reserve, budget, "device")
  while True:
    trips = -(-calls // num_sets)
    start = time.perf_counter()
    compiled = jax.jit(benchmarking.output_and_loop(fn, trips)).lower(
        (shapes,) * num_sets).compile()
    compile_s = time.perf_counter() - start
    temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0) or 0
    fits, need = _fit_sets(config, set_bytes, 0, reserve + temp, budget, "device")
    if fits >= num_sets:
      break
    num_sets = fits  # the program's temporaries leave room for fewer sets: recompile
  sets = make_inputs(config, groups, num_sets)
  loop, (out, _) = benchmarking.time_program(compiled, tuple(sets),
                                             repeats=config.loop_repeats,
                                             calls_per_run=trips * num_sets + 1)
  metrics = {
      "us_per_step": 1e6 * loop.median_s, "step_timing": "loop",
      "median_us_loop": 1e6 * loop.median_s, "p10_us_loop": 1e6 * loop.p10_s,
      "p90_us_loop": 1e6 * loop.p90_s, "loop_calls": trips * num_sets,
      "compile_s": compile_s, "first_call_s": loop.compile_s, "est_memory_gb": need / _GB,
  }
  return metrics, sets, out


def _run_in_process(config: ml_collections.ConfigDict, fn: Any,
                    groups: int | None) -> dict[str, Any]:
  """Compiles, sizes the input sets to the memory budget, times and checks `fn`."""
  torch_peers.close_child()  # a kept-alive torch child would hold device memory
  out_bytes = config.batch * config.num_heads * config.head_dim * 4
  reserve = _CHUNK_TEMP_FACTOR * config.chunk_mb * _MB + out_bytes
  timer = _time_wall_and_loop if config.wall_timing else _time_one_program
  metrics, sets, out = timer(config, fn, groups, reserve,
                             benchmarking.device_memory_budget(config.memory_budget_gb))
  read, dense = workloads.decode_kv_bytes_of_sets(sets, config.num_kv_heads, config.head_dim,
                                                  config.dtype)
  metrics.update(input_sets=len(sets), rotated_mb=len(sets) * workloads.nbytes(sets[0]) / _MB,
                 kv_bytes=read, dense_kv_bytes=dense)
  if "median_us_wall" in metrics:
    metrics["kv_tbps_wall"] = read / metrics["median_us_wall"] / 1e6
  if config.check:
    select = workloads.check_row_ids(config.batch, config.check_rows)
    checked = config.batch if select is None else len(select)
    # Per batch row the reference holds float32 K and V, cast and repeated to Nq heads.
    row_bytes = 8 * config.kv_len * config.head_dim * (config.num_heads + config.num_kv_heads)
    rows = workloads.chunk_rows(checked, row_bytes, config.chunk_mb * _MB)
    metrics["max_abs_err"] = float(workloads.decode_max_abs_err(out, sets[0], rows=rows,
                                                                select=select))
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
  groups = workloads.num_groups(config.head_density, config.num_kv_heads)
  if config.head_density == 1:
    groups = None  # dense: head_indices=None
  workloads.check_row_ids(config.batch, config.check_rows)  # bad values fail before any work
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
