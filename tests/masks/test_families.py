"""flashjax.masks.families: the studies' mask families against brute force."""

from __future__ import annotations

import numpy as np
from absl.testing import absltest, parameterized

from flashjax import masks
from flashjax.masks import families
from tests.masks import brute


def _dense(mask) -> np.ndarray:
  return np.asarray(mask.to_dense(), bool)


class PiecesTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{density=}_{block=}", density, block) for density, block in
      ((0.1, 16), (0.5, 16), (0.5, 32), (1.0, 32)))
  def test_random_blocks_hits_the_target_tile_count(self, density, block):
    rng = np.random.default_rng(3)
    mask = families.random_blocks(128, 96, block, block, density, rng)
    kinds = mask.block_kinds(block, block)
    nq, nk = kinds.shape[-2:]
    self.assertEqual(int(np.sum(kinds != masks.EMPTY)), max(nq, round(density * nq * nk)))
    self.assertTrue(np.all(np.any(kinds != masks.EMPTY, axis=-1)))  # no empty tile row
    self.assertFalse(np.any(kinds == masks.PARTIAL))  # whole tiles only
    other = families.random_blocks(128, 96, block, block, density, np.random.default_rng(4))
    if density < 1:
      self.assertFalse(np.array_equal(mask.to_dense(), other.to_dense()))
    with self.assertRaisesRegex(ValueError, "density="):
      families.random_blocks(64, 64, 16, 16, 0.0, rng)

  def test_random_blocks_clips_edge_tiles(self):
    mask = families.random_blocks(40, 50, 16, 16, 1.0, np.random.default_rng(0))
    self.assertEqual(mask.shape, (40, 50))
    self.assertTrue(_dense(mask).all())  # density 1: every tile, clipped to T x S

  def test_medusa_tree_attends_ancestors_in_its_copy(self):
    # heads=2, topk=3: 1 root + 3 + 9 = 13 nodes per copy; BFS: node 4 is the first child
    # of node 1, whose parent is the root 0.
    dense = _dense(families.medusa_tree(30, heads=2, topk=3))
    self.assertEqual(dense.shape, (30, 30))
    np.testing.assert_array_equal(np.flatnonzero(dense[4]), [0, 1, 4])
    np.testing.assert_array_equal(np.flatnonzero(dense[12]), [0, 3, 12])
    np.testing.assert_array_equal(np.flatnonzero(dense[13 + 4]), [13, 14, 17])  # 2nd copy
    np.testing.assert_array_equal(np.flatnonzero(dense[26]), [26])  # root of the 3rd copy
    self.assertEqual(int(dense.sum()), 2 * (1 + 3 * 2 + 9 * 3) + 1 + 3 * 2)
    with self.assertRaisesRegex(ValueError, "heads="):
      families.medusa_tree(8, heads=0, topk=3)
    with self.assertRaisesRegex(ValueError, "topk="):
      families.medusa_tree(8, heads=2, topk=0)

  def test_lognormal_document_lengths(self):
    rng = np.random.default_rng(0)
    ids = families.document_ids(rng, 2, 20000, 64, "lognormal")
    lengths = np.concatenate([np.bincount(row)[:-1] for row in ids])  # last one is cut
    self.assertAlmostEqual(float(np.mean(lengths)), 64, delta=6)
    self.assertGreater(float(np.mean(lengths)), float(np.median(lengths)))  # right skew
    with self.assertRaisesRegex(ValueError, "dist="):
      families.document_ids(rng, 1, 16, 4, "zipf")
    with self.assertRaisesRegex(ValueError, r"doc_len \(mean_len\)=0 must be an int >= 1"):
      families.build("document", 64, 64, rng, doc_len=0)
    with self.assertRaisesRegex(ValueError, r"batch=0 must be"):
      families.document_ids(rng, 0, 16, 4)

  def test_uniform_document_ids_count_up_from_zero(self):
    ids = families.document_ids(np.random.default_rng(1), 3, 5000, 10)
    self.assertEqual((ids.shape, ids.dtype), ((3, 5000), np.int32))
    for row in ids:
      steps = np.diff(row)
      self.assertEqual(row[0], 0)
      self.assertTrue(np.all((steps == 0) | (steps == 1)))  # contiguous documents
      lengths = np.bincount(row)[:-1]
      self.assertTrue(np.all((lengths >= 1) & (lengths < 20)))
      self.assertAlmostEqual(float(np.mean(lengths)), 10, delta=1)

  def test_random_tree_parents_lie_within_the_span(self):
    dense = _dense(families.random_tree(200, 5, np.random.default_rng(2)))
    np.testing.assert_array_equal(np.diag(dense), np.ones(200, bool))
    self.assertEqual(int(dense.sum()), 200 + 199)  # itself and one parent (not the root)
    for i in range(1, 200):
      parent = [j for j in np.flatnonzero(dense[i]) if j != i]
      self.assertLen(parent, 1)
      self.assertTrue(i - 5 <= parent[0] < i, (i, parent))
    with self.assertRaisesRegex(ValueError, "span=0"):
      families.random_tree(8, 0, np.random.default_rng(0))

  def test_permuted_band_is_a_relabelled_band(self):
    rng = np.random.default_rng(5)
    n, window = 96, 3
    got = _dense(families.permuted_band(n, window, rng))
    perm = np.random.default_rng(5).permutation(n)  # the permutation the family drew
    band = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]) <= window
    want = np.zeros((n, n), bool)
    want[np.ix_(perm, perm)] = band  # query perm[a] attends key perm[b] iff |a - b| <= w
    np.testing.assert_array_equal(got, want)
    self.assertTrue(np.all(np.diag(got)) and np.array_equal(got, got.T))
    self.assertFalse(np.array_equal(got, band))  # scrambled, not the band itself
    with self.assertRaisesRegex(ValueError, "window=-1"):
      families.permuted_band(n, -1, rng)

  def test_random_global_tokens(self):
    rng = np.random.default_rng(5)
    mask = families.random_global_tokens(64, 64, 3, 6, rng)
    dense = _dense(mask)
    # The global tokens are the rows that see every key.
    ids = np.flatnonzero(dense.all(axis=1))
    self.assertLen(ids, 6)
    np.testing.assert_array_equal(dense, brute.global_tokens(64, 64, 3, ids))
    with self.assertRaisesRegex(ValueError, "num_global=65"):
      families.random_global_tokens(64, 64, 3, 65, rng)


