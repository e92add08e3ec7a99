"""pallas_triton backend in Pallas interpret mode (CPU): the shared suite plus focused cases.

The focused cases cover what the suite does not reach: per-head masks under GQA (dK/dV summed
over a group whose heads have different block lists), padded head dims, forward / backward
tilings that differ, EMPTY tiles never being read, vmap, and the block-size heuristic.
"""

import functools
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import flashjax
from flashjax.masks import builders
from flashjax.ops.attention import pallas_gpu_common
from flashjax.ops.attention import pallas_triton
from flashjax.ops.attention import reference
from flashjax.ops.attention.block_sizes import BlockSizes
from tests import oracle
from tests.ops.attention import attention_suite


class TestPallasTriton(attention_suite.AttentionSuite):
  IMPLEMENTATION = "pallas_triton"
  INTERPRET = True
  SUPPORTS_BIAS = False
  # Backward tiles differ from the forward ones: two BlockMasks per call.
  BLOCK_SIZES = BlockSizes(block_q=32, block_kv=32, block_q_bwd=16, block_kv_bwd=64)


@functools.partial(jax.jit, static_argnames=("is_causal", "logits_soft_cap", "block_sizes"))
def _kernel_and_grads(q, k, v, do, mask, segment_ids, *, is_causal=False, logits_soft_cap=None,
                      block_sizes=None):
  """Output [B, T, Nq, D] and (dq, dk, dv) for cotangent `do`, jitted so that cases with the
  same shapes share one interpret-mode compilation."""
  def attention(q, k, v):
    return flashjax.dot_product_attention(
        q, k, v, mask=mask, segment_ids=segment_ids, is_causal=is_causal,
        logits_soft_cap=logits_soft_cap, block_sizes=block_sizes,
        implementation="pallas_triton", interpret=True)

  out, vjp = jax.vjp(attention, q, k, v)
  return out, vjp(do)


