"""Sparse MLP benchmark: flashjax.sparse_mlp beside dense MLPs (XLA / cuBLAS, torch).

One point = (implementation, d_model, d_ff, batch, density). The selected neurons are
k = density * F rounded up to 128 (Polar Sparsity's bucket), distinct and sorted, drawn at
random (this op's speed does not depend on which neurons a router picks, only on how many).
Implementations:
  pallas_triton, xla, pallas_tpu   flashjax.sparse_mlp with w1 neuron-major ("FD");
  dense_xla                        the whole MLP through jnp.dot (cuBLAS on a GPU);
  torch_dense                      the whole MLP through torch (F.linear / addmm), timed
                                   with CUDA events in this process (run with
                                   XLA_PYTHON_CLIENT_PREALLOCATE=false).
Dense implementations run at density 1 only (other points are "unsupported" at once).

Each JAX point is timed on the device (benchmarking.time_in_loop: many calls in one jitted
loop, two input sets of x rotated, the weights far larger than the L2), checked against the
float32 reference on 8 rows spread over the batch (`check_rows`), and reports the weight bytes read (selected rows of w1 and w2), the
achieved weight bandwidth and its percentage of the copy bandwidth measured in the same
process (benchmarking.measured_copy_bandwidth).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import flashjax
from flashjax import benchmarking
from flashjax import workloads
from flashjax.ops.sparse_mlp import block_sizes as block_sizes_lib
from flashjax.ops.sparse_mlp import reference

DENSE = ("dense_xla", "torch_dense")
SPARSE = ("pallas_triton", "xla", "pallas_tpu")
TOLERANCES = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
_BLOCK_FIELDS = ("block_k", "block_k_fc2", "block_d", "block_out", "block_b", "num_splits",
                 "num_warps", "num_stages")


def make_weights(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """The point's weights (flashjax.workloads.sparse_mlp_weights)."""
  return workloads.sparse_mlp_weights(d_model=config.d_model, d_ff=config.d_ff,
                                      dtype=config.dtype, seed=config.seed)


def make_x(config: ml_collections.ConfigDict, index: int) -> jax.Array:
  return workloads.sparse_mlp_input(batch=config.batch, d_model=config.d_model,
                                    dtype=config.dtype, seed=config.seed, index=index)


def block_sizes(config: ml_collections.ConfigDict) -> block_sizes_lib.BlockSizes | None:
  """BlockSizes from the config's tile fields (0 = heuristic); None when all are 0."""
  fields = {name: config[name] or None for name in _BLOCK_FIELDS if name in config}
  return block_sizes_lib.BlockSizes(**fields) if any(fields.values()) else None


def _dense_mlp(x, w1, w2, b1, b2):
  """relu MLP over all F neurons, x's dtype with float32 accumulation (w1 is [F, d])."""
  hidden = jnp.dot(x, w1.T, preferred_element_type=jnp.float32) + b1.astype(jnp.float32)
  hidden = jax.nn.relu(hidden).astype(x.dtype)
  out = jnp.dot(hidden, w2, preferred_element_type=jnp.float32) + b2.astype(jnp.float32)
  return out.astype(x.dtype)


def _jax_fn(config: ml_collections.ConfigDict, ids: jax.Array):
  if config.implementation == "dense_xla":
    return _dense_mlp
  sizes = block_sizes(config)

  def sparse(x, w1, w2, b1, b2):
    return flashjax.sparse_mlp(x, w1, w2, ids, b1=b1, b2=b2, w1_layout="FD",
                               implementation=config.implementation, block_sizes=sizes,
                               interpret=bool(config.interpret))

  return sparse


def _time_torch(config: ml_collections.ConfigDict, weights, xs) -> dict[str, Any]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise NotImplementedError(f"torch is not importable: {e}") from e
  if not torch.cuda.is_available():
    raise NotImplementedError("torch_dense needs a CUDA device")
  to_torch = lambda a: torch.from_dlpack(np.asarray(a.astype(jnp.float32))).cuda().to(
      getattr(torch, config.dtype))
  w1, w2, b1, b2 = (to_torch(weights[n]) for n in ("w1", "w2", "b1", "b2"))
  inputs = [to_torch(x) for x in xs]

  def mlp(x):
    return torch.addmm(b2, F.relu(F.linear(x, w1, b1)), w2)

  with torch.no_grad():
    for _ in range(config.warmup):
      mlp(inputs[0])
    torch.cuda.synchronize()
    per_call = []
    for _ in range(config.repeats):
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      for i in range(config.iters):
        mlp(inputs[i % len(inputs)])
      end.record()
      torch.cuda.synchronize()
      per_call.append(start.elapsed_time(end) * 1e-3 / config.iters)
    out = mlp(inputs[0]).float().cpu().numpy()
  median, p10, p90 = np.percentile(per_call, [50, 10, 90])
  return {"median_us": 1e6 * median, "p10_us": 1e6 * p10, "p90_us": 1e6 * p90,
          "timing": "cuda_events", "out": out}


