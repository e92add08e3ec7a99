"""Public entry point of (head-sparse) decode attention: validation and backend dispatch.

`decode_attention` (the public signature, written only here) validates, applies the
out-of-range policy and hands the backend object of the module named by `implementation`
one canonical `flashjax.ops.decode.base.DecodeArgs` (`DecodeBackend.run`).

Registered backends (name -> module.object, imported lazily; dispatch rules as in
flashjax.ops.attention.api):

  xla                flashjax.ops.decode.xla.decode_attention
  pallas_triton      flashjax.ops.decode.pallas_triton.decode_attention
  pallas_tpu         flashjax.ops.decode.pallas_tpu.decode_attention
  pallas_mosaic_gpu  flashjax.ops.decode.pallas_mosaic_gpu.decode_attention, which runs
                     pallas_triton's kernel (ALIASES; docs/decode.md says why)

`implementation=None` tries `default_implementations()`: the attention order of the device
without the aliases, so a Hopper GPU tries ("pallas_triton", "xla") and never presents the
reused Triton kernel as a separate Mosaic GPU one. Naming an alias runs it.

A Pallas backend on a platform it cannot run on raises BackendUnavailableError (a
NotImplementedError naming interpret=True) before any kernel is built, so lists of names
move on. Out-of-range `lengths` / `head_indices` follow one policy on every backend, applied
here before any backend runs (`decode_attention`'s docstring): concrete values raise
ValueError, traced ones are clamped / ignored, and `debug_checks=True` adds checkify checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from flashjax.ops.attention import api as attention_api
from flashjax.ops.attention.api import (check_lengths, check_platform, check_positive, concrete,
                                        dispatch_named)
from flashjax.ops.decode import base
from flashjax.ops.decode.block_sizes import DecodeBlockSizes

DECODE_BACKENDS: dict[str, tuple[str, str]] = {
    name: (f"flashjax.ops.decode.{name}", "decode_attention")
    for name in ("xla", "pallas_triton", "pallas_tpu", "pallas_mosaic_gpu")
}
# Registered names that run another backend's kernel: name -> that backend.
ALIASES: dict[str, str] = {"pallas_mosaic_gpu": "pallas_triton"}
# Backend name -> (platform it compiles for, whether interpret=True runs it anywhere); the
# alias runs the Triton kernel, so any GPU will do.
PLATFORM_NEEDS: dict[str, tuple[str, bool]] = {
    "pallas_triton": ("gpu", True),
    "pallas_mosaic_gpu": ("gpu", True),
    "pallas_tpu": ("tpu", True),
}


def default_implementations() -> tuple[str, ...]:
  """Decode backends tried, in order, for `implementation=None` on the default device."""
  return tuple(name for name in attention_api.default_implementations()
               if name in DECODE_BACKENDS and name not in ALIASES)


def decode_attention(
    query: jax.Array,
    key_cache: jax.Array,
    value_cache: jax.Array,
    lengths: jax.Array,
    *,
    head_indices: jax.Array | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    block_sizes: DecodeBlockSizes | None = None,
    implementation: str | Sequence[str] | None = None,
    interpret: bool = False,
    debug_checks: bool = False,
) -> jax.Array:
  """One-token attention over a KV cache, optionally computing only selected KV groups.

  Query head n reads KV head n // (Nq // Nkv). Sequence b attends to cache entries
  j < lengths[b]; a sequence of length 0 outputs zeros. With `head_indices`, only the KV
  groups listed in head_indices[b] are computed for sequence b and the query heads of the
  other groups output zeros (repeated ids are allowed and count once). Empty inputs (B, Nq
  or S_max of 0) give zeros without running a kernel.

  Out-of-range values, the same policy on every backend (applied here, before dispatch):
    * concrete (not traced) `lengths` outside [0, S_max] or `head_indices` outside
      [0, Nkv) raise ValueError naming them;
    * traced ones never give NaN, an error or a read outside the cache: lengths are
      clamped to [0, S_max] (a negative length acts as 0, one above S_max as S_max), and
      head ids outside [0, Nkv) are ignored (they select no group; a row with no valid id
      outputs zeros);
    * `debug_checks=True` also adds `jax.experimental.checkify` checks of the traced
      values; run the jitted function under `checkify.checkify(f, errors=
      checkify.user_checks)` to get the error (without checkify, jit refuses the checks).

  Args:
    query: [B, Nq, D] float array.
    key_cache: [B, S_max, Nkv, D], same dtype as query, Nq % Nkv == 0.
    value_cache: [B, S_max, Nkv, D], same dtype and shape as key_cache.
    lengths: int [B], 0 <= lengths[b] <= S_max (out-of-range policy above).
    head_indices: None (all groups) or int [B, K], 1 <= K <= Nkv, ids in [0, Nkv)
      (out-of-range policy above).
    scale: logit scale, a positive Python number (static: not traced under jit; the kernels
      are specialised on it), default 1 / sqrt(D).
    logits_soft_cap: optional positive cap: logits = cap * tanh(logits / cap); static too.
    block_sizes: None (heuristics) or a `flashjax.ops.decode.block_sizes.DecodeBlockSizes` for the
      Pallas backends: tile length, number of splits (e.g. DecodeBlockSizes(num_splits=8)),
      warps, stages; "xla" ignores it. A split count above the cache's tiles raises
      ValueError from the backend.
    implementation: None (best for the default device, falling back to "xla"; see
      `default_implementations`), a backend name, or a sequence of names tried in order.
      "pallas_mosaic_gpu" runs pallas_triton's kernel (no Mosaic GPU decode kernel).
    interpret: run Pallas backends in interpret mode (required to run them on a CPU).
    debug_checks: add checkify checks of traced lengths / head_indices (see above).

  Returns:
    [B, Nq, D] array of query's dtype.

  Raises:
    ValueError: for bad input, naming the values.
    NotImplementedError: when no requested backend can run the call; a Pallas backend on a
      platform it cannot run on raises BackendUnavailableError (a NotImplementedError)
      whose message names interpret=True.
  """
  for name, x, rank in (("query", query, 3), ("key_cache", key_cache, 4),
                        ("value_cache", value_cache, 4)):
    if not isinstance(x, (np.ndarray, jax.Array)):
      raise ValueError(f"{name} must be a jax or numpy array, got {type(x).__name__}")
    if x.ndim != rank:
      raise ValueError(f"{name}.shape={tuple(x.shape)} must have rank {rank}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name}.dtype={x.dtype} must be floating point")
  if not query.dtype == key_cache.dtype == value_cache.dtype:
    raise ValueError(f"dtypes differ: {query.dtype=!s}, {key_cache.dtype=!s}, "
                     f"{value_cache.dtype=!s}")
  if key_cache.shape != value_cache.shape:
    raise ValueError(f"{key_cache.shape=} != {value_cache.shape=}")
  batch, q_heads, head_dim = query.shape
  cache_batch, max_len, kv_heads, cache_head_dim = key_cache.shape
  if cache_batch != batch or cache_head_dim != head_dim:
    raise ValueError(f"{query.shape=} does not match {key_cache.shape=} (batch, head dim)")
  if kv_heads < 1 or head_dim < 1:
    raise ValueError(f"{kv_heads=} and {head_dim=} must be >= 1 ({key_cache.shape=})")
  if q_heads % kv_heads:
    raise ValueError(f"query heads must be a multiple of kv heads: {q_heads=}, {kv_heads=}")
  if not isinstance(debug_checks, (bool, np.bool_)):
    raise ValueError(f"{debug_checks=} must be a bool")

  if lengths is None:
    lengths = np.asarray(lengths)  # refused below with its shape and dtype
  lengths, host = check_lengths("lengths", lengths, batch, max_len, "S_max")
  if host is None:  # traced: clamp (the documented policy)
    if debug_checks:
      checkify.check(jnp.all((lengths >= 0) & (lengths <= max_len)),
                     f"decode_attention: lengths={{lengths}} must lie in [0, S_max={max_len}]",
                     lengths=lengths)
    lengths = jnp.clip(lengths, 0, max_len)

  selected = None  # [B, Nkv] groups kept, for traced head_indices
  if head_indices is not None:
    if not isinstance(head_indices, (np.ndarray, jax.Array)):
      head_indices = np.asarray(head_indices)
    if (head_indices.ndim != 2 or head_indices.shape[0] != batch or
        not 1 <= head_indices.shape[1] <= kv_heads):
      raise ValueError(f"head_indices.shape={tuple(head_indices.shape)} must be [B, K] "
                       f"with B={batch} and 1 <= K <= Nkv={kv_heads}")
    if not jnp.issubdtype(head_indices.dtype, jnp.integer):
      raise ValueError(f"head_indices.dtype={head_indices.dtype} must be an integer dtype")
    host = concrete(head_indices)
    if host is not None and host.size and (host.min() < 0 or host.max() >= kv_heads):
      raise ValueError(f"head_indices={host.tolist()} must lie in [0, Nkv={kv_heads})")
    head_indices = head_indices.astype(np.int32)
    if host is None:  # traced: ignore out-of-range ids (the documented policy)
      valid = (head_indices >= 0) & (head_indices < kv_heads)
      if debug_checks:
        checkify.check(jnp.all(valid), f"decode_attention: head_indices={{head_indices}} "
                       f"must lie in [0, Nkv={kv_heads})", head_indices=head_indices)
      # Groups selected by a valid id; invalid ids become group 0 for the backend and the
      # output keeps only the selected groups.
      selected = jnp.any(valid[:, :, None] & (head_indices[:, :, None] == jnp.arange(kv_heads)),
                         axis=1)  # [B, Nkv]
      head_indices = jnp.where(valid, head_indices, 0)

  scale = check_positive("scale", scale)
  if scale is None:
    scale = 1.0 / math.sqrt(head_dim)
  logits_soft_cap = check_positive("logits_soft_cap", logits_soft_cap)
  if not isinstance(interpret, (bool, np.bool_)):
    raise ValueError(f"{interpret=} must be a bool")
  if block_sizes is not None and not isinstance(block_sizes, DecodeBlockSizes):
    raise ValueError(f"block_sizes={block_sizes!r} must be None or a "
                     "flashjax.ops.decode.block_sizes.DecodeBlockSizes")

  empty = 0 in (batch, q_heads, max_len)

  def call(name, backend):
    check_platform(name, PLATFORM_NEEDS.get(name), bool(interpret))
    if empty:  # S_max == 0 leaves only length 0: zeros, as B == 0 or Nq == 0 do
      return jnp.zeros(query.shape, query.dtype)
    if isinstance(backend, base.DecodeBackend):
      # The contract's canonical form: validated above, handed over as is.
      return backend.run(base.DecodeArgs(
          query=query, key_cache=key_cache, value_cache=value_cache, lengths=lengths,
          head_indices=head_indices, scale=scale, logits_soft_cap=logits_soft_cap,
          block_sizes=block_sizes, interpret=bool(interpret)))
    return backend(query, key_cache, value_cache, lengths, head_indices=head_indices,
                   scale=scale, logits_soft_cap=logits_soft_cap, interpret=bool(interpret),
                   block_sizes=block_sizes)

  # With None, dispatch's default order is filtered by the registry it is given.
  registry = DECODE_BACKENDS if implementation is not None else {
      name: DECODE_BACKENDS[name] for name in default_implementations()}
  _, out = dispatch_named(implementation, registry, call, "decode")
  if selected is not None:
    keep = jnp.repeat(selected, q_heads // kv_heads, axis=1)  # [B, Nq]
    out = jnp.where(keep[:, :, None], out, jnp.zeros((), out.dtype))
  return out
