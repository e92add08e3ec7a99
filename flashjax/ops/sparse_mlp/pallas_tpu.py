"""Gather-GEMM sparse MLP on Pallas Mosaic TPU ("pallas_tpu"; CPU through the TPU interpreter).

The selected ids are scalar-prefetched into SMEM. Weights stay in HBM (memory_space ANY) and
each grid step DMAs its block_k selected rows (each a contiguous [d] row of a neuron-major
weight) into a VMEM tile, one copy per row on one semaphore, then waits for all of them:

  fc1  grid (k tiles,): hidden[:, tile] = act(x @ rows(w1)^T + b1[tile]) (* x @ rows(w3)^T),
       x whole in VMEM, stored in x's dtype.
  fc2  grid (k tiles,), sequential: acc += hidden[:, tile] @ rows(w2) in a float32 VMEM
       accumulator; the last step adds b2 and writes the output.

Padding ids (-1) copy row 0 and their hidden column is zeroed, so nothing outside the
weights is read. The gathered biases b1[ids] (k values) are taken in XLA. Only w1_layout
"FD" runs (a "DF" column is d strided 2-byte elements, one DMA each); the next tile's
copies are not yet overlapped with the current tile's products. Limits: block_k = 128 (the
lane width; k is padded to it), rows padded to 8, VMEM holds x, two [block_k, d] tiles and
the [rows, d] float32 accumulator.
Performance is unmeasured: no TPU is reachable from this project; correctness is checked in
interpret mode.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from flashjax.ops.attention.api import check_platform
from flashjax.ops.sparse_mlp.reference import ACTIVATIONS
from flashjax.ops.sparse_mlp.xla import with_xla_backward

_BLOCK_K = 128
_SUBLANES = 8


def _gather_rows(ids_ref, tile, w_hbm, rows_vmem, sem, block_k: int):
  """DMAs w[ids[tile * block_k + r]] (row 0 for -1) into rows_vmem[r] for every r."""

  def copy(r):
    neuron = jnp.maximum(ids_ref[tile * block_k + r], 0)
    return pltpu.make_async_copy(w_hbm.at[pl.ds(neuron, 1)], rows_vmem.at[pl.ds(r, 1)], sem)

  def start(r, carry):
    copy(r).start()
    return carry

  def wait(r, carry):
    copy(r).wait()
    return carry

  lax.fori_loop(0, block_k, start, 0)
  lax.fori_loop(0, block_k, wait, 0)


def _valid_columns(ids_ref, tile, block_k: int):
  """[1, block_k] flags of the tile's ids that are not padding."""
  lanes = lax.broadcasted_iota(jnp.int32, (1, block_k), 1)

  def flag(r, flags):
    return jnp.where(lanes == r, ids_ref[tile * block_k + r] >= 0, flags)

  return lax.fori_loop(0, block_k, flag, jnp.zeros((1, block_k), jnp.bool_))


def _fc1_kernel(ids_ref, x_ref, b1_ref, w1_hbm, *refs, block_k: int, activation: str,
                gated: bool):
  if gated:
    w3_hbm, h_ref, w1_rows, w3_rows, sem = refs
  else:
    h_ref, w1_rows, sem = refs
  tile = pl.program_id(0)
  _gather_rows(ids_ref, tile, w1_hbm, w1_rows, sem, block_k)
  dims = (((1,), (1,)), ((), ()))
  x = x_ref[...]
  hidden = lax.dot_general(x, w1_rows[...], dims, preferred_element_type=jnp.float32)
  hidden = ACTIVATIONS[activation](hidden + b1_ref[...].astype(jnp.float32))
  if gated:
    _gather_rows(ids_ref, tile, w3_hbm, w3_rows, sem, block_k)
    hidden *= lax.dot_general(x, w3_rows[...], dims, preferred_element_type=jnp.float32)
  hidden = jnp.where(_valid_columns(ids_ref, tile, block_k), hidden, 0.0)
  h_ref[...] = hidden.astype(h_ref.dtype)