def _time_jax(config: ml_collections.ConfigDict, fn, weights, xs) -> dict[str, Any]:
  args = (weights["w1"], weights["w2"], weights["b1"], weights["b2"])
  start = time.perf_counter()
  out = jax.block_until_ready(jax.jit(fn)(xs[0], *args))
  first_call_s = time.perf_counter() - start
  timing = benchmarking.time_in_loop(fn, iters=config.iters, repeats=config.repeats,
                                     arg_sets=[(x, *args) for x in xs])
  return {"median_us": 1e6 * timing.median_s, "p10_us": 1e6 * timing.p10_s,
          "p90_us": 1e6 * timing.p90_s, "timing": "loop", "first_call_s": first_call_s,
          "loop_compile_s": timing.compile_s, "out": np.asarray(out.astype(jnp.float32))}


def check_rows(batch: int, count: int = 8) -> np.ndarray:
  """Rows the error check reads: `count` spread over the batch, first and last included.

  The float32 reference at Precision.HIGHEST took 10-15 s per point for all 64-256 rows on
  an H100, more than the timing itself; every row uses the same gathered weights, so a
  spread of rows checks the kernel's indexing and the batch tiling.
  """
  return workloads.spread_rows(batch, count)


@jax.jit
def _jitted_reference(x, w1, w2, ids, b1, b2):
  return reference.sparse_mlp_reference(x, w1, w2, ids, b1=b1, b2=b2, w1_layout="FD")


def run_point(config: ml_collections.ConfigDict, point: dict[str, Any]) -> dict[str, Any]:
  """Times one (implementation, shape, batch, density) point; see the module docstring.

  Raises:
    NotImplementedError: a dense implementation below density 1, torch missing, or a
      backend that cannot run here (recorded as "unsupported").
  """
  del point
  impl = config.implementation
  if impl not in DENSE + SPARSE:
    raise ValueError(f"unknown implementation {impl!r}; known: {DENSE + SPARSE}")
  if impl in DENSE and config.density != 1:
    raise NotImplementedError(f"{impl} computes every neuron: density 1 only")
  k = workloads.sparse_mlp_num_selected(config.density, config.d_ff)
  rng = np.random.default_rng(config.seed)
  ids = jnp.asarray(np.sort(rng.choice(config.d_ff, k, replace=False)), jnp.int32)
  start = time.perf_counter()
  weights = make_weights(config)
  xs = [make_x(config, i) for i in range(config.input_sets)]
  jax.block_until_ready((weights, xs))
  inputs_s = time.perf_counter() - start
  if impl == "torch_dense":
    metrics = _time_torch(config, weights, xs)
  else:
    metrics = _time_jax(config, _jax_fn(config, ids), weights, xs)
  out = metrics.pop("out")

  itemsize = jnp.dtype(config.dtype).itemsize
  weight_bytes = 2 * k * config.d_model * itemsize
  seconds = metrics["median_us"] * 1e-6
  copy = benchmarking.measured_copy_bandwidth() if config.measure_copy else None
  metrics.update(inputs_s=inputs_s, k=k, weight_mb=weight_bytes / 1e6,
                 weight_tbps=weight_bytes / seconds / 1e12,
                 tflops=4 * config.batch * k * config.d_model / seconds / 1e12)
  if copy:
    metrics.update(copy_tbps=copy / 1e12,
                   pct_of_copy=benchmarking.percent_of_ceiling(weight_bytes / seconds, copy))
  if impl == "pallas_triton":
    cores = int(getattr(jax.devices()[0], "core_count", 0) or 132)
    resolved = block_sizes_lib.resolve(block_sizes(config), rows=config.batch,
                                       d_model=config.d_model, k=k, num_cores=cores)
    metrics["tiles"] = {name: getattr(resolved, name) for name in _BLOCK_FIELDS}
  if config.check:
    start = time.perf_counter()
    rows = check_rows(config.batch)
    expected = _jitted_reference(xs[0][rows], weights["w1"], weights["w2"], ids,
                                 weights["b1"], weights["b2"])
    err = float(np.max(np.abs(out[rows] - np.asarray(expected))))
    metrics["check_s"] = time.perf_counter() - start
    metrics.update(max_abs_err=err, within_tol=err <= TOLERANCES[config.dtype])
  return metrics
