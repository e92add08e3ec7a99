"""pallas_mosaic_gpu compiled on a Hopper GPU: the shared suite without interpret mode, on the
per-item grid and on the persistent grid, plus persistent cases with more work items than SMs.

Skipped unless JAX runs on a GPU. Run on the GPU machine with
  JAX_PLATFORMS=cuda python -m pytest -q tests/ops/attention/test_pallas_mosaic_gpu_gpu.py
The gradient cases run the Mosaic GPU backward kernels (dQ, dK/dV); the suite runs at the
suite's 64 x 64 tiles and at the backend's default tiles (128 x 128 forward, 128 x 64 dQ,
64 x 128 dK/dV).
"""

import dataclasses
import zlib
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import flashjax
from flashjax.ops.attention import pallas_mosaic_gpu
from flashjax.ops.attention import pallas_mosaic_gpu_common
from flashjax.ops.attention import reference
from flashjax.ops.attention.block_sizes import BlockSizes
from tests.ops.attention import test_pallas_mosaic_gpu

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]


class TestPallasMosaicGpuCompiled(test_pallas_mosaic_gpu.MosaicGpuSuite):
  INTERPRET = False
  SKIP_CASES = {}


class TestPallasMosaicGpuCompiledDefaultTiles(TestPallasMosaicGpuCompiled):
  """The suite at default_block_sizes (two consumer warpgroups in every kernel); BlockMask
  cases keep 64 x 64 tiles."""

  BLOCK_SIZES = None

  def block_mask_tiles(self):
    return 64, 64


class TestPallasMosaicGpuCompiledPersistent(TestPallasMosaicGpuCompiled):
  """The suite on the persistent grid (its shapes have fewer work items than SMs: one item
  per program; PersistentGridTest runs several)."""

  BLOCK_SIZES = dataclasses.replace(test_pallas_mosaic_gpu.MosaicGpuSuite.BLOCK_SIZES,
                                    persistent=True)


class TestPallasMosaicGpuCompiledFusedBackward(TestPallasMosaicGpuCompiled):
  """The suite's gradient cases with the one-kernel backward (BlockSizes.fused_backward:
  dkdv_dq, dQ reduce-added by TMA) at the suite's 64 x 64 tiles (one consumer)."""

  BLOCK_SIZES = dataclasses.replace(test_pallas_mosaic_gpu.MosaicGpuSuite.BLOCK_SIZES,
                                    fused_backward=True)
  SKIP_CASES = {"test_[!g]*": "forward case: the other suites run it",
                "test_gqa*": "forward case: the other suites run it"}


class TestPallasMosaicGpuCompiledOverlap(TestPallasMosaicGpuCompiledDefaultTiles):
  """The suite's forward cases at the default tiles (two consumers) with the experimental
  intra-warpgroup overlap (pallas_mosaic_gpu.INTRA_WG_OVERLAP) switched on."""

  SKIP_CASES = {"test_grad*": "the backward does not change with the flag"}

  def setUp(self):
    super().setUp()
    self.enter_context(mock.patch.object(pallas_mosaic_gpu, "INTRA_WG_OVERLAP", True))


