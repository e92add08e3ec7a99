"""Mosaic GPU backward (pallas_mosaic_gpu_vjp) in Mosaic GPU interpret mode (CPU): gradients
against the float32 reference, and which backward the entry point picks.

Each interpreted backward takes 10-35 s on 2 cores, so CI runs a few mask families and the
rest are `slow`; the compiled kernels run every suite gradient case in
test_pallas_mosaic_gpu_gpu.py.
"""

import dataclasses
import zlib
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest
from absl.testing import parameterized

import flashjax
from flashjax.ops.attention import pallas_gpu_common
from flashjax.ops.attention import pallas_mosaic_gpu
from flashjax.ops.attention import pallas_mosaic_gpu_common
from flashjax.ops.attention import pallas_mosaic_gpu_vjp
from flashjax.ops.attention import reference
from flashjax.ops.attention.block_sizes import BlockSizes


def _attention(q, k, v, **kwargs):
  return flashjax.dot_product_attention(q, k, v, implementation="pallas_mosaic_gpu",
                                        interpret=True, **kwargs)


class MosaicGpuBackwardTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.rng = np.random.default_rng(zlib.crc32(self.id().encode()))

  def _normal(self, shape, dtype=jnp.float16):
    return jnp.asarray(self.rng.standard_normal(shape), dtype)

  def _qkv_do(self, batch, q_len, kv_len, q_heads, kv_heads, head_dim):
    return (self._normal((batch, q_len, q_heads, head_dim)),
            self._normal((batch, kv_len, kv_heads, head_dim)),
            self._normal((batch, kv_len, kv_heads, head_dim)),
            self._normal((batch, q_len, q_heads, head_dim)))

  def _case(self, name):
    """(q, k, v, do, attention kwargs, reference kwargs)."""
    if name == "causal_gqa_odd":  # lengths no tile multiple: key bounds, padded query rows
      q, k, v, do = self._qkv_do(1, 100, 100, 2, 1, 32)
      return q, k, v, do, dict(is_causal=True), dict(is_causal=True)
    if name == "document_gqa":  # segment ids per query (dK/dV side) and per key (dQ side)
      q, k, v, do = self._qkv_do(1, 128, 128, 2, 1, 32)
      ids = np.sort(self.rng.integers(0, 3, (1, 128)), axis=1).astype(np.int32)
      return q, k, v, do, dict(segment_ids=jnp.asarray(ids), is_causal=True), dict(
          q_segment_ids=ids, kv_segment_ids=ids, is_causal=True)
    if name == "tree_tiles":  # stored tiles, transposed for the dK/dV kernel
      q, k, v, do = self._qkv_do(1, 128, 128, 2, 1, 32)
      mask = flashjax.masks.tree(np.concatenate([[-1], self.rng.integers(0, np.arange(1, 128))]))
      return q, k, v, do, dict(mask=mask), dict(mask=jnp.asarray(mask.to_dense()))
    if name == "prefix_soft_cap":  # prefix flags packed with the kv ids; tanh derivative
      q, k, v, do = self._qkv_do(1, 128, 128, 2, 2, 32)
      mask = flashjax.masks.prefix_lm(np.repeat([0, 1], [70, 58])[None], np.array([[20, 10]]))
      return q, k, v, do, dict(mask=mask, logits_soft_cap=4.0), dict(
          mask=jnp.asarray(mask.to_dense()), logits_soft_cap=4.0)
    if name == "window_cross":  # band in both orientations, S != T
      q, k, v, do = self._qkv_do(1, 128, 192, 2, 1, 64)
      mask = flashjax.masks.sliding_window(128, 192, 40, 30)
      return q, k, v, do, dict(mask=mask), dict(mask=jnp.asarray(mask.to_dense()))
    if name == "persistent_gqa":  # 3 interpreted programs loop over dQ and dK/dV items
      q, k, v, do = self._qkv_do(1, 192, 160, 4, 2, 32)
      return q, k, v, do, dict(is_causal=True, block_sizes=BlockSizes(
          64, 64, persistent=True)), dict(is_causal=True)
    if name == "two_consumers":  # dQ at 128 x 64 and dK/dV at 64 x 128: two warpgroups each
      q, k, v, do = self._qkv_do(1, 256, 256, 2, 1, 32)
      return q, k, v, do, dict(is_causal=True, block_sizes=BlockSizes(
          128, 64, block_q_bwd=64, block_kv_bwd=128)), dict(is_causal=True)
    if name == "two_consumers_d128":  # fused: dS^T shared, dQ columns split over the two
      q, k, v, do = self._qkv_do(1, 192, 192, 2, 1, 128)
      return q, k, v, do, dict(is_causal=True, block_sizes=BlockSizes(
          128, 64, block_q_bwd=64, block_kv_bwd=128)), dict(is_causal=True)
    raise ValueError(f"unknown {name=}")

  def _check(self, name, fused=False):
    q, k, v, do, kwargs, ref_kwargs = self._case(name)
    f32 = lambda x: x.astype(jnp.float32)
    if fused:
      kwargs["block_sizes"] = dataclasses.replace(
          kwargs.get("block_sizes") or BlockSizes(64, 64), fused_backward=True)
    backward, one_kernel = pallas_mosaic_gpu_vjp.backward, pallas_mosaic_gpu_vjp.dkdv_dq
    with mock.patch.object(pallas_mosaic_gpu_vjp, "backward", wraps=backward) as spy, \
         mock.patch.object(pallas_mosaic_gpu_vjp, "dkdv_dq", wraps=one_kernel) as fused_spy:
      grads = jax.vjp(lambda q, k, v: _attention(q, k, v, **kwargs), q, k, v)[1](do)
    self.assertEqual(spy.call_count, 1)
    self.assertEqual(fused_spy.call_count, int(fused))
    sizes = kwargs.get("block_sizes")
    self.assertEqual(spy.call_args.args[-1].persistent, bool(sizes and sizes.persistent))
    expected = jax.vjp(lambda q, k, v: reference.mha_reference(q, k, v, **ref_kwargs),
                       f32(q), f32(k), f32(v))[1](f32(do))
    for what, got, want in zip(("dq", "dk", "dv"), grads, expected):
      self.assertEqual(got.dtype, q.dtype, msg=what)
      chex.assert_trees_all_close(f32(got), want, atol=2e-2, rtol=1e-2, custom_message=what)

  @parameterized.named_parameters(
      (f"{name=}", name) for name in ("causal_gqa_odd", "document_gqa", "tree_tiles",
                                      "persistent_gqa"))
  def test_gradients(self, name):
    self._check(name)

  @parameterized.named_parameters(
      (f"{name=}", name) for name in ("prefix_soft_cap", "window_cross", "two_consumers"))
  @pytest.mark.slow
  def test_gradients_slow(self, name):
    self._check(name)

  @parameterized.named_parameters(
      (f"{name=}", name) for name in ("causal_gqa_odd", "document_gqa", "two_consumers_d128"))
  def test_fused_gradients(self, name):
    """The one-kernel backward (dkdv_dq): interpret mode sums per-kv-block dQ partials in
    XLA where compiled code reduce-adds them; everything else is the compiled kernel."""
    self._check(name, fused=True)

  @parameterized.named_parameters(
      (f"{name=}", name) for name in ("persistent_gqa", "tree_tiles", "prefix_soft_cap",
                                      "window_cross", "two_consumers"))
  @pytest.mark.slow
  def test_fused_gradients_slow(self, name):
    self._check(name, fused=True)

  @parameterized.named_parameters(
      ("head_dim_256", 256, None, False),
      ("triton_dkdv_tiles", 32, BlockSizes(64, 64, block_q_bwd=32, block_kv_bwd=64), False),
      ("block_mask_128x64", 32, "block_mask", False),
      ("block_mask_64x64", 32, "block_mask_64", True),
  )
  def test_backward_choice(self, head_dim, sizes, mosaic):
    """The Mosaic GPU backward runs for D <= 128 at tiles it takes; D = 256, dK/dV tiles
    chosen for Triton, or a caller's BlockMask other than 64 x 64 keep pallas_triton's."""
    q, k, v, do = self._qkv_do(1, 128, 128, 1, 1, head_dim)
    kwargs = dict(is_causal=True, block_sizes=sizes)
    if isinstance(sizes, str):
      tiles = (64, 64) if sizes == "block_mask_64" else (128, 64)
      kwargs = dict(mask=flashjax.masks.BlockMask.from_mask(flashjax.masks.causal(128, 128),
                                                            *tiles))
    plan, plans = pallas_mosaic_gpu._backward_plan, []  # pylint: disable=protected-access

    def record(*args, **kw):
      plans.append(plan(*args, **kw))
      return plans[-1]

    with mock.patch.object(pallas_mosaic_gpu, "_backward_plan", side_effect=record):
      jax.eval_shape(lambda q, k, v: jax.vjp(lambda *a: _attention(*a, **kwargs), q, k, v)[1](
          do), q, k, v)
    params = plans[-1][2]
    self.assertIsInstance(params, pallas_mosaic_gpu_common.MosaicParams if mosaic else
                          pallas_gpu_common.TritonParams)

  def test_fused_backward_through_block_sizes(self):
    """BlockSizes(fused_backward=True) reaches the backward; where it cannot run it says so."""
    q, k, v, do = self._qkv_do(1, 128, 128, 2, 1, 32)
    calls = []
    backward = pallas_mosaic_gpu_vjp.backward

    def spy(*args, **kwargs):
      calls.append(kwargs.get("fused"))
      return backward(*args, **kwargs)

    sizes = BlockSizes(64, 64, fused_backward=True)
    with mock.patch.object(pallas_mosaic_gpu_vjp, "backward", side_effect=spy):
      jax.eval_shape(lambda q, k, v: jax.vjp(
          lambda *a: _attention(*a, is_causal=True, block_sizes=sizes), q, k, v)[1](do),
          q, k, v)
    self.assertEqual(calls, [True])
    big = self._qkv_do(1, 128, 128, 1, 1, 256)
    with self.assertRaisesRegex(NotImplementedError, "fused_backward=True.*head_dim=256"):
      jax.eval_shape(lambda q, k, v: jax.vjp(
          lambda *a: _attention(*a, is_causal=True, block_sizes=sizes), q, k, v)[1](big[3]),
          *big[:3])
    with self.assertRaisesRegex(ValueError, "fused_backward=1 must be a bool"):
      BlockSizes(fused_backward=1)

  def test_fused_smem_budget(self):
    """Two consumers at D = 128 fit (~197 KiB, split); stored tiles on top do not."""
    causal = flashjax.masks.BlockMask.from_mask(flashjax.masks.causal(256, 256), 64, 128)
    self.assertLess(pallas_mosaic_gpu_vjp.fused_smem_bytes(causal, 128, 2),
                    pallas_mosaic_gpu_common.SMEM_LIMIT)
    tree = flashjax.masks.BlockMask.from_mask(
        flashjax.masks.tree(np.concatenate([[-1], np.arange(255)])), 64, 128)
    self.assertIsNotNone(tree.tiles)
    self.assertGreater(pallas_mosaic_gpu_vjp.fused_smem_bytes(tree, 128, 2),
                       pallas_mosaic_gpu_common.SMEM_LIMIT)

  def test_kernel_tiles_validated(self):
    q, k, v, do = self._qkv_do(1, 128, 128, 1, 1, 32)
    stats = jnp.zeros((1, 2, 128), jnp.float32) + 1.0
    config = pallas_mosaic_gpu_common.MosaicParams(scale=0.2, soft_cap=None, interpret=True)
    causal = flashjax.masks.causal(128, 128)
    with self.assertRaisesRegex(ValueError, "block_kv=128"):
      pallas_mosaic_gpu_vjp.dq(q, k, v, do, stats,
                               flashjax.masks.BlockMask.from_mask(causal, 64, 128), config)
    with self.assertRaisesRegex(ValueError, "block_q=128"):
      pallas_mosaic_gpu_vjp.dkdv(q, k, v, do, stats,
                                 flashjax.masks.BlockMask.from_mask(causal, 128, 64), config)


if __name__ == "__main__":
  absltest.main()
