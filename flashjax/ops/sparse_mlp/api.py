"""Public entry point of the batch-union sparse MLP: validation and backend dispatch.

Registered backends (name -> module.function, imported lazily; dispatch rules as in
flashjax.ops.attention.api):

  xla            flashjax.ops.sparse_mlp.xla.sparse_mlp
  pallas_triton  flashjax.ops.sparse_mlp.pallas_triton.sparse_mlp
  pallas_tpu     flashjax.ops.sparse_mlp.pallas_tpu.sparse_mlp

`implementation=None` tries the device's Pallas backend, then "xla" (a Hopper GPU tries
pallas_triton: there is no Mosaic GPU sparse MLP kernel).

Out-of-range ids under jit (the policy): every backend treats an id outside [0, F) (-1
included) as "no neuron": it contributes nothing (its hidden unit is zero) and no backend
reads outside w1 / w2. Concrete (non-traced) ids are checked instead: out-of-range or
repeated ids raise ValueError. Repeated ids that reach a backend under jit count once per
repetition.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.ops.attention import api as attention_api
from flashjax.ops.attention.api import concrete, dispatch
from flashjax.ops.sparse_mlp.block_sizes import BlockSizes
from flashjax.ops.sparse_mlp.reference import ACTIVATIONS

SPARSE_MLP_BACKENDS: dict[str, tuple[str, str]] = {
    name: (f"flashjax.ops.sparse_mlp.{name}", "sparse_mlp")
    for name in ("xla", "pallas_triton", "pallas_tpu")
}
W1_LAYOUTS = ("DF", "FD")


def default_implementations() -> tuple[str, ...]:
  """Sparse MLP backends tried, in order, for `implementation=None` on the default device."""
  return tuple(name for name in attention_api.default_implementations()
               if name in SPARSE_MLP_BACKENDS)


def _check_array(name: str, x, shape: tuple[int, ...], dtype) -> None:
  if not isinstance(x, (np.ndarray, jax.Array)):
    raise ValueError(f"{name} must be a jax or numpy array, got {type(x).__name__}")
  if tuple(x.shape) != shape:
    raise ValueError(f"{name}.shape={tuple(x.shape)} must be {shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}.dtype={x.dtype} must be floating point")
  if dtype is not None and x.dtype != dtype:
    raise ValueError(f"{name}.dtype={x.dtype} must equal x.dtype={dtype}")


def sparse_mlp(
    x: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    neuron_indices: jax.Array,
    *,
    b1: jax.Array | None = None,
    b2: jax.Array | None = None,
    w3: jax.Array | None = None,
    activation: str = "relu",
    w1_layout: str = "DF",
    block_sizes: BlockSizes | None = None,
    implementation: str | Sequence[str] | None = None,
    interpret: bool = False,
) -> jax.Array:
  """MLP over the selected neurons only: `act(x @ w1[:, idx] + b1[idx]) @ w2[idx, :] + b2`.

  `neuron_indices` is the union of the neurons the batch needs (Deja Vu / Polar Sparsity's
  batch-union selection): every row of x uses the same k neurons, so each selected weight
  row is read once per step, not once per batch row. With `w3` the MLP is gated (SwiGLU
  with activation="silu"): `(act(x @ w1[:, idx] + b1[idx]) * (x @ w3[:, idx])) @ w2[idx]`.
  The hidden activations are computed in float32, rounded to x's dtype, and the second
  product accumulates in float32.

  Args:
    x: [B, d] or [B, T, d] float array.
    w1: fc1 weight in x's dtype, [d, F] (w1_layout="DF", the jnp `x @ w1` layout) or
      [F, d] ("FD", neuron-major: each neuron's weights contiguous, the fast layout for the
      Pallas kernels and the only one pallas_tpu takes).
    w2: fc2 weight [F, d] in x's dtype (neuron-major, so gathered rows are contiguous).
    neuron_indices: int [k], 1 <= k <= F, distinct ids in [0, F) (checked when concrete;
      see the module docstring for traced ids). k is static: pad a varying union to a
      bucket with -1, which contributes nothing.
    b1: None or [F] float bias of fc1.
    b2: None or [d] float bias of fc2.
    w3: None or the gated MLP's up projection, same shape and layout as w1.
    activation: "relu", "gelu" (jax.nn.gelu's tanh form) or "silu".
    w1_layout: "DF" or "FD", the layout of w1 and w3.
    block_sizes: None (heuristics) or a `flashjax.ops.sparse_mlp.block_sizes.BlockSizes`
      for the Pallas backends; "xla" ignores it.
    implementation: None (the device's Pallas backend, falling back to "xla"), a backend
      name ("xla", "pallas_triton", "pallas_tpu") or a sequence of names tried in order.
    interpret: run Pallas backends in interpret mode (on CPU).

  Returns:
    Array of x's shape and dtype.

  Raises:
    ValueError: shapes or dtypes that do not agree, k = 0 or k > F, non-integer ids, and
      concrete ids that are out of range or repeated.
  """
  if not isinstance(x, (np.ndarray, jax.Array)):
    raise ValueError(f"x must be a jax or numpy array, got {type(x).__name__}")
  if x.ndim not in (2, 3):
    raise ValueError(f"x.shape={tuple(x.shape)} must be [B, d] or [B, T, d]")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x.dtype={x.dtype} must be floating point")
  if w1_layout not in W1_LAYOUTS:
    raise ValueError(f"{w1_layout=} must be one of {W1_LAYOUTS}")
  if activation not in ACTIVATIONS:
    raise ValueError(f"{activation=} must be one of {sorted(ACTIVATIONS)}")
  d_model = x.shape[-1]
  if not isinstance(w2, (np.ndarray, jax.Array)) or w2.ndim != 2:
    raise ValueError(f"w2 must be a [F, d] array, got {getattr(w2, 'shape', type(w2))}")
  num_neurons = w2.shape[0]
  w1_shape = (d_model, num_neurons) if w1_layout == "DF" else (num_neurons, d_model)
  _check_array("w2", w2, (num_neurons, d_model), x.dtype)
  _check_array(f"w1 (w1_layout={w1_layout!r})", w1, w1_shape, x.dtype)
  if w3 is not None:
    _check_array(f"w3 (w1_layout={w1_layout!r})", w3, w1_shape, x.dtype)
  if b1 is not None:
    _check_array("b1", b1, (num_neurons,), None)
  if b2 is not None:
    _check_array("b2", b2, (d_model,), None)

  if not isinstance(neuron_indices, (np.ndarray, jax.Array)):
    neuron_indices = np.asarray(neuron_indices)
  if neuron_indices.ndim != 1 or not jnp.issubdtype(neuron_indices.dtype, jnp.integer):
    raise ValueError(f"neuron_indices (shape={tuple(neuron_indices.shape)}, "
                     f"dtype={neuron_indices.dtype}) must be a 1-D integer array")
  k = neuron_indices.shape[0]
  if not 1 <= k <= num_neurons:
    raise ValueError(f"neuron_indices has k={k} ids; need 1 <= k <= F={num_neurons}")
  host = concrete(neuron_indices)
  if host is not None:
    bad = host[(host < 0) | (host >= num_neurons)]
    if bad.size:
      raise ValueError(f"neuron_indices has ids {bad[:8].tolist()} outside [0, "
                       f"F={num_neurons})")
    values, counts = np.unique(host, return_counts=True)
    if (counts > 1).any():
      raise ValueError(f"neuron_indices repeats ids {values[counts > 1][:8].tolist()}; the "
                       "batch union must hold each neuron once")
  neuron_indices = jnp.asarray(neuron_indices, jnp.int32)
  if not isinstance(interpret, (bool, np.bool_)):
    raise ValueError(f"{interpret=} must be a bool")
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes={block_sizes!r} must be None or a "
                     "flashjax.ops.sparse_mlp.block_sizes.BlockSizes")

  rows = x.reshape(-1, d_model)

  def call(backend):
    return backend(rows, w1, w2, neuron_indices, b1=b1, b2=b2, w3=w3, activation=activation,
                   w1_layout=w1_layout, block_sizes=block_sizes, interpret=bool(interpret))

  registry = SPARSE_MLP_BACKENDS if implementation is not None else {
      name: SPARSE_MLP_BACKENDS[name] for name in default_implementations()}
  return dispatch(implementation, registry, call, "sparse_mlp").reshape(x.shape)
