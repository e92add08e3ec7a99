"""Timing, FLOP / byte counting and hardware ceilings for benchmarks.

Two timers:

* `time_fn` times whole calls from Python: the first call (trace + compile + one run) is
  reported separately as `compile_s`, then `warmup` untimed calls, then `iters` timed calls,
  each ended by `jax.block_until_ready`. Good for kernels that run much longer than JAX's
  dispatch overhead (tens of microseconds).
* `time_in_loop` runs the function many times inside one jitted `lax.fori_loop`, so dispatch
  is paid once per loop, and reports the time per iteration. Use it for small kernels such as
  batched decode. Each iteration's inputs pass through `lax.optimization_barrier` together
  with the loop carry so XLA cannot hoist the work out of the loop, and the outputs are summed
  into the carry so it cannot drop the work either (one extra reduction over the outputs per
  iteration is part of the measured time).

Both accept several input sets (`arg_sets`) and rotate among them, so consecutive calls do not
hit inputs that are still in the GPU's L2 cache. `output_and_loop` builds one program that
both returns an output to check and runs such a loop, and `time_program` times whole runs of
a compiled program (one compile for checking and timing).

Provenance: `environment_info` (what every result row records) and `source_tree_hash` (a
content hash of the code, beside the git commit).

Sizing a benchmark: `device_memory_budget` (what the device has free), `fit_input_sets` (how
many input sets fit that budget with the program's working memory) and `loop_calls` (calls
per timed loop for a target loop time).

FLOP conventions (docs/architecture.md, "Design"): dense attention forward 4*B*N*T*S*D
(QK^T and PV, 2 FLOPs per multiply-add), half of that for causal, backward 2.5x forward;
"useful" FLOPs of a masked attention count only allowed (query, key) pairs: 4*N*D per pair.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

# Ceilings measured on an NVIDIA H200 (docs/architecture.md, "Design"): dense bf16 matmul,
# and achieved HBM copy bandwidth (the spec sheet says 4.8 TB/s; copies reach about 4.3-4.6).
H200_BF16_MATMUL_FLOPS_PER_S = 790e12
H200_HBM_BYTES_PER_S = 4.3e12
H200_HBM_SPEC_BYTES_PER_S = 4.8e12
# NVIDIA H100 80GB HBM3: achieved copy bandwidth (bytes read + written per second) measured
# by `measured_copy_bandwidth` on 2026-12-06 (jax 0.11.2; the spec sheet says 3.35 TB/s).
# Its matmul ceiling has not been measured here; device_ceilings gives the datasheet's.
H100_HBM_BYTES_PER_S = 2.74e12

MEASURED, DATASHEET = "measured", "datasheet"


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """Ceilings of one GPU model: vendor datasheet peaks, and what was measured here.

  Attributes:
    name: canonical name (the `device_kind` JAX reports where known).
    datasheet_flops_per_s: dense (no 2:4 sparsity) bf16 / fp16 tensor-core peak.
    datasheet_hbm_bytes_per_s: HBM bandwidth of the datasheet.
    source: the datasheet the two peaks come from.
    measured_flops_per_s: dense bf16 matmul measured on this model (None: not measured).
    measured_hbm_bytes_per_s: achieved copy bandwidth measured here (None: not measured).
    l2_bytes: L2 cache capacity (every Hopper part listed: 50 MB, NVIDIA Hopper architecture
      whitepaper).
  """

  name: str
  datasheet_flops_per_s: float
  datasheet_hbm_bytes_per_s: float
  source: str
  measured_flops_per_s: float | None = None
  measured_hbm_bytes_per_s: float | None = None
  l2_bytes: float = 50e6


# Vendor datasheet peaks, dense bf16 / fp16 tensor-core FLOP/s (the datasheets print the 2:4
# sparsity figure; dense is half of it) and HBM bandwidth. Order matters in `device_spec`:
# "GH200" contains "H200", and the PCIe / NVL parts are checked before the SXM ones.
DEVICE_SPECS = (
    DeviceSpec("NVIDIA GH200 480GB", 989.4e12, 4.0e12,
               "NVIDIA GH200 Grace Hopper Superchip datasheet (96 GB HBM3: 4 TB/s; "
               "990 TFLOP/s dense BF16)"),
    DeviceSpec("NVIDIA GH200 144G HBM3e", 989.4e12, 4.9e12,
               "NVIDIA GH200 Grace Hopper Superchip datasheet (144 GB HBM3e: 4.9 TB/s)"),
    DeviceSpec("NVIDIA H200 NVL", 835.5e12, 4.8e12,
               "NVIDIA H200 NVL datasheet (1,671 TFLOP/s BF16 with sparsity, 4.8 TB/s)"),
    DeviceSpec("NVIDIA H200", 989.4e12, 4.8e12,
               "NVIDIA H200 SXM datasheet (1,979 TFLOP/s BF16 with sparsity, 4.8 TB/s "
               "HBM3e)", measured_flops_per_s=H200_BF16_MATMUL_FLOPS_PER_S,
               measured_hbm_bytes_per_s=H200_HBM_BYTES_PER_S),
    DeviceSpec("NVIDIA H100 PCIe", 756.5e12, 2.0e12,
               "NVIDIA H100 PCIe datasheet (1,513 TFLOP/s BF16 with sparsity, 2 TB/s "
               "HBM2e)"),
    DeviceSpec("NVIDIA H100 NVL", 835.5e12, 3.9e12,
               "NVIDIA H100 NVL datasheet (1,671 TFLOP/s BF16 with sparsity per GPU, "
               "3.9 TB/s HBM3)"),
    DeviceSpec("NVIDIA H100 80GB HBM3", 989.4e12, 3.35e12,
               "NVIDIA H100 SXM5 datasheet (1,979 TFLOP/s BF16 with sparsity, 3.35 TB/s "
               "HBM3)", measured_hbm_bytes_per_s=H100_HBM_BYTES_PER_S),
)


def device_spec(device_kind: str | None) -> DeviceSpec | None:
  """The DEVICE_SPECS entry of a `device_kind` string, or None for an unknown kind.

  Matching is by model: "GH200" (the 144 GB HBM3e part when the kind says "HBM3e" or
  "144"), "H200" ("NVL" for the PCIe-card part), "H100" ("PCIe", "NVL", else the SXM5
  80GB HBM3 part). Other names (CPU, TPU, H800, H20, ...) give None.
  """
  if not device_kind:
    return None
  kind = device_kind.upper()
  by_name = {spec.name: spec for spec in DEVICE_SPECS}
  if "GH200" in kind:
    hbm3e = "HBM3E" in kind or "144" in kind
    return by_name["NVIDIA GH200 144G HBM3e" if hbm3e else "NVIDIA GH200 480GB"]
  if re.search(r"\bH200\b", kind):
    return by_name["NVIDIA H200 NVL" if "NVL" in kind else "NVIDIA H200"]
  if re.search(r"\bH100\b", kind):
    if "PCIE" in kind:
      return by_name["NVIDIA H100 PCIe"]
    return by_name["NVIDIA H100 NVL" if "NVL" in kind else "NVIDIA H100 80GB HBM3"]
  return None


_MODES = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


@dataclasses.dataclass(frozen=True)
class Timing:
  """Result of a timer.

  Attributes:
    compile_s: seconds of the first call (trace, compile and one run).
    times_s: seconds per call of each timed run (for `time_in_loop`, each entry is one whole
      loop divided by its number of calls).
    method: "wall" (`time_fn`) or "loop" (`time_in_loop`).
    calls_per_sample: calls behind each entry of `times_s`.
  """

  compile_s: float
  times_s: tuple[float, ...]
  method: str
  calls_per_sample: int = 1

  @property
  def median_s(self) -> float:
    return float(np.median(self.times_s))

  @property
  def p10_s(self) -> float:
    return float(np.percentile(self.times_s, 10))

  @property
  def p90_s(self) -> float:
    return float(np.percentile(self.times_s, 90))

  @property
  def mean_s(self) -> float:
    return float(np.mean(self.times_s))

  @property
  def min_s(self) -> float:
    return float(np.min(self.times_s))

  def summary(self) -> dict[str, Any]:
    """Milliseconds summary for JSON results."""
    ms = lambda s: 1e3 * s
    return {
        "compile_s": self.compile_s,
        "median_ms": ms(self.median_s),
        "p10_ms": ms(self.p10_s),
        "p90_ms": ms(self.p90_s),
        "mean_ms": ms(self.mean_s),
        "min_ms": ms(self.min_s),
        "samples": len(self.times_s),
        "calls_per_sample": self.calls_per_sample,
        "timing": self.method,
    }


def _input_sets(args: tuple, arg_sets: Sequence[Sequence[Any]] | None) -> list[tuple]:
  if arg_sets is None:
    return [tuple(args)]
  if args:
    raise ValueError(f"pass inputs either positionally or as arg_sets, not both: "
                     f"{len(args)=}, {len(arg_sets)=}")
  if not arg_sets:
    raise ValueError(f"arg_sets must not be empty: {arg_sets=}")
  return [tuple(a) for a in arg_sets]


def time_fn(fn: Callable[..., Any], *args: Any, warmup: int = 3, iters: int = 20,
            arg_sets: Sequence[Sequence[Any]] | None = None) -> Timing:
  """Times `fn(*inputs)` call by call, each call synchronised with block_until_ready.

  Args:
    fn: the function to time, normally jitted (its first call then compiles).
    *args: inputs of every call (when `arg_sets` is None).
    warmup: untimed calls after the first one.
    iters: timed calls; reported numbers use >= 20 (docs/architecture.md, "Design").
    arg_sets: several input tuples; call i uses arg_sets[i % len(arg_sets)].

  Returns:
    Timing with method "wall".
  """
  if iters < 1 or warmup < 0:
    raise ValueError(f"need iters >= 1 and warmup >= 0: {iters=}, {warmup=}")
  sets = _input_sets(args, arg_sets)
  start = time.perf_counter()
  jax.block_until_ready(fn(*sets[0]))
  compile_s = time.perf_counter() - start
  for i in range(warmup):
    jax.block_until_ready(fn(*sets[(i + 1) % len(sets)]))
  times = []
  for i in range(iters):
    inputs = sets[(warmup + 1 + i) % len(sets)]
    start = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    times.append(time.perf_counter() - start)
  return Timing(compile_s, tuple(times), "wall")


def _sum_leaves(tree: Any) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return sum((jnp.sum(x, dtype=jnp.float32) for x in leaves), jnp.zeros((), jnp.float32))


def _loop_over_sets(fn: Callable[..., Any], sets: Sequence[tuple], trips: int,
                    total: Callable[[Any], jax.Array]) -> jax.Array:
  """float32 sum of total(fn(*inputs)) over `trips` fori_loop iterations x every set."""

  def body(_, acc):
    for inputs in sets:
      # The barrier makes the inputs depend on the carry: nothing is loop invariant.
      inputs, acc = jax.lax.optimization_barrier((inputs, acc))
      acc = acc + total(fn(*inputs))
    return acc

  return jax.lax.fori_loop(0, trips, body, jnp.zeros((), jnp.float32))


def time_in_loop(fn: Callable[..., Any], *args: Any, iters: int = 100, repeats: int = 5,
                 arg_sets: Sequence[Sequence[Any]] | None = None) -> Timing:
  """Times `fn` per iteration of a jitted `lax.fori_loop` (for kernels shorter than dispatch).

  Every loop iteration calls `fn` once on each input set (in order), so the loop runs
  ceil(iters / len(arg_sets)) iterations and makes that many times len(arg_sets) calls.

  Args:
    fn: a traceable function of arrays.
    *args: inputs (when `arg_sets` is None).
    iters: calls per loop (rounded up to a multiple of the number of input sets).
    repeats: how many times the whole loop is timed after the compiling call.
    arg_sets: several input tuples to rotate among.

  Returns:
    Timing with method "loop"; `times_s` holds one per-call time per repeat.
  """
  if iters < 1 or repeats < 1:
    raise ValueError(f"need iters >= 1 and repeats >= 1: {iters=}, {repeats=}")
  sets = _input_sets(args, arg_sets)
  trips = -(-iters // len(sets))
  calls = trips * len(sets)

  @jax.jit
  def loop(sets):
    return _loop_over_sets(fn, sets, trips, _sum_leaves)

  start = time.perf_counter()
  jax.block_until_ready(loop(sets))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(loop(sets))
    times.append((time.perf_counter() - start) / calls)
  return Timing(compile_s, tuple(times), "loop", calls_per_sample=calls)


def output_and_loop(fn: Callable[..., jax.Array], trips: int) -> Callable[..., Any]:
  """program(sets) -> (fn(*sets[0]), float32 checksum of `trips` loop iterations).

  One program that both gives an output to check (the first set's) and times the step:
  each iteration calls `fn` once on every set, as `time_in_loop` does (the barrier makes each
  call depend on the carry, so nothing is hoisted out of the loop). Compile it (e.g.
  `jax.jit(program).lower(...).compile()`) and time it with `time_program`, counting
  trips * len(sets) + 1 calls per run.

  Args:
    fn: a traceable function returning one array.
    trips: loop iterations (>= 1).

  Returns:
    The program, a function of the tuple of input sets.
  """
  if trips < 1:
    raise ValueError(f"{trips=} must be >= 1")

  def program(sets):
    total = lambda out: jnp.sum(out, dtype=jnp.float32)
    return fn(*sets[0]), _loop_over_sets(fn, sets, trips, total)

  return program


def time_program(program: Callable[..., Any], *args: Any, repeats: int,
                 calls_per_run: int) -> tuple[Timing, Any]:
  """Times whole runs of a (compiled) program that makes `calls_per_run` calls per run.

  Args:
    program: e.g. a compiled `output_and_loop` program.
    *args: its arguments.
    repeats: timed runs after the first (untimed, reported as compile_s).
    calls_per_run: calls of the timed function per run; each time is run time / this.

  Returns:
    (Timing with method "loop", the first run's output).
  """
  if repeats < 1 or calls_per_run < 1:
    raise ValueError(f"need repeats >= 1 and calls_per_run >= 1: {repeats=}, "
                     f"{calls_per_run=}")
  start = time.perf_counter()
  first = jax.block_until_ready(program(*args))
  first_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(program(*args))
    times.append((time.perf_counter() - start) / calls_per_run)
  return Timing(first_s, tuple(times), "loop", calls_per_sample=calls_per_run), first


def device_memory_budget(budget_gb: float | None = None, *, fraction: float = 0.9,
                         device: Any = None) -> float | None:
  """Bytes a benchmark may use on the device, or None for no limit.

  Args:
    budget_gb: an explicit budget in GB (1e9 bytes); returned as bytes when given.
    fraction: else this fraction of what the device reports free (its `bytes_limit` less
      `bytes_in_use`).
    device: the device asked (default: the first device).

  Returns:
    Bytes, or None where the device reports no limit (e.g. on CPU).
  """
  if budget_gb is not None:
    return budget_gb * 1e9
  if not 0 < fraction <= 1:
    raise ValueError(f"{fraction=} must lie in (0, 1]")
  stats = (device or jax.devices()[0]).memory_stats() or {}
  if "bytes_limit" not in stats:
    return None
  return fraction * (stats["bytes_limit"] - stats.get("bytes_in_use", 0))


def fit_input_sets(set_bytes: float, per_set_extra: float, fixed_bytes: float,
                   budget: float | None, *, max_sets: int,
                   min_rotation_bytes: float | None = None,
                   where: str = "device") -> tuple[int, float]:
  """How many input sets of a benchmark fit a memory budget, and the bytes they need.

  n sets need n * (set_bytes + per_set_extra) + fixed_bytes.

  Args:
    set_bytes: bytes of one input set.
    per_set_extra: bytes that may be needed once per set besides it (program temporaries:
      a timing loop may keep one per unrolled call).
    fixed_bytes: bytes needed once (outputs, generation and check chunks).
    budget: bytes available, None for no limit.
    max_sets: most sets wanted (>= 1).
    min_rotation_bytes: None: want `max_sets`; else only as many sets as needed to rotate
      through this many bytes (so that small inputs are not served from a cache).
    where: "device", "torch child", ...: where the memory is, for the reason.

  Returns:
    (number of sets, bytes needed).

  Raises:
    NotImplementedError: not even one set fits (the reason gives the sizes).
  """
  if max_sets < 1 or not set_bytes > 0:
    raise ValueError(f"need max_sets >= 1 and set_bytes > 0: {max_sets=}, {set_bytes=}")
  want = max_sets
  if min_rotation_bytes is not None:
    want = min(want, max(1, math.ceil(min_rotation_bytes / set_bytes)))
  need = lambda n: n * (set_bytes + per_set_extra) + fixed_bytes
  if budget is not None:
    if need(1) > budget:
      raise NotImplementedError(
          f"needs {need(1) / 1e9:.3g} GB on the {where} ({set_bytes / 1e9:.3g} GB of inputs "
          f"+ {(need(1) - set_bytes) / 1e9:.3g} GB working memory) > budget "
          f"{budget / 1e9:.3g} GB")
    want = max(n for n in range(1, want + 1) if need(n) <= budget)
  return want, need(want)


def loop_calls(target_s: float, step_s: float, min_calls: int, max_calls: int) -> int:
  """Calls per timed loop for a loop of about `target_s` of steps of `step_s` each,
  clamped to [min_calls, max_calls]."""
  if not 1 <= min_calls <= max_calls:
    raise ValueError(f"need 1 <= min_calls <= max_calls: {min_calls=}, {max_calls=}")
  calls = math.ceil(target_s / max(step_s, 1e-9))
  return min(max(calls, min_calls), max_calls)


def _check_mode(mode: str) -> float:
  if mode not in _MODES:
    raise ValueError(f"{mode=} must be one of {sorted(_MODES)}")
  return _MODES[mode]


def attention_flops(batch: int, q_len: int, kv_len: int, num_heads: int, head_dim: int,
                    causal: bool = False, mode: str = "fwd") -> float:
  """Nominal FLOPs of dense attention: 4*B*N*T*S*D forward, half if causal.

  Args:
    batch: B.
    q_len: T.
    kv_len: S.
    num_heads: query heads Nq.
    head_dim: D.
    causal: halve the count (the usual FlashAttention convention).
    mode: "fwd", "bwd" (2.5x forward) or "fwd_bwd" (3.5x forward).

  Returns:
    FLOPs as a float.
  """
  factor = _check_mode(mode)
  flops = 4.0 * batch * num_heads * q_len * kv_len * head_dim
  if causal:
    flops /= 2
  return flops * factor


def masked_attention_flops(num_heads: int, head_dim: int, allowed_pairs: float,
                           mode: str = "fwd") -> float:
  """"Useful" FLOPs of masked attention: 4*N*D per allowed (query, key) pair.

  Args:
    num_heads: query heads Nq.
    head_dim: D.
    allowed_pairs: allowed (query, key) pairs per head, summed over the batch (see
      `count_allowed_pairs`).
    mode: "fwd", "bwd" or "fwd_bwd".

  Returns:
    FLOPs as a float.
  """
  return 4.0 * num_heads * head_dim * float(allowed_pairs) * _check_mode(mode)


def count_allowed_pairs(mask: Any, batch: int = 1) -> float:
  """Allowed (query, key) pairs per head, summed over the batch.

  Args:
    mask: bool array [T, S] or [B|1, N|1, T, S], or anything with `.to_dense()` returning one
      (a flashjax.masks.Mask).
    batch: B; a mask without a batch axis (or with batch 1) counts once per batch row.

  Returns:
    The count (averaged over the head axis when heads differ).
  """
  dense = np.asarray(mask.to_dense() if hasattr(mask, "to_dense") else mask, dtype=bool)
  if dense.ndim == 2:
    dense = dense[None, None]
  if dense.ndim != 4:
    raise ValueError(f"mask must be 2-D or 4-D: {dense.shape=}")
  if dense.shape[0] not in (1, batch):
    raise ValueError(f"mask batch axis does not match: {dense.shape=}, {batch=}")
  per_row = dense.sum(axis=(2, 3), dtype=np.int64).mean(axis=1)  # [B|1]
  return float(per_row.sum() * (batch // dense.shape[0]))


def decode_kv_bytes(lengths: Any, num_kv_heads: int, head_dim: int, dtype: Any,
                    head_indices: Any = None) -> float:
  """Bytes of K and V a decode step must read: valid entries of the selected heads only.

  Args:
    lengths: [B] valid cache entries per sequence.
    num_kv_heads: Nkv of the cache.
    head_dim: D.
    dtype: cache dtype (its itemsize counts).
    head_indices: None (all KV heads) or [B, K] KV-head ids read per sequence; duplicate ids
      in a row count once.

  Returns:
    Bytes as a float.
  """
  lengths = np.asarray(lengths, dtype=np.int64)
  if lengths.ndim != 1:
    raise ValueError(f"lengths must be [B]: {lengths.shape=}")
  if head_indices is None:
    heads = np.full(lengths.shape, num_kv_heads, dtype=np.int64)
  else:
    head_indices = np.asarray(head_indices)
    if head_indices.ndim != 2 or head_indices.shape[0] != lengths.shape[0]:
      raise ValueError(f"head_indices must be [B, K]: {head_indices.shape=}, "
                       f"{lengths.shape=}")
    heads = np.array([len(np.unique(row)) for row in head_indices], dtype=np.int64)
  itemsize = np.dtype(dtype).itemsize
  return float(2 * itemsize * head_dim * np.sum(lengths * heads))


def percent_of_ceiling(value: float, ceiling: float) -> float:
  """100 * value / ceiling (e.g. achieved FLOP/s against the device's matmul ceiling)."""
  if not ceiling > 0:
    raise ValueError(f"{ceiling=} must be positive")
  return 100.0 * value / ceiling


def device_ceilings(device_kind: str | None,
                    dtype: Any = jnp.bfloat16) -> dict[str, Any] | None:
  """The ceilings of a device kind, or None for a kind without a DEVICE_SPECS entry.

  Each ceiling is the measured one where it was measured on that kind (H200: bf16 / fp16
  matmul and copy bandwidth; H100 80GB HBM3: copy bandwidth), else the vendor datasheet's
  peak; `flops_source` / `hbm_source` say which ("measured" or "datasheet"), and the
  datasheet peaks are always given beside them. The matmul ceiling is given for bf16 and
  fp16 only (no float32 ceiling).

  Args:
    device_kind: `jax.devices()[0].device_kind`, e.g. "NVIDIA H200" or
      "NVIDIA H100 80GB HBM3".
    dtype: compute dtype.

  Returns:
    {"device": canonical name, "hbm_bytes_per_s", "hbm_source",
    "datasheet_hbm_bytes_per_s", "source" (the datasheet), "l2_bytes", and for bf16 / fp16
    "flops_per_s", "flops_source", "datasheet_flops_per_s"} or None.
  """
  spec = device_spec(device_kind)
  if spec is None:
    return None
  measured_hbm = spec.measured_hbm_bytes_per_s
  ceilings: dict[str, Any] = {
      "device": spec.name, "source": spec.source,
      "hbm_bytes_per_s": measured_hbm or spec.datasheet_hbm_bytes_per_s,
      "hbm_source": MEASURED if measured_hbm else DATASHEET,
      "datasheet_hbm_bytes_per_s": spec.datasheet_hbm_bytes_per_s,
      "l2_bytes": spec.l2_bytes}
  if np.dtype(dtype) in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16)):
    measured = spec.measured_flops_per_s
    ceilings.update(flops_per_s=measured or spec.datasheet_flops_per_s,
                    flops_source=MEASURED if measured else DATASHEET,
                    datasheet_flops_per_s=spec.datasheet_flops_per_s)
  return ceilings


def running_device_kind() -> str:
  """`device_kind` of the default JAX device ("cpu" on a CPU host)."""
  return jax.devices()[0].device_kind


@functools.cache
def measured_copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> float:
  """Device-to-device copy bandwidth of the default device, bytes read + written per second.

  Rewrites a float32 buffer of `nbytes` (keep it many times the L2 cache) in place, `iters`
  times inside one jitted loop (each step reads and writes every byte once: a loop-carried
  elementwise op that XLA can neither fuse across steps nor drop), and counts 2 * nbytes
  per step. Measured once per process: the ceiling that memory-bound rows are reported
  against, on whatever device runs them.

  Args:
    nbytes: buffer size.
    iters: steps per timed loop.

  Returns:
    Median bytes per second over 5 timed loops.
  """
  source = jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)
  loop = jax.jit(lambda a: jax.lax.fori_loop(0, iters, lambda _, b: b * 1.0001, a))
  timing = time_fn(loop, source, warmup=1, iters=5)
  return 2 * nbytes * iters / timing.median_s