class FusedBackwardTest(parameterized.TestCase):
  """dkdv_dq at the default dK/dV tiles (64 x 128: two consumers reduce-adding into the same
  dQ rows) on shapes with many kv blocks per query tile, against the float32 reference and
  the two-kernel backward."""

  @parameterized.named_parameters(
      dict(testcase_name=f"{name=}_{head_dim=}_{persistent=}", name=name, head_dim=head_dim,
           persistent=persistent)
      for name, head_dim, persistent in (("dense", 128, False), ("causal", 128, True),
                                         ("causal", 64, False), ("document", 128, False),
                                         ("window", 128, True)))
  def test_gradients(self, name, head_dim, persistent):
    rng = np.random.default_rng(zlib.crc32(self.id().encode()))
    batch, length, heads = 2, 1100, (8, 2)
    normal = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    q = normal((batch, length, heads[0], head_dim))
    k, v = (normal((batch, length, heads[1], head_dim)) for _ in range(2))
    do = normal(q.shape)
    kwargs, ref_kwargs = _mask_case(rng, name, batch, length, heads[0])
    f32 = lambda x: x.astype(jnp.float32)

    def grads(fused):
      sizes = BlockSizes(128, 128, persistent=persistent, fused_backward=fused)
      attention = lambda q, k, v: flashjax.dot_product_attention(
          q, k, v, implementation="pallas_mosaic_gpu", block_sizes=sizes, **kwargs)
      return jax.jit(lambda *x: jax.vjp(attention, *x)[1](do))(q, k, v)

    fused, two_kernels = grads(True), grads(False)
    expected = jax.vjp(lambda q, k, v: reference.mha_reference(q, k, v, **ref_kwargs),
                       f32(q), f32(k), f32(v))[1](f32(do))
    for what, g, g2, e in zip("qkv", fused, two_kernels, expected):
      chex.assert_tree_all_finite(g)
      chex.assert_trees_all_close(f32(g), e, atol=5e-2, rtol=2e-2, custom_message=f"d{what}")
      # Same math; dQ differs only in the order of the float32 adds (and one bf16 rounding).
      chex.assert_trees_all_close(f32(g), f32(g2), atol=2e-2, rtol=1e-2,
                                  custom_message=f"d{what} vs two kernels")

  def test_gradients_under_vmap(self):
    """vmap over the gradient: the two-kernel backward batches and matches the per-index
    gradients; the fused kernel (no batching rule of its own) refuses."""
    rng = np.random.default_rng(zlib.crc32(self.id().encode()))
    normal = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    q, do = normal((3, 1, 640, 4, 128)), normal((3, 1, 640, 4, 128))
    k, v = normal((3, 1, 640, 2, 128)), normal((3, 1, 640, 2, 128))

    def vjp(fused):
      sizes = BlockSizes(128, 128, fused_backward=fused)
      attention = lambda q, k, v: flashjax.dot_product_attention(
          q, k, v, implementation="pallas_mosaic_gpu", block_sizes=sizes, is_causal=True)
      return lambda q, k, v, do: jax.vjp(attention, q, k, v)[1](do)

    with self.assertRaisesRegex(NotImplementedError, "fused_backward=False"):
      jax.jit(jax.vmap(vjp(True)))(q, k, v, do)
    batched = jax.jit(jax.vmap(vjp(False)))(q, k, v, do)
    one = jax.jit(vjp(False))
    for i in range(q.shape[0]):
      for what, g, g1 in zip("qkv", batched, one(q[i], k[i], v[i], do[i])):
        chex.assert_trees_all_close(g[i].astype(jnp.float32), g1.astype(jnp.float32),
                                    atol=2e-2, rtol=1e-2, custom_message=f"d{what} [{i}]")

  def test_two_kernel_backward_repeats_its_bits(self):
    """The deterministic choice (docs/mosaic_gpu.md): fused_backward off gives the same bits
    on every run; the fused kernel's float32 reduce-adds need not."""
    rng = np.random.default_rng(zlib.crc32(self.id().encode()))
    q, k, v = (jnp.asarray(rng.standard_normal((2, 1100, 8, 128)), jnp.bfloat16)
               for _ in range(3))
    attention = lambda q, k, v: flashjax.dot_product_attention(
        q, k, v, implementation="pallas_mosaic_gpu", is_causal=True,
        block_sizes=BlockSizes(128, 128, fused_backward=False))
    grads = jax.jit(lambda *x: jax.vjp(attention, *x)[1](x[0]))
    first = grads(q, k, v)
    for _ in range(3):
      for what, a, b in zip("qkv", first, grads(q, k, v)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                      np.asarray(b.astype(jnp.float32)), err_msg=f"d{what}")


def _segment_ids(rng, batch, length, num_segments):
  """Sorted (packed documents) int32 [batch, length] ids with random boundaries."""
  cuts = [np.sort(rng.choice(np.arange(1, length), num_segments - 1, replace=False))
          for _ in range(batch)]
  return np.stack([np.searchsorted(c, np.arange(length), side="right") for c in cuts])


def _mask_case(rng, name, batch, length, q_heads):
  """(attention kwargs, reference kwargs) of a mask case over [batch, q_heads, T, T]."""
  if name == "dense":
    return {}, {}
  if name == "causal":
    return dict(is_causal=True), dict(is_causal=True)
  if name == "document":
    ids = _segment_ids(rng, batch, length, 7)
    return (dict(segment_ids=jnp.asarray(ids), is_causal=True),
            dict(q_segment_ids=ids, kv_segment_ids=ids, is_causal=True))
  if name == "window":
    mask = flashjax.masks.sliding_window(length, length, 300, 20)
    return dict(mask=mask), dict(mask=jnp.asarray(mask.to_dense()))
  if name == "tree_tiles":
    parents = np.concatenate([[-1], rng.integers(0, np.arange(1, length))])
    mask = flashjax.masks.tree(parents)
    return dict(mask=mask), dict(mask=jnp.asarray(mask.to_dense()))
  if name == "zero_rows":
    # Per head: random density, whole query blocks and single rows with no allowed key.
    dense = rng.random((batch, q_heads, length, length)) < rng.random(
        (batch, q_heads, 1, 1)) * 0.3
    dense[:, 1, :300] = False
    dense[0, :, 700] = False
    return dict(mask=jnp.asarray(dense)), dict(mask=jnp.asarray(dense))
  raise ValueError(f"unknown {name=}")


