"""Gather-GEMM sparse MLP on Pallas Triton ("pallas_triton", GPU; CPU in interpret mode).

Two kernels, each reading every selected weight row once per block_b batch rows:

  fc1  grid (block_k tiles of the ids, row tiles). A program loops over the model width in
       block_d chunks, gathers the [block_k, block_d] weight tile with one pointer per
       element (row offsets from the ids) and accumulates x @ tile^T in float32; then it
       adds the gathered bias, applies the activation (times the gathered w3 product when
       gated), zeroes invalid ids and stores hidden [rows_pad, k_pad] in x's dtype.
  fc2  grid (output column tiles, splits of the ids, row tiles). A program loops over its
       share of the ids in block_k_fc2 steps, gathers [block_k_fc2, block_out] tiles of w2's
       selected rows and accumulates hidden @ tile in float32. With one split it adds b2 and
       stores the output; with several it stores float32 partial sums that one XLA fusion
       adds (with b2) and rounds.

Weights are viewed flat (free) and addressed as neuron * stride_neuron + column *
stride_column, so w1 in either layout runs the same code; with the neuron-major layout
("FD", and w2 always) a tile row is block_d contiguous elements, with "DF" each element of
a tile row is a separate 2-byte access (uncoalesced: use "FD" for speed). The ids and x are
read by masked element gathers clamped into their arrays (positions past k, ids outside
[0, F) and rows past the batch are masked): nothing outside the inputs is read and no
padding op runs before the kernels. Limits: d a multiple of 16, F * d < 2**31 (int32
offsets), fc1 tiles within a Hopper block's shared memory (block_sizes.shared_memory_bytes).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from flashjax.ops.attention.api import check_platform
from flashjax.ops.sparse_mlp import block_sizes as block_sizes_lib
from flashjax.ops.sparse_mlp.reference import ACTIVATIONS
from flashjax.ops.sparse_mlp.xla import with_xla_backward

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _dot(a, b, contract: tuple[int, int]):
  """2-D product contracting a's axis contract[0] with b's axis contract[1], f32 result.

  HIGHEST makes Triton run f32 x f32 at IEEE precision (its default is TF32).
  """
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


def _tile_ids(idx_ref, tile, block_k: int, k: int, num_neurons: int):
  """(ids with invalid ones replaced by 0, valid flags) of tile `tile` of the k ids.

  Positions past k and ids outside [0, F) are invalid; loads are element gathers clamped
  into the array, so nothing outside idx_ref is read.
  """
  positions = tile * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
  inside = positions < k
  ids = plgpu.load(idx_ref.at[jnp.minimum(positions, k - 1)], mask=inside, other=-1)
  valid = inside & (ids >= 0) & (ids < num_neurons)
  return jnp.where(valid, ids, 0), valid


def _offsets(rows, columns, row_stride: int, column_stride: int):
  return rows[:, None] * row_stride + columns[None, :] * column_stride


def _masked_rows(valid, shape):
  return jnp.broadcast_to(valid[:, None], shape)


def _fc1_kernel(idx_ref, x_ref, w1_ref, *refs, block_k: int, block_d: int, block_b: int,
                rows: int, d_model: int, k: int, num_neurons: int, strides: tuple[int, int],
                activation: str, gated: bool, has_bias: bool):
  refs = list(refs)
  w3_ref = refs.pop(0) if gated else None
  b1_ref = refs.pop(0) if has_bias else None
  (h_ref,) = refs
  tile, row_tile = pl.program_id(0), pl.program_id(1)
  neurons, valid = _tile_ids(idx_ref, tile, block_k, k, num_neurons)
  row_ids = row_tile * block_b + lax.broadcasted_iota(jnp.int32, (block_b,), 0)
  row_live = row_ids < rows
  row_ids = jnp.minimum(row_ids, rows - 1)

  def gather(w_ref, columns):
    offsets = _offsets(neurons, columns, *strides)  # [block_k, block_d]
    return plgpu.load(w_ref.at[offsets], mask=_masked_rows(valid, offsets.shape), other=0)

  def body(step, accs):
    columns = step * block_d + lax.broadcasted_iota(jnp.int32, (block_d,), 0)
    x_offsets = _offsets(row_ids, columns, d_model, 1)  # [block_b, block_d]
    x = plgpu.load(x_ref.at[x_offsets], mask=_masked_rows(row_live, x_offsets.shape),
                   other=0)
    out = [accs[0] + _dot(x, gather(w1_ref, columns), (1, 1))]
    if gated:
      out.append(accs[1] + _dot(x, gather(w3_ref, columns), (1, 1)))
    return tuple(out)

  zeros = jnp.zeros((block_b, block_k), jnp.float32)
  accs = lax.fori_loop(0, d_model // block_d, body, (zeros,) * (2 if gated else 1))
  hidden = accs[0]
  if has_bias:
    hidden += plgpu.load(b1_ref.at[neurons], mask=valid, other=0).astype(jnp.float32)[None, :]
  hidden = ACTIVATIONS[activation](hidden)
  if gated:
    hidden *= accs[1]
  hidden = jnp.where(valid[None, :], hidden, 0.0)
  h_ref[pl.ds(row_tile * block_b, block_b), pl.ds(tile * block_k, block_k)] = hidden.astype(
      h_ref.dtype)


def _fc2_kernel(idx_ref, h_ref, w2_ref, *refs, block_k: int, block_out: int, block_b: int,
                rows: int, d_model: int, k: int, num_neurons: int, k_tiles: int,
                tiles_per_split: int, has_bias: bool, partial: bool):
  b2_ref = refs[0] if has_bias else None
  out_ref = refs[-1]  # [rows_pad, d] (or [splits, rows_pad, d] float32 partial sums)
  column_tile, split, row_tile = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start = pl.multiple_of(column_tile * block_out, block_out)
  columns = start + lax.broadcasted_iota(jnp.int32, (block_out,), 0)
  h_rows = pl.ds(row_tile * block_b, block_b)  # hidden rows past the batch are zeros

  def body(tile, acc):
    neurons, valid = _tile_ids(idx_ref, tile, block_k, k, num_neurons)
    offsets = _offsets(neurons, columns, d_model, 1)  # [block_k, block_out]
    w = plgpu.load(w2_ref.at[offsets], mask=_masked_rows(valid, offsets.shape), other=0)
    h = h_ref[h_rows, pl.ds(tile * block_k, block_k)]  # [block_b, block_k]
    return acc + _dot(h, w, (1, 0))

  first = split * tiles_per_split
  last = jnp.minimum(first + tiles_per_split, k_tiles)
  acc = lax.fori_loop(first, last, body, jnp.zeros((block_b, block_out), jnp.float32))
  out_rows = pl.ds(row_tile * block_b, block_b)
  if partial:
    out_ref[split, out_rows, pl.ds(start, block_out)] = acc
    return
  if has_bias:
    acc += b2_ref[pl.ds(start, block_out)].astype(jnp.float32)[None, :]
  out_ref[out_rows, pl.ds(start, block_out)] = acc.astype(out_ref.dtype)


def _num_cores() -> int:
  device = jax.devices()[0]
  return int(getattr(device, "core_count", 0) or 132)


def _forward(x, w1, w2, neuron_indices, *, b1=None, b2=None, w3=None, activation="relu",
             w1_layout="DF", block_sizes=None, interpret=False):
  """Kernel forward; inputs validated by flashjax.sparse_mlp (traced ids outside [0, F) contribute nothing)."""
  rows, d_model = x.shape
  num_neurons = w2.shape[0]
  k = neuron_indices.shape[0]
  if x.dtype not in _DTYPES:
    raise NotImplementedError(f"pallas_triton sparse_mlp takes {_DTYPES}, got {x.dtype}")
  if d_model % 16:
    raise NotImplementedError(f"pallas_triton sparse_mlp needs d % 16 == 0, got {d_model=}")
  if num_neurons * d_model >= 2**31:
    raise NotImplementedError(f"pallas_triton sparse_mlp addresses weights with int32 "
                              f"offsets: F * d = {num_neurons * d_model} >= 2**31")
  check_platform("pallas_triton", ("gpu", True), interpret)
  cfg = block_sizes_lib.resolve(block_sizes, rows=rows, d_model=d_model, k=k,
                                num_cores=1 if interpret else _num_cores(),
                                itemsize=x.dtype.itemsize, gated=w3 is not None)
  if d_model % cfg.block_d or d_model % cfg.block_out:
    raise ValueError(f"{cfg.block_d=} and {cfg.block_out=} must divide {d_model=}")
  need = block_sizes_lib.shared_memory_bytes(cfg, x.dtype.itemsize, w3 is not None)
  if need > block_sizes_lib.SHARED_MEMORY_BYTES:
    raise ValueError(f"block sizes {cfg} need about {need} bytes of shared memory "
                     f"({cfg.num_stages} stages of {x.dtype} tiles), over the "
                     f"{block_sizes_lib.SHARED_MEMORY_BYTES} a block may use: lower "
                     "num_stages, block_d, block_k or block_b")
  # fc1 tiles the ids by block_k, fc2 by block_k_fc2 (powers of two); the hidden array
  # holds k_pad columns (zeros past k) and row_tiles * block_b rows.
  pad_to = max(cfg.block_k, cfg.block_k_fc2)
  k_pad = -(-k // pad_to) * pad_to
  row_tiles = -(-rows // cfg.block_b)
  params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  strides = (d_model, 1) if w1_layout == "FD" else (1, num_neurons)
  sizes = dict(rows=rows, d_model=d_model, k=k, num_neurons=num_neurons)

  fc1_inputs = [neuron_indices, x.reshape(-1), w1.reshape(-1)]
  if w3 is not None:
    fc1_inputs.append(w3.reshape(-1))
  if b1 is not None:
    fc1_inputs.append(b1)
  hidden = pl.pallas_call(
      functools.partial(_fc1_kernel, block_k=cfg.block_k, block_d=cfg.block_d,
                        block_b=cfg.block_b, strides=strides, activation=activation,
                        gated=w3 is not None, has_bias=b1 is not None, **sizes),
      grid=(k_pad // cfg.block_k, row_tiles),
      out_shape=jax.ShapeDtypeStruct((row_tiles * cfg.block_b, k_pad), x.dtype),
      compiler_params=params, interpret=interpret, name="flashjax_sparse_mlp_fc1",
  )(*fc1_inputs)

  k_tiles = k_pad // cfg.block_k_fc2
  num_splits = min(cfg.num_splits, k_tiles)
  tiles_per_split = -(-k_tiles // num_splits)
  num_splits = -(-k_tiles // tiles_per_split)
  partial = num_splits > 1
  fc2_inputs = [neuron_indices, hidden, w2.reshape(-1)]
  if b2 is not None and not partial:
    fc2_inputs.append(b2)
  rows_pad = row_tiles * cfg.block_b
  out_shape = (jax.ShapeDtypeStruct((num_splits, rows_pad, d_model), jnp.float32) if partial
               else jax.ShapeDtypeStruct((rows_pad, d_model), x.dtype))
  out = pl.pallas_call(
      functools.partial(_fc2_kernel, block_k=cfg.block_k_fc2, block_out=cfg.block_out,
                        block_b=cfg.block_b, k_tiles=k_tiles, tiles_per_split=tiles_per_split,
                        has_bias=b2 is not None and not partial, partial=partial, **sizes),
      grid=(d_model // cfg.block_out, num_splits, row_tiles),
      out_shape=out_shape, compiler_params=params, interpret=interpret,
      name="flashjax_sparse_mlp_fc2",
  )(*fc2_inputs)
  if partial:
    # One XLA fusion adds the splits' float32 partial sums and the bias, and rounds.
    out = out.sum(axis=0)
    if b2 is not None:
      out = out + b2.astype(jnp.float32)
    out = out.astype(x.dtype)
  return out[:rows]  # a no-op when the batch fills its row tiles


sparse_mlp = with_xla_backward(_forward)
sparse_mlp.__doc__ = """pallas_triton sparse MLP (forward kernels above; backward in XLA).

Same arguments as flashjax.ops.sparse_mlp.xla.sparse_mlp; raises NotImplementedError for
dtypes other than float32 / bfloat16 / float16, d % 16 != 0, F * d >= 2**31, or a non-GPU
platform without interpret=True.
"""