class BuildTest(parameterized.TestCase):

  @parameterized.named_parameters((f, f) for f in families.FAMILIES)
  def test_same_generator_state_same_mask(self, family):
    build = lambda seed: families.build(family, 96, 96, np.random.default_rng(seed), batch=2,
                                        window=8, doc_len=12, block_q=16, block_kv=16,
                                        medusa_heads=3)
    first, again = build(11), build(11)
    if family == "dense":
      self.assertIsNone(first)
      return
    np.testing.assert_array_equal(_dense(first), _dense(again))
    self.assertTrue(_dense(first).any())

  def test_deterministic_families_match_brute_force(self):
    rng = np.random.default_rng(0)
    build = lambda family, **kw: _dense(families.build(family, 50, 70, rng, **kw))
    np.testing.assert_array_equal(build("causal"), brute.causal(50, 70))
    np.testing.assert_array_equal(build("sliding_window", window=7, window_right=2),
                                  brute.sliding_window(50, 70, 7, 2))
    np.testing.assert_array_equal(build("dilated", window=4, dilation=3),
                                  brute.dilated(50, 70, 4, 3))
    state = rng.bit_generator.state
    families.build("causal", 50, 70, rng)
    self.assertEqual(rng.bit_generator.state, state)  # deterministic families draw nothing

  @parameterized.parameters(True, False)
  def test_document_families(self, causal):
    family = "document" if causal else "document_full"
    mask = families.build(family, 64, 64, np.random.default_rng(3), batch=2, doc_len=9)
    ids = families.document_ids(np.random.default_rng(3), 2, 64, 9)
    dense = _dense(mask)
    self.assertEqual(dense.shape, (2, 1, 64, 64))
    for b in range(2):
      np.testing.assert_array_equal(dense[b, 0], brute.document(ids[b], ids[b], causal))

  def test_prefix_lm(self):
    mask = families.build("prefix_lm", 48, 48, np.random.default_rng(4), batch=2, doc_len=8)
    rng = np.random.default_rng(4)
    ids = families.document_ids(rng, 2, 48, 8)
    prefix = rng.integers(0, 8, size=(2, int(ids.max()) + 1))
    dense = _dense(mask)
    for b in range(2):
      want = brute.prefix_lm(ids[b], ids[b], lambda seg, b=b: prefix[b, seg])
      np.testing.assert_array_equal(dense[b, 0], want)

  def test_random_banded_draws_its_seed(self):
    kw = dict(band_peak=0.5, band_decay=0.05, band_floor=2e-3)
    got = families.build("random_banded", 64, 64, np.random.default_rng(6), **kw)
    seed = int(np.random.default_rng(6).integers(2**31))
    want = masks.random_banded(64, 64, seed=seed, peak=0.5, decay=0.05, floor=2e-3)
    np.testing.assert_array_equal(_dense(got), _dense(want))

  def test_bad_arguments_raise(self):
    rng = np.random.default_rng(0)
    with self.assertRaisesRegex(ValueError, "family='nope'"):
      families.build("nope", 16, 16, rng)
    with self.assertRaisesRegex(ValueError, "q_len == kv_len: t=16, s=32"):
      families.build("tree", 16, 32, rng)
    with self.assertRaisesRegex(ValueError, "dist='zipf'"):
      families.build("document", 16, 16, rng, doc_len_dist="zipf")
    with self.assertRaisesRegex(ValueError, "density=1.5"):
      families.build("random_blocks", 16, 16, rng, block_q=8, block_kv=8, block_density=1.5)


