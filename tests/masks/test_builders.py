"""BlockMask builders (host and device), block_mask_for and expand_block_mask."""

from __future__ import annotations

import gc
import time
import weakref
import zlib

import chex
import jax
import numpy as np
import pytest
from absl.testing import absltest, parameterized

from flashjax import masks
from flashjax.masks import EMPTY, FULL, PARTIAL, BlockMask, builders
from flashjax.masks.rule import Band, ElementRule
from tests.masks import brute

T, S = 77, 100


def _rng(name: str) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32(name.encode()))


def _as4d(x: np.ndarray) -> np.ndarray:
  return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _named(**values):
  ((key, items),) = values.items()
  return [{"testcase_name": f"{key}={v!r}", key: v} for v in items]


def _host_masks(name: str) -> masks.Mask:
  rng = _rng(name)
  ids = np.sort(rng.integers(0, 5, T))
  kv_ids = np.sort(rng.integers(0, 5, S))
  return {
      "causal": lambda: masks.causal(T, S, 5),
      "window": lambda: masks.sliding_window(T, S, 9, 2),
      "document_batched": lambda: masks.document((rng.integers(0, 3, (2, T)),
                                                  rng.integers(0, 3, (2, S)))),
      "prefix_lm": lambda: masks.prefix_lm((ids, kv_ids), 4),
      "tree": lambda: masks.tree(np.r_[-1, rng.integers(-1, 30, T - 1)]),
      "dilated": lambda: masks.dilated(T, S, 4, 3),
      "global_tokens": lambda: masks.global_tokens(T, S, 3, [5, 60]),
      "random_banded": lambda: masks.random_banded(T, S, seed=1, floor=0.01),
      "dense_heads": lambda: masks.from_dense(rng.random((1, 2, T, S)) < 0.3),
      "union": lambda: masks.causal(T, T, -20) | masks.tree(np.arange(T) // 2),
      "dense_and_document": lambda: masks.from_dense(rng.random((T, S)) < 0.5) &
                                    masks.document((ids, kv_ids)),
  }[name]()


HOST_MASKS = ("causal", "window", "document_batched", "prefix_lm", "tree", "dilated",
              "global_tokens", "random_banded", "dense_heads", "union",
              "dense_and_document")


def check_block_mask(test: parameterized.TestCase, bm: BlockMask, dense: np.ndarray, *,
                     tight: bool, exact: bool = True) -> None:
  """Every field of `bm` against the dense mask [..., T, S] it should describe."""
  dense = _as4d(np.asarray(dense))
  bq, bk = bm.block_q, bm.block_kv
  kinds = np.asarray(bm.kinds)
  want = np.broadcast_to(brute.kinds(dense, bq, bk), kinds.shape)
  test.assertEqual(bm.shape, kinds.shape[:2] + dense.shape[2:])
  test.assertEqual(kinds.dtype, np.int8)
  if exact:
    chex.assert_trees_all_equal(kinds, want)
  else:  # never EMPTY with an allowed element, never FULL with a disallowed one
    test.assertTrue(np.all((kinds != EMPTY) | (want == EMPTY)))
    test.assertTrue(np.all((kinds != FULL) | (want == FULL)))
  expanded = np.asarray(builders.expand_block_mask(bm))
  chex.assert_trees_all_equal(expanded, np.broadcast_to(dense, bm.shape))
  tiles = None if bm.tiles is None else np.asarray(bm.tiles)
  for direction, grid in (("fwd", kinds), ("bwd", kinds.swapaxes(2, 3))):
    count, block, kind, tile = (np.asarray(getattr(bm, f"{direction}_{n}"))
                                for n in ("count", "block", "kind", "tile"))
    nonempty = grid != EMPTY
    length = max(1, int(nonempty.sum(-1).max())) if tight else grid.shape[-1]
    chex.assert_shape([block, kind, tile], grid.shape[:3] + (length,))
    chex.assert_trees_all_equal(count, nonempty.sum(-1).astype(np.int32))
    valid = np.arange(length) < count[..., None]
    # Valid slots list every non-empty tile with its kind, in ascending order.
    rebuilt = np.zeros_like(grid)
    idx = np.nonzero(valid)
    rebuilt[idx[:3] + (block[idx],)] = kind[idx]
    chex.assert_trees_all_equal(rebuilt, grid)
    test.assertTrue(np.all(np.diff(block, axis=-1)[valid[..., 1:]] > 0))
    # Padding slots repeat the last valid block id (0 in empty rows), kind 0, tile 0.
    last = np.take_along_axis(block, np.maximum(count - 1, 0)[..., None], -1)
    last = np.where(count[..., None] > 0, last, 0)
    chex.assert_trees_all_equal(np.where(valid, block, last), block)
    test.assertTrue(np.all(kind[~valid] == 0) and np.all(tile[~valid] == 0))
    if direction == "fwd" and tiles is not None and bm.rule is None:
      b, n, r, slot = np.nonzero(valid & (kind == PARTIAL))
      pad = np.broadcast_to(brute.padded(dense, bq, bk), bm.shape[:2] + (
          grid.shape[2] * bq, grid.shape[3] * bk))
      pad = pad.reshape(*bm.shape[:2], grid.shape[2], bq, grid.shape[3], bk)
      chex.assert_trees_all_equal(tiles[tile[b, n, r, slot]],
                                  pad[b, n, r, :, block[b, n, r, slot], :])
  test.assertAlmostEqual(float(bm.block_density), float(np.mean(want != EMPTY)) if exact
                         else float(np.mean(kinds != EMPTY)), places=6)
  if bm.density is not None:
    test.assertAlmostEqual(float(bm.density), float(dense.mean()), places=5)


class HostBuilderTest(parameterized.TestCase):

  @parameterized.named_parameters(_named(name=HOST_MASKS))
  def test_matches_brute_force(self, name):
    mask = _host_masks(name)
    dense = mask.to_dense()
    for block_q, block_kv in ((16, 32), (32, 16)):
      bm = BlockMask.from_mask(mask, block_q, block_kv)
      check_block_mask(self, bm, dense, tight=True)
      self.assertEqual(bm.rule is None, mask.rule() is None)
      self.assertEqual(bm.tiles is None, mask.rule() is not None)
      overhang = np.zeros(bm.kinds.shape[2:], bool)
      overhang[-1, :] |= T % block_q != 0
      overhang[:, -1] |= S % block_kv != 0
      self.assertFalse(np.any(bm.kinds[..., overhang] == FULL))

  def test_tiles_deduplicated(self):
    mask = masks.dilated(256, 256, 30, 4)  # every diagonal tile repeats
    bm = BlockMask.from_mask(mask, 16, 16)
    partial = int(np.sum(bm.kinds == PARTIAL))
    self.assertLess(bm.tiles.shape[0], partial // 4)
    flat = bm.tiles.reshape(bm.tiles.shape[0], -1)
    self.assertLen(np.unique(flat, axis=0), flat.shape[0])
    check_block_mask(self, bm, mask.to_dense(), tight=True)

  def test_all_partial_tiles_of_full_or_empty_blocks(self):
    mask = masks.from_dense(np.kron(np.eye(4, dtype=bool), np.ones((16, 16), bool)))
    bm = BlockMask.from_mask(mask, 16, 16)
    self.assertIsNone(bm.tiles)  # no partial tile to store
    check_block_mask(self, bm, mask.to_dense(), tight=True)

  def test_cache_per_mask_and_blocks(self):
    mask = masks.tree(np.arange(64) - 1)
    bm = BlockMask.from_mask(mask, 16, 32)
    self.assertIs(BlockMask.from_mask(mask, 16, 32), bm)
    self.assertIsNot(BlockMask.from_mask(mask, 32, 16), bm)
    self.assertIsNot(BlockMask.from_mask(masks.tree(np.arange(64) - 1), 16, 32), bm)
    ref = weakref.ref(mask)
    del mask
    gc.collect()
    self.assertIsNone(ref())  # the cache does not keep masks alive

  def test_block_density_and_density_of_causal(self):
    bm = BlockMask.from_mask(masks.causal(128, 128), 32, 32)
    self.assertAlmostEqual(float(bm.block_density), 10 / 16)
    self.assertAlmostEqual(float(bm.density), (128 * 129 / 2) / 128**2)
    self.assertEqual(int(np.sum(bm.kinds == FULL)), 6)

  def test_invalid_arguments(self):
    with self.assertRaisesRegex(ValueError, "block_q"):
      BlockMask.from_mask(masks.full(8, 8), 0, 8)
    with self.assertRaisesRegex(ValueError, "Mask"):
      BlockMask.from_mask(np.ones((8, 8), bool), 8, 8)
    with self.assertRaisesRegex(ValueError, "reorder"):
      BlockMask.from_mask(masks.full(8, 8), 8, 8, reorder="amd")


class _RuleBuilderChecks(parameterized.TestCase):

  def _check_rule_builder(self, band, sorted_ids, prefix):
    rng = _rng(f"rule {band} {sorted_ids} {prefix}")
    ids = rng.integers(0, 4, (2, T))
    if sorted_ids:
      ids = np.sort(ids, axis=-1)
    in_prefix = rng.random((2, T)) < 0.3 if prefix else None
    build = jax.jit(lambda q, kv, pre: builders.block_mask_from_rule(
        ElementRule(band, q, kv, pre), T, T, 16, 32))
    bm = build(ids, ids, in_prefix)
    host = masks.RuleMask(T, T, ElementRule(band, ids.astype(np.int32), ids.astype(np.int32),
                                            in_prefix), batched=True)
    dense = host.to_dense()
    # Sorted self-attention ids under a causal or unbounded band classify exactly.
    exact = sorted_ids and band.lo is None
    check_block_mask(self, bm, dense, tight=False, exact=exact)
    self.assertIsNone(bm.tiles)
    self.assertAlmostEqual(float(bm.density), host.density, places=6)


class DeviceBuilderTest(_RuleBuilderChecks):

  @parameterized.named_parameters(
      ("causal_sorted_prefix", Band(None, 0), True, True),
      ("window_random_ids", Band(-6, 3), False, False),
  )
  def test_rule_builder(self, band, sorted_ids, prefix):
    self._check_rule_builder(band, sorted_ids, prefix)

  def test_dense_builder(self):
    rng = _rng("dense builder")
    dense = rng.random((2, 1, T, S)) < 0.3
    dense[0, 0, :32, :32] = True  # some FULL tiles
    bm = jax.jit(lambda m: builders.block_mask_from_dense(m, 16, 32))(dense)
    check_block_mask(self, bm, dense, tight=False)
    host = BlockMask.from_mask(masks.from_dense(dense), 16, 32)
    chex.assert_trees_all_equal(np.asarray(bm.kinds), host.kinds)
    nq, nk = -(-T // 16), -(-S // 32)
    chex.assert_shape(bm.tiles, (2 * nq * nk, 16, 32))
    count, block, tile = (np.asarray(getattr(bm, f"fwd_{n}")) for n in ("count", "block",
                                                                         "tile"))
    b, n, qb, slot = np.nonzero(np.arange(block.shape[-1]) < count[..., None])
    self.assertGreater(b.size, 0)
    flat_id = ((b + n) * nq + qb) * nk + block[b, n, qb, slot]  # Nm == 1
    chex.assert_trees_all_equal(tile[b, n, qb, slot], flat_id.astype(np.int32))


@pytest.mark.slow
class DeviceBuilderSlowTest(_RuleBuilderChecks):

  @parameterized.named_parameters(
      ("causal_sorted", Band(None, 0), True, False),
      ("unbounded_sorted", Band(), True, False),
      ("causal_random_ids_prefix", Band(None, 0), False, True),
  )
  def test_rule_builder_more_bands(self, band, sorted_ids, prefix):
    self._check_rule_builder(band, sorted_ids, prefix)


# Traced combinations whose device compilation is redundant with the CI ones: slow only.
_SLOW_TRACED = {("none", False, True), ("array", False, True), ("array", True, False),
                ("mask", True, True), ("block_mask", False, True), ("block_mask", True, False)}


def _for_cases(slow: bool):
  """block_mask_for cases: mask kind x is_causal x segment ids x traced."""
  cases = []
  for mask_kind in ("none", "mask", "array", "block_mask"):
    for is_causal in (False, True):
      for segments in (False, True):
        for traced in (False, True):
          if (mask_kind, is_causal, segments, traced) == ("none", False, False, True):
            continue
          if slow == (traced and (mask_kind, is_causal, segments) in _SLOW_TRACED):
            cases.append({"testcase_name": f"{mask_kind=}_{is_causal=}_{segments=}_{traced=}",
                          "mask_kind": mask_kind, "is_causal": is_causal,
                          "segments": segments, "traced": traced})
  return cases


class _ForChecks(parameterized.TestCase):

  def _inputs(self, name):
    rng = _rng(name)
    q_ids = np.sort(rng.integers(0, 4, (2, T)), axis=-1).astype(np.int32)
    kv_ids = np.sort(rng.integers(0, 4, (2, S)), axis=-1).astype(np.int32)
    dense = rng.random((1, 2, T, S)) < 0.5
    return q_ids, kv_ids, dense

  def _expected(self, mask_dense, is_causal, q_ids, kv_ids):
    out = np.ones((1, 1, T, S), bool) if mask_dense is None else _as4d(mask_dense)
    if is_causal:
      out = out & brute.causal(T, S)
    if q_ids is not None:
      out = out & (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]
    return out

  def _check_for(self, mask_kind, is_causal, segments, traced):
    q_ids, kv_ids, dense = self._inputs(f"{mask_kind} {is_causal} {segments}")
    dilated = masks.dilated(T, S, 6, 3)
    host_mask = masks.sliding_window(T, S, 20, 5) | masks.from_dense(dense[:1, :1])
    mask, mask_dense = {
        "none": (None, None),
        "mask": (dilated, dilated.to_dense()),
        "array": (dense, dense),
        "block_mask": (BlockMask.from_mask(host_mask, 16, 32), host_mask.to_dense()),
    }[mask_kind]
    if not segments:
      q_ids = kv_ids = None

    def build(mask, q_ids, kv_ids):
      return builders.block_mask_for(q_len=T, kv_len=S, block_q=16, block_kv=32, mask=mask,
                                     is_causal=is_causal, q_segment_ids=q_ids,
                                     kv_segment_ids=kv_ids)

    if traced:
      bm = jax.jit(build)(mask, q_ids, kv_ids) if mask_kind != "mask" else jax.jit(
          lambda q, kv: build(mask, q, kv))(q_ids, kv_ids)
    else:
      bm = build(mask, q_ids, kv_ids)
    expected = self._expected(mask_dense, is_causal, q_ids, kv_ids)
    # A BlockMask ANDed with more inputs has intersected (conservative) kinds; traced inputs
    # go through the device builders (untight lists; exact for a lone dense array).
    combined = mask_kind == "block_mask" and (is_causal or segments)
    device = traced and (segments or mask_kind == "array" or combined)
    exact = not combined and (not device or (mask_kind == "array" and not is_causal and
                                             not segments))
    check_block_mask(self, bm, expected, tight=not device, exact=exact)


class BlockMaskForTest(_ForChecks):

  @parameterized.named_parameters(_for_cases(slow=False))
  def test_and_of_all_inputs(self, mask_kind, is_causal, segments, traced):
    self._check_for(mask_kind, is_causal, segments, traced)

  def test_plain_masks_cached_by_shape(self):
    build = lambda: builders.block_mask_for(q_len=64, kv_len=64, block_q=16, block_kv=16,
                                            is_causal=True)
    self.assertIs(build(), build())
    mask = masks.tree(np.arange(64) - 1)
    build = lambda: builders.block_mask_for(q_len=64, kv_len=64, block_q=16, block_kv=16,
                                            mask=mask, is_causal=True)
    self.assertIs(build(), build())

  def test_traced_block_mask_with_two_segment_sources(self):
    q_ids, kv_ids, _ = self._inputs("two segment sources")
    doc = masks.document((q_ids[:, ::-1].copy(), kv_ids[:, ::-1].copy()), causal=False)
    bm = BlockMask.from_mask(doc, 16, 32)

    @jax.jit
    def build(bm, q, kv):
      return builders.block_mask_for(q_len=T, kv_len=S, block_q=16, block_kv=32, mask=bm,
                                     q_segment_ids=q, kv_segment_ids=kv)

    expected = doc.to_dense() & self._expected(None, False, q_ids, kv_ids)
    check_block_mask(self, build(bm, q_ids, kv_ids), expected, tight=False, exact=False)
    # A concrete BlockMask folds its rule into tiles on the host instead.
    out = jax.jit(lambda q, kv: builders.block_mask_for(
        q_len=T, kv_len=S, block_q=16, block_kv=32, mask=bm, q_segment_ids=q,
        kv_segment_ids=kv))(q_ids, kv_ids)
    self.assertIsNotNone(out.tiles)
    check_block_mask(self, out, expected, tight=False, exact=False)

  @parameterized.named_parameters(
      ("block_sizes_differ", dict(mask=BlockMask.from_mask(masks.causal(T, S), 32, 32)),
       "block_q=32"),
      ("mask_length", dict(mask=masks.causal(T, T)), "kv_len"),
      ("array_shape", dict(mask=np.ones((1, 1, T, T), bool)), "shape"),
      ("array_dtype", dict(mask=np.ones((1, 1, T, S), np.int32)), "dtype"),
      ("one_segment_array", dict(q_segment_ids=np.zeros((1, T), int)), "together"),
      ("segment_shape", dict(q_segment_ids=np.zeros((1, T), int),
                             kv_segment_ids=np.zeros((1, T), int)), "shape"),
      ("segment_batch_vs_mask", dict(mask=np.ones((3, 1, T, S), bool),
                                     q_segment_ids=np.zeros((2, T), int),
                                     kv_segment_ids=np.zeros((2, S), int)), "broadcast"),
      ("block_size_zero", dict(block_q=0), "block_q"),
  )
  def test_invalid(self, kwargs, words):
    args = dict(q_len=T, kv_len=S, block_q=16, block_kv=32) | kwargs
    with self.assertRaisesRegex(ValueError, words):
      builders.block_mask_for(**args)


@pytest.mark.slow
class BlockMaskForSlowTest(_ForChecks):

  @parameterized.named_parameters(_for_cases(slow=True))
  def test_and_of_all_inputs_more_traced(self, mask_kind, is_causal, segments, traced):
    self._check_for(mask_kind, is_causal, segments, traced)


class JitTest(parameterized.TestCase):

  def test_jit_function_taking_block_mask(self):
    mask = masks.random_banded(T, S, seed=5, floor=0.05) & masks.causal(T, S, 10)
    bm = BlockMask.from_mask(mask, 16, 32)

    @jax.jit
    def summary(bm):
      return (builders.expand_block_mask(bm).sum(), bm.fwd_count.sum(),
              bm.fwd_block[..., 0].sum(), bm)

    total, count, first, out = summary(bm)
    self.assertEqual(int(total), int(mask.to_dense().sum()))
    self.assertEqual(int(count), int(np.sum(bm.kinds != EMPTY)))
    self.assertEqual(int(first), int(bm.fwd_block[..., 0].sum()))
    self.assertEqual((out.shape, out.block_q, out.block_kv), (bm.shape, 16, 32))
    chex.assert_trees_all_equal(np.asarray(out.tiles), bm.tiles)

  def test_rule_band_is_static(self):
    bm = BlockMask.from_mask(masks.document(np.repeat(np.arange(4), 20)), 16, 16)
    leaves, treedef = jax.tree_util.tree_flatten(bm)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    self.assertEqual(rebuilt.rule.band, Band(None, 0))
    out = jax.jit(lambda bm: builders.expand_block_mask(bm))(bm)
    chex.assert_trees_all_equal(np.asarray(out)[0, 0], masks.document(
        np.repeat(np.arange(4), 20)).to_dense())


class TwinsTest(parameterized.TestCase):
  """The numpy and jax.numpy twins of the rule classification (flashjax.masks.masks) agree."""

  @parameterized.named_parameters(_named(seed=range(6)))
  def test_host_and_device_rule_classification_agree(self, seed):
    rng = np.random.default_rng(seed)
    lo = None if seed == 1 or rng.random() < 0.5 else int(rng.integers(-40, 0))
    hi = None if rng.random() < 0.3 else int(rng.integers(0, 30))
    sorted_ids, prefix = bool(seed % 2), seed % 3 == 0
    q_ids, kv_ids = rng.integers(0, 4, (2, T)), rng.integers(0, 4, (2, S))
    if sorted_ids:
      q_ids, kv_ids = np.sort(q_ids, axis=-1), np.sort(kv_ids, axis=-1)
    in_prefix = rng.random((2, S)) < 0.3 if prefix else None
    host_rule = ElementRule(Band(lo, hi), q_ids, kv_ids, in_prefix)
    device_rule = ElementRule(Band(lo, hi), jax.numpy.asarray(q_ids, np.int32),
                              jax.numpy.asarray(kv_ids, np.int32),
                              None if in_prefix is None else jax.numpy.asarray(in_prefix))
    chex.assert_trees_all_equal(
        np.asarray(masks.masks.device_rule_row_counts(device_rule, T, S), np.int64),
        masks.masks.rule_row_counts(host_rule, T, S))
    for block_q, block_kv in ((16, 32), (32, 16)):
      host = masks.masks.rule_block_kinds(host_rule, T, S, block_q, block_kv)
      device = np.asarray(masks.masks.device_rule_block_kinds(device_rule, T, S, block_q,
                                                              block_kv))
      self.assertEqual(device.shape, host.shape)
      # The device twin is conservative: EMPTY or FULL only where the host says so.
      self.assertTrue(np.all((device != EMPTY) | (host == EMPTY)))
      self.assertTrue(np.all((device != FULL) | (host == FULL)))
      if sorted_ids and lo is None and not prefix:
        chex.assert_trees_all_equal(device, host)


@pytest.mark.slow
class TimingTest(parameterized.TestCase):
  """Host build times of the design targets (printed; bounds generous for slow hosts)."""

  def _time(self, build):
    start = time.perf_counter()
    out = build()
    return out, time.perf_counter() - start

  def test_build_times(self):
    bm, seconds = self._time(lambda: BlockMask.from_mask(masks.causal(131072, 131072), 128,
                                                         128))
    print(f"causal 128k: {seconds:.3f} s")
    self.assertLess(seconds, 2.0)
    self.assertAlmostEqual(float(bm.block_density), 1025 / 2048, places=6)
    rng = np.random.default_rng(0)
    lengths = rng.geometric(1 / 512, 256)
    ids = np.repeat(np.arange(lengths.size), lengths)[:32768]
    bm, seconds = self._time(lambda: BlockMask.from_mask(masks.document(ids), 128, 128))
    print(f"document 32k (mean doc 512): {seconds:.3f} s")
    self.assertLess(seconds, 2.0)
    mask, seconds = self._time(lambda: masks.random_banded(16384, 16384))
    bm, seconds_bm = self._time(lambda: BlockMask.from_mask(mask, 128, 128))
    print(f"random_banded 16k: mask {seconds:.3f} s, BlockMask {seconds_bm:.3f} s")
    self.assertLess(seconds + seconds_bm, 10.0)


if __name__ == "__main__":
  absltest.main()
