"""Token and learned position embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Embed(nnx.Module):
  """Token embedding table [V, D]; `attend` is the tied output projection."""

  def __init__(self, vocab_size: int, dim: int, *, param_dtype: jnp.dtype = jnp.float32,
               init_std: float = 0.02, rngs: nnx.Rngs):
    """Builds the table with N(0, init_std^2) entries.

    Args:
      vocab_size: number of tokens V.
      dim: embedding width D.
      param_dtype: dtype of the table.
      init_std: standard deviation of the initial entries.
      rngs: random streams (uses `params`).
    """
    init = nnx.initializers.normal(init_std)
    self.embedding = nnx.Param(init(rngs.params(), (vocab_size, dim), param_dtype))

  def __call__(self, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Looks up int tokens [...] and returns [..., D] in `dtype`."""
    return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """float32 logits [..., V] = x [..., D] @ embedding^T (inputs in x's dtype)."""
    table = self.embedding[...].astype(x.dtype)
    return jnp.einsum("...D,VD->...V", x, table, preferred_element_type=jnp.float32)


class LearnedPositions(nnx.Module):
  """Learned absolute position table [max_len, D] (OPT / GPT-2 style)."""

  def __init__(self, max_len: int, dim: int, *, param_dtype: jnp.dtype = jnp.float32,
               init_std: float = 0.02, rngs: nnx.Rngs):
    """Builds the table with N(0, init_std^2) entries.

    Args:
      max_len: number of positions.
      dim: embedding width D.
      param_dtype: dtype of the table.
      init_std: standard deviation of the initial entries.
      rngs: random streams (uses `params`).
    """
    init = nnx.initializers.normal(init_std)
    self.embedding = nnx.Param(init(rngs.params(), (max_len, dim), param_dtype))

  def __call__(self, positions: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Looks up int positions [...] (each < max_len) and returns [..., D] in `dtype`."""
    return jnp.take(self.embedding[...], positions, axis=0).astype(dtype)
