"""The attention backend contract: arguments bound and canonicalised once, one method per backend.

`api.dot_product_attention` (the public signature, written once) validates the public
arguments, folds jax.nn's extras (sequence lengths, local window) into the mask and segment
ids, and hands a backend one `AttentionArgs`: the canonical form below. A backend is an
`AttentionBackend` object registered under its module's `dot_product_attention` name; it
overrides `attend(args)` only. Calling the object directly with the backend-protocol keywords
(tests, benchmarks: `pallas_triton.dot_product_attention(q, k, v, is_causal=True, ...)`)
binds and canonicalises the same way (`AttentionArgs.bind`).

Canonical form (`AttentionArgs`):
  query [B, T, Nq, D], key / value [B, S, Nkv, D] (same dtype, Nq % Nkv == 0);
  bias None or [B|1, Nq|1, T, S]; mask None | Mask | BlockMask | bool [B|1, Nq|1, T, S];
  q_segment_ids / kv_segment_ids both None or int [B, T] / [B, S]; is_causal a bool;
  scale a float (default 1 / sqrt(D)) or, for the backends api.py lets take one, a traced
  float32 scalar; logits_soft_cap None or a float > 0; block_sizes None or a BlockSizes;
  interpret as given.

`BlockSparseBackend` adds what every Pallas backend does with it: its capability checks,
its plan (the BlockMasks at its tiling and its static kernel parameters), and the RCM
permutation of a BlockMask applied around the kernels through flashjax.masks.rcm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from flashjax.masks import rcm
from flashjax.masks.block_mask import BlockMask


def check_qkv(query: Any, key: Any, value: Any) -> None:
  """ValueError (naming the values) unless q, k, v are rank-4 float arrays of one dtype with
  key.shape == value.shape, equal batch and head dim, and Nq a multiple of Nkv >= 1."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    if x.ndim != 4:
      raise ValueError(f"{name}.shape={tuple(x.shape)} must have rank 4 [B, T|S, N, D] (or "
                       "query, key and value all rank 3)")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name}.dtype={x.dtype} must be floating point")
  if not query.dtype == key.dtype == value.dtype:
    raise ValueError(f"dtypes differ: {query.dtype=!s}, {key.dtype=!s}, {value.dtype=!s}")
  batch, _, q_heads, head_dim = query.shape
  if key.shape != value.shape:
    raise ValueError(f"{key.shape=} != {value.shape=}")
  kv_batch, _, kv_heads, kv_head_dim = key.shape
  if kv_batch != batch:
    raise ValueError(f"batch mismatch: {query.shape=} vs {key.shape=}")
  if kv_head_dim != head_dim:
    raise ValueError(f"head dim mismatch: {query.shape=} vs {key.shape=}")
  if kv_heads < 1 or head_dim < 1:
    raise ValueError(f"{kv_heads=} and {head_dim=} must be >= 1 ({key.shape=})")
  if q_heads % kv_heads:
    raise ValueError(f"query heads must be a multiple of kv heads: {q_heads=}, {kv_heads=}")


def canonical_scale(scale: Any, head_dim: int) -> Any:
  """1 / sqrt(head_dim) for None, a traced scale as is, anything else as a float."""
  if scale is None:
    return 1.0 / math.sqrt(head_dim)
  if isinstance(scale, jax.core.Tracer):
    return scale
  return float(scale)


def canonical_soft_cap(logits_soft_cap: Any) -> float | None:
  """None, or the cap as a float > 0 (ValueError naming it otherwise)."""
  if logits_soft_cap is None:
    return None
  if not logits_soft_cap > 0:
    raise ValueError(f"{logits_soft_cap=} must be > 0")
  return float(logits_soft_cap)


@dataclasses.dataclass(frozen=True)
class AttentionArgs:
  """The canonical arguments every attention backend receives (module docstring)."""

  query: jax.Array
  key: jax.Array
  value: jax.Array
  bias: jax.Array | None = None
  mask: Any = None
  q_segment_ids: jax.Array | None = None
  kv_segment_ids: jax.Array | None = None
  is_causal: bool = False
  scale: Any = 1.0
  logits_soft_cap: float | None = None
  block_sizes: Any = None
  interpret: Any = False

  @classmethod
  def bind(cls, query, key, value, *, bias=None, mask=None, q_segment_ids=None,
           kv_segment_ids=None, is_causal=False, scale=None, logits_soft_cap=None,
           block_sizes=None, interpret=False) -> AttentionArgs:
    """Binds the backend-protocol keywords (docs/architecture.md) into canonical form."""
    check_qkv(query, key, value)
    if (q_segment_ids is None) != (kv_segment_ids is None):
      raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    return cls(query=query, key=key, value=value, bias=bias, mask=mask,
               q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
               is_causal=bool(is_causal), scale=canonical_scale(scale, query.shape[3]),
               logits_soft_cap=canonical_soft_cap(logits_soft_cap),
               block_sizes=block_sizes, interpret=interpret)

  @property
  def head_dim(self) -> int:
    return self.query.shape[3]

  @property
  def q_len(self) -> int:
    return self.query.shape[1]

  @property
  def kv_len(self) -> int:
    return self.key.shape[1]

  @property
  def permuted(self) -> bool:
    """Whether the mask is an RCM-reordered BlockMask."""
    return isinstance(self.mask, BlockMask) and (self.mask.q_perm is not None
                                                 or self.mask.kv_perm is not None)


