"""flashjax.workloads: benchmark input sets, their decode bytes and the decode error check."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from flashjax import workloads
from flashjax.ops.decode.reference import decode_reference

_SHAPE = dict(batch=8, kv_len=64, num_heads=4, num_kv_heads=4, head_dim=16)


def _decode_inputs(**overrides):
  kwargs = dict(_SHAPE, dtype="float32", groups=2, num_sets=2, seed=0, ragged=True,
                chunk_bytes=1000.0)
  kwargs.update(overrides)
  return workloads.decode_inputs(**kwargs)


def _numpy_decode(q, k, v, lengths, heads):
  """float64 numpy decode attention: unselected KV groups and empty rows give zeros."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, nq, d = q.shape
  nkv = k.shape[2]
  out = np.zeros_like(q)
  for i in range(b):
    for h in range(nq):
      g = h // (nq // nkv)
      if g not in heads[i] or lengths[i] == 0:
        continue
      logits = k[i, :lengths[i], g] @ q[i, h] / np.sqrt(d)
      p = np.exp(logits - logits.max())
      out[i, h] = p @ v[i, :lengths[i], g] / p.sum()
  return out


class HelpersTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{density=}_{nkv=}", density, nkv, want)
      for density, nkv, want in ((1.0, 8, 8), (0.75, 8, 6), (0.5, 8, 4), (0.25, 8, 2),
                                 (0.25, 32, 8), (0.5, 2, 1), (0.01, 8, 1), (0.3, 5, 2)))
  def test_num_groups(self, density, nkv, want):
    self.assertEqual(workloads.num_groups(density, nkv), want)

  def test_num_groups_rejects_densities_outside_the_unit_interval(self):
    for bad in (0.0, 1.5, -0.2):
      with self.assertRaisesRegex(ValueError, f"head_density={bad}"):
        workloads.num_groups(bad, 8)

  def test_samples(self):
    rng = np.random.default_rng(0)
    heads = workloads.sample_head_indices(rng, 64, 8, 3)
    chex.assert_shape(heads, (64, 3))
    self.assertTrue(np.all(np.diff(heads, axis=1) > 0))  # distinct, ascending
    self.assertTrue(np.all((heads >= 0) & (heads < 8)))
    self.assertGreater(len({tuple(r) for r in heads}), 10)  # random per sequence
    lengths = workloads.sample_lengths(rng, 256, 100, ragged=True)
    self.assertEqual((lengths.min() >= 50, lengths.max() <= 100), (True, True))
    self.assertGreater(len(set(lengths.tolist())), 20)
    np.testing.assert_array_equal(workloads.sample_lengths(rng, 3, 100, ragged=False),
                                  [100, 100, 100])
    with self.assertRaisesRegex(ValueError, "groups=9"):
      workloads.sample_head_indices(rng, 4, 8, 9)

  @parameterized.parameters((12, 10.0, 45.0, 4), (7, 10.0, 45.0, 1), (8, 10.0, 1.0, 1),
                            (12, 10.0, 1000.0, 12), (30, 3.0, 31.0, 10))
  def test_chunk_rows(self, batch, row_bytes, limit, want):
    got = workloads.chunk_rows(batch, row_bytes, limit)
    self.assertEqual(got, want)
    self.assertEqual(batch % got, 0)

  def test_check_row_ids(self):
    self.assertIsNone(workloads.check_row_ids(8, None))
    self.assertIsNone(workloads.check_row_ids(8, 8))
    self.assertEqual(workloads.check_row_ids(256, 8), (0, 36, 73, 109, 146, 182, 219, 255))
    self.assertEqual(workloads.check_row_ids(5, 1), (0,))
    for bad in (0, 2.5, True):
      with self.assertRaisesRegex(ValueError, "check_rows="):
        workloads.check_row_ids(8, bad)

  def test_nbytes(self):
    shapes = (jax.ShapeDtypeStruct((3, 5), jnp.bfloat16), jnp.zeros((7,), jnp.int32))
    self.assertEqual(workloads.nbytes(shapes), 3 * 5 * 2 + 7 * 4)


