"""Experiment kind "attention_bench": times dot_product_attention on one mask per point.

Config fields read by `run_point` (configs/quickstart.py sets all of them):

  implementation   a flashjax backend ("xla", "pallas_triton", ...) or "peer:NAME" for a
                   third_party peer ("peer:jax_nn_cudnn", "peer:torch_flex", ...)
  mask             mask family, one of MASK_FAMILIES
  batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, dtype
  block_q, block_kv  tiles of the Pallas backends (also the tiles of the reported block
                   density); None: the backend's defaults (block density then at 128 x 64)
  dispatch         optional: BlockSizes.dispatch, pallas_triton's forward dispatch ("lists"
                   or "flags", the binary block masking paper's flag loop); None or absent:
                   the backend's default. Set without block_q / block_kv it fixes the tiles
                   at BlockSizes' 128 x 64 (the rows record fwd_dispatch and fwd_tiles)
  mode             "fwd" or "fwd_bwd" (gradients of q, k, v)
  timing           "wall" (time_fn), "loop" (time_in_loop: device time) or "both" (loop
                   timing as median_ms etc., the wall timing beside it as wall_median_ms etc.)
  warmup, iters, input_sets, seed
  interpret        None: Pallas backends in interpret mode exactly when running on CPU
  torch_keep_alive optional (default True): the torch peers (peer:torch_sdpa,
                   peer:torch_flex) run in one long-lived child process
                   (third_party.torch_peers), ended when the next in-process point starts so
                   that JAX gets its memory back; False: a new child per point (pays torch's
                   import, CUDA start-up and inductor's import every point). A torch point
                   that runs out of device memory is "unsupported" with the reason (the
                   JAX process holds its share of the device), not an error
  check            compare the output (and gradients) with the float32 reference
  check_budget_gb  optional: device memory the reference check may use (None or absent:
                   half of what the device has free, DEFAULT_CHECK_BUDGET_BYTES on a CPU)
  check_rows       optional: None (absent) check every batch row the budget allows, n: at
                   most n rows spread over the batch
  mask parameters  window, window_right, doc_len, tree_span, band_peak, band_decay,
                   band_floor, band_symmetric, dilation, num_global, doc_len_dist ("uniform" or
                   "lognormal"), block_density_target and mask_block (random_blocks),
                   medusa_heads and medusa_topk (medusa, medusa_padded), prefix_frac
                   (prefix_lm): the arguments of flashjax.masks.families.build (its
                   defaults when a config lacks them)
  rcm_report       optional: add flashjax.masks.rcm.rcm_report's fields (`rcm_fields`)
  roofline_device  optional: device kind of the roofline's ceilings (None: running device)

Every point is checked against flashjax's float32 reference on the same inputs in the same
run (max_abs_err; within_tol by dtype: float32 1e-4, bfloat16 2e-2, float16 5e-3 absolute,
doubled for gradients). The check is sized to the device's memory (`plan_check`): the
reference runs in query chunks against the whole key side on as many batch rows as fit, and
the row records `check` ("all rows", "subset" or "skipped: <reason>"), `check_batch_rows`,
`check_q_chunk`, `check_call_gb` and `check_budget_gb`. `timing_method` names the timer of
median_ms ("loop": device time, "wall", or the torch child's "cuda_events"). A flashjax row
records the kernel that ran (`kernel_fields`: backend, fwd_tiles, dq_tiles / dkdv_tiles /
bwd_backend for fwd_bwd, tiles_from, plan_tiles, kernel_params; fwd_dispatch for
pallas_triton). The point
reports time, useful TFLOP/s (4*N*D per allowed pair), mask density and block density (at
the forward tiles that ran), the host preprocessing apart from the kernel time
(`mask_build_ms`: the mask family's constructor; flashjax rows also `block_mask_ms`: mask
-> BlockMask at the forward tiles, RCM ordering included for RCM families),
and the analytical IO model of the implementation's algorithm (flashjax.io_model:
block-skipping FlashAttention for the Pallas backends and FlexAttention, FlashAttention on the
full mask for the other peers, materialised scores for XLA): `model_algorithm`,
`model_bytes`, `model_flops` and `roofline_ms` on the ceilings of `roofline_device` (config
field `roofline_device`, None: the running device; `benchmarking.device_ceilings`, measured
where measured, else the datasheet: `roofline_source`). On a device kind without ceilings
(CPU) roofline_ms is None. `pct_of_peak` is against the running device's matmul ceiling,
`pct_of_peak_source` says whether that ceiling was measured or is the datasheet's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import flashjax
from flashjax import benchmarking
from flashjax import io_model
from flashjax import masks
from flashjax import workloads
from flashjax.masks import families
from flashjax.masks import rcm
from flashjax.ops.attention import api as attention_api
from flashjax.ops.attention import base as attention_base
from flashjax.ops.attention.block_sizes import BlockSizes
from flashjax.ops.attention.reference import mha_reference
from flashjax.ops.attention.tuning import store as tuning_store
import third_party
from third_party import torch_peers

# Families whose flashjax BlockMask is Reverse Cuthill-McKee reordered (peers: unsupported),
# and the library family (flashjax.masks.families) each one reorders.
RCM_FAMILIES = ("random_banded_rcm", "permuted_band_rcm")
_BASE_FAMILY = {"random_banded_rcm": "random_banded", "permuted_band_rcm": "permuted_band"}
MASK_FAMILIES = (*families.FAMILIES, *RCM_FAMILIES)
TOLERANCES = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
PEER_PREFIX = "peer:"
_TORCH_PEERS = tuple(PEER_PREFIX + name for name in torch_peers.ATTENTION)
# Config fields passed to flashjax.masks.families.build under their own names (a config
# without one gets build's default; block_density_target is build's block_density).
_MASK_PARAMS = ("batch", "window", "window_right", "doc_len", "doc_len_dist", "tree_span",
                "band_peak", "band_decay", "band_floor", "band_symmetric", "dilation",
                "num_global", "medusa_heads", "medusa_topk", "prefix_frac")


def build_mask(config: ml_collections.ConfigDict, rng: np.random.Generator) -> Any:
  """The flashjax.masks Mask of `config.mask` at [T, S] (None for "dense").

  Args:
    config: the point's config (mask family and its parameters, shapes).
    rng: numpy generator for the random families.

  Returns:
    A Mask or None (flashjax.masks.families.build; an RCM family builds its base family).
  """
  family = config.mask
  if family not in MASK_FAMILIES:
    raise ValueError(f"unknown mask family {family=}; known: {MASK_FAMILIES}")
  if family in RCM_FAMILIES and config.q_len != config.kv_len:
    raise ValueError(f"{family=} needs q_len == kv_len: t={config.q_len}, s={config.kv_len}")
  params = {name: config[name] for name in _MASK_PARAMS if name in config}
  if "block_density_target" in config:
    params["block_density"] = config.block_density_target
  if family == "random_blocks":
    params["block_q"], params["block_kv"] = _pattern_tiles(config)
  return families.build(_BASE_FAMILY.get(family, family), config.q_len, config.kv_len, rng,
                        **params)


def input_sets(config: ml_collections.ConfigDict) -> list[tuple[jax.Array, ...]]:
  """config.input_sets fresh (q, k, v[, dout]) tuples from config.seed."""
  return workloads.attention_inputs(
      batch=config.batch, q_len=config.q_len, kv_len=config.kv_len,
      num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
      head_dim=config.head_dim, dtype=config.dtype, num_sets=config.input_sets,
      seed=config.seed, with_dout=config.mode == "fwd_bwd")


def with_grads(attend):
  """fn(q, k, v, dout) -> (dq, dk, dv): the backward pass after the forward."""

  def fwd_bwd(q, k, v, dout):
    _, vjp = jax.vjp(attend, q, k, v)
    return vjp(dout)

  return jax.jit(fwd_bwd)


def interpret_mode(config: ml_collections.ConfigDict) -> bool:
  """config.interpret, or (when None) Pallas interpret mode exactly when JAX runs on CPU."""
  if config.interpret is not None:
    return bool(config.interpret)
  return jax.default_backend() == "cpu"


def _block_sizes(config: ml_collections.ConfigDict) -> BlockSizes | None:
  dispatch = config.get("dispatch", None)
  if config.block_q is None and config.block_kv is None and dispatch is None:
    return None
  defaults = BlockSizes()
  return BlockSizes(block_q=config.block_q or defaults.block_q,
                    block_kv=config.block_kv or defaults.block_kv, dispatch=dispatch)


def _tiles(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """Forward tiles of the Pallas backends (and of the reported block density)."""
  sizes = _block_sizes(config) or BlockSizes()
  return sizes.block_q, sizes.block_kv


def _pattern_tiles(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """Tiles of the random_blocks pattern: `mask_block` (one int) or the benchmark tiles."""
  mask_block = config.get("mask_block", None)
  return (mask_block, mask_block) if mask_block else _tiles(config)


def kernel_mask(config: ml_collections.ConfigDict, mask: Any) -> Any:
  """What flashjax receives: the RCM-reordered BlockMask for RCM_FAMILIES, else the Mask."""
  if config.mask not in RCM_FAMILIES:
    return mask
  return masks.BlockMask.from_mask(mask, *_tiles(config), reorder="rcm")


def _interpretable(implementation: str) -> bool:
  """Whether the backend has an interpret mode (the Pallas ones: api.PLATFORM_NEEDS)."""
  return attention_api.PLATFORM_NEEDS.get(implementation, (None, False))[1]


def _flashjax_kwargs(config, mask) -> dict[str, Any]:
  """Keyword arguments of the point's flashjax.dot_product_attention call."""
  implementation = config.implementation
  block_sizes = None if implementation.startswith("xla") else _block_sizes(config)
  return dict(mask=mask, implementation=implementation, block_sizes=block_sizes,
              interpret=interpret_mode(config) and _interpretable(implementation))


