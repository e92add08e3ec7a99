"""Experiment kind "attention_bench": times dot_product_attention on one mask per point.

Config fields read by `run_point` (configs/quickstart.py sets all of them):

  implementation   a flashjax backend ("xla", "pallas_triton", ...) or "peer:NAME" for a
                   third_party peer ("peer:jax_nn_cudnn", "peer:torch_flex", ...)
  mask             mask family, one of MASK_FAMILIES
  batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, dtype
  block_q, block_kv  tiles of the Pallas backends (also the tiles of the reported block
                   density); None: the backend's defaults (block density then at 128 x 64)
  mode             "fwd" or "fwd_bwd" (gradients of q, k, v)
  timing           "wall" (time_fn), "loop" (time_in_loop) or "both"
  warmup, iters, input_sets, seed
  interpret        None: Pallas backends in interpret mode exactly when running on CPU
  check            compare the output (and gradients) with the float32 reference
  mask parameters  window, window_right, doc_len, tree_span, band_peak, band_decay,
                   band_floor, dilation, num_global, doc_len_dist ("uniform" or
                   "lognormal"), block_density_target and mask_block (random_blocks),
                   medusa_heads and medusa_topk (medusa): the arguments of
                   flashjax.masks.families.build (its defaults when a config lacks them)

Every point is checked against flashjax's float32 reference on the same inputs in the same
run (max_abs_err; within_tol by dtype: float32 1e-4, bfloat16 2e-2, float16 5e-3 absolute),
and reports time, useful TFLOP/s (4*N*D per allowed pair), mask density and block density,
and the analytical IO model of the implementation's algorithm (flashjax.io_model:
block-skipping FlashAttention for the Pallas backends and FlexAttention, FlashAttention on the
full mask for the other peers, materialised scores for XLA): `model_algorithm`,
`model_bytes`, `model_flops` and `roofline_ms` on the H200 ceilings.
"""

from __future__ import annotations

import functools
import math
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
from flashjax.ops.attention.block_sizes import BlockSizes
from flashjax.ops.attention.reference import mha_reference
import third_party

# Families whose flashjax BlockMask is Reverse Cuthill-McKee reordered (peers: unsupported),
# and the library family (flashjax.masks.families) each one reorders.
RCM_FAMILIES = ("random_banded_rcm",)
_BASE_FAMILY = {"random_banded_rcm": "random_banded"}
MASK_FAMILIES = (*families.FAMILIES, *RCM_FAMILIES)
TOLERANCES = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
PEER_PREFIX = "peer:"
# Config fields passed to flashjax.masks.families.build under their own names (a config
# without one gets build's default; block_density_target is build's block_density).
_MASK_PARAMS = ("batch", "window", "window_right", "doc_len", "doc_len_dist", "tree_span",
                "band_peak", "band_decay", "band_floor", "dilation", "num_global",
                "medusa_heads", "medusa_topk")


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
  if config.block_q is None and config.block_kv is None:
    return None
  defaults = BlockSizes()
  return BlockSizes(block_q=config.block_q or defaults.block_q,
                    block_kv=config.block_kv or defaults.block_kv)


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


def _flashjax_fn(config, mask):
  implementation = config.implementation
  block_sizes = None if implementation.startswith("xla") else _block_sizes(config)
  return jax.jit(functools.partial(
      flashjax.dot_product_attention, mask=mask, implementation=implementation,
      block_sizes=block_sizes,
      interpret=interpret_mode(config) and implementation.startswith("pallas")))


# Above this many logits (B * N * T * S) the dense reference would need tens of GB: check
# against the chunked XLA backend in float32 (full-precision matmuls, never T x S) instead.
DENSE_REFERENCE_MAX_LOGITS = 2**31


def _reference_fn(config, mask):
  """float32 reference attention for the error check: dense when small, else chunked."""
  logits = config.batch * config.num_heads * config.q_len * config.kv_len
  if logits <= DENSE_REFERENCE_MAX_LOGITS:
    return functools.partial(mha_reference, mask=mask)
  return jax.jit(functools.partial(flashjax.dot_product_attention, mask=mask,
                                   implementation="xla_chunked"))


def check_errors(config, fn, sets, mask) -> dict[str, Any]:
  """Max abs errors of `fn` on the first input set against the float32 reference."""
  inputs = sets[0]
  f32 = [x.astype(jnp.float32) for x in inputs]
  reference = _reference_fn(config, mask)
  if config.mode == "fwd":
    got, want = {"out": fn(*inputs)}, {"out": reference(*f32)}
  else:
    names = ("dq", "dk", "dv")
    _, vjp = jax.vjp(reference, *f32[:3])
    got, want = dict(zip(names, fn(*inputs))), dict(zip(names, vjp(f32[3])))
  errors = {f"max_abs_err_{name}": float(jnp.max(jnp.abs(got[name].astype(jnp.float32)
                                                           - want[name])))
            for name in got}
  worst = max(errors.values(), key=lambda e: math.inf if math.isnan(e) else e)
  tol = TOLERANCES.get(config.dtype, 1e-4) * (1 if config.mode == "fwd" else 2)
  return {"max_abs_err": worst, "within_tol": worst <= tol, **errors}  # NaN never passes


