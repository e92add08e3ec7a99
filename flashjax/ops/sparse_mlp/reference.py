"""Reference sparse MLP: the gathered neurons in float32 at Precision.HIGHEST."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# name -> elementwise function; gelu is jax.nn.gelu's default tanh form.
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}


def gathered_rows(w: jax.Array, neurons: jax.Array, w1_layout: str) -> jax.Array:
  """Rows [k, d] of neuron-major weights: w [F, d] ("FD") or w [d, F] ("DF")."""
  return w[neurons] if w1_layout == "FD" else w[:, neurons].T


def sparse_mlp_reference(x, w1, w2, neuron_indices, *, b1=None, b2=None, w3=None,
                         activation="relu", w1_layout="DF", **unused):
  """`act(x @ w1[:, idx] + b1[idx]) [* (x @ w3[:, idx])] @ w2[idx] + b2` in float32.

  Ids equal to -1 (the api's marker for padding and out-of-range ids) contribute nothing.

  Args:
    x: [R, d].
    w1: [d, F] ("DF") or [F, d] ("FD").
    w2: [F, d].
    neuron_indices: int32 [k]; ids outside [0, F) (e.g. -1 padding) contribute nothing.
    b1: None or [F].
    b2: None or [d].
    w3: None or the up projection of a gated MLP, laid out as w1.
    activation: a key of ACTIVATIONS.
    w1_layout: "DF" or "FD".
    **unused: backend options (block sizes, interpret) that the reference ignores.

  Returns:
    [R, d] float32.
  """
  del unused
  f32 = lambda a: a.astype(jnp.float32)
  dot = functools.partial(jnp.dot, precision=jax.lax.Precision.HIGHEST)
  valid = (neuron_indices >= 0) & (neuron_indices < w2.shape[0])
  neurons = jnp.where(valid, neuron_indices, 0)
  hidden = dot(f32(x), f32(gathered_rows(w1, neurons, w1_layout)).T)
  if b1 is not None:
    hidden = hidden + f32(b1)[neurons]
  hidden = ACTIVATIONS[activation](hidden)
  if w3 is not None:
    hidden = hidden * dot(f32(x), f32(gathered_rows(w3, neurons, w1_layout)).T)
  hidden = jnp.where(valid, hidden, 0.0)
  out = dot(hidden, f32(w2)[neurons])
  if b2 is not None:
    out = out + f32(b2)
  return out