def _flashjax_fn(config, mask):
  return jax.jit(functools.partial(flashjax.dot_product_attention,
                                   **_flashjax_kwargs(config, mask)))


# Which plan BlockMask each backward kernel of a Pallas backend walks: (dQ, dK/dV).
_BWD_MASKS = {"pallas_triton": ("fwd_mask", "bwd_mask"),
              "pallas_mosaic_gpu": ("dq_mask", "dkdv_mask"),
              "pallas_tpu": ("bwd_mask", "bwd_mask")}
# Fields of a plan's parameter dataclasses that are not launch parameters.
_NOT_LAUNCH = frozenset({"scale", "soft_cap", "interpret", "q_len", "kv_len",
                         "fwd_dispatch"})


def _tiles_of(bm: masks.BlockMask) -> str:
  return f"{bm.block_q}x{bm.block_kv}"


def _launch_params(value: Any) -> Any:
  """A plan's parameter dataclass as a dict without scale / soft cap / interpret."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _launch_params(getattr(value, f.name))
            for f in dataclasses.fields(value) if f.name not in _NOT_LAUNCH}
  return value


def kernel_fields(config: ml_collections.ConfigDict, mask: Any,
                  inputs: tuple[jax.Array, ...]) -> dict[str, Any]:
  """Which kernel the point's flashjax call runs, as the call resolves it.

  The backend comes from flashjax.resolve_implementation on the same call; for a Pallas
  backend its plan (the BlockMasks and launch parameters the kernels are built with) is
  computed from the same arguments the dispatcher hands it, so the tiles are the ones that
  ran (tuning store or backend defaults included), not the config's request.

  Args:
    config: the point's config.
    mask: what flashjax receives (`kernel_mask`).
    inputs: one input set (q, k, v[, dout]).

  Returns:
    backend; for Pallas backends also fwd_tiles ("block_q x block_kv"), tiles_from
    ("config", "block_mask", "tuning_store" or "backend_default"), kernel_params (launch
    parameters of the plan), plan_tiles (every BlockMask of the plan) and, for
    pallas_triton, fwd_dispatch (BlockSizes.dispatch as resolved: lists or flags); for fwd_bwd
    dq_tiles, dkdv_tiles and bwd_backend (whose backward kernels run).
  """
  q, k, v = inputs[:3]
  kwargs = _flashjax_kwargs(config, mask)
  name = flashjax.resolve_implementation(flashjax.dot_product_attention, q, k, v, **kwargs)
  fields: dict[str, Any] = {"backend": name}
  backend = attention_api.load_backend(name, attention_api.ATTENTION_BACKENDS)
  if not isinstance(backend, attention_base.BlockSparseBackend):
    return fields
  plan = backend.plan(attention_base.AttentionArgs.bind(
      q, k, v, mask=mask, block_sizes=kwargs["block_sizes"], interpret=kwargs["interpret"]))
  parts = plan._asdict()
  fields["fwd_tiles"] = _tiles_of(plan.fwd_mask)
  if isinstance(mask, masks.BlockMask):
    fields["tiles_from"] = "block_mask"
  elif kwargs["block_sizes"] is not None:
    fields["tiles_from"] = "config"
  else:
    tuned = tuning_store.tuned_block_sizes(name, q, k, mask=mask,
                                           interpret=kwargs["interpret"])
    fields["tiles_from"] = "backend_default" if tuned is None else "tuning_store"
  if name == "pallas_triton":  # the forward's dispatch form (lists or flags)
    fields["fwd_dispatch"] = parts["params"].fwd_dispatch
  fields["plan_tiles"] = {field: _tiles_of(value) for field, value in parts.items()
                          if isinstance(value, masks.BlockMask)}
  fields["kernel_params"] = {field: _launch_params(value) for field, value in parts.items()
                             if dataclasses.is_dataclass(value)
                             and not isinstance(value, masks.BlockMask)}
  if config.mode == "fwd_bwd":
    if name not in _BWD_MASKS:
      raise ValueError(f"backend {name!r}: which BlockMask its backward kernels walk is not "
                       f"known here; known: {sorted(_BWD_MASKS)}")
    dq, dkdv = _BWD_MASKS[name]
    fields["dq_tiles"], fields["dkdv_tiles"] = _tiles_of(parts[dq]), _tiles_of(parts[dkdv])
    fields["bwd_backend"] = name
    if "bwd_params" in parts:  # pallas_mosaic_gpu: its own backward or pallas_triton's
      from flashjax.ops.attention import pallas_gpu_common  # pylint: disable=g-import-not-at-top
      if isinstance(parts["bwd_params"], pallas_gpu_common.TritonParams):
        fields["bwd_backend"] = "pallas_triton"
  return fields


# Float32 copies of the score matrix [rows, N, q_chunk, S] that the reference keeps live at
# once (logits, masked logits, exponentials, probabilities; the backward adds the saved
# probabilities and the score gradients): the memory estimate of one reference call.
SCORE_COPIES = {"fwd": 4, "fwd_bwd": 8}
# Smallest query chunk of a reference call (or T, when shorter).
MIN_CHECK_CHUNK = 16
# Check budget where the device reports no memory limit (CPU) and config.check_budget_gb is
# None: a fixed size that any benchmark host has.
DEFAULT_CHECK_BUDGET_BYTES = 4e9
# Fraction of the device's free memory (after timing) a check may use by default: the
# estimate leaves out XLA's workspaces.
CHECK_BUDGET_FRACTION = 0.5


class CheckSkipped(Exception):
  """Not even the smallest reference check fits the budget (the message says why)."""


@dataclasses.dataclass(frozen=True)
class CheckPlan:
  """What the float32 reference check of a point computes.

  Attributes:
    rows: batch rows checked (every query row of each, chunk by chunk).
    q_chunk: query rows per reference call; the key side is always whole.
    call_bytes: estimated device bytes of one reference call (`reference_bytes`).
    budget: the bytes it had to fit.
  """

  rows: tuple[int, ...]
  q_chunk: int
  call_bytes: float
  budget: float


def reference_bytes(config: ml_collections.ConfigDict, rows: int, q_chunk: int) -> float:
  """Estimated device bytes of one float32 reference call on `rows` batch rows x `q_chunk`
  query rows against all S keys: SCORE_COPIES score matrices and the bool mask, the float32
  inputs of those rows (K/V repeated to Nq heads) and, for fwd_bwd, their gradients."""
  n, s, d = config.num_heads, config.kv_len, config.head_dim
  copies = SCORE_COPIES[config.mode]
  scores = rows * n * q_chunk * s * (4 * copies + 1)
  per_query = (2 if config.mode == "fwd" else 4) * q_chunk * n * d  # q, out (+ dout, dq)
  per_key = (2 if config.mode == "fwd" else 6) * s * n * d  # k, v (+ dk, dv, partials)
  rows_f32 = (config.q_len * n + 2 * s * config.num_kv_heads) * d  # the rows' f32 inputs
  if config.mode == "fwd_bwd":
    rows_f32 += config.q_len * n * d + 2 * s * config.num_kv_heads * d  # dout, dk/dv sums
  return 4.0 * rows * (per_query + per_key + rows_f32) + scores


def _chunk_sizes(q_len: int) -> list[int]:
  """T, then the powers of two below it down to MIN_CHECK_CHUNK (largest first)."""
  sizes = [q_len]
  size = 1 << ((q_len - 1).bit_length() - 1) if q_len > 1 else 1
  while size >= MIN_CHECK_CHUNK:
    if size < q_len:
      sizes.append(size)
    size //= 2
  return sizes


def check_budget(config: ml_collections.ConfigDict) -> float:
  """Bytes the reference check may use: config.check_budget_gb when set, else
  CHECK_BUDGET_FRACTION of the device's free memory, else DEFAULT_CHECK_BUDGET_BYTES."""
  budget_gb = config.get("check_budget_gb", None)
  if budget_gb is not None and not budget_gb > 0:
    raise ValueError(f"config.check_budget_gb={budget_gb!r} must be positive or None")
  budget = benchmarking.device_memory_budget(budget_gb, fraction=CHECK_BUDGET_FRACTION)
  return DEFAULT_CHECK_BUDGET_BYTES if budget is None else budget


