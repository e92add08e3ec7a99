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

  def attend(self, args: AttentionArgs, **options):
    if options:
      raise NotImplementedError(f"{self.name}: unsupported options {sorted(options)}")
    self.check_supported(args)
    plan = self.plan(args)
    query, key, value = rcm.permute_qkv(args.query, args.key, args.value, plan.fwd_mask)
    out = self.kernel(query, key, value, plan)
    return rcm.unpermute_output(out, plan.fwd_mask)
