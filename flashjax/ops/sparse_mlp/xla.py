"""XLA sparse MLP ("xla"): gather the selected weight rows, then two dense dots.

XLA materialises the gathered [k, d] weights before each dot (read, write, read again), so
this path moves about three times the weight bytes of the Pallas kernels; it is the
always-working path and the backward of every backend (`with_xla_backward`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flashjax.ops.attention.xla import matmul_precision
from flashjax.ops.sparse_mlp.reference import ACTIVATIONS, gathered_rows


def sparse_mlp(x, w1, w2, neuron_indices, *, b1=None, b2=None, w3=None, activation="relu",
               w1_layout="DF", block_sizes=None, interpret=False):
  """Gathered MLP in x's dtype with float32 accumulation; see flashjax.sparse_mlp.

  Args:
    x: [R, d].
    w1: [d, F] ("DF") or [F, d] ("FD"), x's dtype.
    w2: [F, d].
    neuron_indices: int32 [k]; ids outside [0, F) contribute nothing.
    b1: None or [F].
    b2: None or [d].
    w3: None or the gated MLP's up projection, laid out as w1.
    activation: "relu", "gelu" or "silu".
    w1_layout: "DF" or "FD".
    block_sizes: ignored (no tiles).
    interpret: ignored (no Pallas).

  Returns:
    [R, d] in x's dtype.
  """
  del block_sizes, interpret
  # float32 inputs at HIGHEST (not TF32 on GPUs): this is also every backend's backward.
  dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32,
                          precision=matmul_precision(x.dtype))
  valid = (neuron_indices >= 0) & (neuron_indices < w2.shape[0])
  neurons = jnp.where(valid, neuron_indices, 0)
  hidden = dot(x, gathered_rows(w1, neurons, w1_layout).T)
  if b1 is not None:
    hidden = hidden + b1[neurons].astype(jnp.float32)
  hidden = ACTIVATIONS[activation](hidden)
  if w3 is not None:
    hidden = hidden * dot(x, gathered_rows(w3, neurons, w1_layout).T)
  hidden = jnp.where(valid, hidden, 0.0).astype(x.dtype)
  out = dot(hidden, w2[neurons])
  if b2 is not None:
    out = out + b2.astype(jnp.float32)
  return out.astype(x.dtype)


def with_xla_backward(forward):
  """Wraps a kernel forward in a custom_vjp whose backward differentiates `sparse_mlp` above.

  The backward recomputes the hidden activations in XLA and scatter-adds the weight
  gradients into the selected rows (zeros elsewhere); neuron_indices get no gradient.

  Args:
    forward: a backend function with sparse_mlp's signature.

  Returns:
    The same function, differentiable in x, w1, w2, w3, b1 and b2.
  """

  def wrapped(x, w1, w2, neuron_indices, *, b1=None, b2=None, w3=None, **static):
    weights = (x, w1, w2, b1, b2, w3)

    @jax.custom_vjp
    def run(weights, neurons):
      x, w1, w2, b1, b2, w3 = weights
      return forward(x, w1, w2, neurons, b1=b1, b2=b2, w3=w3, **static)

    def run_fwd(weights, neurons):
      return run(weights, neurons), (weights, neurons)

    def run_bwd(residuals, cotangent):
      weights, neurons = residuals

      def xla_forward(weights):
        x, w1, w2, b1, b2, w3 = weights
        return sparse_mlp(x, w1, w2, neurons, b1=b1, b2=b2, w3=w3, **static)

      _, vjp = jax.vjp(xla_forward, weights)
      return vjp(cotangent)[0], None

    run.defvjp(run_fwd, run_bwd)
    return run(weights, neuron_indices)

  return wrapped