def plan_check(config: ml_collections.ConfigDict, budget: float) -> CheckPlan:
  """The largest reference check whose calls fit `budget` bytes.

  Starts from the requested batch rows (config.check_rows: None for all, else that many
  spread over the batch, flashjax.workloads.check_row_ids) and the whole query length; the
  query chunk halves first (down to MIN_CHECK_CHUNK: all query rows are still checked), then
  the batch rows halve (spread over the requested ones, down to one).

  Raises:
    CheckSkipped: one batch row at the smallest chunk still needs more than `budget`.
  """
  if not budget > 0:
    raise ValueError(f"check {budget=} must be positive")
  b = config.batch
  requested = workloads.check_row_ids(b, config.get("check_rows", None)) or tuple(range(b))
  counts = []
  count = len(requested)
  while count >= 1:
    counts.append(count)
    count //= 2
  chunks = _chunk_sizes(config.q_len)
  for count in counts:
    rows = tuple(requested[i] for i in workloads.spread_rows(len(requested), count))
    for chunk in chunks:
      need = reference_bytes(config, len(rows), chunk)
      if need <= budget:
        return CheckPlan(rows=rows, q_chunk=chunk, call_bytes=need, budget=budget)
  smallest = reference_bytes(config, 1, chunks[-1])
  raise CheckSkipped(f"the smallest float32 reference call (1 batch row x {chunks[-1]} "
                     f"query rows x {config.kv_len} keys, {config.mode}) needs "
                     f"{smallest / 1e9:.3g} GB > check budget {budget / 1e9:.3g} GB")


