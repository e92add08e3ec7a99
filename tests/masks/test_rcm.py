"""Reverse Cuthill-McKee reordering: permutation, block density, attention equivalence."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from flashjax import masks
from flashjax.masks import BlockMask, builders, rcm


def _attention(q, k, v, allowed):
  """float32 softmax attention [B, T, N, D] with a bool [T, S] mask (rows never empty)."""
  logits = jnp.einsum("btnd,bsnd->bnts", q, k, precision=jax.lax.Precision.HIGHEST)
  logits = jnp.where(allowed[None, None], logits / np.sqrt(q.shape[-1]), -jnp.inf)
  return jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(logits, axis=-1), v,
                    precision=jax.lax.Precision.HIGHEST)


def _shuffled_band(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A banded mask with its tokens shuffled: (dense mask, shuffle)."""
  shuffle = np.random.default_rng(seed).permutation(size)
  band = masks.sliding_window(size, size, 3, 3).to_dense()
  return band[np.ix_(shuffle, shuffle)], shuffle


class RcmTest(parameterized.TestCase):

  def test_permutation_and_inverse(self):
    dense, _ = _shuffled_band(100, 0)
    perm, inv = rcm.rcm_permutation(masks.from_dense(dense))
    chex.assert_trees_all_equal(np.sort(perm), np.arange(100, dtype=np.int32))
    chex.assert_trees_all_equal(perm[inv], np.arange(100, dtype=np.int32))
    self.assertEqual(perm.dtype, np.int32)

  @parameterized.named_parameters(
      [{"testcase_name": f"{size=}_{block=}", "size": size, "block": block}
       for size, block in ((256, 32), (200, 16))])
  def test_rcm_lowers_block_density_of_shuffled_band(self, size, block):
    dense, _ = _shuffled_band(size, size)
    mask = masks.from_dense(dense)
    plain = BlockMask.from_mask(mask, block, block)
    reordered = BlockMask.from_mask(mask, block, block, reorder="rcm")
    band = BlockMask.from_mask(masks.sliding_window(size, size, 3, 3), block, block)
    self.assertGreater(float(plain.block_density), 0.9)
    # RCM recovers (about) the unshuffled band.
    self.assertLessEqual(float(reordered.block_density), 1.25 * float(band.block_density))
    self.assertLess(float(reordered.block_density), 0.5 * float(plain.block_density))
    self.assertAlmostEqual(float(reordered.density), float(plain.density), places=6)
    self.assertIs(BlockMask.from_mask(mask, block, block, reorder="rcm"), reordered)
    # The BlockMask describes the permuted mask M[perm][:, perm].
    perm = reordered.q_perm
    chex.assert_trees_all_equal(reordered.kv_perm, perm)
    expanded = np.asarray(builders.expand_block_mask(reordered))[0, 0]
    chex.assert_trees_all_equal(expanded, dense[np.ix_(perm, perm)])

  def test_permuted_attention_matches(self):
    size = 96
    mask = masks.random_banded(size, size, seed=11, floor=0.01)
    bm = masks.BlockMask.from_mask(mask, 16, 16, reorder="rcm")
    keys = jax.random.split(jax.random.key(4), 3)
    q, k, v = (jax.random.normal(key, (2, size, 3, 16), jnp.float32) for key in keys)
    expected = _attention(q, k, v, jnp.asarray(mask.to_dense()))
    pq, pk, pv = rcm.permute_qkv(q, k, v, bm)
    permuted = _attention(pq, pk, pv, builders.expand_block_mask(bm)[0, 0])
    out = rcm.unpermute_output(permuted, bm)
    chex.assert_trees_all_close(out, expected, atol=2e-5, rtol=1e-5)
    plain = BlockMask.from_mask(mask, 16, 16)
    chex.assert_trees_all_equal(rcm.permute_qkv(q, k, v, plain), (q, k, v))
    chex.assert_trees_all_equal(rcm.unpermute_output(out, plain), out)

  def test_permute_mask_of_tree(self):
    parents = np.r_[-1, np.arange(49) // 2]
    mask = masks.tree(parents)
    perm, _ = rcm.rcm_permutation(mask)
    permuted = rcm.permute_mask(mask, perm)
    chex.assert_trees_all_equal(permuted.to_dense(), mask.to_dense()[np.ix_(perm, perm)])

  @parameterized.named_parameters(
      ("not_square", lambda: rcm.rcm_permutation(masks.full(4, 5)), "T == S"),
      ("batched", lambda: rcm.rcm_permutation(masks.document(np.zeros((2, 4), int))),
       "leading"),
      ("bad_perm", lambda: rcm.permute_mask(masks.full(4, 4), [0, 1, 1, 2]), "perm"),
      ("combined_with_segments", lambda: builders.block_mask_for(
          q_len=32, kv_len=32, block_q=16, block_kv=16, is_causal=True,
          mask=BlockMask.from_mask(masks.tree(np.arange(32) - 1), 16, 16, reorder="rcm")),
       "RCM"),
  )
  def test_invalid(self, build, words):
    with self.assertRaisesRegex(ValueError, words):
      build()


class RcmReportTest(absltest.TestCase):

  def test_permuted_band_gets_narrower_and_fewer_tiles(self):
    size, block = 256, 16
    shuffled, _ = _shuffled_band(size, seed=3)  # a band of half-width 3, tokens shuffled
    got = rcm.rcm_report(shuffled, block, block)
    self.assertAlmostEqual(got["density"], shuffled.mean())
    self.assertGreater(got["bandwidth_before"], size // 2)  # scattered over the square
    self.assertLess(got["bandwidth_after"], got["bandwidth_before"])
    self.assertLessEqual(got["bandwidth_after"], 2 * 3)  # RCM recovers a narrow band
    # The shuffled band touches most tiles; the reordered one about 3 tiles per tile row.
    self.assertGreater(got["block_density_before"], 0.5)
    self.assertLess(got["block_density_after"], 0.25)
    self.assertLess(got["block_density_after"], got["block_density_before"])
    self.assertGreaterEqual(got["rcm_ms"], 0.0)
    self.assertGreaterEqual(got["permute_ms"], 0.0)

  def test_band_already_in_order_is_unchanged(self):
    band = masks.sliding_window(128, 128, 2, 2)
    got = rcm.rcm_report(band, 32, 32)
    self.assertEqual(got["bandwidth_before"], 2)
    self.assertEqual(got["bandwidth_after"], 2)
    self.assertEqual(rcm.bandwidth(np.zeros((4, 4), bool)), 0)

  def test_bad_arguments(self):
    band = masks.sliding_window(64, 64, 2, 2)
    with self.assertRaisesRegex(ValueError, "block_q=0"):
      rcm.rcm_report(band, 0, 16)
    with self.assertRaisesRegex(ValueError, "block_kv=16.5"):
      rcm.rcm_report(band, 16, 16.5)
    with self.assertRaisesRegex(ValueError, "T == S"):
      rcm.rcm_report(masks.causal(32, 64), 16, 16)


if __name__ == "__main__":
  absltest.main()