class AttentionBackend:
  """One attention backend: override `attend`; the object is the backend function.

  Attributes:
    name: the registered backend name (used in messages).
    supports_bias: False: an additive bias raises NotImplementedError naming the backend,
      so dispatch moves on.
    bias_hint: what the bias message suggests instead.
  """

  name: str = ""
  supports_bias: bool = False
  bias_hint: str = "use the xla backend"

  def __call__(self, query, key, value, *, bias=None, mask=None, q_segment_ids=None,
               kv_segment_ids=None, is_causal=False, scale=None, logits_soft_cap=None,
               block_sizes=None, interpret=False, **options):
    """Runs the backend on the backend-protocol keywords (bound by `AttentionArgs.bind`)."""
    args = AttentionArgs.bind(
        query, key, value, bias=bias, mask=mask, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, is_causal=is_causal, scale=scale,
        logits_soft_cap=logits_soft_cap, block_sizes=block_sizes, interpret=interpret)
    return self.run(args, **options)

  def run(self, args: AttentionArgs, **options):
    """Runs the backend on canonical arguments (what api.py calls)."""
    if args.bias is not None and not self.supports_bias:
      raise NotImplementedError(
          f"{self.name}: additive bias is not supported; {self.bias_hint}")
    return self.attend(args, **options)

  def attend(self, args: AttentionArgs, **options):
    """[B, T, Nq, D] in query's dtype (rows with no allowed key 0). Backends override."""
    raise NotImplementedError(f"{type(self).__name__} does not implement attend")

  def backward_from_stats(self, args: AttentionArgs, d_out: jax.Array, lse: jax.Array,
                          delta: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dQ, dK, dV of this call given row statistics computed elsewhere.

    For a call that is one key block of a larger attention (context-parallel ring): with the
    rows' log-sum-exp over *all* keys, P = exp(s - lse) is this block's slice of the full
    softmax and the usual backward applies block by block.

    Args:
      args: the call's canonical arguments.
      d_out: [B, T, Nq, D] cotangent of the full attention output.
      lse: float32 [B, T, Nq] natural-log log-sum-exp of each row's allowed logits over all
        keys (-inf: the row has no allowed key anywhere).
      delta: float32 [B, T, Nq] rowsum(d_out * out) of the full output.

    Returns:
      (dQ, dK, dV) in the input dtypes. Backends without such a backward raise
      NotImplementedError naming themselves.
    """
    del args, d_out, lse, delta
    raise NotImplementedError(
        f"{self.name}: no backward from external row statistics (lse, delta); "
        "pallas_triton has one")

  def __repr__(self) -> str:
    return f"<flashjax attention backend {self.name!r}>"


class BlockSparseBackend(AttentionBackend):
  """A Pallas backend: capability checks, a plan (BlockMasks, static parameters), kernels.

  `attend` runs `check_supported(args)`, `plan(args)`, permutes q/k/v by the plan's forward
  BlockMask (RCM order; identity without one), calls `kernel(q, k, v, plan)` and un-permutes
  the output.
  """

  def check_supported(self, args: AttentionArgs) -> None:
    """NotImplementedError for inputs this backend cannot run (dtype, head dim, ...)."""
    del args

  def plan(self, args: AttentionArgs) -> Any:
    """Static plan of one call; must have a `fwd_mask` BlockMask attribute."""
    raise NotImplementedError

  def kernel(self, query, key, value, plan: Any) -> jax.Array:
    """The (differentiable) kernels on q/k/v in the plan's BlockMask order."""
    raise NotImplementedError

  def kernel_with_lse(self, query, key, value, plan: Any) -> tuple[jax.Array, jax.Array]:
    """`kernel`'s output (differentiable) and the forward's lse2 residual: float32
    [B * Nq, T] base-2 log-sum-exp of the scaled logits, +inf for rows with no allowed key.
    Backends whose forward keeps no such residual raise NotImplementedError."""
    del query, key, value, plan
    raise NotImplementedError(f"{self.name} cannot return the softmax residual "
                              "(return_residual=True)")

  def attend(self, args: AttentionArgs, *, return_residual: bool = False, **options):
    """The output, or (output, residual) with return_residual: the residual is the natural
    log-sum-exp [B, T, Nq] of each row's allowed logits in query's dtype, -inf for rows
    without an allowed key, without gradient (api.dot_product_attention's contract)."""
    if options:
      raise NotImplementedError(f"{self.name}: unsupported options {sorted(options)}")
    self.check_supported(args)
    plan = self.plan(args)
    query, key, value = rcm.permute_qkv(args.query, args.key, args.value, plan.fwd_mask)
    if not return_residual:
      out = self.kernel(query, key, value, plan)
      return rcm.unpermute_output(out, plan.fwd_mask)
    out, lse2 = self.kernel_with_lse(query, key, value, plan)
    lse = natural_lse(lax.stop_gradient(lse2), *args.query.shape[:3])
    lse = rcm.unpermute_output(lse[..., None], plan.fwd_mask)[..., 0]
    return rcm.unpermute_output(out, plan.fwd_mask), lse.astype(args.query.dtype)


def natural_lse(lse2: jax.Array, batch: int, q_len: int, num_heads: int) -> jax.Array:
  """Pallas lse2 [B * Nq, T] (base 2, +inf: no allowed key) -> float32 [B, T, Nq] natural
  log-sum-exp (-inf: no allowed key)."""
  lse = jnp.where(jnp.isposinf(lse2), -jnp.inf, lse2 * math.log(2.0))
  return lse.reshape(batch, num_heads, q_len).transpose(0, 2, 1).astype(jnp.float32)


def lse2_rows(lse: jax.Array) -> jax.Array:
  """Inverse of `natural_lse`: float32 [B, T, Nq] (-inf: no key) -> [B * Nq, T] base 2
  (+inf: no key, so the backward kernels recompute P = exp2(s - lse2) = 0)."""
  batch, q_len, num_heads = lse.shape
  lse = lse.astype(jnp.float32)
  lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse / math.log(2.0))
  return lse2.transpose(0, 2, 1).reshape(batch * num_heads, q_len)