def _mask_rows(mask: Any, rows: tuple[int, ...], q0: int, q1: int) -> np.ndarray | None:
  """bool [R|1, N|1, q1 - q0, S] of the mask for the checked batch rows (None: dense)."""
  if mask is None:
    return None
  tile = mask.dense_tile(q0, q1, 0, mask.shape[-1])
  if tile.ndim == 2:
    return tile[None, None]
  return tile[list(rows)] if tile.shape[0] > 1 else tile


def _is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _max_err(got: jax.Array, want: jax.Array) -> float:
  return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))


def _worst(errors: list[float]) -> float:
  return max(errors, key=lambda e: math.inf if math.isnan(e) else e)


def _checked_errors(config, got, inputs, mask, plan: CheckPlan) -> dict[str, float]:
  """Max abs errors of `got` (fn's outputs on `inputs`) on the plan's rows, chunk by chunk.

  fwd: out. fwd_bwd: the gradients of sum(out * dout) over one query chunk at a time; a
  chunk's dq rows are exact, and dk / dv are the sums of the chunks' contributions (the loss
  is linear in its chunks). Batch rows are independent, so a subset of them is exact too.
  """
  rows = np.asarray(plan.rows)
  f32 = [jnp.asarray(x)[rows].astype(jnp.float32) for x in inputs]
  got = {name: jnp.asarray(g)[rows] for name, g in got.items()}
  errors = {name: [] for name in got}
  if config.mode == "fwd_bwd":
    dk_sum = jnp.zeros(f32[1].shape, jnp.float32)
    dv_sum = jnp.zeros(f32[2].shape, jnp.float32)
  for q0 in range(0, config.q_len, plan.q_chunk):
    q1 = min(config.q_len, q0 + plan.q_chunk)
    reference = functools.partial(mha_reference, mask=_mask_rows(mask, plan.rows, q0, q1))
    if config.mode == "fwd":
      want = reference(f32[0][:, q0:q1], f32[1], f32[2])
      errors["out"].append(_max_err(got["out"][:, q0:q1], want))
      continue
    _, vjp = jax.vjp(reference, f32[0][:, q0:q1], f32[1], f32[2])
    dq, dk, dv = vjp(f32[3][:, q0:q1])
    errors["dq"].append(_max_err(got["dq"][:, q0:q1], dq))
    dk_sum, dv_sum = dk_sum + dk, dv_sum + dv
  if config.mode == "fwd_bwd":
    errors["dk"].append(_max_err(got["dk"], dk_sum))
    errors["dv"].append(_max_err(got["dv"], dv_sum))
  return {f"max_abs_err_{name}": _worst(values) for name, values in errors.items()}