def time_point(config, fn, sets) -> dict[str, Any]:
  """Timing metrics of `fn` over the input sets (config.timing: wall, loop or both)."""
  metrics = {}
  if config.timing in ("wall", "both"):
    metrics.update(benchmarking.time_fn(fn, warmup=config.warmup, iters=config.iters,
                                        arg_sets=sets).summary())
  if config.timing in ("loop", "both"):
    loop = benchmarking.time_in_loop(fn, iters=config.iters, arg_sets=sets).summary()
    if config.timing == "loop":
      metrics.update(loop)
    else:
      metrics.update({f"loop_{k}": v for k, v in loop.items()})
  if not metrics:
    raise ValueError(f"{config.timing=} must be 'wall', 'loop' or 'both'")
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
    return peer.run(*_torch_case(config, peer_mask))
  attend = peer.make(peer_mask)
  fn = attend if config.mode == "fwd" else with_grads(attend)
  metrics = time_point(config, fn, sets)
  if config.check:
    metrics.update(check_errors(config, fn, sets, mask))
  return metrics


def model_columns(config: ml_collections.ConfigDict, block_density: float) -> dict[str, Any]:
  """The IO model of the point's algorithm (flashjax.io_model) on the H200 ceilings.

  Args:
    config: the point's config (implementation, shapes, dtype, mode, tiles).
    block_density: fraction of non-empty tiles at the benchmark tiles (block skipping).

  Returns:
    model_algorithm, model_bytes, model_flops and roofline_ms.
  """
  algorithm = io_model.implementation_algorithm(config.implementation)
  shape = io_model.Shape(
      batch=config.batch, q_len=config.q_len, kv_len=config.kv_len,
      num_heads=config.num_heads, head_dim=config.head_dim,
      itemsize=jnp.dtype(config.dtype).itemsize, num_kv_heads=config.num_kv_heads,
      score_itemsize=4 if algorithm == "naive" else None)  # XLA keeps float32 logits
  block_q, block_kv = _tiles(config)
  full = io_model.dense_tiles(shape, block_q, block_kv)
  tiles = min(full, block_density * full)
  cost = io_model.attention_cost(algorithm, shape, config.mode, block_q=block_q,
                                 block_kv=block_kv, nonempty_tiles=tiles)
  return {"model_algorithm": algorithm, "model_bytes": cost.hbm_bytes,
          "model_flops": cost.flops, "roofline_ms": cost.roofline_ms()}


def run_point(config: ml_collections.ConfigDict, point: dict[str, Any]) -> dict[str, Any]:
  """Times one (implementation, mask, shape) point; see the module docstring.

  Args:
    config: the study config with the point's fields already set.
    point: the sweep point (unused beyond config; recorded by the launcher).

  Returns:
    Metrics: timing summary, TFLOP/s, % of ceiling (when known), densities, errors.
  """
  del point
  if config.mode not in ("fwd", "fwd_bwd"):
    raise ValueError(f"{config.mode=} must be 'fwd' or 'fwd_bwd'")
  rng = np.random.default_rng(config.seed)
  mask = build_mask(config, rng)
  sets = input_sets(config)
  if config.implementation.startswith(PEER_PREFIX):
    if config.mask in RCM_FAMILIES:
      raise NotImplementedError(f"{config.mask=}: RCM reordering is a flashjax BlockMask; "
                                "peers run the same mask as 'random_banded'")
    metrics = _run_peer(config, mask, sets)
  else:
    attend = _flashjax_fn(config, kernel_mask(config, mask))
    fn = attend if config.mode == "fwd" else with_grads(attend)
    metrics = time_point(config, fn, sets)
    if config.check:
      metrics.update(check_errors(config, fn, sets, mask))

  b, t, s = config.batch, config.q_len, config.kv_len
  density = 1.0 if mask is None else mask.density  # mean over the mask's batch and heads
  pairs = density * b * t * s
  flops = benchmarking.masked_attention_flops(config.num_heads, config.head_dim, pairs,
                                              config.mode)
  seconds = metrics["median_ms"] / 1e3 if "median_ms" in metrics else math.nan
  block_q, block_kv = _tiles(config)
  block_density = 1.0
  if mask is not None:
    if config.mask in RCM_FAMILIES:
      kinds = kernel_mask(config, mask).kinds  # tiles of the reordered sequence
    else:
      kinds = mask.block_kinds(block_q, block_kv)
    block_density = float(np.mean(np.asarray(kinds) != masks.EMPTY))
  metrics.update(model_columns(config, block_density))
  metrics.update(
      density=density, block_density=block_density, bd_tiles=f"{block_q}x{block_kv}",
      useful_tflops=flops / seconds / 1e12,
      dense_equiv_tflops=benchmarking.attention_flops(
          b, t, s, config.num_heads, config.head_dim, mode=config.mode) / seconds / 1e12)
  ceilings = benchmarking.device_ceilings(jax.devices()[0].device_kind, config.dtype)
  if ceilings and "flops_per_s" in ceilings:
    metrics["pct_of_peak"] = benchmarking.percent_of_ceiling(flops / seconds,
                                                             ceilings["flops_per_s"])
  return metrics
