"""pallas_mosaic_gpu backend in Mosaic GPU interpret mode (CPU): the shared suite plus focused
cases (dtype refusal, the GPU gate, tile validation, EMPTY tiles never read, per-head masks).

The kernel takes bfloat16 / float16 only (wgmma has no f32 operands), so the suite's float32
inputs are run as float16 and compared at float16 tolerances. The backward is pallas_triton's
(docs/mosaic_gpu.md), so the gradient cases check the wiring and the shared lse2 residual.
"""

import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import flashjax
from flashjax.ops.attention import pallas_mosaic_gpu
from flashjax.ops.attention import reference
from flashjax.ops.attention.configs import BlockSizes
from tests import oracle
from tests.ops.attention import attention_suite


class TestPallasMosaicGpu(attention_suite.AttentionSuite):
  IMPLEMENTATION = "pallas_mosaic_gpu"
  INTERPRET = True
  SUPPORTS_BIAS = False
  DTYPES = ("bfloat16", "float16")
  # block_q: one warpgroup's wgmma M (64); the backward (pallas_triton) gets other tiles.
  BLOCK_SIZES = BlockSizes(block_q=64, block_kv=64, block_q_bwd=32, block_kv_bwd=64)
  # The backward is pallas_triton's kernels, whose suite runs every gradient case; here the
  # dense, GQA, zero-row and RCM cases check the wiring (residuals, masks, permutation).
  _BACKWARD_COVERED = "backward = pallas_triton kernels, covered by test_pallas_triton"
  SKIP_CASES = {
      "test_grad_low_precision*": _BACKWARD_COVERED,
      "test_grad_segment_ids": _BACKWARD_COVERED,
      "test_grad_soft_cap_scale": _BACKWARD_COVERED,
      "test_grad_mask_family_family='sliding_window'": _BACKWARD_COVERED,
      "test_grad_mask_family_family='tree'": _BACKWARD_COVERED,
      "test_grad_mask_family_family='block_mask'": _BACKWARD_COVERED,
  }

  def qkv(self, batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype="float32",
          scale=1.0):
    """The suite's inputs, float32 requests made float16 (this backend refuses float32)."""
    dtype = "float16" if dtype == "float32" else dtype
    return super().qkv(batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype, scale)

  def assert_close(self, actual, expected, dtype, grad=False, what=""):
    """float32 tolerances requested for a low-precision result use that dtype's instead."""
    if dtype == "float32" and jnp.dtype(actual.dtype) != jnp.float32:
      dtype = jnp.dtype(actual.dtype).name
    super().assert_close(actual, expected, dtype, grad=grad, what=what)


def _attention(q, k, v, **kwargs):
  return flashjax.dot_product_attention(q, k, v, implementation="pallas_mosaic_gpu",
                                        interpret=True, **kwargs)


