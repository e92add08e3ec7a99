"""partially_fused_tpu on CPU: interpret-mode forward vs the float32 reference, the Mosaic TPU
lowering traced on CPU (two kernels), and block-size validation.

Odd lengths (S not a multiple of the 128-key tile) check that padded keys never leak; causal
cases with T != S check the top-left diagonal and the skipped tiles above it.
"""

from __future__ import annotations

from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flashjax.ops.attention import api, partially_fused, partially_fused_tpu, reference
from flashjax.ops.attention.block_sizes import BlockSizes
from tests.ops.attention import random_inputs


class PartiallyFusedTpuTest(random_inputs.RandomInputs, parameterized.TestCase):

  @parameterized.named_parameters(
      {"testcase_name": f"{dtype}_T{q_len}_S{kv_len}_bq{block_q}_{causal=}", "dtype": dtype,
       "q_len": q_len, "kv_len": kv_len, "block_q": block_q, "causal": causal}
      for dtype, q_len, kv_len, block_q, causal in (
          # GQA 4 / 2, odd lengths: 3 key tiles, the last one mostly padding.
          ("float32", 200, 300, 16, False),
          ("float32", 200, 300, 16, True),
          # T > S causal (every row still has key 0), smallest float32 block.
          ("float32", 300, 130, 8, True),
          # T < S, several query blocks per key tile (tiles skipped above the diagonal).
          ("float32", 40, 384, 8, True),
          ("bfloat16", 200, 300, 16, True),
          ("bfloat16", 72, 260, 32, False),
      ))
  def test_forward_matches_reference(self, dtype, q_len, kv_len, block_q, causal):
    q, k, v = self.qkv(1, q_len, kv_len, 4, 2, 64, dtype)
    scale = 0.2
    out = partially_fused_tpu.forward(q, k, v, scale=scale, is_causal=causal, block_q=block_q,
                                      block_kv=128, interpret=True)
    f32 = lambda x: x.astype(jnp.float32)
    ref = reference.mha_reference(f32(q), f32(k), f32(v), is_causal=causal, scale=scale)
    chex.assert_type(out, q.dtype)
    chex.assert_shape(out, q.shape)
    chex.assert_tree_all_finite(out)
    tol = 2e-5 if dtype == "float32" else 2e-2
    bound = tol * max(1.0, float(jnp.max(jnp.abs(ref))))
    np.testing.assert_allclose(np.asarray(f32(out)), np.asarray(ref), atol=bound, rtol=0)

  def test_head_dim_256_two_batches(self):
    # D = 256 (two lane tiles; the other cases pad D = 64 to 128 lanes) and batch > 1.
    q, k, v = self.qkv(2, 24, 140, 2, 1, 256)
    out = partially_fused_tpu.forward(q, k, v, scale=0.05, is_causal=True, block_q=8,
                                      block_kv=128, interpret=True)
    ref = reference.mha_reference(q, k, v, is_causal=True, scale=0.05)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=0)

  def test_causal_skips_tiles_above_diagonal(self):
    # The TPU interpreter leaves unwritten memory NaN: the scores kernel must leave exactly the
    # key tiles above each query block's diagonal unwritten, and the P @ V kernel must not
    # let them into the output.
    q, k, v = self.qkv(1, 256, 384, 2, 1, 64)
    block_q, block_kv = 64, 128
    outputs = []
    real_pallas_call = pl.pallas_call

    def spy(*args, **kwargs):
      call = real_pallas_call(*args, **kwargs)

      def run(*operands):
        outputs.append(call(*operands))
        return outputs[-1]
      return run

    with mock.patch.object(partially_fused_tpu.pl, "pallas_call", spy):
      out = partially_fused_tpu.forward(q, k, v, scale=0.2, is_causal=True, block_q=block_q,
                                        block_kv=block_kv, interpret=pltpu.InterpretParams())
    probs, row_max, row_sum = outputs[0]
    tiles = np.asarray(probs).reshape(2, 4, block_q, 3, block_kv)
    for i in range(4):
      for j in range(3):
        written = j * block_kv <= (i + 1) * block_q - 1
        nan = np.isnan(tiles[:, i, :, j])
        self.assertEqual(bool(nan.any()), not written, f"query block {i}, key tile {j}")
        self.assertEqual(bool(nan.all()), not written, f"query block {i}, key tile {j}")
        rows = slice(i * block_q, (i + 1) * block_q)
        if not written:  # statistics of skipped tiles keep their initial values
          self.assertTrue(np.all(np.asarray(row_max)[:, rows, j] == -np.inf))
          self.assertTrue(np.all(np.asarray(row_sum)[:, rows, j] == 0))
    ref = reference.mha_reference(q, k, v, is_causal=True, scale=0.2)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=0)

  @parameterized.product(dtype=("float32", "bfloat16"), causal=(False, True))
  def test_lowers_for_tpu(self, dtype, causal):
    q, k, v = self.qkv(2, 200, 300, 4, 2, 64, dtype)

    def f(q, k, v):
      return partially_fused_tpu.forward(q, k, v, scale=0.125, is_causal=causal, block_q=16,
                                         block_kv=128, interpret=False)

    text = jax.jit(f).trace(q, k, v).lower(lowering_platforms=("tpu",)).as_text()
    self.assertEqual(text.count("tpu_custom_call"), 2)

  def test_default_block_sizes(self):
    self.assertEqual((partially_fused_tpu.DEFAULT_BLOCK_SIZES.block_q,
                      partially_fused_tpu.DEFAULT_BLOCK_SIZES.block_kv), (128, 128))
    for dtype in ("float32", "bfloat16", "float16"):
      partially_fused_tpu.check_block_sizes(128, 128, dtype)

  def test_check_block_sizes_rejects(self):
    with self.assertRaisesRegex(ValueError, "block_kv=64"):
      partially_fused_tpu.check_block_sizes(128, 64, jnp.float32)
    with self.assertRaisesRegex(ValueError, "block_q=8"):
      partially_fused_tpu.check_block_sizes(8, 128, jnp.bfloat16)
    partially_fused_tpu.check_block_sizes(8, 128, jnp.float32)  # legal for float32
    q, k, v = self.qkv(1, 16, 128, 1, 1, 32)
    with self.assertRaisesRegex(ValueError, "block_kv=64"):
      partially_fused_tpu.forward(q, k, v, scale=1.0, is_causal=False, block_kv=64,
                                  interpret=True)