class PallasTritonTest(parameterized.TestCase):
  """Focused interpret-mode cases, compared with the float32 reference."""

  def setUp(self):
    super().setUp()
    self.rng = np.random.default_rng(zlib.crc32(self.id().encode()))

  def _qkv(self, batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype=jnp.float32):
    normal = lambda shape: jnp.asarray(self.rng.standard_normal(shape), dtype)
    return (normal((batch, q_len, q_heads, head_dim)),
            normal((batch, kv_len, kv_heads, head_dim)),
            normal((batch, kv_len, kv_heads, head_dim)), normal((batch, q_len, q_heads,
                                                                 head_dim)))

  def _check(self, q, k, v, do, *, tol=(2e-5, 1e-4), mask=None, segment_ids=None, **static):
    """Kernel output and q/k/v gradients vs mha_reference on float32 copies of the inputs."""
    out, grads = _kernel_and_grads(q, k, v, do, mask, segment_ids, **static)
    ref_kwargs = attention_suite.AttentionSuite.reference_kwargs(
        dict(static, mask=mask, segment_ids=segment_ids))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    ref_out, ref_vjp = jax.vjp(
        lambda q, k, v: reference.mha_reference(q, k, v, **ref_kwargs), f32(q), f32(k), f32(v))
    ref_grads = ref_vjp(f32(do))
    chex.assert_type(out, q.dtype)
    chex.assert_tree_all_finite((out, grads))
    chex.assert_trees_all_close(f32(out), ref_out, atol=tol[0], rtol=tol[0])
    for name, g, rg in zip("qkv", grads, ref_grads):
      chex.assert_trees_all_close(f32(g), rg, atol=tol[1], rtol=tol[1],
                                  custom_message=f"d{name}")
    return out, grads

  def test_per_head_mask_gqa(self):
    """Query heads of one kv group have different block lists; dK/dV sums over the group."""
    q, k, v, do = self._qkv(2, 96, 128, 4, 2, 32)
    mask = self.rng.random((2, 4, 96, 128)) < 0.3
    mask[:, 1, :, 64:] = False    # head 1: its right half of the kv blocks is EMPTY
    mask[:, 2, :48] = False       # head 2: first query blocks attend to nothing
    mask[0, 3] = oracle.causal_mask(96, 128)
    self._check(q, k, v, do, mask=jnp.asarray(mask))

  def test_padded_head_dim_soft_cap(self):
    q, k, v, do = self._qkv(1, 72, 100, 2, 2, 40)
    self._check(q, k, v, do, is_causal=True, logits_soft_cap=10.0)

  def test_padded_head_dim_float16_cross_segments(self):
    q, k, v, do = self._qkv(2, 50, 77, 4, 2, 80, jnp.float16)
    ids = (np.arange(50)[None] // 20).repeat(2, 0), (np.arange(77)[None] // 30).repeat(2, 0)
    self._check(q, k, v, do, segment_ids=tuple(jnp.asarray(x, jnp.int32) for x in ids),
                is_causal=True, tol=(5e-3, 2e-2))

  @parameterized.named_parameters(
      (f"{block_q=}_{block_kv=}_{block_q_bwd=}_{block_kv_bwd=}", block_q, block_kv,
       block_q_bwd, block_kv_bwd)
      for block_q, block_kv, block_q_bwd, block_kv_bwd in (
          (16, 64, 64, 16), (128, 128, 16, 16)))
  def test_block_sizes(self, block_q, block_kv, block_q_bwd, block_kv_bwd):
    q, k, v, do = self._qkv(1, 120, 136, 2, 1, 32)
    mask = self.rng.random((1, 1, 120, 136)) < 0.4
    self._check(q, k, v, do, mask=jnp.asarray(mask), is_causal=True,
                block_sizes=BlockSizes(block_q, block_kv, block_q_bwd, block_kv_bwd))

  def test_full_and_partial_tiles_in_one_list(self):
    """Causal documents with block_q > block_kv (forward / dQ) and block_kv > block_q (dK/dV):
    lists where a PARTIAL tile precedes a FULL one, run as a FULL loop then a PARTIAL loop."""
    q, k, v, do = self._qkv(2, 192, 192, 2, 1, 32)
    sizes = BlockSizes(block_q=64, block_kv=16, block_q_bwd=16, block_kv_bwd=64)
    pos = np.arange(192)
    ids = np.stack([np.searchsorted(starts, pos, side="right")
                    for starts in ([40, 150], [70, 100])]).astype(np.int32)
    segment_ids = (jnp.asarray(ids), jnp.asarray(ids))
    for backward, tiling in ((False, (64, 16)), (True, (16, 64))):
      bm = builders.block_mask_for(q_len=192, kv_len=192, block_q=tiling[0],
                                   block_kv=tiling[1], is_causal=True,
                                   q_segment_ids=ids, kv_segment_ids=ids)
      kind = np.asarray(bm.bwd_kind if backward else bm.fwd_kind)
      block = np.asarray(bm.bwd_block if backward else bm.fwd_block)
      # The case must exercise the reordering: some list has a PARTIAL slot before a FULL one.
      self.assertTrue(np.any((kind[..., :-1] == 1) & (kind[..., 1:] == 2)), f"{backward=}")
      got_block, _, n_full = pallas_gpu_common.full_first(
          jnp.asarray(block), jnp.asarray(kind, jnp.int32), jnp.zeros(block.shape, jnp.int32))
      chex.assert_trees_all_equal(n_full, (kind == 2).sum(-1).astype(np.int32))
      for index in np.ndindex(kind.shape[:-1]):
        expected = np.concatenate([block[index][kind[index] == kind_] for kind_ in (2, 1, 0)])
        chex.assert_trees_all_equal(got_block[index], expected)
    self._check(q, k, v, do, segment_ids=segment_ids, is_causal=True, block_sizes=sizes)

  def test_empty_blocks_are_never_read(self):
    """Keys of a segment no query belongs to are NaN; they lie in EMPTY tiles only."""
    q, k, v, do = self._qkv(2, 128, 128, 2, 2, 32)
    q_ids = np.zeros((2, 128), np.int32)
    kv_ids = np.zeros((2, 128), np.int32)
    kv_ids[:, 64:96] = 9
    segment_ids = (jnp.asarray(q_ids), jnp.asarray(kv_ids))
    nan_rows = lambda x: x.at[:, 64:96].set(jnp.nan)
    out, (dq, dk, dv) = _kernel_and_grads(q, nan_rows(k), nan_rows(v), do, None, segment_ids,
                                          is_causal=True, block_sizes=BlockSizes(32, 32))
    chex.assert_tree_all_finite((out, dq))
    expected = reference.mha_reference(q, k, v, q_segment_ids=segment_ids[0],
                                       kv_segment_ids=segment_ids[1], is_causal=True)
    chex.assert_trees_all_close(out, expected, atol=2e-5, rtol=2e-5)
    chex.assert_trees_all_equal(dk[:, 64:96], jnp.zeros_like(dk[:, 64:96]))
    chex.assert_trees_all_equal(dv[:, 64:96], jnp.zeros_like(dv[:, 64:96]))

  def test_block_mask_with_other_block_sizes(self):
    q, k, v, _ = self._qkv(2, 96, 96, 2, 2, 32)
    block_mask = builders.block_mask_for(q_len=96, kv_len=96, block_q=32, block_kv=16,
                                         is_causal=True)
    with self.assertRaisesRegex(ValueError, "block_sizes"):
      pallas_triton.dot_product_attention(
          q, k, v, mask=block_mask, block_sizes=BlockSizes(32, 32), interpret=True)

  def test_bias_not_implemented(self):
    q, k, v, _ = self._qkv(1, 32, 32, 1, 1, 16)
    with self.assertRaisesRegex(NotImplementedError, "bias"):
      pallas_triton.dot_product_attention(q, k, v, bias=jnp.zeros((1, 1, 32, 32)),
                                          interpret=True)

  def test_vmap(self):
    q, k, v, _ = self._qkv(3, 64, 96, 2, 1, 32)
    add_axis = lambda x: x[:, None]
    out = jax.vmap(lambda q, k, v: flashjax.dot_product_attention(
        q, k, v, is_causal=True, implementation="pallas_triton", interpret=True))(
            add_axis(q), add_axis(k), add_axis(v))
    expected = reference.mha_reference(q, k, v, is_causal=True)
    chex.assert_trees_all_close(out[:, 0], expected, atol=2e-5, rtol=2e-5)

  @parameterized.named_parameters(
      (f"{head_dim=}_{q_len=}", head_dim, q_len, expected)
      for head_dim, q_len, expected in ((64, 4096, (128, 64)), (128, 4096, (128, 64)),
                                        (256, 4096, (64, 32)), (128, 40, (64, 64))))
  def test_default_block_sizes(self, head_dim, q_len, expected):
    sizes = pallas_triton.default_block_sizes(head_dim, q_len, 4096)
    self.assertEqual((sizes.block_q, sizes.block_kv), expected)
    self.assertLessEqual(sizes.bwd_q, sizes.block_q)
    interp = pallas_triton.default_block_sizes(head_dim, q_len, 4096, interpret=True)
    self.assertEqual((interp.block_q, interp.block_kv), (32, 32))

if __name__ == "__main__":
  absltest.main()
