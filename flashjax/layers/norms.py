"""Normalisation layers: RMSNorm (LLaMA) and LayerNorm (OPT).

Both normalise over the last axis in float32 and return the input's dtype; the learned
scale (and LayerNorm's bias) is applied after the cast back, as in the LLaMA and OPT
reference implementations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * scale over the last axis (no mean subtraction, no bias)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs | None = None):
    """Builds the layer.

    Args:
      dim: size of the normalised (last) axis.
      eps: added to the mean square.
      param_dtype: dtype of the scale.
      rngs: unused (the scale starts at ones); accepted for a uniform constructor.
    """
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises x [..., dim]; returns the same shape and dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


class LayerNorm(nnx.Module):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis."""

  def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs | None = None):
    """Builds the layer.

    Args:
      dim: size of the normalised (last) axis.
      eps: added to the variance.
      param_dtype: dtype of scale and bias.
      rngs: unused (scale starts at ones, bias at zeros); accepted for a uniform constructor.
    """
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises x [..., dim]; returns the same shape and dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    return normed * self.scale[...].astype(x.dtype) + self.bias[...].astype(x.dtype)