class PaperFamiliesTest(absltest.TestCase):
  """The binary block masking paper's masks (configs/reproduce_binblkmsk.py)."""

  def test_medusa_padded_is_one_parent_only_tree(self):
    self.assertEqual(families.medusa_nodes(2, 3), 12)
    self.assertEqual(families.medusa_depth(12, 3), 2)
    self.assertEqual(families.medusa_depth(38, 3), 2)
    self.assertEqual(families.medusa_depth(39, 3), 3)
    dense = np.asarray(families.medusa_padded(16, None, 3).to_dense())
    want = np.eye(16, dtype=bool)
    for node in range(3, 12):  # depth 2: nodes 3..11 have parents 0..2
      want[node, node // 3 - 1] = True
    np.testing.assert_array_equal(dense, want)
    with self.assertRaisesRegex(ValueError, "nodes > length"):
      families.medusa_padded(16, 3, 3)
    with self.assertRaisesRegex(ValueError, "topk"):
      families.medusa_depth(2, 3)

  def test_longformer_global(self):
    dense = np.asarray(families.longformer_global(64, 2, np.random.default_rng(0)).to_dense())
    rows = np.flatnonzero(dense.all(axis=1))
    self.assertLen(rows, 2 + 6 - 2)  # tokens 0, 1 and log2(64) - 2 more
    self.assertEqual(list(rows[:2]), [0, 1])
    np.testing.assert_array_equal(dense.all(axis=0), dense.all(axis=1))  # symmetric globals
    self.assertTrue(dense[30, 28] and dense[30, 32])
    with self.assertRaisesRegex(ValueError, "length=3"):
      families.longformer_global(3, 2, np.random.default_rng(0))

  def test_prefix_fraction(self):
    ids = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(families.prefix_lengths_from_fraction(ids, 0.4), [[2, 2]])
    got = families.build("prefix_lm", 64, 64, np.random.default_rng(5), batch=2, doc_len=8,
                         prefix_frac=0.4)
    doc_ids = families.document_ids(np.random.default_rng(5), 2, 64, 8)
    want = masks.prefix_lm(doc_ids, families.prefix_lengths_from_fraction(doc_ids, 0.4))
    np.testing.assert_array_equal(got.to_dense(), want.to_dense())
    with self.assertRaisesRegex(ValueError, "fraction=1.5"):
      families.prefix_lengths_from_fraction(ids, 1.5)


if __name__ == "__main__":
  absltest.main()