def _fc2_kernel(ids_ref, h_ref, b2_ref, w2_hbm, out_ref, w2_rows, acc_ref, sem, *,
                block_k: int):
  tile = pl.program_id(0)

  @pl.when(tile == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  _gather_rows(ids_ref, tile, w2_hbm, w2_rows, sem, block_k)
  acc_ref[...] += jnp.dot(h_ref[...], w2_rows[...], preferred_element_type=jnp.float32)

  @pl.when(tile == pl.num_programs(0) - 1)
  def _():
    out_ref[...] = (acc_ref[...] + b2_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


def _forward(x, w1, w2, neuron_indices, *, b1=None, b2=None, w3=None, activation="relu",
             w1_layout="DF", block_sizes=None, interpret=False):
  """Kernel forward; inputs validated by flashjax.sparse_mlp (traced ids outside [0, F) contribute nothing)."""
  del block_sizes  # One tile shape: block_k is the lane width.
  if w1_layout != "FD":
    raise NotImplementedError("pallas_tpu sparse_mlp needs neuron-major weights: pass w1 "
                              f"(and w3) as [F, d] with w1_layout='FD', got {w1_layout=}")
  check_platform("pallas_tpu", ("tpu", True), interpret)
  rows, d_model = x.shape
  k = neuron_indices.shape[0]
  k_pad = -(-k // _BLOCK_K) * _BLOCK_K
  rows_pad = -(-rows // _SUBLANES) * _SUBLANES
  num_neurons = w2.shape[0]
  ids = jnp.where((neuron_indices >= 0) & (neuron_indices < num_neurons), neuron_indices,
                  -1)
  ids = jnp.pad(ids, (0, k_pad - k), constant_values=-1)
  x_pad = jnp.pad(x, ((0, rows_pad - rows), (0, 0)))
  b1_tiles = (jnp.zeros((1, k_pad), jnp.float32) if b1 is None else
              jnp.where(ids >= 0, b1[jnp.maximum(ids, 0)], 0).astype(jnp.float32)[None])
  b2_row = (jnp.zeros((1, d_model), jnp.float32) if b2 is None else
            b2.astype(jnp.float32)[None])
  k_tiles = k_pad // _BLOCK_K
  gated = w3 is not None
  interpret_arg = pltpu.InterpretParams() if interpret else False
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  whole = lambda shape: pl.BlockSpec(shape, lambda t, ids: (0,) * len(shape))
  hidden_tile = pl.BlockSpec((rows_pad, _BLOCK_K), lambda t, ids: (0, t))

  hidden = pl.pallas_call(
      functools.partial(_fc1_kernel, block_k=_BLOCK_K, activation=activation, gated=gated),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(k_tiles,),
          in_specs=[whole(x_pad.shape), pl.BlockSpec((1, _BLOCK_K), lambda t, ids: (0, t)),
                    hbm] + ([hbm] if gated else []),
          out_specs=hidden_tile,
          scratch_shapes=[pltpu.VMEM((_BLOCK_K, d_model), x.dtype)] * (2 if gated else 1)
          + [pltpu.SemaphoreType.DMA(())],
      ),
      out_shape=jax.ShapeDtypeStruct((rows_pad, k_pad), x.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret_arg,
      name="flashjax_sparse_mlp_fc1_tpu",
  )(ids, x_pad, b1_tiles, w1, *([w3] if gated else []))

  out = pl.pallas_call(
      functools.partial(_fc2_kernel, block_k=_BLOCK_K),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(k_tiles,),
          in_specs=[hidden_tile, whole(b2_row.shape), hbm],
          out_specs=whole((rows_pad, d_model)),
          scratch_shapes=[pltpu.VMEM((_BLOCK_K, d_model), x.dtype),
                          pltpu.VMEM((rows_pad, d_model), jnp.float32),
                          pltpu.SemaphoreType.DMA(())],
      ),
      out_shape=jax.ShapeDtypeStruct((rows_pad, d_model), x.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      interpret=interpret_arg,
      name="flashjax_sparse_mlp_fc2_tpu",
  )(ids, hidden, b2_row, w2)
  return out[:rows]


sparse_mlp = with_xla_backward(_forward)
sparse_mlp.__doc__ = """pallas_tpu sparse MLP (forward kernels above; backward in XLA).

Same arguments as flashjax.ops.sparse_mlp.xla.sparse_mlp; raises NotImplementedError for
w1_layout="DF" or a non-TPU platform without interpret=True.
"""