def check_errors(config, fn, sets, mask) -> dict[str, Any]:
  """Max abs errors of `fn` on the first input set against the float32 reference.

  The check is sized to the device's memory (`check_budget`, `plan_check`): the reference
  runs on a subset of batch rows and in query chunks with the key side whole, and the row
  records what was checked. A reference call that still runs out of memory halves the
  budget and plans again. When even the smallest check cannot run, the row says so
  (check="skipped: <reason>", max_abs_err and within_tol None); it is never silently left out.

  Returns:
    check ("all rows", "subset" or "skipped: ..."), check_batch_rows (the batch rows whose
    every query row was compared), check_q_chunk, check_call_gb (estimate of one reference
    call), check_budget_gb, max_abs_err, within_tol (by dtype: TOLERANCES, doubled for
    gradients) and max_abs_err_<out | dq | dk | dv>.
  """
  inputs = sets[0]
  if config.mode == "fwd":
    got = {"out": fn(*inputs)}
  else:
    got = dict(zip(("dq", "dk", "dv"), fn(*inputs)))
  budget = check_budget(config)
  reasons = []
  while True:
    try:
      plan = plan_check(config, budget)
    except CheckSkipped as e:
      reason = "; ".join([*reasons, str(e)])
      return {"check": f"skipped: {reason}", "check_budget_gb": budget / 1e9,
              "max_abs_err": None, "within_tol": None}
    try:
      errors = _checked_errors(config, got, inputs, mask, plan)
      break
    except Exception as e:  # an estimate that was too small: retry with less memory
      if not _is_out_of_memory(e):
        raise
      reasons.append(f"{plan.call_bytes / 1e9:.3g} GB reference calls ran out of memory")
      budget = plan.call_bytes / 2
  worst = _worst(list(errors.values()))
  tol = TOLERANCES.get(config.dtype, 1e-4) * (1 if config.mode == "fwd" else 2)
  every_row = len(plan.rows) == config.batch
  return {"check": "all rows" if every_row else "subset",
          "check_batch_rows": list(plan.rows), "check_q_chunk": plan.q_chunk,
          "check_call_gb": plan.call_bytes / 1e9, "check_budget_gb": plan.budget / 1e9,
          "max_abs_err": worst, "within_tol": worst <= tol, **errors}  # NaN never passes