class AttentionInputsTest(absltest.TestCase):

  def test_shapes_dtype_and_fresh_sets(self):
    sets = workloads.attention_inputs(batch=2, q_len=8, kv_len=12, num_heads=4,
                                      num_kv_heads=2, head_dim=16, dtype="bfloat16",
                                      num_sets=3, seed=1, with_dout=True)
    self.assertLen(sets, 3)
    q, k, v, dout = sets[0]
    chex.assert_shape([q, dout], (2, 8, 4, 16))
    chex.assert_shape([k, v], (2, 12, 2, 16))
    self.assertEqual({x.dtype for x in sets[0]}, {jnp.dtype(jnp.bfloat16)})
    self.assertAlmostEqual(float(jnp.std(k.astype(jnp.float32))), 1.0, delta=0.15)
    self.assertGreater(float(jnp.max(jnp.abs(sets[0][0] - sets[1][0]))), 0.1)
    again = workloads.attention_inputs(batch=2, q_len=8, kv_len=12, num_heads=4,
                                       num_kv_heads=2, head_dim=16, dtype="bfloat16",
                                       num_sets=1, seed=1)
    self.assertLen(again[0], 3)  # no dout
    chex.assert_trees_all_equal(again[0], sets[0][:3])
    with self.assertRaisesRegex(ValueError, "num_sets=0"):
      workloads.attention_inputs(batch=1, q_len=8, kv_len=8, num_heads=1, num_kv_heads=1,
                                 head_dim=8, dtype="float32", num_sets=0, seed=0)


class DecodeInputsTest(absltest.TestCase):

  def test_inputs_are_fresh_per_set(self):
    sets = _decode_inputs()
    (q0, k0, v0, len0, heads0), (_, k1, _, len1, heads1) = sets
    chex.assert_shape([k0, v0], (8, 64, 4, 16))
    chex.assert_shape(q0, (8, 4, 16))
    chex.assert_shape(heads0, (8, 2))
    self.assertEqual(k0.dtype, jnp.float32)
    self.assertGreater(float(jnp.std(k0)), 0.5)
    self.assertGreater(float(jnp.max(jnp.abs(k0 - k1))), 0.1)
    self.assertGreater(float(jnp.max(jnp.abs(k0 - v0))), 0.1)
    self.assertFalse(np.array_equal(heads0, heads1) and np.array_equal(len0, len1))
    again = _decode_inputs(num_sets=1)[0]
    chex.assert_trees_all_equal(again, sets[0])  # same seed, same inputs
    dense = _decode_inputs(groups=None, num_sets=1)[0]
    self.assertLen(dense, 4)  # no head_indices

  def test_chunking_does_not_change_the_values_shapes(self):
    small, large = _decode_inputs(chunk_bytes=1.0), _decode_inputs(chunk_bytes=1e9)
    chex.assert_trees_all_equal_shapes(small, large)
    # Lengths and groups come from numpy, independent of the chunking.
    np.testing.assert_array_equal(small[1][3], large[1][3])
    np.testing.assert_array_equal(small[1][4], large[1][4])

  def test_shapes_match_the_inputs(self):
    shapes = workloads.decode_input_shapes(dtype="bfloat16", groups=3, **_SHAPE)
    inputs = _decode_inputs(dtype="bfloat16", groups=3, num_sets=1)[0]
    self.assertEqual([(s.shape, s.dtype) for s in shapes],
                     [(x.shape, x.dtype) for x in inputs])
    self.assertEqual(workloads.nbytes(shapes), workloads.nbytes(inputs))

  def test_kv_bytes_of_sets(self):
    sets = _decode_inputs()
    read, dense = workloads.decode_kv_bytes_of_sets(sets, 4, 16, "float32")
    per_entry = 2 * 4 * 16  # K and V, float32, D = 16
    want_read = np.mean([per_entry * 2 * np.sum(np.asarray(s[3])) for s in sets])
    want_dense = np.mean([per_entry * 4 * np.sum(np.asarray(s[3])) for s in sets])
    self.assertAlmostEqual(read, want_read)
    self.assertAlmostEqual(dense, want_dense)


