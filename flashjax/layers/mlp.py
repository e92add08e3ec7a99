"""Feed-forward blocks: SwiGLU (LLaMA) and a two-layer ReLU MLP (OPT).

Both also run over a subset of their hidden units (`sparse`, through flashjax.sparse_mlp):
the batch union a Polar Sparsity neuron router selects at decode time.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flashjax.ops.sparse_mlp.api import sparse_mlp


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: jnp.dtype) -> nnx.Param:
  return nnx.Param(nnx.initializers.normal(std)(rngs.params(), shape, dtype))


class GatedMLP(nnx.Module):
  """SwiGLU: down(silu(x @ gate) * (x @ up)), no biases (LLaMA)."""

  def __init__(self, d_model: int, d_ff: int, *, init_std: float = 0.02,
               out_init_std: float | None = None, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    """Builds the weights with N(0, std^2) entries.

    Args:
      d_model: model width D.
      d_ff: hidden width F.
      init_std: standard deviation of the gate and up projections.
      out_init_std: standard deviation of the down projection (default init_std).
      param_dtype: dtype of the weights.
      rngs: random streams (uses `params`).
    """
    out_std = init_std if out_init_std is None else out_init_std
    self.gate = _param(rngs, (d_model, d_ff), init_std, param_dtype)  # DF
    self.up = _param(rngs, (d_model, d_ff), init_std, param_dtype)  # DF
    self.down = _param(rngs, (d_ff, d_model), out_std, param_dtype)  # FD

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., D] -> [..., D], computed in x's dtype."""
    gate = jnp.einsum("...D,DF->...F", x, self.gate[...].astype(x.dtype))
    up = jnp.einsum("...D,DF->...F", x, self.up[...].astype(x.dtype))
    return jnp.einsum("...F,FD->...D", jax.nn.silu(gate) * up, self.down[...].astype(x.dtype))

  def sparse(self, x: jax.Array, neuron_indices: jax.Array, *, implementation: Any = None,
             interpret: bool = False) -> jax.Array:
    """The MLP over hidden units `neuron_indices` (int [k]) only: x [B, D] -> [B, D]."""
    dtype = x.dtype
    return sparse_mlp(x, self.gate[...].astype(dtype), self.down[...].astype(dtype),
                      neuron_indices, w3=self.up[...].astype(dtype), activation="silu",
                      implementation=implementation, interpret=interpret)


class ReluMLP(nnx.Module):
  """fc2(relu(fc1(x))) with biases (OPT)."""

  def __init__(self, d_model: int, d_ff: int, *, use_bias: bool = True, init_std: float = 0.02,
               out_init_std: float | None = None, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    """Builds the weights with N(0, std^2) entries and zero biases.

    Args:
      d_model: model width D.
      d_ff: hidden width F.
      use_bias: add biases after both projections.
      init_std: standard deviation of fc1.
      out_init_std: standard deviation of fc2 (default init_std).
      param_dtype: dtype of the weights.
      rngs: random streams (uses `params`).
    """
    out_std = init_std if out_init_std is None else out_init_std
    # Both stored neuron-major ([F, D], a unit's weights contiguous, the torch Linear layout
    # of fc1): the sparse path reads whole rows of the units it computes.
    self.fc1 = _param(rngs, (d_ff, d_model), init_std, param_dtype)  # FD
    self.fc2 = _param(rngs, (d_ff, d_model), out_std, param_dtype)  # FD
    self.use_bias = use_bias
    if use_bias:
      self.fc1_bias = nnx.Param(jnp.zeros((d_ff,), param_dtype))
      self.fc2_bias = nnx.Param(jnp.zeros((d_model,), param_dtype))

  def preactivation(self, x: jax.Array) -> jax.Array:
    """fc1(x) plus its bias, before the ReLU: [..., D] -> [..., F], in x's dtype."""
    hidden = jnp.einsum("...D,FD->...F", x, self.fc1[...].astype(x.dtype))
    if self.use_bias:
      hidden = hidden + self.fc1_bias[...].astype(x.dtype)
    return hidden

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., D] -> [..., D], computed in x's dtype."""
    hidden = self.preactivation(x)
    out = jnp.einsum("...F,FD->...D", jax.nn.relu(hidden), self.fc2[...].astype(x.dtype))
    if self.use_bias:
      out = out + self.fc2_bias[...].astype(x.dtype)
    return out

  def sparse(self, x: jax.Array, neuron_indices: jax.Array, *, implementation: Any = None,
             interpret: bool = False) -> jax.Array:
    """The MLP over fc1 units `neuron_indices` (int [k]) only: x [B, D] -> [B, D].

    fc1 is stored [F, D] (w1_layout "FD"): a selected unit's weights are one contiguous
    row, which every backend reads whole (docs/sparse_mlp.md, Layouts).
    """
    dtype = x.dtype
    biases = {}
    if self.use_bias:
      biases = dict(b1=self.fc1_bias[...], b2=self.fc2_bias[...])
    return sparse_mlp(x, self.fc1[...].astype(dtype), self.fc2[...].astype(dtype),
                      neuron_indices, activation="relu", w1_layout="FD",
                      implementation=implementation,
                      interpret=interpret, **biases)
