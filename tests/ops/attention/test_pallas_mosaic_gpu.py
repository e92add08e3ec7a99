"""pallas_mosaic_gpu backend in Mosaic GPU interpret mode (CPU): the shared suite plus focused
cases (dtype refusal, the GPU gate, tile validation, EMPTY tiles never read, per-head masks).

The kernel takes bfloat16 / float16 only (wgmma has no f32 operands), so the suite's float32
inputs are run as float16 and compared at float16 tolerances. Backward cases:
test_pallas_mosaic_gpu_vjp.py.
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
from flashjax.ops.attention import pallas_mosaic_gpu
from flashjax.ops.attention import pallas_mosaic_gpu_common
from flashjax.ops.attention import reference
from flashjax.ops.attention.block_sizes import BlockSizes
from flashjax.ops.attention.tuning import store as tuning_store
from tests import oracle
from tests.ops.attention import attention_suite


class MosaicGpuSuite(attention_suite.AttentionSuite):
  """The shared suite configured for this backend (interpret mode here, compiled in
  test_pallas_mosaic_gpu_gpu.py)."""

  __test__ = False
  IMPLEMENTATION = "pallas_mosaic_gpu"
  INTERPRET = True
  SUPPORTS_BIAS = False
  DTYPES = ("bfloat16", "float16")
  # block_q: one warpgroup's wgmma M (64). The backward runs the Mosaic GPU kernels (dQ at
  # 64 x 64, dK/dV at 64 x 64 in interpret mode, 64 x 128 compiled); BlockMask cases use
  # 64 x 64 tiles, which both backward kernels take.
  BLOCK_SIZES = BlockSizes(block_q=64, block_kv=64)

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


# The Mosaic GPU interpreter simulates every warpgroup, TMA and barrier with callbacks: 15-30 s
# per suite case on 2 CPU cores (~30 min for the suite), too slow for CI. CI runs the focused
# cases below; the whole suite runs compiled on the GPU and here with `-m slow`.
@pytest.mark.slow
class TestPallasMosaicGpu(MosaicGpuSuite):
  pass


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

  def test_shared_memory_overflow_raises(self):
    q, k, v = self._qkv(1, 256, 256, 1, 1, 128)
    with self.assertRaisesRegex(ValueError, "bytes of shared memory"):
      _attention(q, k, v, block_sizes=BlockSizes(128, 128, num_stages=3))

  @parameterized.named_parameters(
      ("causal_gqa", dict(is_causal=True), 1),
      ("tree_tiles", dict(mask=flashjax.masks.tree(
          np.concatenate([[-1], np.arange(255) // 2]))), 2),
  )
  def test_two_consumer_warpgroups(self, kwargs, kv_heads):
    """block_q = 128: two consumer warpgroups share the K/V ring and alternate (ping-pong)."""
    q, k, v = self._qkv(1, 256, 256, 2 // kv_heads, 1, 32)
    out = _attention(q, k, v, block_sizes=BlockSizes(128, 64), **kwargs)
    mask = kwargs.get("mask")
    expected = reference.mha_reference(
        q, k, v, is_causal=kwargs.get("is_causal", False),
        mask=None if mask is None else jnp.asarray(mask.to_dense()))
    chex.assert_trees_all_close(out.astype(jnp.float32), expected, atol=5e-3)

  @parameterized.named_parameters(
      (f"{block_q=}_{block_kv=}", block_q, block_kv)
      for block_q, block_kv in ((32, 64), (256, 64), (128, 32)))
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
    q, k, v = self._qkv(1, 128, 128, 1, 1, 32)
    q_ids = np.zeros((1, 128), np.int32)
    kv_ids = np.zeros((1, 128), np.int32)
    kv_ids[:, 64:] = 9
    segment_ids = (jnp.asarray(q_ids), jnp.asarray(kv_ids))
    nan_rows = lambda x: x.at[:, 64:].set(jnp.nan)
    out = _attention(q, nan_rows(k), nan_rows(v), segment_ids=segment_ids, is_causal=True,
                     block_sizes=BlockSizes(64, 64))
    expected = reference.mha_reference(q, k, v, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
                                       is_causal=True)
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_close(out.astype(jnp.float32), expected, atol=5e-3)

  @parameterized.named_parameters(
      (f"{persistent=}", persistent) for persistent in (False, True))
  def test_per_head_mask_gqa_lse(self, persistent):
    """Query heads of one kv group have different block lists; lse2 matches the reference
    (base 2, +inf on rows with no allowed key). Persistent: lists of 0 to 3 blocks reorder
    the 8 work items over 3 programs; the empty items run last."""
    q, k, v = self._qkv(1, 128, 160, 4, 2, 32, jnp.bfloat16)
    mask = self.rng.random((1, 4, 128, 160)) < 0.3
    mask[:, 1, :, 64:] = False    # head 1: kv blocks right of 64 are EMPTY
    mask[:, 2, :64] = False       # head 2: the first query block attends to nothing
    mask[0, 3] = oracle.causal_mask(128, 160)
    bm = flashjax.masks.BlockMask.from_mask(flashjax.masks.from_dense(mask), 64, 64)
    config = pallas_mosaic_gpu_common.MosaicParams(scale=0.3, soft_cap=None, interpret=True,
                                       persistent=persistent)
    # Eager: under jax.jit the interpreter's simulated warpgroups (io_callbacks) deadlocked
    # on this 2-core machine (docs/mosaic_gpu.md).
    out, lse2 = pallas_mosaic_gpu._forward(q, k, v, bm, config)
    expected = reference.mha_reference(q, k, v, mask=jnp.asarray(mask), scale=0.3)
    chex.assert_trees_all_close(out.astype(jnp.float32), expected, atol=2e-2)
    f32 = lambda x: np.asarray(x, np.float64)
    logits = np.einsum("btnd,bsnd->bnts", f32(q), np.repeat(f32(k), 2, axis=2)) * 0.3
    logits = np.where(mask, logits, -np.inf)
    with np.errstate(divide="ignore"):
      lse = np.log(np.exp(logits).sum(-1)) / np.log(2.0)
    lse = np.where(np.isneginf(lse), np.inf, lse).reshape(4, 128)
    chex.assert_trees_all_equal(np.isinf(np.asarray(lse2)), np.isinf(lse))
    chex.assert_trees_all_close(np.where(np.isinf(lse), 0.0, np.asarray(lse2)),
                                np.where(np.isinf(lse), 0.0, lse), atol=2e-4, rtol=2e-4)

  def test_odd_lengths_soft_cap_prefix(self):
    """Lengths that are no tile multiple, a soft cap and a prefix-LM rule (segment ids plus
    prefix flags packed in one kv array) in PARTIAL tiles."""
    q, k, v = self._qkv(1, 150, 150, 1, 1, 32)
    mask = flashjax.masks.prefix_lm(np.repeat([0, 1], [60, 90])[None], np.array([[20, 10]]))
    out = _attention(q, k, v, mask=mask, logits_soft_cap=5.0)
    expected = reference.mha_reference(q, k, v, logits_soft_cap=5.0,
                                       mask=jnp.asarray(mask.to_dense()))
    chex.assert_trees_all_close(out.astype(jnp.float32), expected, atol=5e-3)

  def _persistent_case(self, name):
    """(q, k, v, block_sizes, attention kwargs, reference kwargs) of a persistent-grid case."""
    if name == "dense_odd":  # 3 query blocks x 2 heads = 6 items over 3 programs
      q, k, v = self._qkv(1, 150, 170, 2, 2, 32)
      return q, k, v, BlockSizes(64, 64), {}, {}
    if name == "causal_gqa_two_consumers":  # ping-pong phases carried across items
      q, k, v = self._qkv(1, 256, 256, 2, 1, 32)
      return q, k, v, BlockSizes(128, 64), dict(is_causal=True), dict(is_causal=True)
    if name in ("document_gqa", "window_soft_cap"):
      q, k, v = self._qkv(2, 192, 192, 4, 2, 32)
      if name == "window_soft_cap":
        mask = flashjax.masks.sliding_window(192, 192, 50, 10)
        return q, k, v, BlockSizes(64, 64), dict(mask=mask, logits_soft_cap=4.0), dict(
            mask=jnp.asarray(mask.to_dense()), logits_soft_cap=4.0)
      ids = np.zeros((2, 192), np.int32)
      for row in range(2):
        ids[row] = np.searchsorted(np.sort(self.rng.choice(191, 2, replace=False) + 1),
                                   np.arange(192), side="right")
      return q, k, v, BlockSizes(64, 64), dict(segment_ids=jnp.asarray(ids), is_causal=True), (
          dict(q_segment_ids=ids, kv_segment_ids=ids, is_causal=True))
    if name == "tree_tiles":  # stored mask tiles: a third SMEM ring
      q, k, v = self._qkv(1, 256, 256, 2, 2, 32)
      mask = flashjax.masks.tree(np.concatenate([[-1], self.rng.integers(0, np.arange(1, 256))]))
      return q, k, v, BlockSizes(64, 64), dict(mask=mask), dict(mask=jnp.asarray(mask.to_dense()))
    raise ValueError(f"unknown {name=}")

  @parameterized.named_parameters(
      (f"{name=}", name) for name in ("dense_odd", "causal_gqa_two_consumers", "document_gqa",
                                      "tree_tiles"))
  def test_persistent(self, name):
    """BlockSizes(persistent=True): 3 interpreted programs loop over the sorted work items."""
    self._check_persistent(name)

  @pytest.mark.slow
  def test_persistent_window_soft_cap(self):
    self._check_persistent("window_soft_cap")

  def _check_persistent(self, name):
    q, k, v, sizes, kwargs, ref_kwargs = self._persistent_case(name)
    forward = pallas_mosaic_gpu._forward
    with mock.patch.object(pallas_mosaic_gpu, "_forward", wraps=forward) as spy:
      out = _attention(q, k, v, block_sizes=dataclasses.replace(sizes, persistent=True),
                       **kwargs)
    self.assertTrue(spy.call_args.args[4].persistent)
    expected = reference.mha_reference(q, k, v, **ref_kwargs)
    chex.assert_trees_all_close(out.astype(jnp.float32), expected, atol=5e-3)

  @parameterized.named_parameters(
      (f"{name=}_{persistent=}", name, persistent)
      for name, persistent in (("causal_gqa_two_consumers", True),))
  def test_intra_warpgroup_overlap(self, name, persistent):
    """INTRA_WG_OVERLAP: S_j and P_{j-1} V_{j-1} issued together, softmax in between; the
    interpreter checks the barrier phases (one wait and one release per slot) and the math."""
    self._check_overlap(name, persistent)

  @parameterized.named_parameters(
      (f"{name=}_{persistent=}", name, persistent)
      for name, persistent in (("causal_gqa_two_consumers", False), ("document_gqa", False),
                               ("tree_tiles", True), ("dense_odd", False)))
  @pytest.mark.slow
  def test_intra_warpgroup_overlap_slow(self, name, persistent):
    self._check_overlap(name, persistent)

  def _check_overlap(self, name, persistent):
    q, k, v, sizes, kwargs, ref_kwargs = self._persistent_case(name)
    forward = pallas_mosaic_gpu._forward
    with mock.patch.object(pallas_mosaic_gpu, "INTRA_WG_OVERLAP", True), \
        mock.patch.object(pallas_mosaic_gpu, "_forward", wraps=forward) as spy:
      out = _attention(q, k, v, block_sizes=dataclasses.replace(sizes, persistent=persistent),
                       **kwargs)
    self.assertTrue(spy.call_args.args[4].overlap)
    expected = reference.mha_reference(q, k, v, **ref_kwargs)
    chex.assert_trees_all_close(out.astype(jnp.float32), expected, atol=5e-3)

  def test_intra_warpgroup_overlap_empty_blocks(self):
    """Query blocks with no kv tile (count 0) skip the overlapped pipeline: zero rows; the
    others mix FULL tiles and stored PARTIAL ones."""
    q, k, v = self._qkv(1, 256, 256, 2, 1, 32)
    allowed = np.tril(np.ones((256, 256), bool))
    allowed[:128] = False  # the first two-consumer query block has an empty list
    with mock.patch.object(pallas_mosaic_gpu, "INTRA_WG_OVERLAP", True):
      out = _attention(q, k, v, mask=jnp.asarray(allowed), block_sizes=BlockSizes(128, 64))
    expected = reference.mha_reference(q, k, v, mask=jnp.asarray(allowed))
    chex.assert_trees_all_close(out.astype(jnp.float32), expected, atol=5e-3)
    chex.assert_trees_all_equal(np.asarray(out[:, :128]), np.zeros_like(out[:, :128]))

  def test_item_order(self):
    """Longest kv list first, ties in item id order; ids are (b * Nq + h) * nq + qi."""
    count = jnp.asarray([[[1, 3, 3]], [[0, 3, 2]]], jnp.int32)  # [B=2, Nm=1, nq=3]
    order = pallas_mosaic_gpu_common.query_item_order(count, batch=2, num_heads=2)
    chex.assert_trees_all_equal(
        order, jnp.asarray([1, 2, 4, 5, 7, 10, 8, 11, 0, 3, 6, 9], jnp.int32))
    counts = self.rng.integers(0, 4, (1, 3, 5))
    order = np.asarray(pallas_mosaic_gpu_common.query_item_order(jnp.asarray(counts), batch=2,
                                                     num_heads=3))
    lengths = np.broadcast_to(counts, (2, 3, 5)).reshape(-1)[order]
    chex.assert_trees_all_equal(np.sort(order), np.arange(30))
    self.assertTrue(np.all(np.diff(lengths) <= 0), msg=f"{lengths=}")
    ties = np.diff(lengths) == 0
    self.assertTrue(np.all(np.diff(order)[ties] > 0), msg=f"{order=}")

  @parameterized.named_parameters(
      (f"{n_items=}_{interpret=}", n_items, interpret, expected)
      for n_items, interpret, expected in ((2, True, 2), (50, True, 3), (7, False, 7)))
  def test_num_programs(self, n_items, interpret, expected):
    self.assertEqual(pallas_mosaic_gpu_common.num_programs(n_items, interpret), expected)

  def test_register_split(self):
    """setmaxnreg counts: the default and FlashAttention-3's split pass, others are refused."""
    common = pallas_mosaic_gpu_common
    self.assertEqual(common.register_split(2), (40, 232))
    self.assertEqual(common.register_split(1), (40, 240))
    with mock.patch.object(common, "REGISTERS_TWO_CONSUMERS", (24, 240)):
      self.assertEqual(common.register_split(2), (24, 240))
    for bad in ((40, 240), (20, 240), (40, 230)):  # over 504; under 24; not a multiple of 8
      with mock.patch.object(common, "REGISTERS_TWO_CONSUMERS", bad), \
           self.assertRaisesRegex(ValueError, "register split"):
        common.register_split(2)

  def test_gradients(self):
    """The backward (Mosaic GPU kernels) takes this forward's lse2 residual."""
    q, k, v = self._qkv(1, 64, 64, 2, 1, 32)
    do = jnp.asarray(self.rng.standard_normal(q.shape), q.dtype)
    f32 = lambda x: x.astype(jnp.float32)
    grads = jax.vjp(lambda q, k, v: _attention(q, k, v, is_causal=True), q, k, v)[1](do)
    expected = jax.vjp(lambda q, k, v: reference.mha_reference(q, k, v, is_causal=True),
                       f32(q), f32(k), f32(v))[1](f32(do))
    chex.assert_trees_all_close(jax.tree.map(f32, grads), expected, atol=1e-2)

  def test_vmap(self):
    q, k, v = self._qkv(2, 64, 96, 1, 1, 32)
    add_axis = lambda x: x[:, None]
    out = jax.vmap(lambda q, k, v: _attention(q, k, v, is_causal=True))(
        add_axis(q), add_axis(k), add_axis(v))
    expected = reference.mha_reference(q, k, v, is_causal=True)
    chex.assert_trees_all_close(out[:, 0].astype(jnp.float32), expected, atol=5e-3)

  @parameterized.named_parameters(
      (f"{head_dim=}_{kv_len=}_{interpret=}", head_dim, kv_len, interpret, expected)
      for head_dim, kv_len, interpret, expected in (
          (128, 4096, False, (128, 128)), (256, 4096, False, (128, 64)),
          (128, 4096, True, (64, 64)), (128, 20, False, (128, 64))))
  def test_default_block_sizes(self, head_dim, kv_len, interpret, expected):
    sizes = pallas_mosaic_gpu.default_block_sizes(head_dim, 4096, kv_len, interpret=interpret)
    self.assertEqual((sizes.block_q, sizes.block_kv), expected)
    self.assertFalse(sizes.persistent)

  @parameterized.named_parameters(
      (f"{head_dim=}_{mask=}", head_dim, mask, expected)
      for head_dim, mask, expected in (
          (128, "full", (128, 128, 2, True)), (96, "full", (128, 128, 2, True)),
          (64, "full", (128, 128, 3, None)), (256, "full", (128, 64, None, None)),
          (128, "causal", (128, 128, 2, True)), (64, "causal", (128, 128, None, None)),
          (256, "causal", (128, 64, None, None)),
          (128, "other", (128, 128, None, None)), (64, "other", (128, 128, None, None))))
  def test_full_and_causal_defaults(self, head_dim, mask, expected):
    """The tuning studies' picks: persistent grid at padded D = 128 for full and plain causal
    masks, 3 stages at D = 64 for full ones."""
    sizes = pallas_mosaic_gpu.default_block_sizes(
        head_dim, 4096, 4096, full_mask=mask == "full", causal_only=mask == "causal")
    self.assertEqual((sizes.block_q, sizes.block_kv, sizes.num_stages, sizes.persistent),
                     expected)

  @parameterized.named_parameters(
      ("no_mask", {}, (True, False)), ("is_causal", {"is_causal": True}, (False, True)),
      ("segment_ids", {"segment_ids": "ids"}, (False, False)),
      ("causal_segment_ids", {"segment_ids": "ids", "is_causal": True}, (False, False)),
      ("mask", {"mask": "causal"}, (False, False)))
  def test_plan_names_the_mask_class_exactly(self, kwargs, expected):
    """full_mask only without any mask, causal_only only for is_causal alone (a causal Mask
    object counts as a general mask)."""
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 128, 2, 64), jnp.bfloat16)
               for i in range(3))
    if kwargs.get("segment_ids") == "ids":
      kwargs = dict(kwargs, segment_ids=jnp.zeros((1, 128), jnp.int32))
    if kwargs.get("mask") == "causal":
      kwargs = {"mask": flashjax.masks.causal(128, 128)}
    real = pallas_mosaic_gpu.default_block_sizes
    seen = []

    def recording(*args, **kw):
      seen.append((kw.get("full_mask"), kw.get("causal_only")))
      return real(*args, **kw)

    with mock.patch.object(pallas_mosaic_gpu, "default_block_sizes", recording), \
        tuning_store.disabled():
      # The plan is made while tracing: shapes only, no interpreted kernel run.
      jax.eval_shape(lambda q, k, v: flashjax.dot_product_attention(
          q, k, v, implementation="pallas_mosaic_gpu", interpret=True, **kwargs), q, k, v)
    self.assertEqual(seen, [expected])


if __name__ == "__main__":
  absltest.main()
