"""flashjax.masks constructors, combinations and tile kinds against brute force."""

from __future__ import annotations

import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from flashjax import masks
from flashjax.masks import rule as rule_lib
from tests.masks import brute

T, S = 77, 100  # deliberately not multiples of the block sizes
BLOCKS = ((16, 32), (32, 16), (8, 8))


def _rng(name: str) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32(name.encode()))


def _sorted_ids(rng, shape, num_ids):
  return np.sort(rng.integers(0, num_ids, shape), axis=-1)


def _tree_parents(rng, t):
  """Random topologically ordered tree: parent of node i is a node < i (or -1)."""
  return np.array([-1] + [int(rng.integers(-1, i)) for i in range(1, t)])


def _case_full(rng):
  return masks.full(T, S), np.ones((T, S), bool)


def _case_causal(rng):
  offset = int(rng.integers(-10, 30))
  return masks.causal(T, S, offset), brute.causal(T, S, offset)


def _case_sliding_window(rng):
  left, right = (int(x) for x in rng.integers(0, 12, 2))
  return masks.sliding_window(T, S, left, right), brute.sliding_window(T, S, left, right)


def _case_document_sorted(rng):
  ids = _sorted_ids(rng, T, 6)
  return masks.document(ids), brute.document(ids, ids, True)


def _case_document_random_batched(rng):
  ids = rng.integers(0, 3, (3, T))
  expected = np.stack([brute.document(x, x, False) for x in ids])[:, None]
  return masks.document(ids, causal=False), expected


def _case_document_pair(rng):
  q_ids, kv_ids = _sorted_ids(rng, T, 5), _sorted_ids(rng, S, 5)
  return masks.document((q_ids, kv_ids)), brute.document(q_ids, kv_ids, True)


def _case_document_pair_broadcast(rng):
  q_ids, kv_ids = rng.integers(0, 4, (2, T)), rng.integers(0, 4, S)
  expected = np.stack([brute.document(x, kv_ids, False) for x in q_ids])[:, None]
  return masks.document((q_ids, kv_ids), causal=False), expected


def _case_prefix_lm_int(rng):
  ids = _sorted_ids(rng, T, 5)
  length = int(rng.integers(1, 8))
  return masks.prefix_lm(ids, length), brute.prefix_lm(ids, ids, lambda s: length)


def _case_prefix_lm_dict(rng):
  ids = rng.integers(0, 4, T)  # unsorted: the prefix is the first tokens of an id
  table = {0: 3, 2: 9}
  return masks.prefix_lm(ids, table), brute.prefix_lm(ids, ids, lambda s: table.get(s, 0))


def _case_prefix_lm_array_pair(rng):
  q_ids, kv_ids = _sorted_ids(rng, T, 4), _sorted_ids(rng, S, 4)
  table = rng.integers(0, 20, 4)
  return (masks.prefix_lm((q_ids, kv_ids), table),
          brute.prefix_lm(q_ids, kv_ids, lambda s: table[s]))


def _case_prefix_lm_per_row(rng):
  ids = _sorted_ids(rng, (2, T), 3)
  table = rng.integers(0, 15, (2, 3))
  expected = np.stack([brute.prefix_lm(ids[b], ids[b], lambda s, b=b: table[b, s])
                       for b in range(2)])[:, None]
  return masks.prefix_lm(ids, table), expected


def _case_tree(rng):
  parents = _tree_parents(rng, T)
  return masks.tree(parents), brute.tree(parents)


def _case_tree_batched(rng):
  parents = np.stack([_tree_parents(rng, T) for _ in range(2)])
  return masks.tree(parents), np.stack([brute.tree(p) for p in parents])[:, None]


def _case_dilated(rng):
  window, dilation = int(rng.integers(0, 6)), int(rng.integers(2, 5))
  return (masks.dilated(T, S, window, dilation),
          brute.dilated(T, S, window, dilation))


def _case_global_tokens(rng):
  window = int(rng.integers(0, 6))
  ids = rng.choice(S, 4, replace=False)  # some ids >= T: global keys only
  return masks.global_tokens(T, S, window, ids), brute.global_tokens(T, S, window, ids)


