"""Pallas Triton split-K decode kernel in interpret mode (CPU): shared suite + kernel cases."""

import functools
import zlib

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp

from flashjax.ops.decode import block_sizes
from flashjax.ops.decode import split_k
from flashjax.ops.decode import pallas_triton
from flashjax.ops.decode import reference
from tests.ops.decode import decode_suite

TOLERANCES = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


@functools.partial(jax.jit, static_argnums=(5, 6))
def oracle(query, key_cache, value_cache, lengths, head_indices, scale, logits_soft_cap):
  """float32 HIGHEST decode attention: [B, Nq, D]; entries past the length never count."""
  batch, num_heads, head_dim = query.shape
  max_len, num_kv_heads = key_cache.shape[1:3]
  q = query.astype(jnp.float32).reshape(batch, num_kv_heads, -1, head_dim)
  logits = scale * jnp.einsum(
      "bngd,bsnd->bngs", q, key_cache.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
  )
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  live = (jnp.arange(max_len)[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, S]
  peak = jnp.max(jnp.where(live, logits, -jnp.inf), axis=-1, keepdims=True)
  weights = jnp.where(live, jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0)), 0)
  weights = weights / jnp.maximum(weights.sum(axis=-1, keepdims=True), 1e-30)
  values = jnp.where(live[:, 0, 0, :, None, None], value_cache.astype(jnp.float32), 0)
  out = jnp.einsum("bngs,bsnd->bngd", weights, values, precision=jax.lax.Precision.HIGHEST)
  if head_indices is not None:
    chosen = jnp.zeros((batch, num_kv_heads), bool)
    chosen = chosen.at[jnp.arange(batch)[:, None], head_indices].set(True)
    out = jnp.where(chosen[:, :, None, None], out, 0)
  return out.reshape(batch, num_heads, head_dim)


_jit_reference = jax.jit(reference.decode_reference,
                         static_argnames=("scale", "logits_soft_cap", "interpret"))


def make_inputs(seed, batch, max_len, num_heads, num_kv_heads, head_dim, dtype, lengths):
  """Random query and caches (fresh per test) and int32 lengths."""
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  query = jax.random.normal(kq, (batch, num_heads, head_dim), jnp.float32).astype(dtype)
  cache_shape = (batch, max_len, num_kv_heads, head_dim)
  key_cache = jax.random.normal(kk, cache_shape, jnp.float32).astype(dtype)
  value_cache = jax.random.normal(kv, cache_shape, jnp.float32).astype(dtype)
  return query, key_cache, value_cache, jnp.asarray(lengths, jnp.int32)


class TestPallasTritonDecode(decode_suite.DecodeSuite):
  IMPLEMENTATION = "pallas_triton"
  INTERPRET = True