TIMINGS = ("wall", "loop", "both")


def time_point(config, fn, sets) -> dict[str, Any]:
  """Timing metrics of `fn` over the input sets.

  config.timing "wall": `time_fn` (each call timed from Python); "loop": `time_in_loop`
  (config.iters calls inside one jitted loop, dispatch paid once: device time); "both": the
  loop timing as the headline (median_ms, ...) and the wall timing beside it as
  wall_median_ms, wall_p10_ms, ... `timing_method` names the headline's timer.
  """
  if config.timing not in TIMINGS:
    raise ValueError(f"{config.timing=} must be one of {TIMINGS}")
  metrics = {}
  if config.timing in ("loop", "both"):
    metrics.update(benchmarking.time_in_loop(fn, iters=config.iters, arg_sets=sets).summary())
  if config.timing in ("wall", "both"):
    wall = benchmarking.time_fn(fn, warmup=config.warmup, iters=config.iters,
                                arg_sets=sets).summary()
    metrics.update(wall if config.timing == "wall" else {f"wall_{k}": v
                                                          for k, v in wall.items()})
  metrics["timing_method"] = "wall" if config.timing == "wall" else "loop"
  return metrics


def _torch_case(config, peer_mask: third_party.PeerMask) -> tuple[dict, dict]:
  case = {k: config[k] for k in ("batch", "q_len", "kv_len", "num_heads", "num_kv_heads",
                                 "head_dim", "dtype", "mode", "warmup", "iters",
                                 "input_sets", "seed")}
  case.update(scale=None, structured=peer_mask.structured, band_lo=peer_mask.band_lo,
              band_hi=peer_mask.band_hi)
  arrays = {}
  for name in ("dense", "q_segment_ids", "kv_segment_ids"):
    if getattr(peer_mask, name) is not None:
      arrays[name] = getattr(peer_mask, name)
  return case, arrays


def _run_peer(config, mask, sets) -> dict[str, Any]:
  name = config.implementation[len(PEER_PREFIX):]
  peers = third_party.attention_peers(interpret=interpret_mode(config))
  if name not in peers:
    raise ValueError(f"unknown peer {name=}; known: {sorted(peers)}")
  peer = peers[name]
  availability = peer.available()
  if not availability:
    raise NotImplementedError(f"peer {name} is not available: {availability.reason}")
  peer_mask = third_party.PeerMask.from_mask(mask, config.q_len, config.kv_len)
  if isinstance(peer, third_party.TorchPeer):
    try:
      metrics = peer.run(*_torch_case(config, peer_mask),  # CUDA events on a GPU
                         keep_alive=config.get("torch_keep_alive", True))
    except RuntimeError as e:
      if not _is_out_of_memory(e):
        raise
      # A recorded skip with the reason (status "unsupported"), not an error row.
      raise NotImplementedError(
          f"{name} does not fit the device memory left to its child process at this shape "
          f"(the benchmark's JAX process holds its own share): {str(e)[-300:]}") from e
    metrics["timing_method"] = metrics.get("timing")
    # The torch child compares the forward output only, on every row (its own reference).
    err = metrics.get("max_abs_err")
    if err is None:
      metrics.update(check="skipped: the torch child reported no max_abs_err",
                     within_tol=None)
    else:
      metrics.update(check="all rows, forward output (torch child)",
                     within_tol=err <= TOLERANCES.get(config.dtype, 1e-4))  # NaN fails
    return metrics
  attend = peer.make(peer_mask)
  fn = attend if config.mode == "fwd" else with_grads(attend)
  metrics = time_point(config, fn, sets)
  if config.check:
    metrics.update(check_errors(config, fn, sets, mask))
  return metrics


