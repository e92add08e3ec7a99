"""Public entry point of blocked attention: input validation and backend dispatch.

`dot_product_attention` checks every input (ValueError naming the offending values),
normalises the optional arguments to the backend protocol of docs/architecture.md and calls
`dot_product_attention` of the backend module named by `implementation`.

Registered backends (name -> module.function, imported lazily on first use):

  xla                flashjax.ops.attention.xla.dot_product_attention
  xla_chunked        flashjax.ops.attention.xla.dot_product_attention_chunked
  pallas_triton      flashjax.ops.attention.pallas_triton.dot_product_attention
  pallas_tpu         flashjax.ops.attention.pallas_tpu.dot_product_attention
  pallas_mosaic_gpu  flashjax.ops.attention.pallas_mosaic_gpu.dot_product_attention

A backend that cannot handle its inputs raises NotImplementedError; so does a backend whose
module is not there. With `implementation=None` or a sequence of names the next backend is
tried; with a single name the error reaches the caller.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.masks import masks as masks_lib
from flashjax.masks.block_mask import BlockMask

ATTENTION_BACKENDS: dict[str, tuple[str, str]] = {
    "xla": ("flashjax.ops.attention.xla", "dot_product_attention"),
    "xla_chunked": ("flashjax.ops.attention.xla", "dot_product_attention_chunked"),
    "pallas_triton": ("flashjax.ops.attention.pallas_triton", "dot_product_attention"),
    "pallas_tpu": ("flashjax.ops.attention.pallas_tpu", "dot_product_attention"),
    "pallas_mosaic_gpu": ("flashjax.ops.attention.pallas_mosaic_gpu", "dot_product_attention"),
}


def default_implementations() -> tuple[str, ...]:
  """Backends tried, in order, for `implementation=None` on the default device."""
  platform = jax.default_backend()
  if platform == "gpu":
    capability = str(getattr(jax.devices()[0], "compute_capability", ""))
    if capability.startswith("9."):
      return ("pallas_mosaic_gpu", "pallas_triton", "xla")
    return ("pallas_triton", "xla")
  if platform == "tpu":
    return ("pallas_tpu", "xla")
  return ("xla",)


def resolve_implementations(implementation: Any, registry: Mapping[str, Any]) -> tuple[
    tuple[str, ...], bool]:
  """Turns `implementation` into (names to try, whether falling through is allowed).

  Args:
    implementation: None, a registered name, or a non-empty sequence of names.
    registry: the registered names.

  Returns:
    The names in order and True when NotImplementedError moves on to the next name.
  """
  if implementation is None:
    return tuple(n for n in default_implementations() if n in registry), True
  if isinstance(implementation, str):
    names, fall_through = (implementation,), False
  elif isinstance(implementation, Sequence) and implementation:
    names, fall_through = tuple(implementation), True
  else:
    raise ValueError(f"{implementation=} must be None, a backend name or a non-empty "
                     f"sequence of names from {sorted(registry)}")
  for name in names:
    if not isinstance(name, str) or name not in registry:
      raise ValueError(f"unknown implementation {name!r} in {implementation=}; known: "
                       f"{sorted(registry)}")
  return names, fall_through


def load_backend(name: str, registry: Mapping[str, tuple[str, str]]) -> Callable[..., Any]:
  """Imports the backend function; a missing module raises NotImplementedError."""
  module_name, function_name = registry[name]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    # Only the backend module itself being absent means "not available"; a module that
    # exists but fails to import is a bug and propagates.
    if e.name == module_name:
      raise NotImplementedError(f"backend {name!r}: module {module_name} is not available"
                                ) from e
    raise
  return getattr(module, function_name)


def dispatch(implementation: Any, registry: Mapping[str, tuple[str, str]],
             call: Callable[[Callable[..., Any]], Any], what: str) -> Any:
  """Calls `call(backend_fn)` for the requested backends until one runs.

  Args:
    implementation: as in `resolve_implementations`.
    registry: name -> (module, function).
    call: runs one backend function on the validated inputs.
    what: op name for error messages.

  Returns:
    The first backend's result that did not raise NotImplementedError.
  """
  names, fall_through = resolve_implementations(implementation, registry)
  reasons = []
  for name in names:
    try:
      return call(load_backend(name, registry))
    except NotImplementedError as e:
      if not fall_through:
        raise
      reasons.append(f"{name}: {e}")
  raise NotImplementedError(f"no {what} backend ran these inputs ({implementation=}, tried "
                            f"{list(names)}): " + "; ".join(reasons))


def _is_array(x: Any) -> bool:
  return isinstance(x, (np.ndarray, jax.Array))


def _xp(x: Any):
  return np if isinstance(x, np.ndarray) else jnp


def _check_4d_like(name: str, x: Any, batch: int, heads: int, q_len: int,
                   kv_len: int) -> Any:
  """Checks rank 2..4 and broadcastability to [B, N, T, S]; returns [B|1, N|1, T, S]."""
  if not 2 <= x.ndim <= 4:
    raise ValueError(f"{name}.shape={tuple(x.shape)} must have rank 2 to 4 (broadcastable "
                     f"to [B, N, T, S] = {(batch, heads, q_len, kv_len)})")
  shape = (1,) * (4 - x.ndim) + tuple(x.shape)
  full = (batch, heads, q_len, kv_len)
  if any(d not in (1, f) for d, f in zip(shape, full)):
    raise ValueError(f"{name}.shape={tuple(x.shape)} is not broadcastable to "
                     f"[B, N, T, S] = {full}")
  xp = _xp(x)
  return xp.broadcast_to(xp.reshape(x, shape), (shape[0], shape[1], q_len, kv_len))


def _check_mask(mask: Any, batch: int, heads: int, q_len: int, kv_len: int,
                block_sizes: Any) -> Any:
  if mask is None:
    return None
  if isinstance(mask, BlockMask):
    bm, nm, t, s = mask.shape
    if (t, s) != (q_len, kv_len) or bm not in (1, batch) or nm not in (1, heads):
      raise ValueError(f"BlockMask {mask.shape=} does not fit [B, N, T, S] = "
                       f"{(batch, heads, q_len, kv_len)}")
    if block_sizes is not None and (block_sizes.block_q, block_sizes.block_kv) != (
        mask.block_q, mask.block_kv):
      raise ValueError(f"{block_sizes=} disagrees with the BlockMask tiles "
                       f"{mask.block_q=}, {mask.block_kv=}")
    return mask
  if isinstance(mask, masks_lib.Mask):
    shape = tuple(mask.shape)
    ok = len(shape) in (2, 4) and shape[-2:] == (q_len, kv_len)
    if len(shape) == 4:
      ok = ok and shape[0] in (1, batch) and shape[1] in (1, heads)
    if not ok:
      raise ValueError(f"mask.shape={shape} must be (T, S) = {(q_len, kv_len)} or "
                       f"(B|1, N|1, T, S) with (B, N) = {(batch, heads)}")
    return mask
  if not _is_array(mask):
    raise ValueError(f"mask of type {type(mask).__name__} must be None, a bool array, a "
                     "flashjax.masks Mask or a BlockMask")
  if mask.dtype != np.bool_:
    raise ValueError(f"{mask.dtype=!s} must be bool (pass additive masks as bias)")
  return _check_4d_like("mask", mask, batch, heads, q_len, kv_len)


def _check_segment_ids(segment_ids: Any, batch: int, q_len: int,
                       kv_len: int) -> tuple[Any, Any]:
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, tuple):
    if len(segment_ids) != 2:
      raise ValueError(f"{len(segment_ids)=} must be 2: (q_segment_ids, kv_segment_ids)")
    q_ids, kv_ids = segment_ids
  else:
    if q_len != kv_len:
      raise ValueError(f"a single segment_ids array needs self-attention, got {q_len=} != "
                       f"{kv_len=}; pass (q_segment_ids, kv_segment_ids)")
    q_ids = kv_ids = segment_ids
  out = []
  for name, ids, length in (("q_segment_ids", q_ids, q_len), ("kv_segment_ids", kv_ids,
                                                              kv_len)):
    if not _is_array(ids):
      ids = np.asarray(ids)
    if tuple(ids.shape) != (batch, length):
      raise ValueError(f"{name}.shape={tuple(ids.shape)} must be [B, len] = "
                       f"{(batch, length)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"{name}.dtype={ids.dtype} must be an integer dtype")
    out.append(ids.astype(np.int32))
  return out[0], out[1]


def check_positive(name: str, value: Any) -> float | None:
  """None, or value as a positive finite float (ValueError naming it otherwise)."""
  if value is None:
    return None
  try:
    value = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise ValueError(f"{name}={value!r} must be a concrete number") from e
  if not value > 0 or not math.isfinite(value):
    raise ValueError(f"{name}={value} must be positive and finite")
  return value


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: Any = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    logits_soft_cap: float | None = None,
    block_sizes: Any = None,
    implementation: str | Sequence[str] | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Scaled dot-product attention with masks, GQA and pluggable backends.

  For query head n (kv head n // (Nq // Nkv)), logits are
  `scale * q @ k^T`, then `cap * tanh(logits / cap)` when `logits_soft_cap` is set, then
  `+ bias`; keys not allowed by the mask get probability 0. All mask arguments combine by
  AND; a query row with no allowed key outputs zeros and gets zero gradients.

  Args:
    query: [B, T, Nq, D] float array.
    key: [B, S, Nkv, D], same dtype as query, Nq % Nkv == 0.
    value: [B, S, Nkv, D], same dtype and shape as key.
    bias: optional additive float array broadcastable to [B, Nq, T, S] (rank 2 to 4).
    mask: None | bool array broadcastable to [B, Nq, T, S] (rank 2 to 4; True = allowed) |
      flashjax.masks Mask of shape (T, S) or (B|1, Nq|1, T, S) | BlockMask.
    scale: logit scale, default 1 / sqrt(D).
    is_causal: allow only keys j <= i (top-left aligned).
    segment_ids: int [B, T] (self-attention, T == S) or a pair (q_ids [B, T],
      kv_ids [B, S]); query i may attend key j only with equal ids.
    logits_soft_cap: optional positive cap of the logits.
    block_sizes: optional BlockSizes for tiled backends (must match a BlockMask's tiles).
    implementation: None (best for the default device, falling back to "xla"), a backend
      name, or a sequence of names tried in order.
    interpret: run Pallas backends in interpret mode.

  Returns:
    [B, T, Nq, D] array of query's dtype.
  """
  for name, x in (("query", query), ("key", key), ("value", value)):
    if not _is_array(x):
      raise ValueError(f"{name} must be a jax or numpy array, got {type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(f"{name}.shape={tuple(x.shape)} must have rank 4 [B, T|S, N, D]")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name}.dtype={x.dtype} must be floating point")
  if not query.dtype == key.dtype == value.dtype:
    raise ValueError(f"dtypes differ: {query.dtype=!s}, {key.dtype=!s}, {value.dtype=!s}")
  batch, q_len, q_heads, head_dim = query.shape
  if key.shape != value.shape:
    raise ValueError(f"{key.shape=} != {value.shape=}")
  kv_batch, kv_len, kv_heads, kv_head_dim = key.shape
  if kv_batch != batch:
    raise ValueError(f"batch mismatch: {query.shape=} vs {key.shape=}")
  if kv_head_dim != head_dim:
    raise ValueError(f"head dim mismatch: {query.shape=} vs {key.shape=}")
  if q_heads % kv_heads:
    raise ValueError(f"query heads must be a multiple of kv heads: {q_heads=}, {kv_heads=}")

  if bias is not None:
    if not _is_array(bias) or not jnp.issubdtype(bias.dtype, jnp.floating):
      raise ValueError(f"bias must be a floating point array, got {type(bias).__name__} "
                       f"with dtype={getattr(bias, 'dtype', None)}")
    bias = _check_4d_like("bias", bias, batch, q_heads, q_len, kv_len)
  if block_sizes is not None and not (hasattr(block_sizes, "block_q") and
                                      hasattr(block_sizes, "block_kv")):
    raise ValueError(f"{block_sizes=} must be None or a BlockSizes")
  mask = _check_mask(mask, batch, q_heads, q_len, kv_len, block_sizes)
  q_segment_ids, kv_segment_ids = _check_segment_ids(segment_ids, batch, q_len, kv_len)
  scale = check_positive("scale", scale)
  if scale is None:
    scale = 1.0 / math.sqrt(head_dim)
  logits_soft_cap = check_positive("logits_soft_cap", logits_soft_cap)
  if not isinstance(is_causal, (bool, np.bool_)):
    raise ValueError(f"{is_causal=} must be a bool")
  if not isinstance(interpret, (bool, np.bool_)):
    raise ValueError(f"{interpret=} must be a bool")

  def call(backend):
    return backend(query, key, value, bias=bias, mask=mask, q_segment_ids=q_segment_ids,
                   kv_segment_ids=kv_segment_ids, is_causal=bool(is_causal), scale=scale,
                   logits_soft_cap=logits_soft_cap, block_sizes=block_sizes,
                   interpret=bool(interpret))

  return dispatch(implementation, ATTENTION_BACKENDS, call, "attention")