class PallasMosaicGpuTest(parameterized.TestCase):
  """Focused interpret-mode cases, compared with the float32 reference."""

  def setUp(self):
    super().setUp()
    self.rng = np.random.default_rng(zlib.crc32(self.id().encode()))

  def _qkv(self, batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype=jnp.float16):
    normal = lambda shape: jnp.asarray(self.rng.standard_normal(shape), dtype)
    return (normal((batch, q_len, q_heads, head_dim)),
            normal((batch, kv_len, kv_heads, head_dim)),
            normal((batch, kv_len, kv_heads, head_dim)))

  def test_float32_not_implemented(self):
    q, k, v = self._qkv(1, 64, 64, 1, 1, 16, jnp.float32)
    with self.assertRaisesRegex(NotImplementedError, "float32"):
      _attention(q, k, v)

  def test_float32_falls_through_to_xla(self):
    q, k, v = self._qkv(1, 64, 64, 2, 1, 16, jnp.float32)
    out = flashjax.dot_product_attention(q, k, v, is_causal=True, interpret=True,
                                         implementation=("pallas_mosaic_gpu", "xla"))
    chex.assert_trees_all_close(out, reference.mha_reference(q, k, v, is_causal=True),
                                atol=2e-5, rtol=1e-5)

  def test_gpu_gate(self):
    """Compiled (interpret=False) runs are refused until the kernel is validated on a GPU."""
    q, k, v = self._qkv(1, 64, 64, 1, 1, 16)
    with self.assertRaisesRegex(NotImplementedError, "not yet validated on a GPU"):
      pallas_mosaic_gpu.dot_product_attention(q, k, v)
    out = flashjax.dot_product_attention(q, k, v, implementation=("pallas_mosaic_gpu", "xla"))
    chex.assert_trees_all_close(out, reference.mha_reference(q, k, v).astype(q.dtype),
                                atol=5e-3)

  @parameterized.named_parameters(
      (f"{block_q=}_{block_kv=}", block_q, block_kv) for block_q, block_kv in ((32, 32),
                                                                                 (16, 64)))
  def test_tiles_wgmma_cannot_use(self, block_q, block_kv):
    q, k, v = self._qkv(1, 64, 64, 1, 1, 16)
    bm = flashjax.masks.BlockMask.from_mask(flashjax.masks.causal(64, 64), block_q, block_kv)
    with self.assertRaisesRegex(ValueError, f"{block_q=}"):
      _attention(q, k, v, mask=bm)

  def test_bias_not_implemented(self):
    q, k, v = self._qkv(1, 64, 64, 1, 1, 16)
    with self.assertRaisesRegex(NotImplementedError, "bias"):
      pallas_mosaic_gpu.dot_product_attention(q, k, v, bias=jnp.zeros((1, 1, 64, 64)),
                                              interpret=True)

  def test_empty_blocks_are_never_read(self):
    """Keys of a segment no query belongs to are NaN; they lie in EMPTY tiles only."""
    q, k, v = self._qkv(2, 128, 128, 2, 2, 32)
    q_ids = np.zeros((2, 128), np.int32)
    kv_ids = np.zeros((2, 128), np.int32)
    kv_ids[:, 64:96] = 9
    segment_ids = (jnp.asarray(q_ids), jnp.asarray(kv_ids))
    nan_rows = lambda x: x.at[:, 64:96].set(jnp.nan)
    out = _attention(q, nan_rows(k), nan_rows(v), segment_ids=segment_ids, is_causal=True,
                     block_sizes=BlockSizes(64, 32))
    expected = reference.mha_reference(q, k, v, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
                                       is_causal=True)
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_close(out.astype(jnp.float32), expected, atol=5e-3)

  def test_per_head_mask_gqa_lse(self):
    """Query heads of one kv group have different block lists; lse2 matches the reference
    (base 2, +inf on rows with no allowed key)."""
    q, k, v = self._qkv(2, 128, 160, 4, 2, 32, jnp.bfloat16)
    mask = self.rng.random((2, 4, 128, 160)) < 0.3
    mask[:, 1, :, 64:] = False    # head 1: kv blocks right of 64 are EMPTY
    mask[:, 2, :64] = False       # head 2: the first query block attends to nothing
    mask[0, 3] = oracle.causal_mask(128, 160)
    bm = flashjax.masks.BlockMask.from_mask(flashjax.masks.from_dense(mask), 64, 32)
    config = pallas_mosaic_gpu._Config(scale=0.3, soft_cap=None, interpret=True)
    out, lse2 = jax.jit(pallas_mosaic_gpu._forward, static_argnums=4)(q, k, v, bm, config)
    expected = reference.mha_reference(q, k, v, mask=jnp.asarray(mask), scale=0.3)
    chex.assert_trees_all_close(out.astype(jnp.float32), expected, atol=2e-2)
    f32 = lambda x: np.asarray(x, np.float64)
    logits = np.einsum("btnd,bsnd->bnts", f32(q), np.repeat(f32(k), 2, axis=2)) * 0.3
    logits = np.where(mask, logits, -np.inf)
    with np.errstate(divide="ignore"):
      lse = np.log(np.exp(logits).sum(-1)) / np.log(2.0)
    lse = np.where(np.isneginf(lse), np.inf, lse).reshape(8, 128)
    chex.assert_trees_all_equal(np.isinf(np.asarray(lse2)), np.isinf(lse))
    chex.assert_trees_all_close(np.where(np.isinf(lse), 0.0, np.asarray(lse2)),
                                np.where(np.isinf(lse), 0.0, lse), atol=2e-4, rtol=2e-4)

  def test_vmap(self):
    q, k, v = self._qkv(3, 64, 96, 2, 1, 32)
    add_axis = lambda x: x[:, None]
    out = jax.vmap(lambda q, k, v: _attention(q, k, v, is_causal=True))(
        add_axis(q), add_axis(k), add_axis(v))
    expected = reference.mha_reference(q, k, v, is_causal=True)
    chex.assert_trees_all_close(out[:, 0].astype(jnp.float32), expected, atol=5e-3)

  @parameterized.named_parameters(
      (f"{kv_len=}_{interpret=}", kv_len, interpret, expected)
      for kv_len, interpret, expected in ((4096, False, (64, 64)), (4096, True, (64, 32)),
                                          (20, False, (64, 32))))
  def test_default_block_sizes(self, kv_len, interpret, expected):
    sizes = pallas_mosaic_gpu.default_block_sizes(128, 4096, kv_len, interpret=interpret)
    self.assertEqual((sizes.block_q, sizes.block_kv), expected)


if __name__ == "__main__":
  absltest.main()