def _case_random_banded(rng):
  mask = masks.random_banded(T, S, seed=int(rng.integers(1000)), floor=0.02)
  # The constructor samples; the definition checked here is consistency of its views.
  return mask, masks.from_dense(mask.to_dense()).to_dense()


def _case_from_dense_2d(rng):
  dense = rng.random((T, S)) < 0.3
  return masks.from_dense(dense), dense


def _case_from_dense_4d(rng):
  dense = rng.random((2, 3, T, S)) < 0.2
  return masks.from_dense(dense), dense


CASES = {name[len("_case_"):]: fn for name, fn in dict(globals()).items()
         if name.startswith("_case_")}


def _named(**values):
  """named_parameters: one case per combination, named from f"{x=}"."""
  ((key, items),) = values.items()
  return [{"testcase_name": f"{key}={v!r}", key: v} for v in items]


class MaskConstructorTest(parameterized.TestCase):

  def _case(self, case):
    mask, expected = CASES[case](_rng(case))
    return mask, np.asarray(expected)

  @parameterized.named_parameters(_named(case=sorted(CASES)))
  def test_to_dense_matches_definition(self, case):
    mask, expected = self._case(case)
    dense = mask.to_dense()
    chex.assert_shape(dense, mask.shape)
    self.assertEqual(dense.dtype, np.bool_)
    chex.assert_trees_all_equal(dense, expected)
    self.assertAlmostEqual(mask.density, expected.mean(), places=12)

  @parameterized.named_parameters(_named(case=sorted(CASES)))
  def test_dense_tile(self, case):
    mask, expected = self._case(case)
    rng = _rng(case + "tile")
    for _ in range(4):
      q0, k0 = int(rng.integers(0, T)), int(rng.integers(0, S))
      q1, k1 = q0 + int(rng.integers(0, 40)), k0 + int(rng.integers(0, 40))  # may overhang
      want = brute.padded(expected, 1, 1)[..., q0:q1, k0:k1]
      want = np.pad(want, [(0, 0)] * 2 + [(0, q1 - q0 - want.shape[2]),
                                          (0, k1 - k0 - want.shape[3])])
      tile = mask.dense_tile(q0, q1, k0, k1)
      chex.assert_trees_all_equal(tile, want.reshape(tile.shape))
      chex.assert_shape(tile, mask.shape[:-2] + (q1 - q0, k1 - k0))

  @parameterized.named_parameters(_named(case=sorted(CASES)))
  def test_block_kinds_exact(self, case):
    mask, expected = self._case(case)
    for block_q, block_kv in BLOCKS:
      kinds = mask.block_kinds(block_q, block_kv)
      chex.assert_trees_all_equal(np.asarray(kinds),
                                  brute.kinds(expected, block_q, block_kv))

  @parameterized.named_parameters(_named(case=sorted(CASES)))
  def test_rule_evaluates_to_dense(self, case):
    mask, expected = self._case(case)
    computable = case.startswith(("full", "causal", "sliding", "document", "prefix"))
    rule = mask.rule()
    self.assertEqual(rule is not None, computable)
    if rule is not None:
      dense = rule.evaluate(np.arange(mask.q_len), np.arange(mask.kv_len), xp=np)
      dense = dense.reshape((-1, 1) + dense.shape[-2:])  # [B|1, 1, T, S]
      expected = expected.reshape((1,) * (4 - expected.ndim) + expected.shape)
      chex.assert_trees_all_equal(np.broadcast_to(dense, expected.shape), expected)

  def _check_band_probabilities(self, mask, size, far_delta):
    """Allowed fraction at distance 1 and 3 (0.5 exp(-0.3 d)) and beyond 40 (the floor)."""
    rows, cols = mask.nonzero()
    dist = np.abs(rows - cols)
    for d in (1, 3):
      frac = np.sum(dist == d) / (2 * (size - d))
      self.assertAlmostEqual(frac, 0.5 * np.exp(-0.3 * d), delta=0.03)
    far = dist > 40
    cells = size * size - np.sum(np.minimum(size, np.arange(size) + 41) -
                                 np.maximum(0, np.arange(size) - 40))
    self.assertAlmostEqual(far.sum() / cells, 2e-4, delta=far_delta)
    return rows, dist

  def test_traced_builder_arguments_say_masks_are_built_on_the_host(self):
    note = r"traced under jax.jit, and masks are built on the host"
    for build, arg in ((lambda n: masks.causal(n, 8), jnp.int32(8)),
                       (masks.document, jnp.zeros(8, jnp.int32)),
                       (masks.from_dense, jnp.ones((8, 8), bool)),
                       (masks.tree, jnp.full(8, -1, jnp.int32))):
      with self.assertRaisesRegex(ValueError, note):
        jax.jit(build)(arg)

  def test_random_banded_statistics(self):
    size = 2048
    mask = masks.random_banded(size, size, seed=3)
    rows, dist = self._check_band_probabilities(mask, size, far_delta=0.3e-4)
    self.assertTrue(np.all(np.bincount(rows[dist == 0], minlength=size) == 1))

  def test_random_banded_symmetric_statistics(self):
    size = 2048
    mask = masks.random_banded(size, size, seed=4, symmetric=True)
    dense = mask.to_dense()
    np.testing.assert_array_equal(dense, dense.T)
    self.assertTrue(np.all(np.diag(dense)))
    # Each pair drawn once: probability p, not 1 - (1 - p)^2.
    self._check_band_probabilities(mask, size, far_delta=0.4e-4)
    with self.assertRaisesRegex(ValueError, "kv_len=200"):
      masks.random_banded(300, 200, symmetric=True)

  def test_random_banded_deterministic(self):
    a = masks.random_banded(300, 200, seed=7).to_dense()
    chex.assert_trees_all_equal(a, masks.random_banded(300, 200, seed=7).to_dense())
    self.assertFalse(np.array_equal(a, masks.random_banded(300, 200, seed=8).to_dense()))
    self.assertTrue(np.all(a.any(axis=1)))  # T > S: rows past S keep key S - 1
    self.assertTrue(np.all(a[200:, 199]))


