"""Public entry point of blocked attention: input validation and backend dispatch.

`dot_product_attention` (the public signature, written only here) checks every input
(ValueError naming the offending values), normalises the optional arguments to the canonical
form of the backend contract (flashjax.ops.attention.base.AttentionArgs) and hands it to the
backend object `dot_product_attention` of the module named by `implementation`
(`AttentionBackend.run`; a plain function there, such as the jax.nn pass-throughs, gets the
backend-protocol keywords instead). It takes every
argument of `jax.nn.dot_product_attention` with jax.nn's meaning; docs/jax_nn_compat.md
lists the differences.

Registered backends (name -> module.function, imported lazily on first use):

  xla                flashjax.ops.attention.xla.dot_product_attention
  xla_chunked        flashjax.ops.attention.xla.dot_product_attention_chunked
  pallas_triton      flashjax.ops.attention.pallas_triton.dot_product_attention
  pallas_tpu         flashjax.ops.attention.pallas_tpu.dot_product_attention
  pallas_mosaic_gpu  flashjax.ops.attention.pallas_mosaic_gpu.dot_product_attention
  cudnn              flashjax.ops.attention.jax_nn.dot_product_attention_cudnn: a pass-through
                     to jax.nn.dot_product_attention(implementation="cudnn")
  jax_nn             flashjax.ops.attention.jax_nn.dot_product_attention: a pass-through to
                     jax.nn.dot_product_attention(implementation="xla")
  partially_fused    flashjax.ops.attention.partially_fused.dot_product_attention: scores
                     kernel + P @ V kernel (Pallas, Triton lowering; no masks but causal)

"xla" stays flashjax's own XLA backend (rows without an allowed key output zeros); the two
pass-through names run jax.nn itself, with jax.nn's semantics.

A backend that cannot handle its inputs raises NotImplementedError; so does a backend whose
module is not there, and a backend that cannot run on this platform
(`BackendUnavailableError`, raised before any kernel is built; its message names
`interpret=True`). With `implementation=None` or a sequence of names the next backend is
tried; with a single name the error reaches the caller. The backend that ran is logged at
DEBUG level (logger "flashjax") and `resolve_implementation` returns it without running the
op.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.masks import masks as masks_lib
from flashjax.masks.block_mask import BlockMask
from flashjax.ops.attention import base

ATTENTION_BACKENDS: dict[str, tuple[str, str]] = {
    "xla": ("flashjax.ops.attention.xla", "dot_product_attention"),
    "xla_chunked": ("flashjax.ops.attention.xla", "dot_product_attention_chunked"),
    "pallas_triton": ("flashjax.ops.attention.pallas_triton", "dot_product_attention"),
    "pallas_tpu": ("flashjax.ops.attention.pallas_tpu", "dot_product_attention"),
    "pallas_mosaic_gpu": ("flashjax.ops.attention.pallas_mosaic_gpu", "dot_product_attention"),
    "cudnn": ("flashjax.ops.attention.jax_nn", "dot_product_attention_cudnn"),
    "jax_nn": ("flashjax.ops.attention.jax_nn", "dot_product_attention"),
    "partially_fused": ("flashjax.ops.attention.partially_fused", "dot_product_attention"),
}
# Backends called with jax.nn's own arguments (query_seq_lengths, key_value_seq_lengths,
# local_window_size) instead of having them folded into segment ids and masks.
PASS_THROUGH_BACKENDS = frozenset({"cudnn", "jax_nn"})
# Backends that take `return_residual=True` (the others raise NotImplementedError for it).
RESIDUAL_BACKENDS = frozenset({"xla", "xla_chunked", "cudnn", "jax_nn"})
# Pallas backends whose forward kernel keeps the row log-sum-exp: `attention_with_lse`
# returns it (public return_residual still refuses them).
KERNEL_RESIDUAL_BACKENDS = frozenset({"pallas_triton", "pallas_mosaic_gpu"})
_KERNEL_RESIDUAL: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "flashjax_kernel_residual", default=False)
# Backends that take a traced `scale`; the others get the query multiplied by it and 1.0.
TRACED_SCALE_BACKENDS = frozenset({"xla", "xla_chunked", "jax_nn"})
# Backend name -> (platforms it compiles for, comma-separated, whether interpret=True runs it
# anywhere). "gpu_sm90" is a GPU of compute capability 9.x (Hopper: wgmma).
PLATFORM_NEEDS: dict[str, tuple[str, bool]] = {
    "pallas_triton": ("gpu", True),
    "pallas_tpu": ("tpu", True),
    "pallas_mosaic_gpu": ("gpu_sm90", True),
    "cudnn": ("gpu", False),
    "partially_fused": ("gpu,tpu", True),
}

logger = logging.getLogger("flashjax")

# While `resolve_implementation` runs: the list that `dispatch_named` appends
# (op name, backend name) to.
_RECORD: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar(
    "flashjax_dispatch_record", default=None)


class BackendUnavailableError(NotImplementedError):
  """A backend cannot run on this platform (e.g. a Pallas GPU backend on a CPU).

  A NotImplementedError, so `implementation=None` and lists of names move on to the next
  backend; a single name raises it to the caller, before JAX would fail to lower the kernel.
  """


def _is_hopper() -> bool:
  capability = str(getattr(jax.devices()[0], "compute_capability", ""))
  return capability.startswith("9.")


def default_implementations() -> tuple[str, ...]:
  """Backends tried, in order, for `implementation=None` on the default device."""
  platform = jax.default_backend()
  if platform == "gpu":
    if _is_hopper():
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


def check_platform(name: str, needs: tuple[str, bool] | None, interpret: bool) -> None:
  """Raises BackendUnavailableError when backend `name` cannot run on the default device.

  Args:
    name: backend name (for the message).
    needs: (platform, interpretable) as in PLATFORM_NEEDS, or None (runs anywhere).
    interpret: whether the call asked for interpret mode.
  """
  if needs is None:
    return
  platform, interpretable = needs
  if interpret and interpretable:
    return
  here = jax.default_backend()
  if platform == "gpu_sm90":
    if here == "gpu" and _is_hopper():
      return
    wanted = "an NVIDIA Hopper GPU (compute capability 9.x)"
  else:
    if here in platform.split(","):
      return
    wanted = " or ".join({"gpu": "a GPU", "tpu": "a TPU"}.get(p, p)
                         for p in platform.split(","))
  if here == "gpu":
    capability = getattr(jax.devices()[0], "compute_capability", "?")
    here = f"gpu (compute capability {capability})"
  if interpretable:
    hint = ("pass interpret=True to run it in Pallas interpret mode (slow, for tests), or "
            f"implementation=[{name!r}, 'xla'] to fall back to XLA where it cannot run")
  else:
    hint = (f"it has no interpret mode; use implementation='xla' or a list such as "
            f"[{name!r}, 'xla']")
  raise BackendUnavailableError(f"backend {name!r} needs {wanted} but JAX's default backend "
                                f"is {here!r}: {hint}")


def dispatch_named(implementation: Any, registry: Mapping[str, tuple[str, str]],
                   call: Callable[[str, Callable[..., Any]], Any],
                   what: str) -> tuple[str, Any]:
  """Calls `call(name, backend_fn)` for the requested backends until one runs.

  The backend that ran is logged at DEBUG level (logger "flashjax", with the reasons of the
  ones skipped before it), or, under `resolve_implementation`, only reported to it (nothing
  ran). Under jit this happens once per trace: the choice is made while tracing.

  Args:
    implementation: as in `resolve_implementations`.
    registry: name -> (module, function).
    call: runs one backend function (given its name) on the validated inputs.
    what: op name for messages.

  Returns:
    (name, result) of the first backend that did not raise NotImplementedError.
  """
  names, fall_through = resolve_implementations(implementation, registry)
  reasons = []
  for name in names:
    try:
      result = call(name, load_backend(name, registry))
    except NotImplementedError as e:
      if not fall_through:
        raise
      reasons.append(f"{name}: {e}")
      continue
    record = _RECORD.get()
    if record is not None:  # resolve_implementation: traced abstractly, nothing ran
      record.append((what, name))
    else:
      skipped = f"; skipped {'; '.join(reasons)}" if reasons else ""
      logger.debug("flashjax %s: backend %r ran (implementation=%r%s)", what, name,
                    implementation, skipped)
    return name, result
  raise NotImplementedError(f"no {what} backend ran these inputs ({implementation=}, tried "
                            f"{list(names)}): " + "; ".join(reasons))


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
  return dispatch_named(implementation, registry, lambda name, fn: call(fn), what)[1]


def resolve_implementation(op: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
  """The backend name that `op(*args, **kwargs)` would run, without running it.

  The call is traced abstractly (`jax.eval_shape` under `jax.disable_jit`, so a jitted `op`
  is traced again: no compilation, no device work) with the arguments as given, so concrete
  values are checked as in a real call. Example:

    flashjax.resolve_implementation(flashjax.dot_product_attention, q, k, v,
                                    implementation=["pallas_triton", "xla"])  # "xla" on CPU

  Args:
    op: flashjax.dot_product_attention, flashjax.decode_attention, or another function
      whose first flashjax op dispatches through this module.
    *args: positional arguments of the call.
    **kwargs: keyword arguments of the call.

  Returns:
    The registered name of the backend that the first dispatched flashjax op ran.

  Raises:
    Whatever the call raises: ValueError for bad input, NotImplementedError when no
    requested backend can run it; ValueError when `op` dispatched no flashjax op.
  """
  record: list[tuple[str, str]] = []
  token = _RECORD.set(record)
  try:
    # disable_jit: a jitted op (or backend) whose trace is cached still runs its Python.
    with jax.disable_jit():
      jax.eval_shape(lambda: op(*args, **kwargs))
  finally:
    _RECORD.reset(token)
  if not record:
    raise ValueError(f"{op=} did not dispatch a flashjax op")
  return record[0][1]


def concrete(x: Any) -> np.ndarray | None:
  """Host copy of x, or None when x is traced."""
  try:
    return np.asarray(x)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


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


def traced_note(value: Any) -> str:
  """The end of an error message about an argument that must be static, when `value` is a
  jax value traced under jit (else "")."""
  if _is_array(value) and concrete(value) is None:
    return ("; it is traced under jax.jit: pass a Python value (a static argument, e.g. "
            "jax.jit(f, static_argnames=...), or a closure constant)")
  return ""


def check_positive(name: str, value: Any) -> float | None:
  """None, or value as a positive finite float (ValueError naming it otherwise)."""
  if value is None:
    return None
  try:
    value = float(value)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError) as e:
    raise ValueError(f"{name}={value!r} must be a concrete number" + traced_note(value)) from e
  if not value > 0 or not math.isfinite(value):
    raise ValueError(f"{name}={value} must be positive and finite")
  return value


_INT32_MIN = int(np.iinfo(np.int32).min)


def check_lengths(name: str, lengths: Any, batch: int, length: int,
                  length_name: str = "") -> tuple[Any, np.ndarray | None]:
  """(lengths as int32 [B], their host copy or None when traced); None stays None.

  Shape and dtype are always checked; concrete values must lie in [0, length] (ValueError
  naming them and `length_name`, e.g. "S_max"); traced ones are the caller's policy.
  """
  if lengths is None:
    return None, None
  if not _is_array(lengths):
    lengths = np.asarray(lengths)
  if tuple(lengths.shape) != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"{name} (shape={tuple(lengths.shape)}, dtype={lengths.dtype}) must be "
                     f"an int array of shape [B] = ({batch},)")
  host = concrete(lengths)
  if host is not None and host.size and (host.min() < 0 or host.max() > length):
    bound = f"{length_name}={length}" if length_name else f"{length}"
    raise ValueError(f"{name}={host.tolist()} must lie in [0, {bound}]")
  return lengths.astype(np.int32), host


def _check_window(local_window_size: Any) -> tuple[int, int] | None:
  """None, or (left, right) of non-negative ints (an int w means (w, w), as in jax.nn)."""
  if local_window_size is None:
    return None
  window = local_window_size
  if isinstance(window, (int, np.integer)) and not isinstance(window, (bool, np.bool_)):
    window = (window, window)
  ok = isinstance(window, (tuple, list)) and len(window) == 2 and all(
      isinstance(w, (int, np.integer)) and not isinstance(w, (bool, np.bool_)) and w >= 0
      for w in window)
  if not ok:
    raise ValueError(f"{local_window_size=} must be None, an int >= 0 or a pair "
                     "(left, right) of ints >= 0" + traced_note(local_window_size))
  return int(window[0]), int(window[1])


def _resolve_scale(scale: Any, head_dim: int) -> tuple[Any, bool]:
  """(scale as a float or, when traced, a float32 scalar array; whether it is traced)."""
  if scale is None:
    return 1.0 / math.sqrt(head_dim), False
  if _is_array(scale) and concrete(scale) is None:  # traced
    if scale.shape != () or not jnp.issubdtype(scale.dtype, jnp.number):
      raise ValueError(f"a traced scale must be a real scalar, got shape={scale.shape}, "
                       f"dtype={scale.dtype}")
    return scale.astype(jnp.float32), True
  return check_positive("scale", scale), False


@functools.lru_cache(maxsize=64)
def _window_mask(q_len: int, kv_len: int, left: int, right: int) -> masks_lib.Mask:
  """jax.nn's local window as a flashjax Mask (cached: backends cache BlockMasks per Mask)."""
  return masks_lib.sliding_window(q_len, kv_len, left, right)