class PersistentGridTest(parameterized.TestCase):
  """persistent=True with more work items than SMs (several items per program, skewed list
  lengths), against the float32 reference and bit-equal to the per-item grid."""

  def setUp(self):
    super().setUp()
    self.rng = np.random.default_rng(zlib.crc32(self.id().encode()))

  def _qkv(self, batch, length, q_heads, kv_heads, head_dim, dtype=jnp.bfloat16):
    normal = lambda shape: jnp.asarray(self.rng.standard_normal(shape), dtype)
    return (normal((batch, length, q_heads, head_dim)),
            normal((batch, length, kv_heads, head_dim)),
            normal((batch, length, kv_heads, head_dim)))

  @parameterized.named_parameters(
      dict(testcase_name=f"{name=}_{length=}_{heads=}_{head_dim=}_{block_q=}", name=name,
           length=length, heads=heads, head_dim=head_dim, block_q=block_q)
      for name, length, heads, head_dim, block_q in (
          ("dense", 1100, (8, 8), 128, 128),
          ("causal", 2048, (8, 2), 128, 128),
          ("causal", 1531, (4, 4), 64, 64),
          ("causal", 1200, (8, 8), 256, 128),
          ("document", 2048, (8, 2), 128, 128),
          ("window", 2000, (8, 8), 128, 128),
          ("tree_tiles", 1100, (8, 4), 128, 128),
          ("zero_rows", 1100, (8, 2), 64, 128)))
  def test_forward(self, name, length, heads, head_dim, block_q):
    batch = 2
    q, k, v = self._qkv(batch, length, *heads, head_dim)
    kwargs, ref_kwargs = _mask_case(self.rng, name, batch, length, heads[0])
    n_items = batch * heads[0] * -(-length // block_q)
    self.assertGreater(n_items, pallas_mosaic_gpu_common.num_programs(n_items, False),
                       msg="fewer work items than programs: each program runs one")
    sizes = pallas_mosaic_gpu.default_block_sizes(head_dim, length, length)
    sizes = dataclasses.replace(sizes, block_q=block_q)
    if name == "tree_tiles":
      sizes = dataclasses.replace(sizes, block_kv=64)  # the stored-tile ring must fit SMEM

    def attend(persistent):
      fn = jax.jit(lambda q, k, v: flashjax.dot_product_attention(
          q, k, v, implementation="pallas_mosaic_gpu",
          block_sizes=dataclasses.replace(sizes, persistent=persistent), **kwargs))
      return fn(q, k, v)

    out = attend(True)
    expected = reference.mha_reference(q, k, v, **ref_kwargs)
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_close(out.astype(jnp.float32), expected, atol=2e-2)
    # Both grids run the same per-item code (same instructions per item): same bits.
    chex.assert_trees_all_equal(out, attend(False))

  @parameterized.named_parameters(
      dict(testcase_name=f"{name=}", name=name) for name in ("causal", "document"))
  def test_gradients(self, name):
    """Forward and the Mosaic GPU backward kernels on the persistent grid (several items
    per program)."""
    batch, length, heads = 2, 1200, (8, 2)
    q, k, v = self._qkv(batch, length, *heads, 64)
    kwargs, ref_kwargs = _mask_case(self.rng, name, batch, length, heads[0])
    do = jnp.asarray(self.rng.standard_normal(q.shape), q.dtype)
    f32 = lambda x: x.astype(jnp.float32)

    def attention(q, k, v):
      return flashjax.dot_product_attention(
          q, k, v, implementation="pallas_mosaic_gpu",
          block_sizes=BlockSizes(128, 128, persistent=True), **kwargs)

    grads = jax.jit(lambda *x: jax.vjp(attention, *x)[1](do))(q, k, v)
    expected = jax.vjp(lambda q, k, v: reference.mha_reference(q, k, v, **ref_kwargs),
                       f32(q), f32(k), f32(v))[1](f32(do))
    for name_, g, e in zip("qkv", grads, expected):
      chex.assert_trees_all_close(f32(g), e, atol=5e-2, rtol=2e-2, custom_message=f"d{name_}")