class CombinationTest(parameterized.TestCase):

  def test_and_or_broadcast_leading_dims(self):
    rng = _rng("combine")
    ids = rng.integers(0, 3, (2, T))
    doc = masks.document((ids, _sorted_ids(rng, (2, S), 3)), causal=False)  # (2, 1, T, S)
    heads = masks.from_dense(rng.random((1, 3, T, S)) < 0.4)  # (1, 3, T, S)
    window = masks.sliding_window(T, S, 7, 3)  # (T, S)
    for combined, op in ((doc & heads & window, np.logical_and),
                         (doc | heads | window, np.logical_or)):
      chex.assert_shape(combined.to_dense(), (2, 3, T, S))
      expected = op(op(doc.to_dense(), heads.to_dense()), window.to_dense())
      chex.assert_trees_all_equal(combined.to_dense(), expected)
      self.assertAlmostEqual(combined.density, expected.mean(), places=12)
      for block_q, block_kv in BLOCKS:
        chex.assert_trees_all_equal(np.asarray(combined.block_kinds(block_q, block_kv)),
                                    brute.kinds(expected, block_q, block_kv))

  @parameterized.named_parameters(
      ("causal_and_document", lambda ids: masks.causal(T, T, 2) & masks.document(ids, False),
       True),
      ("window_and_prefix_lm_full", lambda ids: masks.full(T, T) & masks.prefix_lm(ids, 2),
       True),
      ("same_documents", lambda ids: masks.document(ids) & masks.document(ids, False), True),
      ("window_and_dilation_one", lambda ids: masks.sliding_window(T, T, 3) &
       masks.dilated(T, T, 5, 1), True),
      ("overlapping_band_union", lambda ids: masks.causal(T, T) |
       masks.sliding_window(T, T, 0, 4), True),
      ("prefix_lm_and_causal", lambda ids: masks.prefix_lm(ids, 3) & masks.causal(T, T),
       False),
      ("two_different_documents", lambda ids: masks.document(ids) &
       masks.document(ids[::-1]), False),
      ("disjoint_bands", lambda ids: masks.causal(T, T, -9) |
       masks.sliding_window(T, T, 0, 4), False),
      ("empty_band_intersection", lambda ids: masks.causal(T, T, -9) &
       masks.sliding_window(T, T, 0, 4), False),
      ("tree_and_causal", lambda ids: masks.tree(np.arange(T) - 1) & masks.causal(T, T),
       False),
  )
  def test_rule_of_combination(self, build, computable):
    ids = _sorted_ids(_rng("rule of combination"), T, 4)
    mask = build(ids)
    self.assertEqual(mask.rule() is not None, computable)
    expected = mask.a.to_dense() & mask.b.to_dense() if isinstance(
        mask, masks.AndMask) else mask.a.to_dense() | mask.b.to_dense()
    chex.assert_trees_all_equal(mask.to_dense(), expected)
    if computable:
      rule = mask.rule()
      dense = rule.evaluate(np.arange(T), np.arange(T), xp=np)
      chex.assert_trees_all_equal(dense.reshape(expected.shape), expected)
    chex.assert_trees_all_equal(np.asarray(mask.block_kinds(16, 32)),
                                brute.kinds(expected, 16, 32))

  def test_and_rules_keeps_segments_of_one_side(self):
    ids = np.array([[0, 0, 1, 1, 1]], np.int32)
    a = rule_lib.ElementRule(rule_lib.Band(None, 0), ids, ids)
    merged = masks.masks.and_rules(a, rule_lib.ElementRule(rule_lib.Band(-2, 5)))
    self.assertEqual(merged.band, rule_lib.Band(-2, 0))
    self.assertIs(merged.q_segment_ids, ids)


class ValidationTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("zero_length", lambda: masks.full(0, 4), "q_len"),
      ("float_length", lambda: masks.causal(4.0, 4), "q_len"),
      ("negative_left", lambda: masks.sliding_window(8, 8, -1), "left"),
      ("negative_right", lambda: masks.sliding_window(8, 8, 2, -3), "right"),
      ("negative_window", lambda: masks.dilated(8, 8, -1, 2), "window"),
      ("zero_dilation", lambda: masks.dilated(8, 8, 2, 0), "dilation"),
      ("parents_out_of_range", lambda: masks.tree([-1, 0, 3]), "parents"),
      ("parents_below_minus_one", lambda: masks.tree([-2, 0]), "parents"),
      ("parents_rank_3", lambda: masks.tree(np.zeros((1, 1, 3), int)), "parents"),
      ("float_segment_ids", lambda: masks.document(np.ones(4)), "dtype"),
      ("segment_ids_rank_3", lambda: masks.document(np.ones((1, 2, 3), int)), "shape"),
      ("segment_batches_differ", lambda: masks.document(
          (np.ones((2, 4), int), np.ones((3, 4), int))), "batch"),
      ("segment_tuple_of_three", lambda: masks.document((np.ones(3, int),) * 3), "tuple"),
      ("negative_prefix", lambda: masks.prefix_lm(np.zeros(4, int), -1), "prefix_lengths"),
      ("prefix_table_too_short", lambda: masks.prefix_lm(np.arange(4), [1, 1]),
       "prefix_lengths"),
      ("prefix_rows_differ", lambda: masks.prefix_lm(np.zeros((2, 4), int),
                                                      np.ones((3, 1), int)), "rows"),
      ("global_id_out_of_range", lambda: masks.global_tokens(8, 8, 1, [8]), "global_ids"),
      ("random_floor_above_peak", lambda: masks.random_banded(8, 8, floor=0.9), "floor"),
      ("from_dense_not_bool", lambda: masks.from_dense(np.ones((4, 4))), "dtype"),
      ("from_dense_rank_3", lambda: masks.from_dense(np.ones((1, 4, 4), bool)), "shape"),
      ("and_different_lengths", lambda: masks.full(4, 4) & masks.full(4, 5), "differ"),
      ("and_lead_mismatch", lambda: masks.from_dense(np.ones((2, 1, 4, 4), bool)) &
       masks.from_dense(np.ones((3, 1, 4, 4), bool)), "broadcast"),
      ("dense_tile_backwards", lambda: masks.full(4, 4).dense_tile(3, 2, 0, 1), "q1"),
      ("dense_tile_negative", lambda: masks.full(4, 4).dense_tile(0, 2, -1, 1), "k0"),
  )
  def test_raises_value_error(self, build, words):
    with self.assertRaisesRegex(ValueError, words):
      build()


if __name__ == "__main__":
  absltest.main()