class BackendOnTpuTest(parameterized.TestCase):
  """implementation="partially_fused" picks these kernels where JAX runs on a TPU (faked here
  by patching partially_fused.on_tpu; the TPU kernels then run in interpret mode)."""

  def setUp(self):
    super().setUp()
    patcher = mock.patch.object(partially_fused, "on_tpu", return_value=True)
    patcher.start()
    self.addCleanup(patcher.stop)
    rng = np.random.default_rng(7)
    self.q, self.k, self.v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                              for shape in ((1, 40, 4, 32), (1, 136, 2, 32), (1, 136, 2, 32)))

  def test_forward_and_gradients_through_the_api(self):
    attend = lambda q, k, v: api.dot_product_attention(
        q, k, v, is_causal=True, implementation="partially_fused", interpret=True,
        block_sizes=BlockSizes(16, 128))
    ref_fn = lambda q, k, v: reference.mha_reference(q, k, v, is_causal=True)
    with mock.patch.object(partially_fused_tpu, "forward",
                           wraps=partially_fused_tpu.forward) as tpu_forward:
      out = jax.jit(attend)(self.q, self.k, self.v)
      self.assertEqual(tpu_forward.call_count, 1)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_fn(self.q, self.k, self.v)),
                               atol=2e-5, rtol=0)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    grads = jax.grad(loss(attend), argnums=(0, 1, 2))(self.q, self.k, self.v)
    ref_grads = jax.grad(loss(ref_fn), argnums=(0, 1, 2))(self.q, self.k, self.v)
    for name, g, rg in zip("qkv", grads, ref_grads):
      np.testing.assert_allclose(np.asarray(g), np.asarray(rg), atol=2e-5, rtol=0,
                                 err_msg=f"d{name}")

  def test_tpu_tiling_rules_and_head_dim(self):
    with self.assertRaisesRegex(ValueError, "block_kv=64"):
      api.dot_product_attention(self.q, self.k, self.v, implementation="partially_fused",
                                interpret=True, block_sizes=BlockSizes(16, 64))
    q = jnp.ones((1, 8, 1, 384), jnp.float32)
    with self.assertRaisesRegex(NotImplementedError, "head_dim=384 > 256"):
      api.dot_product_attention(q, q, q, implementation="partially_fused", interpret=True)

  def test_lowers_for_tpu_through_the_api(self):
    q, k, v = (x.astype(jnp.bfloat16) for x in (self.q, self.k, self.v))
    fn = lambda q, k, v: api.dot_product_attention(q, k, v, implementation="partially_fused",
                                                   block_sizes=BlockSizes(16, 128))
    with mock.patch.object(api, "check_platform"):  # the host is a CPU
      text = jax.jit(fn).trace(q, k, v).lower(lowering_platforms=("tpu",)).as_text()
    self.assertEqual(text.count("tpu_custom_call"), 2)


if __name__ == "__main__":
  absltest.main()
