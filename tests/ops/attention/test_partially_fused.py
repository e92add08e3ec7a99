"""The partially_fused backend in Pallas interpret mode vs the float32 reference, its
NotImplementedError cases and io_model's rule for it (small shapes: CPU)."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from flashjax import io_model
from flashjax.masks import masks
from flashjax.ops.attention import api
from flashjax.ops.attention import partially_fused
from flashjax.ops.attention import reference
from flashjax.ops.attention.block_sizes import BlockSizes


def _inputs(seed, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (batch, q_len, num_heads, head_dim), jnp.float32)
  k = jax.random.normal(keys[1], (batch, kv_len, num_kv_heads, head_dim), jnp.float32)
  v = jax.random.normal(keys[2], (batch, kv_len, num_kv_heads, head_dim), jnp.float32)
  do = jax.random.normal(keys[3], q.shape, jnp.float32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), do.astype(dtype)


def _max_err(actual, expected):
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  assert np.all(np.isfinite(actual))
  return float(np.max(np.abs(actual - expected)))


_kernel = functools.partial(partially_fused.dot_product_attention, interpret=True)


class PartiallyFusedTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # (B, T, S, Nq, Nkv, D, causal): T != S, GQA, lengths and D that need padding.
      ("dense", 2, 64, 64, 2, 2, 32, False),
      ("causal", 1, 64, 64, 2, 2, 32, True),
      ("dense_t_ne_s_gqa", 1, 40, 72, 4, 2, 24, False),
      ("causal_t_gt_s_gqa", 1, 71, 37, 4, 1, 16, True),
      ("causal_t_lt_s_d128", 1, 33, 95, 2, 2, 128, True),
  )
  def test_forward_matches_reference(self, b, t, s, nq, nkv, d, causal):
    q, k, v, _ = _inputs(t * 7 + s, b, t, s, nq, nkv, d)
    out = _kernel(q, k, v, is_causal=causal)
    ref = reference.mha_reference(q, k, v, is_causal=causal)
    self.assertEqual(out.shape, q.shape)
    self.assertLess(_max_err(out, ref), 2e-5)

  def test_scale_and_small_tiles(self):
    q, k, v, _ = _inputs(3, 1, 50, 50, 2, 1, 16)
    out = _kernel(q, k, v, is_causal=True, scale=0.37, block_sizes=BlockSizes(16, 16))
    ref = reference.mha_reference(q, k, v, is_causal=True, scale=0.37)
    self.assertLess(_max_err(out, ref), 2e-5)
    # The test can fail: the default scale gives a different answer.
    default = reference.mha_reference(q, k, v, is_causal=True)
    self.assertGreater(_max_err(out, default), 1e-2)

  @parameterized.parameters(jnp.bfloat16, jnp.float16)
  def test_low_precision(self, dtype):
    q, k, v, _ = _inputs(5, 1, 48, 80, 4, 2, 32, dtype)
    out = _kernel(q, k, v, is_causal=True)
    self.assertEqual(out.dtype, dtype)
    f32 = lambda x: x.astype(jnp.float32)
    ref = reference.mha_reference(f32(q), f32(k), f32(v), is_causal=True)
    self.assertLess(_max_err(out, ref), 2e-2)

  @parameterized.parameters(False, True)
  def test_gradients_match_reference(self, causal):
    q, k, v, do = _inputs(11, 1, 36, 44, 4, 2, 16)
    fn = lambda q, k, v: _kernel(q, k, v, is_causal=causal)
    ref_fn = lambda q, k, v: reference.mha_reference(q, k, v, is_causal=causal)
    out, vjp = jax.vjp(fn, q, k, v)
    ref_out, ref_vjp = jax.vjp(ref_fn, q, k, v)
    self.assertLess(_max_err(out, ref_out), 2e-5)
    for name, g, rg in zip("qkv", vjp(do), ref_vjp(do)):
      self.assertLess(_max_err(g, rg), 1e-4, msg=f"d{name}")
      self.assertGreater(float(jnp.max(jnp.abs(rg))), 1e-3)  # non-trivial gradients

  def test_through_api_and_jit(self):
    q, k, v, _ = _inputs(13, 1, 32, 48, 2, 1, 32)
    fn = jax.jit(lambda q, k, v: api.dot_product_attention(
        q, k, v, is_causal=True, implementation="partially_fused", interpret=True))
    ref = reference.mha_reference(q, k, v, is_causal=True)
    self.assertLess(_max_err(fn(q, k, v), ref), 2e-5)

  def test_causal_mask_object_runs_as_is_causal(self):
    q, k, v, _ = _inputs(19, 1, 40, 56, 2, 1, 32)
    got = _kernel(q, k, v, mask=masks.causal(40, 56))
    ref = reference.mha_reference(q, k, v, is_causal=True)
    self.assertLess(_max_err(got, ref), 2e-5)
    self.assertLess(_max_err(got, _kernel(q, k, v, is_causal=True)), 1e-6)

  def test_unsupported_arguments_raise(self):
    q, k, v, _ = _inputs(17, 1, 32, 32, 2, 2, 16)
    cases = {
        "mask": dict(mask=jnp.ones((32, 32), bool)),
        "Mask": dict(mask=masks.causal(32, 32, offset=1)),  # not top-left causal
        "segment ids": dict(q_segment_ids=jnp.zeros((1, 32), jnp.int32),
                            kv_segment_ids=jnp.zeros((1, 32), jnp.int32)),
        "logits_soft_cap": dict(logits_soft_cap=5.0),
        "bias": dict(bias=jnp.zeros((1, 1, 32, 32))),
    }
    for word, kwargs in cases.items():
      with self.assertRaisesRegex(NotImplementedError, word):
        _kernel(q, k, v, **kwargs)
    with self.assertRaisesRegex(NotImplementedError, "head_dim=256"):
      _kernel(*_inputs(1, 1, 16, 16, 1, 1, 256)[:3])
    with self.assertRaisesRegex(NotImplementedError, "return_residual"):
      api.dot_product_attention(q, k, v, implementation="partially_fused", interpret=True,
                                return_residual=True)
    with self.assertRaisesRegex(NotImplementedError, "query_seq_lengths"):
      api.dot_product_attention(q, k, v, implementation="partially_fused", interpret=True,
                                query_seq_lengths=jnp.array([20]))
    with self.assertRaisesRegex(ValueError, "block_q=24"):
      _kernel(q, k, v, block_sizes=BlockSizes(24, 16))


class RuleTest(absltest.TestCase):

  def test_beats_unfused_xla_not_flash_at_default_tiles(self):
    for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
      p = io_model.predict_partially_fused(4096, 4096, 128, jnp.bfloat16, kind, batch=4,
                                           num_heads=32)
      self.assertTrue(p.beats_naive)
      self.assertFalse(p.beats_flash)
      self.assertFalse(io_model.prefer_partially_fused(4096, 4096, 128, jnp.bfloat16, kind,
                                                       batch=4, num_heads=32))
      # Scores of 4*32 heads at 4096^2 do not fit the 50 MB L2: 3 score transfers vs 4.
      self.assertFalse(p.scores_in_l2)
      self.assertAlmostEqual(p.naive_ms / p.partially_fused_ms, 4 / 3, delta=0.05)

  def test_preferred_when_flash_rereads_kv_from_hbm(self):
    # Small flash query tiles re-read the (L2-sized-exceeding) K/V 32 times at T = 512.
    p = io_model.predict_partially_fused(512, 65536, 128, jnp.bfloat16,
                                         "NVIDIA H100 80GB HBM3", num_heads=8, block_q=16)
    self.assertFalse(p.kv_in_l2)
    self.assertTrue(p.prefer)
    self.assertLess(p.partially_fused_ms, p.flash_ms / 2)

  def test_short_sequences_pay_launches(self):
    p = io_model.predict_partially_fused(64, 64, 64, jnp.float32, "NVIDIA H200")
    self.assertTrue(p.scores_in_l2)
    self.assertAlmostEqual(p.partially_fused_ms, 2 * io_model.LAUNCH_MS, delta=1e-3)
    self.assertFalse(p.prefer)

  def test_unknown_device_raises(self):
    with self.assertRaisesRegex(ValueError, "device_kind='cpu'"):
      io_model.prefer_partially_fused(128, 128, 64, jnp.bfloat16, "cpu")


if __name__ == "__main__":
  absltest.main()