@functools.cache
def _git_state() -> tuple[str | None, bool | None]:
  repo = _checkout_root()
  try:
    commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    status = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, timeout=10, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None, None
  return commit, bool(status.strip())


# What `source_tree_hash` covers by default: the library, the study configs and the
# experiment kinds (the code that decides what a benchmark row measures).
SOURCE_TREE_PARTS = ("flashjax", "configs", "experiments")


def _checkout_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_tree_hash(root: str | None = None,
                     parts: Sequence[str] = SOURCE_TREE_PARTS) -> str:
  """sha256 of the *.py files under `parts` of `root`: which code produced a row.

  Unlike a git commit it names uncommitted edits and copies outside git: the digest covers
  each file's path relative to `root` (with "/" separators) and its bytes, files in sorted
  path order, so it changes when any file is edited, added, removed or renamed. Directories
  named __pycache__ or starting with "." are skipped.

  Args:
    root: directory holding `parts` (default: this flashjax checkout).
    parts: directories (or single files) below `root`; at least one must exist.

  Returns:
    "sha256:" followed by 64 hex digits.

  Raises:
    ValueError: no part exists under `root`, or `parts` is empty.
  """
  root = os.path.abspath(root or _checkout_root())
  if not parts:
    raise ValueError(f"{parts=} must name at least one directory below {root}")
  files = []
  found = False
  for part in parts:
    top = os.path.join(root, part)
    if os.path.isfile(top):
      found = True
      files.append(top)
      continue
    if not os.path.isdir(top):
      continue
    found = True
    for dirpath, dirnames, filenames in os.walk(top):
      dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
      files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
  if not found:
    raise ValueError(f"none of {list(parts)} exists under {root}")
  digest = hashlib.sha256()
  for path in sorted(set(files), key=lambda p: os.path.relpath(p, root).replace(os.sep, "/")):
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    with open(path, "rb") as f:
      data = f.read()
    digest.update(f"{rel}\0{len(data)}\0".encode())
    digest.update(data)
  return "sha256:" + digest.hexdigest()


@functools.cache
def _this_tree_hash() -> str | None:
  try:
    return source_tree_hash()
  except (OSError, ValueError):
    return None


def environment_info() -> dict[str, Any]:
  """What a result row must record about where it was measured.

  Returns:
    jax / jaxlib versions, backend, device kind and count, Python version, host name, the
    git commit of the flashjax checkout (None outside a git checkout), whether the
    checkout had uncommitted changes to tracked files, and `source_hash`: the
    `source_tree_hash` of this checkout's flashjax/, configs/ and experiments/ (computed
    once per process), which identifies the code of a dirty or non-git copy too.
  """
  commit, dirty = _git_state()
  return {
      "jax_version": jax.__version__,
      "jaxlib_version": jaxlib.__version__,
      "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind,
      "device_count": jax.device_count(),
      "python_version": platform.python_version(),
      "hostname": platform.node(),
      "git_commit": commit,
      "git_dirty": dirty,
      "source_hash": _this_tree_hash(),
  }
