"""flashjax.distributed: context-parallel attention on fake CPU devices.

tests/conftest.py gives a CPU run 8 host devices; the tests skip with fewer. Every case
checks the sharded result and its q / k / v gradients against the single-device
flashjax.dot_product_attention in float32.
"""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import flashjax
from flashjax import distributed, masks
from flashjax.distributed import context_parallel
from flashjax.distributed import layout as layout_lib
from flashjax.ops.attention import pallas_triton

B, T, NQ, NKV, D = 2, 64, 4, 2, 16


def _mesh(p, shape=None, names=("cp",)):
  devices = np.array(jax.devices()[:p if shape is None else int(np.prod(shape))])
  return Mesh(devices.reshape(shape or (p,)), names)


def _qkv(seed=0, t=T):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (B, t, NQ, D)), jax.random.normal(ks[1], (B, t, NKV, D)),
          jax.random.normal(ks[2], (B, t, NKV, D)))


def _random_block_mask(t, block, seed=3):
  """Per-head (1, Nq, T, T) random elements inside random `block` x `block` blocks (the
  diagonal blocks kept), so whole shard pairs drop."""
  n = t // block
  keep = np.random.default_rng(seed).random((n, n)) < 0.3
  keep |= np.eye(n, dtype=bool)
  dense = np.kron(keep, np.ones((block, block), bool)) & (
      np.random.default_rng(seed + 1).random((1, NQ, t, t)) < 0.7)
  return masks.from_dense(dense | np.eye(t, dtype=bool))


def _value_and_grads(attend, q, k, v, ids):
  """(out, (dq, dk, dv)) of sum(out * w) for a fixed random w, in one jit."""
  w = jax.random.normal(jax.random.key(9), q.shape)

  def loss(q, k, v, ids):
    out = attend(q, k, v, ids)
    return jnp.sum(out * w), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      q, k, v, ids)
  return out, grads


class ContextParallelTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if jax.device_count() < 8:
      self.skipTest(f"needs 8 devices, has {jax.device_count()} (tests/conftest.py sets 8 "
                    "fake CPU devices)")

  @parameterized.named_parameters(
      ("causal_ring_8", 8, "ring", dict(is_causal=True), "zigzag"),
      ("documents_ring_2", 2, "ring", dict(documents=True), "contiguous"),
      ("window_ring_4_of_2x4", 4, "ring", dict(mask=masks.sliding_window(T, T, 9, 2)),
       None),
      ("random_blocks_ring_4", 4, "ring",
       dict(mask=_random_block_mask(T, 16), layout="contiguous"), "contiguous"),
      ("causal_documents_allgather_4", 4, "allgather", dict(is_causal=True, documents=True),
       "zigzag"),
  )
  def test_matches_single_device(self, p, strategy, kwargs, layout):
    kwargs = dict(kwargs)
    force_layout = kwargs.pop("layout", None)
    q, k, v = _qkv()
    ids = None
    if kwargs.pop("documents", False):
      ids = np.repeat([[0, 1, 2, 3], [5, 5, 6, 7]], [10, 20, 30, 4], axis=1)
      if strategy == "ring":  # also as a batched Mask (B, 1, T, T): the two AND
        kwargs["mask"] = masks.document(ids, causal=False)
      ids = jnp.asarray(ids)
    if p == 4:  # a 2 x 4 mesh: the sequence axis is one of two
      mesh, axis = _mesh(p, (2, 4), ("data", "cp")), "cp"
    else:
      mesh, axis = _mesh(p), "cp"
    plan = distributed.plan_context_parallel(T, T, p, mask=kwargs.get("mask"),
                                             is_causal=kwargs.get("is_causal", False),
                                             strategy=strategy, layout=force_layout)
    self.assertEqual(plan.strategy, strategy)
    if layout is not None:
      self.assertEqual(plan.layout, layout)
    if force_layout:
      self.assertGreater(plan.skipped_pairs, 0)
    sharded = NamedSharding(mesh, PartitionSpec(None, axis))
    q, k, v = (jax.device_put(x, sharded) for x in (q, k, v))

    def sharded_attend(q, k, v, ids):
      return distributed.context_parallel_attention(q, k, v, mesh=mesh, axis_name=axis,
                                                    segment_ids=ids, strategy=strategy,
                                                    layout=force_layout,
                                                    **kwargs)

    def local_attend(q, k, v, ids):
      return flashjax.dot_product_attention(q, k, v, segment_ids=ids, **kwargs)

    out, grads = _value_and_grads(sharded_attend, q, k, v, ids)
    want, want_grads = _value_and_grads(local_attend, q, k, v, ids)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
    for name, got, expected in zip("qkv", grads, want_grads):
      np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=f"d{name}")

  @parameterized.named_parameters(
      ("causal_2", 2, dict(is_causal=True), "zigzag"),
      ("causal_documents_4", 4, dict(documents=True), "zigzag"),
      ("window_4_of_2x4", 4, dict(mask=masks.sliding_window(T, T, 9, 2)), None),
  )
  def test_pallas_triton_ring(self, p, kwargs, layout):
    # The ring on the Pallas Triton kernels (interpret mode on CPU): forward kernel per
    # block (its lse residual), backward dQ / dK/dV kernels per block from the global
    # lse / delta; equal to the single-device call.
    kwargs = dict(kwargs)
    q, k, v = _qkv(2)
    ids = None
    if kwargs.pop("documents", False):
      ids = jnp.asarray(np.repeat([[0, 1, 2, 3], [5, 5, 6, 7]], [10, 20, 30, 4], axis=1))
      kwargs["is_causal"] = True
    if p == 4:
      mesh, axis = _mesh(p, (2, 4), ("data", "cp")), "cp"
    else:
      mesh, axis = _mesh(p), "cp"
    plan = distributed.plan_context_parallel(T, T, p, mask=kwargs.get("mask"),
                                             is_causal=kwargs.get("is_causal", False),
                                             strategy="ring", implementation="pallas_triton")
    self.assertEqual(plan.strategy, "ring")
    if layout is not None:
      self.assertEqual(plan.layout, layout)
    triton = pallas_triton.PallasTriton
    counts = {"kernel_with_lse": 0, "backward_from_stats": 0}

    def counting(name):
      original = getattr(triton, name)

      @functools.wraps(original)
      def wrapper(*args, **kw):
        counts[name] += 1
        return original(*args, **kw)
      return wrapper

    def sharded_attend(q, k, v, ids):
      return distributed.context_parallel_attention(
          q, k, v, mesh=mesh, axis_name=axis, segment_ids=ids, strategy="ring",
          implementation="pallas_triton", interpret=True, **kwargs)

    def local_attend(q, k, v, ids):
      return flashjax.dot_product_attention(q, k, v, segment_ids=ids, **kwargs)

    with mock.patch.object(triton, "kernel_with_lse", counting("kernel_with_lse")), \
        mock.patch.object(triton, "backward_from_stats", counting("backward_from_stats")):
      out, grads = _value_and_grads(sharded_attend, q, k, v, ids)
    self.assertGreater(counts["kernel_with_lse"], 0)
    self.assertGreater(counts["backward_from_stats"], 0)
    want, want_grads = _value_and_grads(local_attend, q, k, v, ids)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
    for name, got, expected in zip("qkv", grads, want_grads):
      np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=f"d{name}")

  def test_ring_needs_lse_backend(self):
    q, k, v = _qkv()
    with self.assertRaisesRegex(NotImplementedError, "pallas_tpu"):
      distributed.context_parallel_attention(
          q, k, v, mesh=_mesh(2), axis_name="cp", is_causal=True, strategy="ring",
          implementation="pallas_tpu", interpret=True)
    with self.assertRaisesRegex(ValueError, "interpret=1"):
      distributed.context_parallel_attention(q, k, v, mesh=_mesh(2), axis_name="cp",
                                             interpret=1)

  def test_odd_local_length_and_auto_plan(self):
    # T = 24 over 8 devices: 3 rows each (no kernel tile divides it), zig-zag impossible.
    t = 24
    q, k, v = _qkv(1, t)
    mesh = _mesh(8)
    plan = distributed.plan_context_parallel(t, t, 8, is_causal=True)
    self.assertEqual((plan.strategy, plan.layout), ("allgather", "contiguous"))
    self.assertIn("divisible by 16", plan.reason)
    self.assertIn("ALLGATHER_MAX_LOCAL_LEN", plan.reason)
    self.assertEqual(plan.skipped_pairs, 8 * 7 // 2)
    want = flashjax.dot_product_attention(q, k, v, is_causal=True)
    out = distributed.context_parallel_attention(q, k, v, mesh=mesh, axis_name="cp",
                                                 is_causal=True, strategy="ring")
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
    programs = len(context_parallel._PROGRAMS)  # pylint: disable=protected-access
    distributed.context_parallel_attention(q, k, v, mesh=mesh, axis_name="cp",
                                           mask=masks.causal(t, t), strategy="ring")
    self.assertLen(context_parallel._PROGRAMS, programs)  # same plan: compiled once

  def test_plan_rules(self):
    long = distributed.plan_context_parallel(16384, 16384, 8, is_causal=True)
    self.assertEqual((long.strategy, long.layout), ("ring", "zigzag"))
    self.assertEqual(long.skipped_pairs, 0)  # zig-zag: every pair holds some work
    self.assertAlmostEqual(long.balance, 1.0)
    contiguous = distributed.plan_context_parallel(16384, 16384, 8, is_causal=True,
                                                   layout="contiguous")
    self.assertEqual(contiguous.skipped_pairs, 28)
    self.assertEqual(contiguous.compute_steps, 8)
    triton = distributed.plan_context_parallel(16384, 16384, 8,
                                               implementation="pallas_triton")
    self.assertEqual(triton.strategy, "ring")  # pallas_triton returns the log-sum-exp
    pallas = distributed.plan_context_parallel(16384, 16384, 8,
                                               implementation="pallas_mosaic_gpu")
    self.assertEqual(pallas.strategy, "allgather")
    self.assertIn("log-sum-exp", pallas.reason)
    self.assertEqual(pallas.layout, "contiguous")  # no mask: nothing to balance

  def test_load_balance(self):
    causal = masks.causal(1024, 1024)
    contiguous = distributed.load_balance(causal, 8)
    self.assertGreater(contiguous, 1.7)
    self.assertLess(contiguous, 2.0)
    self.assertEqual(distributed.load_balance(causal, 8, layout="zigzag"), 1.0)
    np.testing.assert_array_equal(
        distributed.device_tile_counts(causal, 4, layout="zigzag", tile=64), [34] * 4)
    ids = np.repeat(np.arange(4), [100, 300, 600, 24])
    documents = masks.document(ids)
    window = masks.sliding_window(1024, 1024, 128)
    for mask in (documents, window):
      ratios = [distributed.load_balance(mask, 8, layout=name) for name in ("contiguous",
                                                                            "zigzag")]
      self.assertTrue(all(r >= 1.0 for r in ratios), ratios)
    # A window's work is already even, up to the first shard's shorter rows.
    self.assertLess(distributed.load_balance(window, 8), 1.15)

  def test_layout_helpers(self):
    perm = distributed.layout_permutation(16, 4)
    np.testing.assert_array_equal(perm[:4], [0, 1, 14, 15])
    x = jnp.arange(2 * 16).reshape(2, 16)
    np.testing.assert_array_equal(distributed.from_layout(distributed.to_layout(x, 4), 4), x)
    mesh = _mesh(4)
    spec = PartitionSpec(None, "cp")
    zig = jax.jit(jax.shard_map(functools.partial(layout_lib.zigzag_local, axis_name="cp",
                                                  num_shards=4),
                                mesh=mesh, in_specs=spec, out_specs=spec))
    np.testing.assert_array_equal(zig(x), distributed.to_layout(x, 4))
    back = jax.jit(jax.shard_map(functools.partial(layout_lib.unzigzag_local, axis_name="cp",
                                                   num_shards=4),
                                 mesh=mesh, in_specs=spec, out_specs=spec))
    np.testing.assert_array_equal(back(zig(x)), x)

  def test_bad_inputs(self):
    q, k, v = _qkv()
    mesh = _mesh(8)
    attend = functools.partial(distributed.context_parallel_attention, mesh=mesh)
    with self.assertRaisesRegex(ValueError, "'sp'"):
      attend(q, k, v, axis_name="sp")
    with self.assertRaisesRegex(ValueError, "T=60 .* 8 devices"):
      attend(q[:, :60], k[:, :60], v[:, :60], axis_name="cp")
    with self.assertRaisesRegex(ValueError, "T=24 .* divisible by 16"):
      attend(q[:, :24], k[:, :24], v[:, :24], axis_name="cp", layout="zigzag")
    with self.assertRaisesRegex(ValueError, "strategy='bogus'"):
      attend(q, k, v, axis_name="cp", strategy="bogus")
    with self.assertRaisesRegex(ValueError, "multiple of kv heads"):
      attend(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), axis_name="cp")
    with self.assertRaisesRegex(ValueError, "segment_ids"):
      attend(q, k, v, axis_name="cp", segment_ids=jnp.zeros((B, T - 1), jnp.int32))
    with self.assertRaisesRegex(ValueError, r"mask.shape=\(64, 32\)"):
      attend(q, k, v, axis_name="cp", mask=masks.causal(64, 32))


if __name__ == "__main__":
  absltest.main()