class PallasTritonKernelTest(parameterized.TestCase):
  """Kernel-level cases the shared suite cannot reach (forced splits, cache garbage).

  pallas_tpu's tests reuse them through `BACKEND`.
  """

  BACKEND = pallas_triton

  def decode(self, *args, **kwargs):
    return self.BACKEND.decode_attention(*args, interpret=True, **kwargs)

  def seed(self) -> int:
    return zlib.crc32(self.id().encode())

  def check(self, out, args, head_indices, scale, logits_soft_cap):
    """Compares with the jnp oracle and with flashjax's decode reference."""
    dtype = args[0].dtype
    expected = oracle(*args, head_indices, scale, logits_soft_cap)
    chex.assert_shape(out, expected.shape)
    chex.assert_tree_all_finite(out)
    self.assertEqual(out.dtype, dtype)
    tol = TOLERANCES[dtype.type]
    chex.assert_trees_all_close(out.astype(jnp.float32), expected, atol=tol, rtol=tol)
    ref = _jit_reference(*args, head_indices=head_indices, scale=scale,
                         logits_soft_cap=logits_soft_cap)
    chex.assert_trees_all_close(out.astype(jnp.float32), ref.astype(jnp.float32), atol=tol,
                                rtol=tol)

  def test_splits_gqa_ragged(self):
    # S_max = 200 is not a multiple of block_kv = 64; lengths 0 and 1 leave dead splits.
    args = make_inputs(self.seed(), 4, 200, 8, 2, 64, jnp.float32, [200, 0, 1, 131])
    config = block_sizes.DecodeBlockSizes(block_kv=64, num_splits=3)
    out = self.decode(*args, head_indices=None, scale=0.125, logits_soft_cap=None,
                      block_sizes=config)
    self.check(out, args, None, 0.125, None)

  def test_splits_head_sparse_bfloat16_soft_cap(self):
    seed = self.seed()
    args = make_inputs(seed, 3, 160, 8, 4, 64, jnp.bfloat16, [160, 97, 33])
    perms = jax.vmap(lambda k: jax.random.permutation(k, 4))(
        jax.random.split(jax.random.key(seed + 1), 3))
    heads = perms[:, :3].astype(jnp.int32)
    config = block_sizes.DecodeBlockSizes(block_kv=32, num_splits=4)
    out = self.decode(*args, head_indices=heads, scale=0.5, logits_soft_cap=2.0,
                      block_sizes=config)
    self.check(out, args, heads, 0.5, 2.0)

  def test_cache_tail_is_never_read(self):
    query, key_cache, value_cache, lengths = make_inputs(
        self.seed(), 2, 100, 4, 2, 64, jnp.float32, [70, 1])
    tail = (jnp.arange(100)[None, :] >= lengths[:, None])[:, :, None, None]
    poisoned_k = jnp.where(tail, jnp.nan, key_cache)
    poisoned_v = jnp.where(tail, jnp.inf, value_cache)
    out = self.decode(query, poisoned_k, poisoned_v, lengths, head_indices=None, scale=0.125,
                      logits_soft_cap=None,
                      block_sizes=block_sizes.DecodeBlockSizes(block_kv=32, num_splits=2))
    self.check(out, (query, key_cache, value_cache, lengths), None, 0.125, None)

  def test_short_cache_and_default_config(self):
    # S_max below the smallest tile; the split heuristic picks the split count.
    args = make_inputs(self.seed(), 2, 9, 2, 1, 64, jnp.float32, [9, 5])
    out = self.decode(*args, head_indices=None, scale=0.125, logits_soft_cap=None)
    self.check(out, args, None, 0.125, None)


