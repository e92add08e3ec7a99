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
                   band_floor, dilation, num_global

Every point is checked against flashjax's float32 reference on the same inputs in the same
run (max_abs_err; within_tol by dtype: float32 1e-4, bfloat16 2e-2, float16 5e-3 absolute),
and reports time, useful TFLOP/s (4*N*D per allowed pair), mask density and block density.
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
from flashjax import masks
from flashjax.ops.attention.configs import BlockSizes
from flashjax.ops.attention.reference import mha_reference
import third_party

MASK_FAMILIES = ("dense", "causal", "sliding_window", "document", "prefix_lm", "tree",
                 "random_banded", "dilated", "global")
TOLERANCES = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
PEER_PREFIX = "peer:"


def _segment_ids(rng: np.random.Generator, batch: int, length: int,
                 mean_len: int) -> np.ndarray:
  """int32 [B, T] document ids; document lengths uniform in [1, 2 * mean_len)."""
  ids = np.empty((batch, length), np.int32)
  for b in range(batch):
    ends = np.cumsum(rng.integers(1, 2 * mean_len, size=length))
    ids[b] = np.searchsorted(ends, np.arange(length), side="right")
  return ids


def build_mask(config: ml_collections.ConfigDict, rng: np.random.Generator) -> Any:
  """The flashjax.masks Mask of `config.mask` at [T, S] (None for "dense").

  Args:
    config: the point's config (mask family and its parameters, shapes).
    rng: numpy generator for the random families.

  Returns:
    A Mask or None.
  """
  t, s, family = config.q_len, config.kv_len, config.mask
  if family not in MASK_FAMILIES:
    raise ValueError(f"unknown mask family {family=}; known: {MASK_FAMILIES}")
  if family in ("document", "prefix_lm", "tree") and t != s:
    raise ValueError(f"{family=} needs q_len == kv_len: {t=}, {s=}")
  if family == "dense":
    return None
  if family == "causal":
    return masks.causal(t, s)
  if family == "sliding_window":
    return masks.sliding_window(t, s, config.window, config.window_right)
  if family in ("document", "prefix_lm"):
    ids = _segment_ids(rng, config.batch, t, config.doc_len)
    if family == "document":
      return masks.document(ids, causal=True)
    num_docs = int(ids.max()) + 1
    prefix = rng.integers(0, config.doc_len, size=(config.batch, num_docs)).astype(np.int32)
    return masks.prefix_lm(ids, prefix)
  if family == "tree":
    # MEDUSA-style: node i attends to itself and its parent, a recent earlier node.
    parents = np.array([-1] + [int(rng.integers(max(0, i - config.tree_span), i))
                               for i in range(1, t)], np.int32)
    return masks.tree(parents)
  if family == "random_banded":
    return masks.random_banded(t, s, seed=int(rng.integers(2**31)), peak=config.band_peak,
                               decay=config.band_decay, floor=config.band_floor)
  if family == "dilated":
    return masks.dilated(t, s, config.window, config.dilation)
  global_ids = np.sort(rng.choice(t, size=config.num_global, replace=False)).astype(np.int32)
  return masks.global_tokens(t, s, config.window, global_ids)


def _inputs(config: ml_collections.ConfigDict) -> list[tuple[jax.Array, ...]]:
  """`input_sets` fresh (q, k, v[, dout]) tuples from config.seed."""
  dtype = jnp.dtype(config.dtype)
  b, t, s, d = config.batch, config.q_len, config.kv_len, config.head_dim
  shapes = [(b, t, config.num_heads, d), (b, s, config.num_kv_heads, d),
            (b, s, config.num_kv_heads, d)]
  if config.mode == "fwd_bwd":
    shapes.append(shapes[0])
  key = jax.random.key(config.seed)
  sets = []
  for set_key in jax.random.split(key, config.input_sets):
    keys = jax.random.split(set_key, len(shapes))
    sets.append(tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype)
                      for k, shape in zip(keys, shapes)))
  return sets


def _with_grads(attend):
  """fn(q, k, v, dout) -> (dq, dk, dv): the backward pass after the forward."""

  def fwd_bwd(q, k, v, dout):
    _, vjp = jax.vjp(attend, q, k, v)
    return vjp(dout)

  return jax.jit(fwd_bwd)


def _interpret(config: ml_collections.ConfigDict) -> bool:
  if config.interpret is not None:
    return bool(config.interpret)
  return jax.default_backend() == "cpu"


def _block_sizes(config: ml_collections.ConfigDict) -> BlockSizes | None:
  if config.block_q is None and config.block_kv is None:
    return None
  defaults = BlockSizes()
  return BlockSizes(block_q=config.block_q or defaults.block_q,
                    block_kv=config.block_kv or defaults.block_kv)


def _flashjax_fn(config, mask):
  implementation = config.implementation
  block_sizes = None if implementation.startswith("xla") else _block_sizes(config)
  return jax.jit(functools.partial(
      flashjax.dot_product_attention, mask=mask, implementation=implementation,
      block_sizes=block_sizes,
      interpret=_interpret(config) and implementation.startswith("pallas")))


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


def _errors(config, fn, sets, mask) -> dict[str, Any]:
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


def _time(config, fn, sets) -> dict[str, Any]:
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
  peers = third_party.attention_peers(interpret=_interpret(config))
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
  fn = attend if config.mode == "fwd" else _with_grads(attend)
  metrics = _time(config, fn, sets)
  if config.check:
    metrics.update(_errors(config, fn, sets, mask))
  return metrics


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
  sets = _inputs(config)
  if config.implementation.startswith(PEER_PREFIX):
    metrics = _run_peer(config, mask, sets)
  else:
    attend = _flashjax_fn(config, mask)
    fn = attend if config.mode == "fwd" else _with_grads(attend)
    metrics = _time(config, fn, sets)
    if config.check:
      metrics.update(_errors(config, fn, sets, mask))

  b, t, s = config.batch, config.q_len, config.kv_len
  density = 1.0 if mask is None else mask.density  # mean over the mask's batch and heads
  pairs = density * b * t * s
  flops = benchmarking.masked_attention_flops(config.num_heads, config.head_dim, pairs,
                                              config.mode)
  seconds = metrics["median_ms"] / 1e3 if "median_ms" in metrics else math.nan
  block_sizes = _block_sizes(config) or BlockSizes()
  block_density = 1.0
  if mask is not None:
    kinds = mask.block_kinds(block_sizes.block_q, block_sizes.block_kv)
    block_density = float(np.mean(kinds != masks.EMPTY))
  metrics.update(
      density=density, block_density=block_density,
      bd_tiles=f"{block_sizes.block_q}x{block_sizes.block_kv}",
      useful_tflops=flops / seconds / 1e12,
      dense_equiv_tflops=benchmarking.attention_flops(
          b, t, s, config.num_heads, config.head_dim, mode=config.mode) / seconds / 1e12)
  ceilings = benchmarking.device_ceilings(jax.devices()[0].device_kind, config.dtype)
  if ceilings and "flops_per_s" in ceilings:
    metrics["pct_of_peak"] = benchmarking.percent_of_ceiling(flops / seconds,
                                                             ceilings["flops_per_s"])
  return metrics