def model_columns(config: ml_collections.ConfigDict, block_density: float,
                  tiles: tuple[int, int] | None = None) -> dict[str, Any]:
  """The IO model of the point's algorithm (flashjax.io_model) on a device's ceilings.

  Args:
    config: the point's config (implementation, shapes, dtype, mode, tiles; optional
      roofline_device: the device kind whose ceilings the roofline uses, None or absent:
      the running device).
    block_density: fraction of non-empty tiles at the benchmark tiles (block skipping).
    tiles: (block_q, block_kv) that ran; None: the config's tiles (or the defaults).

  Returns:
    model_algorithm, model_bytes, model_flops, roofline_ms (None when the device kind has
    no ceilings for the dtype), roofline_device and roofline_source ("measured",
    "datasheet" or "measured flops, datasheet hbm" ...; None without ceilings).
  """
  algorithm = io_model.implementation_algorithm(config.implementation)
  shape = io_model.Shape(
      batch=config.batch, q_len=config.q_len, kv_len=config.kv_len,
      num_heads=config.num_heads, head_dim=config.head_dim,
      itemsize=jnp.dtype(config.dtype).itemsize, num_kv_heads=config.num_kv_heads,
      score_itemsize=4 if algorithm == "naive" else None)  # XLA keeps float32 logits
  block_q, block_kv = tiles or _tiles(config)
  full = io_model.dense_tiles(shape, block_q, block_kv)
  tiles = min(full, block_density * full)
  cost = io_model.attention_cost(algorithm, shape, config.mode, block_q=block_q,
                                 block_kv=block_kv, nonempty_tiles=tiles)
  device = config.get("roofline_device", None) or benchmarking.running_device_kind()
  # The roofline's matmul ceiling is the bf16 / fp16 one (a float32 point is compared
  # against it too: the model counts work, not the dtype's peak).
  ceilings = benchmarking.device_ceilings(device, "bfloat16")
  roofline, source = None, None
  if ceilings is not None:
    roofline = cost.roofline_ms(ceilings["flops_per_s"], ceilings["hbm_bytes_per_s"])
    sources = {ceilings["flops_source"], ceilings["hbm_source"]}
    source = (sources.pop() if len(sources) == 1 else
              f"{ceilings['flops_source']} flops, {ceilings['hbm_source']} hbm")
  return {"model_algorithm": algorithm, "model_bytes": cost.hbm_bytes,
          "model_flops": cost.flops, "roofline_ms": roofline, "roofline_device": device,
          "roofline_source": source}


def preprocess_fields(config: ml_collections.ConfigDict, mask: Any, tiles: tuple[int, int],
                      mask_build_ms: float) -> dict[str, Any]:
  """Host preprocessing times of a point, apart from the kernel time.

  Args:
    config: the point's config.
    mask: the point's Mask (None: dense).
    tiles: (block_q, block_kv) of the forward kernel.
    mask_build_ms: host time `build_mask` took (the mask family's constructor).

  Returns:
    mask_build_ms, and block_mask_ms: host time of BlockMask.from_mask at `tiles` (the
    mask -> BlockMask step of binary block masking; RCM families: the RCM ordering, the
    permuted mask and its BlockMask; 0.0 for dense, which needs none).
  """
  block_mask_ms = 0.0
  if mask is not None:
    start = time.perf_counter()
    if config.mask in RCM_FAMILIES:
      masks.BlockMask.from_mask(mask, *tiles, reorder="rcm")
    else:
      masks.BlockMask.from_mask(mask, *tiles)
    block_mask_ms = 1e3 * (time.perf_counter() - start)
  return {"mask_build_ms": mask_build_ms, "block_mask_ms": block_mask_ms}


def rcm_fields(mask: Any, tiles: tuple[int, int]) -> dict[str, Any]:
  """flashjax.masks.rcm.rcm_report of a square single-row mask at `tiles`, as rcm_* fields.

  Returns rcm_density, rcm_bandwidth_before / _after, rcm_block_density_before / _after,
  rcm_ms and rcm_permute_ms; for a dense, non-square or batched mask (RCM reorders one
  (T, T) pattern) rcm_status "skipped: <why>" instead (else "ok").
  """
  if mask is None:
    return {"rcm_status": "skipped: dense"}
  if mask.lead != (1, 1) or mask.q_len != mask.kv_len:
    return {"rcm_status": f"skipped: mask shape {mask.shape} is not one (T, T) pattern"}
  report = rcm.rcm_report(mask, *tiles)
  return {"rcm_status": "ok", **{f"rcm_{k}" if not k.startswith("rcm") else k: v
                                 for k, v in report.items()}}


_POSITIVE_FIELDS = ("batch", "q_len", "kv_len", "num_heads", "num_kv_heads", "head_dim",
                    "iters", "input_sets")