class DecodeErrorTest(absltest.TestCase):

  def test_reference_agrees_with_numpy(self):
    q, k, v, lengths, heads = _decode_inputs(num_sets=1)[0]
    want = _numpy_decode(q, k, v, np.asarray(lengths), np.asarray(heads))
    got = decode_reference(q, k, v, lengths, head_indices=heads)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)

  def test_error_check_reads_every_row(self):
    inputs = _decode_inputs(batch=4, num_kv_heads=2, groups=1, num_sets=1)[0]
    want = decode_reference(*inputs[:4], head_indices=inputs[4])
    self.assertLess(float(workloads.decode_max_abs_err(want, inputs, rows=1)), 1e-6)
    wrong = want.at[3, 1, 5].add(0.25)  # the last chunk only
    for rows in (1, 2, 4):
      self.assertAlmostEqual(float(workloads.decode_max_abs_err(wrong, inputs, rows=rows)),
                             0.25, places=5)
    # Ignoring head_indices (computing every group) is caught: unselected heads must be 0.
    dense = decode_reference(*inputs[:4])
    self.assertGreater(float(workloads.decode_max_abs_err(dense, inputs, rows=2)), 0.1)
    nan = want.at[0, 0, 0].set(jnp.nan)
    self.assertTrue(np.isnan(float(workloads.decode_max_abs_err(nan, inputs, rows=2))))
    # A row subset sees only its rows.
    for select, err in (((0, 3), 0.25), ((0, 1, 2), 0.0)):
      got = workloads.decode_max_abs_err(wrong, inputs, rows=1, select=select)
      self.assertAlmostEqual(float(got), err, places=5)
    with self.assertRaisesRegex(ValueError, "rows=3"):
      workloads.decode_max_abs_err(want, inputs, rows=3)


class SparseMLPInputsTest(absltest.TestCase):

  def test_num_selected_rounds_up_to_the_bucket(self):
    self.assertEqual(workloads.sparse_mlp_num_selected(0.05, 16384), 896)
    self.assertEqual(workloads.sparse_mlp_num_selected(1.0, 16384), 16384)
    self.assertEqual(workloads.sparse_mlp_num_selected(0.001, 512), 128)
    self.assertEqual(workloads.sparse_mlp_num_selected(0.3, 1000, bucket=64), 320)
    self.assertEqual(workloads.sparse_mlp_num_selected(0.99, 1000, bucket=64), 1000)
    with self.assertRaisesRegex(ValueError, "density=0"):
      workloads.sparse_mlp_num_selected(0, 512)

  def test_weights_scale_and_shapes(self):
    w = workloads.sparse_mlp_weights(d_model=64, d_ff=1024, dtype="float32", seed=3)
    chex.assert_shape([w["w1"], w["w2"]], (1024, 64))
    chex.assert_shape(w["b1"], (1024,))
    chex.assert_shape(w["b2"], (64,))
    self.assertAlmostEqual(float(jnp.std(w["w1"])), 64 ** -0.5, delta=0.01)
    self.assertAlmostEqual(float(jnp.std(w["w2"])), 1024 ** -0.5, delta=0.002)
    self.assertAlmostEqual(float(jnp.std(w["b1"])), 0.1, delta=0.01)
    # relu(x w1^T + b1) w2 + b2 of a standard normal x has outputs of scale O(1).
    x = workloads.sparse_mlp_input(batch=256, d_model=64, dtype="float32", seed=3, index=0)
    out = np.maximum(np.asarray(x) @ np.asarray(w["w1"]).T + np.asarray(w["b1"]), 0)
    out = out @ np.asarray(w["w2"]) + np.asarray(w["b2"])
    self.assertBetween(float(np.std(out)), 0.3, 1.5)
    bf16 = workloads.sparse_mlp_weights(d_model=64, d_ff=1024, dtype="bfloat16", seed=3)
    self.assertEqual(bf16["w1"].dtype, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(bf16["w1"], np.float32), w["w1"], atol=1e-2)

  def test_inputs_differ_per_index(self):
    x0, x1 = (workloads.sparse_mlp_input(batch=4, d_model=8, dtype="float32", seed=0,
                                         index=i) for i in (0, 1))
    chex.assert_shape(x0, (4, 8))
    self.assertGreater(float(jnp.max(jnp.abs(x0 - x1))), 0.1)

  def test_spread_rows(self):
    np.testing.assert_array_equal(workloads.spread_rows(1, 8), [0])
    np.testing.assert_array_equal(workloads.spread_rows(5, 8), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(workloads.spread_rows(256, 8),
                                  [0, 36, 73, 109, 146, 182, 219, 255])
    with self.assertRaisesRegex(ValueError, "count=0"):
      workloads.spread_rows(4, 0)


if __name__ == "__main__":
  absltest.main()
