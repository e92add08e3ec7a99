"""The decode backend contract: arguments bound and canonicalised once, one method per backend.

`api.decode_attention` (the public signature, written once) validates the public arguments
and applies the out-of-range policy, then hands a backend one `DecodeArgs`. A backend is a
`DecodeBackend` object registered under its module's `decode_attention` name; it overrides
`attend(args)` only. Calling the object directly with the backend-protocol keywords (tests,
benchmarks) binds the same canonical form (`DecodeArgs.bind`).

Canonical form (`DecodeArgs`): query [B, Nq, D]; key_cache / value_cache rank 4 of one shape
([B, S_max, Nkv, D] in the public layout) and the query's dtype; lengths int32 [B];
head_indices None or int32 [B, K]; scale a float (default 1 / sqrt(D)); logits_soft_cap None
or a float > 0; block_sizes None or a DecodeBlockSizes; interpret a bool.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from flashjax.ops.attention.base import canonical_scale, canonical_soft_cap


@dataclasses.dataclass(frozen=True)
class DecodeArgs:
  """The canonical arguments every decode backend receives (module docstring)."""

  query: jax.Array
  key_cache: jax.Array
  value_cache: jax.Array
  lengths: jax.Array
  head_indices: jax.Array | None = None
  scale: float = 1.0
  logits_soft_cap: float | None = None
  block_sizes: Any = None
  interpret: bool = False

  @classmethod
  def bind(cls, query, key_cache, value_cache, lengths, *, head_indices=None, scale=None,
           logits_soft_cap=None, interpret=False, block_sizes=None) -> DecodeArgs:
    """Binds the backend-protocol keywords (docs/architecture.md) into canonical form."""
    if query.ndim != 3 or key_cache.ndim != 4 or key_cache.shape != value_cache.shape:
      raise ValueError(f"expected query [B, Nq, D] and two rank-4 caches of one shape: "
                       f"{query.shape=}, {key_cache.shape=}, {value_cache.shape=}")
    if not query.dtype == key_cache.dtype == value_cache.dtype:
      raise ValueError(f"dtypes differ: {query.dtype=!s}, {key_cache.dtype=!s}, "
                       f"{value_cache.dtype=!s}")
    if head_indices is not None:
      head_indices = jnp.asarray(head_indices).astype(jnp.int32)
    return cls(query=query, key_cache=key_cache, value_cache=value_cache,
               lengths=jnp.asarray(lengths).astype(jnp.int32), head_indices=head_indices,
               scale=canonical_scale(scale, query.shape[2]),
               logits_soft_cap=canonical_soft_cap(logits_soft_cap),
               block_sizes=block_sizes, interpret=interpret)


class DecodeBackend:
  """One decode backend: override `attend`; the object is the backend function.

  Attributes:
    name: the registered backend name (used in messages).
  """

  name: str = ""

  def __call__(self, query, key_cache, value_cache, lengths, *, head_indices=None,
               scale=None, logits_soft_cap=None, interpret=False, block_sizes=None,
               **options):
    """Runs the backend on the backend-protocol keywords (bound by `DecodeArgs.bind`)."""
    args = DecodeArgs.bind(query, key_cache, value_cache, lengths, head_indices=head_indices,
                           scale=scale, logits_soft_cap=logits_soft_cap,
                           interpret=interpret, block_sizes=block_sizes)
    return self.run(args, **options)

  def run(self, args: DecodeArgs, **options):
    """Runs the backend on canonical arguments (what api.py calls)."""
    return self.attend(args, **options)

  def attend(self, args: DecodeArgs, **options) -> jax.Array:
    """[B, Nq, D] in the query's dtype. Backends override."""
    raise NotImplementedError(f"{type(self).__name__} does not implement attend")

  def __repr__(self) -> str:
    return f"<flashjax decode backend {self.name!r}>"