def check_point(config: ml_collections.ConfigDict) -> None:
  """Refuses a point that cannot run, naming the field (the launcher checks every point of
  the sweep this way before it runs any)."""
  for name in _POSITIVE_FIELDS:
    value = config.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
      raise ValueError(f"config.{name}={value!r} must be an int >= 1")
  if config.num_heads % config.num_kv_heads:
    raise ValueError(f"config.num_heads={config.num_heads} must be a multiple of "
                     f"config.num_kv_heads={config.num_kv_heads}")
  if config.mode not in ("fwd", "fwd_bwd"):
    raise ValueError(f"config.mode={config.mode!r} must be 'fwd' or 'fwd_bwd'")
  if config.dtype not in TOLERANCES:
    raise ValueError(f"config.dtype={config.dtype!r} must be one of {sorted(TOLERANCES)}")
  if config.mask not in MASK_FAMILIES:
    raise ValueError(f"config.mask={config.mask!r} is not a mask family; known: "
                     f"{MASK_FAMILIES}")
  implementation = config.implementation
  if implementation.startswith(PEER_PREFIX):
    known = sorted(PEER_PREFIX + name for name in third_party.attention_peers())
  else:
    known = sorted(attention_api.ATTENTION_BACKENDS)
  if implementation not in known:
    raise ValueError(f"config.implementation={implementation!r} is not one of {known}")


def run_point(config: ml_collections.ConfigDict, point: dict[str, Any]) -> dict[str, Any]:
  """Times one (implementation, mask, shape) point; see the module docstring.

  Args:
    config: the study config with the point's fields already set.
    point: the sweep point (unused beyond config; recorded by the launcher).

  Returns:
    Metrics: timing summary, TFLOP/s, % of ceiling (when known), densities, errors.
  """
  del point
  check_point(config)
  if config.implementation not in _TORCH_PEERS:
    torch_peers.close_child()  # a kept-alive torch child would hold device memory
  rng = np.random.default_rng(config.seed)
  start = time.perf_counter()
  mask = build_mask(config, rng)
  mask_build_ms = 1e3 * (time.perf_counter() - start)
  sets = input_sets(config)
  kmask = None
  if config.implementation.startswith(PEER_PREFIX):
    if config.mask in RCM_FAMILIES:
      raise NotImplementedError(f"{config.mask=}: RCM reordering is a flashjax BlockMask; "
                                "peers run the same mask as 'random_banded'")
    metrics = _run_peer(config, mask, sets)
  else:
    start = time.perf_counter()
    kmask = kernel_mask(config, mask)
    rcm_block_mask_ms = 1e3 * (time.perf_counter() - start)
    metrics = kernel_fields(config, kmask, sets[0])
    attend = _flashjax_fn(config, kmask)
    fn = attend if config.mode == "fwd" else with_grads(attend)
    metrics.update(time_point(config, fn, sets))
    if config.check:
      metrics.update(check_errors(config, fn, sets, mask))

  b, t, s = config.batch, config.q_len, config.kv_len
  density = 1.0 if mask is None else mask.density  # mean over the mask's batch and heads
  pairs = density * b * t * s
  flops = benchmarking.masked_attention_flops(config.num_heads, config.head_dim, pairs,
                                              config.mode)
  seconds = metrics["median_ms"] / 1e3 if "median_ms" in metrics else math.nan
  # The forward tiles that ran (a Pallas backend's plan), else the config's / the defaults.
  tiles = metrics.get("fwd_tiles")
  block_q, block_kv = map(int, tiles.split("x")) if tiles else _tiles(config)
  block_density = 1.0
  if mask is not None:
    if config.mask in RCM_FAMILIES:
      kinds = (kmask if kmask is not None else kernel_mask(config, mask)).kinds  # reordered
    else:
      kinds = mask.block_kinds(block_q, block_kv)
    block_density = float(np.mean(np.asarray(kinds) != masks.EMPTY))
  if config.implementation.startswith(PEER_PREFIX):  # builds its own structures
    metrics["mask_build_ms"] = mask_build_ms
  else:
    metrics.update(preprocess_fields(config, mask, (block_q, block_kv), mask_build_ms))
    if config.mask in RCM_FAMILIES:
      metrics["block_mask_ms"] = rcm_block_mask_ms  # the BlockMask that ran, RCM included
  if config.get("rcm_report", False):
    metrics.update(rcm_fields(mask, (block_q, block_kv)))
  metrics.update(model_columns(config, block_density, tiles=(block_q, block_kv)))
  metrics.update(
      density=density, block_density=block_density, bd_tiles=f"{block_q}x{block_kv}",
      useful_tflops=flops / seconds / 1e12,
      dense_equiv_tflops=benchmarking.attention_flops(
          b, t, s, config.num_heads, config.head_dim, mode=config.mode) / seconds / 1e12)
  ceilings = benchmarking.device_ceilings(benchmarking.running_device_kind(), config.dtype)
  if ceilings and "flops_per_s" in ceilings:
    metrics["pct_of_peak"] = benchmarking.percent_of_ceiling(flops / seconds,
                                                             ceilings["flops_per_s"])
    metrics["pct_of_peak_source"] = ceilings["flops_source"]
  return metrics