class TritonOnlyTest(parameterized.TestCase):

  def test_bnsd_layout_matches(self):
    query, key_cache, value_cache, lengths = make_inputs(
        zlib.crc32(self.id().encode()), 2, 128, 8, 2, 64, jnp.float32, [128, 77])
    heads = jnp.array([[1], [0]], jnp.int32)
    out = pallas_triton.decode_attention(
        query, key_cache.transpose(0, 2, 1, 3), value_cache.transpose(0, 2, 1, 3), lengths,
        head_indices=heads, scale=0.125, logits_soft_cap=None, interpret=True,
        block_sizes=block_sizes.DecodeBlockSizes(block_kv=32, num_splits=2), kv_layout="BNSD")
    expected = oracle(query, key_cache, value_cache, lengths, heads, 0.125, None)
    chex.assert_trees_all_close(out, expected, atol=2e-5, rtol=1e-5)

  @parameterized.named_parameters(
      dict(testcase_name=f"{path=}_{sparse=}", path=path, sparse=sparse)
      for path in ("direct", "merge_kernel", "xla_merge") for sparse in (False, True))
  def test_output_paths(self, path, sparse):
    """One split (normalised store), merge kernel and XLA merge, dense and head-sparse."""
    seed = zlib.crc32(self.id().encode())
    # G = 3 query heads per group (tile rows 16): the stores must not touch the next group.
    # D = 64: the merge kernel works on two 32-column chunks.
    args = make_inputs(seed, 3, 160, 12, 4, 64, jnp.float32, [160, 0, 70])
    heads = jnp.array([[3, 0], [1, 2], [2, 2]], jnp.int32) if sparse else None
    config = {"direct": block_sizes.DecodeBlockSizes(num_splits=1, xla_merge=False),
              "merge_kernel": block_sizes.DecodeBlockSizes(block_kv=32, num_splits=3, xla_merge=False),
              "xla_merge": block_sizes.DecodeBlockSizes(block_kv=32, num_splits=3, xla_merge=True),
              }[path]
    out = pallas_triton.decode_attention(*args, head_indices=heads, scale=0.2,
                                         logits_soft_cap=None, interpret=True,
                                         block_sizes=config)
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_close(out, oracle(*args, heads, 0.2, None), atol=2e-5, rtol=1e-5)
    chex.assert_trees_all_equal(out[1], jnp.zeros_like(out[1]))  # length 0
    if sparse:  # groups 1, 2 of sequence 0 and 0, 1, 3 of sequence 2 were not selected
      chex.assert_trees_all_equal(out[0, 3:9], jnp.zeros_like(out[0, 3:9]))
      chex.assert_trees_all_equal(out[2, :6], jnp.zeros_like(out[2, :6]))
      chex.assert_trees_all_equal(out[2, 9:], jnp.zeros_like(out[2, 9:]))

  def test_split_count_above_the_tiles_is_a_value_error(self):
    args = make_inputs(2, 1, 64, 2, 1, 16, jnp.float32, [64])
    for config in (block_sizes.DecodeBlockSizes(block_kv=32, num_splits=3),
                   block_sizes.DecodeBlockSizes(num_splits=5)):
      with self.assertRaisesRegex(ValueError, f"num_splits={config.num_splits} exceeds"):
        pallas_triton.decode_attention(*args, head_indices=None, scale=0.1,
                                       logits_soft_cap=None, interpret=True,
                                       block_sizes=config)

  def test_non_power_of_two_head_dim_is_not_implemented(self):
    args = make_inputs(1, 1, 32, 2, 1, 48, jnp.float32, [32])
    with self.assertRaisesRegex(NotImplementedError, "head_dim=48"):
      pallas_triton.decode_attention(*args, head_indices=None, scale=0.1,
                                     logits_soft_cap=None, interpret=True)


class SplitHeuristicTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # The H200's measured best split counts (S = 4096, Nkv = 8, block_kv = 128).
      dict(testcase_name="batch=128_groups=8", batch=128, groups=8, expected=1),
      dict(testcase_name="batch=32_groups=8", batch=32, groups=8, expected=1),
      dict(testcase_name="batch=8_groups=8", batch=8, groups=8, expected=4),
      # Capped at one block per split.
      dict(testcase_name="batch=1_groups=8", batch=1, groups=8, expected=32),
  )
  def test_gpu_heuristic(self, batch, groups, expected):
    got = block_sizes.num_splits_heuristic(batch, groups, 4096, 128, num_cores=132, waves=2)
    self.assertEqual(got, expected)

  def test_heuristic_drops_splits_without_blocks(self):
    # 33 splits of 64 blocks would take 2 blocks each and leave the 33rd empty.
    self.assertEqual(
        block_sizes.num_splits_heuristic(1, 8, 4096, 64, num_cores=132, waves=2), 32)
    # 3 splits of 8 blocks own 3, 3 and 2 blocks: kept.
    self.assertEqual(block_sizes.num_splits_heuristic(1, 1, 1024, 128, num_cores=3, waves=1), 3)

  @parameterized.named_parameters(
      # (block_kv, num_splits) picked for B, K groups, S_max on 132 SMs.
      dict(testcase_name="batch=1_groups=8_len=1024", batch=1, groups=8, max_len=1024,
           config=block_sizes.DecodeBlockSizes(), expected=(64, 16)),  # 128 tiles: only 64 programs
      dict(testcase_name="batch=1_groups=2_len=1024", batch=1, groups=2, max_len=1024,
           config=block_sizes.DecodeBlockSizes(), expected=(64, 16)),  # tiles stop shrinking at 64
      dict(testcase_name="batch=1_groups=2_len=16384", batch=1, groups=2, max_len=16384,
           config=block_sizes.DecodeBlockSizes(), expected=(128, 128)),  # 256 programs
      dict(testcase_name="batch=1_groups=32_len=1024", batch=1, groups=32, max_len=1024,
           config=block_sizes.DecodeBlockSizes(), expected=(128, 8)),
      dict(testcase_name="batch=1_groups=8_len=4096", batch=1, groups=8, max_len=4096,
           config=block_sizes.DecodeBlockSizes(), expected=(128, 32)),
      dict(testcase_name="batch=8_groups=8_len=16384", batch=8, groups=8, max_len=16384,
           config=block_sizes.DecodeBlockSizes(), expected=(128, 4)),
      dict(testcase_name="batch=64_groups=8_len=4096", batch=64, groups=8, max_len=4096,
           config=block_sizes.DecodeBlockSizes(), expected=(128, 1)),
      dict(testcase_name="short_cache", batch=2, groups=1, max_len=9,
           config=block_sizes.DecodeBlockSizes(), expected=(16, 1)),
      dict(testcase_name="explicit_block_kv", batch=1, groups=8, max_len=1024,
           config=block_sizes.DecodeBlockSizes(block_kv=128), expected=(128, 8)),
      dict(testcase_name="num_splits=64_len=1024", batch=1, groups=8, max_len=1024,
           config=block_sizes.DecodeBlockSizes(num_splits=64), expected=(16, 64)),
      dict(testcase_name="num_splits=4_len=1024", batch=1, groups=8, max_len=1024,
           config=block_sizes.DecodeBlockSizes(num_splits=4), expected=(128, 4)),
  )
  def test_launch_shape(self, batch, groups, max_len, config, expected):
    got = block_sizes.launch_shape(batch, groups, max_len, config, num_cores=132, waves=2)
    self.assertEqual(got, expected)

  def test_launch_shape_refuses_more_splits_than_tiles(self):
    with self.assertRaisesRegex(ValueError, "num_splits=65 exceeds the 64 tiles"):
      block_sizes.launch_shape(1, 8, 1024, block_sizes.DecodeBlockSizes(num_splits=65), num_cores=132,
                           waves=2)
    with self.assertRaisesRegex(ValueError, "num_splits=16 exceeds the 8 tiles of block_kv=128"):
      block_sizes.launch_shape(1, 8, 1024, block_sizes.DecodeBlockSizes(block_kv=128, num_splits=16),
                           num_cores=132, waves=2)

  def test_config_validation(self):
    with self.assertRaisesRegex(ValueError, "block_kv=48"):
      block_sizes.DecodeBlockSizes(block_kv=48)
    with self.assertRaisesRegex(ValueError, "block_kv=8"):
      block_sizes.DecodeBlockSizes(block_kv=8)
    with self.assertRaisesRegex(ValueError, "num_splits=0"):
      block_sizes.DecodeBlockSizes(num_splits=0)
    with self.assertRaisesRegex(ValueError, "num_splits=True"):
      block_sizes.DecodeBlockSizes(num_splits=True)
    with self.assertRaisesRegex(ValueError, "xla_merge='yes'"):
      block_sizes.DecodeBlockSizes(xla_merge="yes")

  def test_merge_ignores_dead_splits(self):
    # Split 0 read keys (m = 1, l = 2, o = 4 -> output 2); split 1 read nothing (m = -inf,
    # l = 0), whatever its o holds; a sequence of length 0 has only dead splits.
    o = jnp.stack([jnp.full((16, 8), 4.0), jnp.full((16, 8), 7.0)])[None, None]
    m = jnp.array([1.0, -jnp.inf])[None, None, :, None] * jnp.ones((1, 1, 2, 16))
    l = jnp.array([2.0, 0.0])[None, None, :, None] * jnp.ones((1, 1, 2, 16))
    chex.assert_trees_all_close(split_k.merge_splits(o, m, l), jnp.full((1, 1, 16, 8), 2.0))
    dead = split_k.merge_splits(o, jnp.full_like(m, -jnp.inf), jnp.zeros_like(l))
    chex.assert_trees_all_equal(dead, jnp.zeros((1, 1, 16, 8)))


if __name__ == "__main__":
  absltest.main()
