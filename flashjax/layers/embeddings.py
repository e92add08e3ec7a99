"""Token and learned position embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class _Table(nnx.Module):
  """A learned table [rows, D] looked up by int ids (`embedding`, the checkpoint name)."""

  def __init__(self, rows: int, dim: int, *, param_dtype: jnp.dtype = jnp.float32,
               init_std: float = 0.02, rngs: nnx.Rngs):
    """Builds the table with N(0, init_std^2) entries.

    Args:
      rows: number of entries (vocabulary size or positions).
      dim: embedding width D.
      param_dtype: dtype of the table.
      init_std: standard deviation of the initial entries.
      rngs: random streams (uses `params`).
    """
    init = nnx.initializers.normal(init_std)
    self.embedding = nnx.Param(init(rngs.params(), (rows, dim), param_dtype))

  def __call__(self, ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Looks up int ids [...] (each < rows) and returns [..., D] in `dtype`."""
    return jnp.take(self.embedding[...], ids, axis=0).astype(dtype)


class Embed(_Table):
  """Token embedding table [V, D] (`Embed(vocab_size, dim, ...)`); `attend` is the tied
  output projection."""

  def attend(self, x: jax.Array) -> jax.Array:
    """float32 logits [..., V] = x [..., D] @ embedding^T (inputs in x's dtype)."""
    table = self.embedding[...].astype(x.dtype)
    return jnp.einsum("...D,VD->...V", x, table, preferred_element_type=jnp.float32)


class LearnedPositions(_Table):
  """Learned absolute position table [max_len, D] (OPT / GPT-2 style;
  `LearnedPositions(max_len, dim, ...)`), looked up by positions."""