def _fold_window(mask: Any, window: tuple[int, int], q_len: int, kv_len: int) -> Any:
  """mask AND jax.nn's local window (i - left <= j <= i + right), as one backend mask."""
  band = _window_mask(q_len, kv_len, *window)
  if mask is None:
    return band
  if isinstance(mask, masks_lib.Mask):
    return mask & band
  return mask & band.to_dense()  # bool array [B|1, N|1, T, S]


def _fold_seq_lengths(q_ids: Any, kv_ids: Any, q_lengths: Any, kv_lengths: Any, batch: int,
                      q_len: int, kv_len: int) -> tuple[Any, Any]:
  """Segment ids that also exclude padded queries (i >= q_lengths) and keys.

  A padded query or key gets an id that no key or query has: queries past their length then
  have no allowed key (zero output, as jax.nn gives them) and padded keys are never read.
  With user segment ids those two ids are below their minimum (or, when that would wrap
  around int32, above their maximum).
  """
  if q_lengths is None and kv_lengths is None:
    return q_ids, kv_ids
  if q_ids is None:
    q_ids = jnp.zeros((batch, q_len), jnp.int32)
    kv_ids = jnp.zeros((batch, kv_len), jnp.int32)
    pad_q, pad_kv = 1, 2
  else:
    q_ids, kv_ids = jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)
    lo = jnp.minimum(q_ids.min(), kv_ids.min())
    hi = jnp.maximum(q_ids.max(), kv_ids.max())
    below = lo > _INT32_MIN + 1
    pad_q, pad_kv = jnp.where(below, lo - 1, hi + 1), jnp.where(below, lo - 2, hi + 2)
  if q_lengths is not None:
    q_ids = jnp.where(jnp.arange(q_len)[None, :] < q_lengths[:, None], q_ids, pad_q)
  if kv_lengths is not None:
    kv_ids = jnp.where(jnp.arange(kv_len)[None, :] < kv_lengths[:, None], kv_ids, pad_kv)
  return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def _empty_result(query: jax.Array, return_residual: bool) -> Any:
  """Zeros of query's shape (and a -inf residual): B, T, Nq or S is 0."""
  out = jnp.zeros(query.shape, query.dtype)
  if return_residual:
    return out, jnp.full(query.shape[:3], -jnp.inf, query.dtype)
  return out


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: Any = None,
    *,
    scale: float | jax.Array | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | Sequence[str] | None = None,
    return_residual: bool = False,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    logits_soft_cap: float | None = None,
    block_sizes: Any = None,
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Scaled dot-product attention with masks, GQA and pluggable backends.

  Takes every argument of `jax.nn.dot_product_attention` with the same meaning (the
  differences, e.g. rows without an allowed key, are in docs/jax_nn_compat.md). For query
  head n (kv head n // (Nq // Nkv)), logits are `scale * q @ k^T`, then
  `cap * tanh(logits / cap)` when `logits_soft_cap` is set, then `+ bias`; keys not allowed
  by the mask get probability 0. All mask arguments (mask, is_causal, segment_ids,
  query_seq_lengths, key_value_seq_lengths, local_window_size) combine by AND; a query row
  with no allowed key outputs zeros and gets zero gradients (jax.nn: the mean of the
  values). Empty inputs (B, T, Nq or S of 0) give zeros without running a kernel.

  Args:
    query: [B, T, Nq, D] float array ([T, Nq, D] when key and value are rank 3 too).
    key: [B, S, Nkv, D], same dtype as query, Nq % Nkv == 0.
    value: [B, S, Nkv, D], same dtype and shape as key.
    bias: optional additive float array broadcastable to [B, Nq, T, S] (rank 2 to 4).
    mask: None | bool array broadcastable to [B, Nq, T, S] (rank 2 to 4; True = allowed) |
      flashjax.masks Mask of shape (T, S) or (B|1, Nq|1, T, S) | BlockMask.
    scale: logit scale, default 1 / sqrt(D). A traced scalar (e.g. a jit argument) works:
      "xla", "xla_chunked" and "jax_nn" use it as is, the other backends get
      `query * scale` (rounded to query's dtype) and a scale of 1.
    is_causal: allow only keys j <= i (top-left aligned, as jax.nn).
    query_seq_lengths: optional int [B]: queries i >= query_seq_lengths[b] are padding
      (zero output). Concrete values must lie in [0, T].
    key_value_seq_lengths: optional int [B]: keys j >= key_value_seq_lengths[b] are never
      attended. Concrete values must lie in [0, S].
    local_window_size: None, an int w (same as (w, w)) or (left, right) of ints >= 0: query
      i attends keys i - left <= j <= i + right (as jax.nn). Cannot be combined with a
      BlockMask (build the window into the BlockMask instead).
    implementation: None (best for the default device, falling back to "xla"), a backend
      name, or a sequence of names tried in order. "cudnn" and "jax_nn" run
      jax.nn.dot_product_attention itself (cuDNN / XLA paths, jax.nn semantics).
    return_residual: also return the log-sum-exp of each row's allowed logits,
      [B, T, Nq] ([T, Nq] for rank-3 inputs) in query's dtype, -inf for rows without an
      allowed key, no gradient (as jax.nn). Backends that cannot produce it ("pallas_*")
      raise NotImplementedError, so lists of names move on (`attention_with_lse` also takes
      pallas_triton and pallas_mosaic_gpu).
    segment_ids: int [B, T] (self-attention, T == S) or a pair (q_ids [B, T],
      kv_ids [B, S]); query i may attend key j only with equal ids.
    logits_soft_cap: optional positive cap of the logits.
    block_sizes: optional BlockSizes for tiled backends (must match a BlockMask's tiles).
    interpret: run Pallas backends in interpret mode (required to run them on a CPU).

  Returns:
    [B, T, Nq, D] array of query's dtype, or (that, residual) with return_residual.

  Raises:
    ValueError: for bad input, naming the values.
    NotImplementedError: when no requested backend can run the call; a Pallas backend on a
      platform it cannot run on raises BackendUnavailableError (a NotImplementedError)
      whose message names interpret=True.
  """
  for name, x in (("query", query), ("key", key), ("value", value)):
    if not _is_array(x):
      raise ValueError(f"{name} must be a jax or numpy array, got {type(x).__name__}")
  unbatched = query.ndim == key.ndim == value.ndim == 3
  if unbatched:  # jax.nn's [T, N, H] layout
    query, key, value = query[None], key[None], value[None]
  base.check_qkv(query, key, value)
  batch, q_len, q_heads, head_dim = query.shape
  kv_len = key.shape[1]

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
  q_lengths, _ = check_lengths("query_seq_lengths", query_seq_lengths, batch, q_len)
  kv_lengths, _ = check_lengths("key_value_seq_lengths", key_value_seq_lengths, batch,
                                  kv_len)
  window = _check_window(local_window_size)
  if window is not None and isinstance(mask, BlockMask):
    raise ValueError(f"{local_window_size=} cannot be combined with a BlockMask mask; build "
                     "the window into it (e.g. BlockMask.from_mask(your_mask & "
                     "masks.sliding_window(T, S, left, right), ...))")
  scale, scale_traced = _resolve_scale(scale, head_dim)
  logits_soft_cap = check_positive("logits_soft_cap", logits_soft_cap)
  for name, flag in (("is_causal", is_causal), ("interpret", interpret),
                     ("return_residual", return_residual)):
    if not isinstance(flag, (bool, np.bool_)):
      raise ValueError(f"{name}={flag!r} must be a bool" + traced_note(flag))
  is_causal, interpret = bool(is_causal), bool(interpret)
  return_residual = bool(return_residual)

  empty = 0 in (batch, q_len, q_heads, kv_len)
  permuted_with_lengths = (isinstance(mask, BlockMask) and (
      mask.q_perm is not None or mask.kv_perm is not None) and (
          q_lengths is not None or kv_lengths is not None))
  folded_mask, folded_q_ids, folded_kv_ids = mask, q_segment_ids, kv_segment_ids
  if not empty:
    if window is not None:
      folded_mask = _fold_window(mask, window, q_len, kv_len)
    folded_q_ids, folded_kv_ids = _fold_seq_lengths(q_segment_ids, kv_segment_ids, q_lengths,
                                                    kv_lengths, batch, q_len, kv_len)

  def call(name, backend):
    check_platform(name, PLATFORM_NEEDS.get(name), interpret)
    if return_residual and name not in RESIDUAL_BACKENDS and not (
        _KERNEL_RESIDUAL.get() and name in KERNEL_RESIDUAL_BACKENDS):
      raise NotImplementedError(
          f"backend {name!r} cannot return the softmax residual (return_residual=True); "
          f"{sorted(RESIDUAL_BACKENDS)} can")
    if permuted_with_lengths and name not in ("xla", "xla_chunked", *PASS_THROUGH_BACKENDS):
      raise NotImplementedError(
          f"backend {name!r}: query_seq_lengths / key_value_seq_lengths cannot be combined "
          "with an RCM-reordered BlockMask (the lengths refer to the original order); 'xla' "
          "and 'xla_chunked' can")
    if empty:
      return _empty_result(query, return_residual)
    q, s = query, scale
    if scale_traced and name not in TRACED_SCALE_BACKENDS:
      q, s = (query.astype(jnp.float32) * scale).astype(query.dtype), 1.0
    if isinstance(backend, base.AttentionBackend) and name not in PASS_THROUGH_BACKENDS:
      # The contract's canonical form: validated above, handed over as is.
      args = base.AttentionArgs(
          query=q, key=key, value=value, bias=bias, mask=folded_mask,
          q_segment_ids=folded_q_ids, kv_segment_ids=folded_kv_ids, is_causal=is_causal,
          scale=s, logits_soft_cap=logits_soft_cap, block_sizes=block_sizes,
          interpret=interpret)
      return backend.run(args, **({"return_residual": True} if return_residual else {}))
    kwargs = dict(bias=bias, is_causal=is_causal, scale=s, logits_soft_cap=logits_soft_cap,
                  block_sizes=block_sizes, interpret=interpret)
    if name in PASS_THROUGH_BACKENDS:
      kwargs.update(mask=mask, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                    query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths,
                    local_window_size=window, return_residual=return_residual)
    else:
      kwargs.update(mask=folded_mask, q_segment_ids=folded_q_ids,
                    kv_segment_ids=folded_kv_ids)
      if return_residual:
        kwargs["return_residual"] = True
    return backend(q, key, value, **kwargs)

  _, out = dispatch_named(implementation, ATTENTION_BACKENDS, call, "attention")
  if unbatched:
    out = jax.tree.map(lambda x: x[0], out)
  return out


def attention_with_lse(query: jax.Array, key: jax.Array, value: jax.Array,
                       **kwargs: Any) -> tuple[jax.Array, jax.Array]:
  """`dot_product_attention(..., return_residual=True)` that also runs the Pallas backends
  whose forward kernel keeps the row log-sum-exp (KERNEL_RESIDUAL_BACKENDS: pallas_triton,
  pallas_mosaic_gpu), e.g. for merging key blocks (the context-parallel ring).

  Same arguments (except return_residual) and result: (out, lse [B, T, Nq] in query's
  dtype, natural log, -inf for rows without an allowed key, no gradient). For the Pallas
  backends lse is their float32 base-2 statistic converted. pallas_tpu raises
  NotImplementedError (lists of names move on).
  """
  if "return_residual" in kwargs:
    raise ValueError("attention_with_lse always returns the residual; do not pass "
                     f"return_residual={kwargs['return_residual']!r}")
  token = _KERNEL_RESIDUAL.set(True)
  try:
    return dot_product_attention(query, key, value, return_residual=True, **kwargs)
  finally:
    _KERNEL_RESIDUAL.reset(token)
