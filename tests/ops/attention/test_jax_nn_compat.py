"""flashjax.dot_product_attention as a drop-in for jax.nn.dot_product_attention (CPU).

* jax.nn's own call patterns (bias, mask, is_causal, sequence lengths, local windows,
  return_residual, GQA / MQA, rank-3 inputs, traced scale) run through both and agree on
  every row with an allowed key; rows without one show the documented difference
  (docs/jax_nn_compat.md): zeros and a -inf residual here, the mean of the values there.
* The new arguments give the same results on every backend (Pallas in interpret mode).
* Empty inputs, platform checks (interpret=True named, lists fall back, the backend that ran
  is logged and queryable) and the pass-through backends "jax_nn" / "cudnn".
"""

from __future__ import annotations

import zlib
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import flashjax
from flashjax import masks
from flashjax.ops.attention import api

B, T, S, NQ, NKV, D = 2, 32, 48, 4, 2, 16
Q_LENS = np.array([T, 11], np.int32)
KV_LENS = np.array([20, S], np.int32)
ON_CPU = jax.default_backend() == "cpu"


def _rng(test: absltest.TestCase) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32(test.id().encode()))


def _qkv(rng, batch=B, q_len=T, kv_len=S, q_heads=NQ, kv_heads=NKV, dtype="float32"):
  normal = lambda shape: jnp.asarray(rng.standard_normal(shape), dtype)
  return (normal((batch, q_len, q_heads, D)), normal((batch, kv_len, kv_heads, D)),
          normal((batch, kv_len, kv_heads, D)))


def _pattern_kwargs(name: str, rng: np.random.Generator, q_len: int) -> dict[str, Any]:
  """jax.nn keyword arguments of one call pattern (shapes B, q_len, S, NQ)."""
  key_padding = rng.random((B, 1, 1, S)) < 0.8
  key_padding[..., 0] = True
  lengths = dict(query_seq_lengths=jnp.asarray(np.minimum(Q_LENS, q_len)),
                 key_value_seq_lengths=jnp.asarray(KV_LENS))
  return {
      "plain": {},
      "bias": dict(bias=jnp.asarray(rng.standard_normal((1, NQ, q_len, S)), jnp.float32)),
      "bias_per_batch": dict(bias=jnp.asarray(rng.standard_normal((B, 1, q_len, S)),
                                              jnp.float32)),
      "mask_key_padding": dict(mask=jnp.asarray(key_padding)),
      "mask_per_head": dict(mask=jnp.asarray(rng.random((B, NQ, q_len, S)) < 0.7)),
      "is_causal": dict(is_causal=True),
      "scale": dict(scale=0.3),
      "seq_lengths": lengths,
      "query_seq_lengths": dict(query_seq_lengths=lengths["query_seq_lengths"]),
      "key_value_seq_lengths": dict(key_value_seq_lengths=lengths["key_value_seq_lengths"]),
      "local_window_int": dict(local_window_size=3),
      "local_window_pair": dict(local_window_size=(5, 2)),
      "local_window_causal": dict(local_window_size=(4, 0), is_causal=True),
      "everything": dict(bias=jnp.asarray(rng.standard_normal((1, 1, q_len, S)), jnp.float32),
                         mask=jnp.asarray(key_padding), is_causal=True,
                         local_window_size=(6, 1), **lengths),
  }[name]


def _allowed(kwargs: dict[str, Any], batch: int, q_heads: int, q_len: int,
             kv_len: int) -> np.ndarray:
  """bool [B, N, T, S] from jax.nn's definitions of the mask arguments."""
  i, j = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
  ok = np.ones((batch, q_heads, q_len, kv_len), bool)
  if kwargs.get("mask") is not None:
    ok &= np.asarray(kwargs["mask"])
  if kwargs.get("is_causal"):
    ok &= j <= i
  window = kwargs.get("local_window_size")
  if window is not None:
    left, right = (window, window) if isinstance(window, int) else window
    ok &= (i - left <= j) & (j <= i + right)
  if kwargs.get("query_seq_lengths") is not None:
    ok &= (i < np.asarray(kwargs["query_seq_lengths"])[:, None, None, None])
  if kwargs.get("key_value_seq_lengths") is not None:
    ok &= (j < np.asarray(kwargs["key_value_seq_lengths"])[:, None, None, None])
  return ok


PATTERNS = ("plain", "bias", "bias_per_batch", "mask_key_padding", "mask_per_head",
            "is_causal", "scale", "seq_lengths", "query_seq_lengths", "key_value_seq_lengths",
            "local_window_int", "local_window_pair", "local_window_causal", "everything")
MQA_PATTERNS = ("plain", "is_causal", "local_window_pair", "everything")


class TestJaxNnCallPatterns(parameterized.TestCase):
  """jax.nn's argument combinations, ours ("xla" and None) against jax.nn's."""

  @parameterized.named_parameters(
      {"testcase_name": f"{pattern=}_{heads=}_{q_len=}", "pattern": pattern, "heads": heads,
       "q_len": q_len}
      for pattern, heads, q_len in (
          [(p, (NQ, NKV), T) for p in PATTERNS] +  # GQA, T != S
          [(p, (NQ, 1), S) for p in MQA_PATTERNS]))  # MQA, T == S
  def test_matches_jax_nn(self, pattern, heads, q_len):
    rng = _rng(self)
    q, k, v = _qkv(rng, q_len=q_len, q_heads=heads[0], kv_heads=heads[1])
    kwargs = _pattern_kwargs(pattern, rng, q_len)
    out, lse = flashjax.dot_product_attention(q, k, v, return_residual=True, **kwargs)
    ref, ref_lse = jax.nn.dot_product_attention(q, k, v, return_residual=True, **kwargs)
    chex.assert_equal_shape((out, ref))
    chex.assert_equal_shape((lse, ref_lse))
    self.assertEqual(lse.dtype, ref_lse.dtype)
    rows = _allowed(kwargs, B, heads[0], q_len, S).any(-1).transpose(0, 2, 1)  # [B, T, N]
    np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], atol=2e-5)
    np.testing.assert_allclose(np.asarray(lse)[rows], np.asarray(ref_lse)[rows], atol=2e-5,
                               rtol=1e-6)
    # Rows without an allowed key: zeros and -inf here; jax.nn gives padded queries zeros
    # and other such rows the mean of the values (documented difference).
    chex.assert_trees_all_equal(np.asarray(out)[~rows], np.zeros_like(np.asarray(out)[~rows]))
    self.assertTrue(np.all(np.isneginf(np.asarray(lse)[~rows])))
    padded = np.zeros_like(rows)
    if "query_seq_lengths" in kwargs:
      padded = (np.arange(q_len)[None, :] >= np.asarray(kwargs["query_seq_lengths"])[:, None])
      padded = np.broadcast_to(padded[:, :, None], rows.shape)
      np.testing.assert_array_equal(np.asarray(ref)[padded], 0.0)
    mean = np.repeat(np.asarray(v).mean(axis=1), heads[0] // heads[1], axis=1)  # [B, N, D]
    mean = np.broadcast_to(mean[:, None], ref.shape)
    differ = ~rows & ~padded
    np.testing.assert_allclose(np.asarray(ref)[differ], mean[differ], atol=1e-5)
    if pattern == "everything":
      self.assertTrue((~rows & ~padded).any(), "the pattern must reach the difference")

  def test_unbatched_rank3_inputs(self):
    q, k, v = (x[0] for x in _qkv(_rng(self)))
    out, lse = flashjax.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    ref, ref_lse = jax.nn.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    chex.assert_trees_all_close((out, lse), (ref, ref_lse), atol=2e-5)

  def test_low_precision_residual_dtype(self):
    q, k, v = _qkv(_rng(self), dtype="bfloat16")
    out, lse = flashjax.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    ref, ref_lse = jax.nn.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    chex.assert_trees_all_equal_dtypes((out, lse), (ref, ref_lse))
    chex.assert_trees_all_close(jax.tree.map(lambda x: x.astype(jnp.float32), (out, lse)),
                                jax.tree.map(lambda x: x.astype(jnp.float32), (ref, ref_lse)),
                                atol=3e-2)

  def test_traced_scale_under_jit_and_its_gradient(self):
    q, k, v = _qkv(_rng(self))

    def loss(fn, scale):
      return jnp.sum(fn(q, k, v, scale=scale, is_causal=True) ** 2)

    ours = jax.jit(jax.value_and_grad(lambda s: loss(flashjax.dot_product_attention, s)))
    theirs = jax.jit(jax.value_and_grad(lambda s: loss(jax.nn.dot_product_attention, s)))
    chex.assert_trees_all_close(ours(0.4), theirs(0.4), rtol=1e-5)

  def test_gradients_match_with_seq_lengths_and_window(self):
    q, k, v = _qkv(_rng(self), kv_len=T)
    kwargs = dict(local_window_size=(7, 3), key_value_seq_lengths=jnp.asarray([12, T]))
    # Only rows with an allowed key count (the others differ by design).
    rows = _allowed(kwargs, B, NQ, T, T).any(-1).transpose(0, 2, 1)[..., None]
    self.assertFalse(rows.all())
    grad = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a, **kwargs)) * rows),
                                       (0, 1, 2)))(q, k, v)
    chex.assert_trees_all_close(grad(flashjax.dot_product_attention),
                                grad(jax.nn.dot_product_attention), atol=5e-5)

  def test_jax_nn_backend_is_jax_nn_itself(self):
    """"jax_nn" passes jax.nn's arguments through: equal to jax.nn, masked rows included."""
    rng = _rng(self)
    q, k, v = _qkv(rng)
    kwargs = _pattern_kwargs("everything", rng, T)
    ours = jax.jit(lambda *a: flashjax.dot_product_attention(
        *a, implementation="jax_nn", return_residual=True, **kwargs))(q, k, v)
    theirs = jax.jit(lambda *a: jax.nn.dot_product_attention(
        *a, return_residual=True, **kwargs))(q, k, v)
    chex.assert_trees_all_equal(ours, theirs)

  def test_jax_nn_backend_translates_flashjax_masks(self):
    q, k, v = _qkv(_rng(self), q_len=S)
    ids = np.repeat(np.array([[0] * 20 + [1] * (S - 20)]), B, axis=0)
    kwargs = dict(mask=masks.sliding_window(S, S, 5, 1), segment_ids=ids)
    chex.assert_trees_all_close(
        flashjax.dot_product_attention(q, k, v, implementation="jax_nn", **kwargs),
        flashjax.dot_product_attention(q, k, v, implementation="xla", **kwargs), atol=2e-5)
    with self.assertRaisesRegex(NotImplementedError, "jax_nn: .*logits_soft_cap"):
      flashjax.dot_product_attention(q, k, v, implementation="jax_nn", logits_soft_cap=5.0)
    with self.assertRaisesRegex(NotImplementedError, "jax_nn: .*BlockMask"):
      flashjax.dot_product_attention(
          q, k, v, implementation="jax_nn",
          mask=masks.BlockMask.from_mask(masks.causal(S, S), 16, 16))


class TestJaxNnArgumentValidation(parameterized.TestCase):

  @parameterized.named_parameters(
      ("window_negative", dict(local_window_size=-1), r"local_window_size=-1"),
      ("window_triple", dict(local_window_size=(1, 2, 3)), r"local_window_size=\(1, 2, 3\)"),
      ("window_float", dict(local_window_size=(1.0, 2)), r"local_window_size=\(1.0, 2\)"),
      ("window_bool", dict(local_window_size=True), r"local_window_size=True"),
      ("q_lengths_shape", dict(query_seq_lengths=np.array([3])),
       r"query_seq_lengths \(shape=\(1,\)"),
      ("kv_lengths_dtype", dict(key_value_seq_lengths=np.array([3.0, 4.0])),
       r"key_value_seq_lengths \(shape=\(2,\), dtype=float64\)"),
      ("q_lengths_high", dict(query_seq_lengths=np.array([3, T + 1])),
       r"query_seq_lengths=\[3, 33\] must lie in \[0, 32\]"),
      ("kv_lengths_negative", dict(key_value_seq_lengths=np.array([-1, 4])),
       r"key_value_seq_lengths=\[-1, 4\]"),
      ("window_with_block_mask", dict(
          local_window_size=2, mask=masks.BlockMask.from_mask(masks.causal(T, S), 16, 16)),
       r"local_window_size=2 cannot be combined with a BlockMask"),
      ("return_residual", dict(return_residual="yes"), r"return_residual='yes'"),
      ("rank_mix", dict(query=np.zeros((T, NQ, D), np.float32)),
       r"query.shape=\(32, 4, 16\) must have rank 4"),
      ("zero_kv_heads", dict(key=np.zeros((B, S, 0, D), np.float32),
                             value=np.zeros((B, S, 0, D), np.float32)), r"kv_heads=0"),
  )
  def test_bad_input_raises_value_error_naming_it(self, kwargs, pattern):
    q, k, v = _qkv(_rng(self))
    call = dict(query=q, key=k, value=v)
    call.update(kwargs)
    with self.assertRaisesRegex(ValueError, pattern):
      flashjax.dot_product_attention(**call)

  @parameterized.named_parameters(
      ("window", "local_window_size", jnp.int32(2)),
      ("is_causal", "is_causal", jnp.bool_(True)),
      ("soft_cap", "logits_soft_cap", jnp.float32(5.0)))
  def test_static_arguments_traced_under_jit_say_so(self, name, value):
    q, k, v = _qkv(_rng(self))
    with self.assertRaisesRegex(ValueError, rf"{name}=.*traced under jax.jit: pass a Python "
                                r"value"):
      jax.jit(lambda x: flashjax.dot_product_attention(q, k, v, **{name: x}))(value)
    with self.assertRaisesRegex(ValueError, r"scale=.*traced under jax.jit"):
      jax.jit(lambda s: flashjax.decode_attention(q[:, 0], k, v, jnp.array([S, S]), scale=s))(
          jnp.float32(0.5))

  @parameterized.named_parameters(
      ("gpu_odd_tiles", ("pallas_triton", "pallas_mosaic_gpu"), 24, 16, "powers of two"),
      ("tpu_narrow_kv", ("pallas_tpu",), 16, 16, "multiple of 128"))
  def test_block_mask_tiles_a_kernel_cannot_take_fall_through(self, names, bq, bk, reason):
    """A BlockMask the kernels cannot tile is NotImplementedError: lists move on to "xla"."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(_rng(self)))  # a dtype all of them take
    bm = masks.BlockMask.from_mask(masks.causal(T, S), bq, bk)
    for name in names:
      self.assertEqual(flashjax.resolve_implementation(
          flashjax.dot_product_attention, q, k, v, mask=bm, interpret=True,
          implementation=[name, "xla"]), "xla")
      with self.assertRaisesRegex(NotImplementedError, reason):
        flashjax.resolve_implementation(flashjax.dot_product_attention, q, k, v, mask=bm,
                                        interpret=True, implementation=name)

  def test_traced_scale_must_be_scalar(self):
    q, k, v = _qkv(_rng(self))
    with self.assertRaisesRegex(ValueError, r"traced scale must be a real scalar, got "
                                r"shape=\(2,\)"):
      jax.jit(lambda s: flashjax.dot_product_attention(q, k, v, scale=s))(jnp.ones(2))


# Backends run on the CPU: Pallas ones in interpret mode. pallas_mosaic_gpu's interpreter
# takes 15-30 s per kernel call, so it is only in the cases that run no kernel.
KERNEL_BACKENDS = ("xla", "xla_chunked", "pallas_triton", "pallas_tpu")
ALL_BACKENDS = KERNEL_BACKENDS + ("pallas_mosaic_gpu",)


def _attention(implementation, *args, **kwargs):
  return flashjax.dot_product_attention(*args, implementation=implementation,
                                        interpret=implementation.startswith("pallas"),
                                        **kwargs)


class TestEveryBackend(parameterized.TestCase):
  """The jax.nn arguments and empty inputs on every backend (Pallas in interpret mode)."""

  @parameterized.named_parameters(
      {"testcase_name": f"{implementation=}", "implementation": implementation}
      for implementation in KERNEL_BACKENDS)
  def test_seq_lengths_window_and_traced_scale(self, implementation):
    q, k, v = _qkv(_rng(self), q_len=64, kv_len=96)
    q_lens, kv_lens = jnp.array([64, 10], jnp.int32), jnp.array([90, 33], jnp.int32)
    kwargs = dict(local_window_size=(20, 3))
    fn = jax.jit(lambda *a: _attention(implementation, *a[:3], scale=a[3],
                                       query_seq_lengths=a[4], key_value_seq_lengths=a[5],
                                       **kwargs))
    out = fn(q, k, v, 0.3, q_lens, kv_lens)
    ref = jax.nn.dot_product_attention(q, k, v, scale=0.3, query_seq_lengths=q_lens,
                                       key_value_seq_lengths=kv_lens, **kwargs)
    rows = _allowed(dict(query_seq_lengths=q_lens, key_value_seq_lengths=kv_lens, **kwargs),
                    B, NQ, 64, 96).any(-1).transpose(0, 2, 1)
    self.assertTrue((~rows).any() and rows.any())
    np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], atol=5e-5)
    np.testing.assert_array_equal(np.asarray(out)[~rows], 0.0)

  @parameterized.named_parameters(
      {"testcase_name": f"{implementation=}_{shape=}", "implementation": implementation,
       "shape": shape}
      for implementation in ALL_BACKENDS
      for shape in ((B, 0, S), (B, T, 0), (0, T, S)))
  def test_empty_inputs(self, implementation, shape):
    batch, q_len, kv_len = shape
    q, k, v = _qkv(_rng(self), batch=batch, q_len=q_len, kv_len=kv_len, dtype="float16")
    attend = lambda *a: _attention(implementation, *a, is_causal=True)
    for fn in (attend, jax.jit(attend)):
      out = fn(q, k, v)
      chex.assert_shape(out, q.shape)
      chex.assert_trees_all_equal(out, jnp.zeros_like(q))
    if implementation in api.RESIDUAL_BACKENDS:
      _, lse = _attention(implementation, q, k, v, return_residual=True)
      chex.assert_trees_all_equal(lse, jnp.full(q.shape[:3], -jnp.inf, q.dtype))

  @parameterized.named_parameters(
      {"testcase_name": f"{implementation=}", "implementation": implementation}
      for implementation in ("pallas_triton", "pallas_tpu", "pallas_mosaic_gpu"))
  def test_residual_refused_and_lists_move_on(self, implementation):
    q, k, v = _qkv(_rng(self), dtype="float16")
    with self.assertRaisesRegex(NotImplementedError, "cannot return the softmax residual"):
      _attention(implementation, q, k, v, return_residual=True)
    out = flashjax.dot_product_attention(q, k, v, return_residual=True, interpret=True,
                                         implementation=[implementation, "xla"])
    chex.assert_trees_all_equal(out, flashjax.dot_product_attention(q, k, v,
                                                                    return_residual=True))
    self.assertEqual(flashjax.resolve_implementation(
        flashjax.dot_product_attention, q, k, v, return_residual=True, interpret=True,
        implementation=[implementation, "xla"]), "xla")


  def test_seq_lengths_with_rcm_block_mask(self):
    rng = _rng(self)
    q, k, v = _qkv(rng, q_len=64, kv_len=64)
    dense = rng.random((64, 64)) < 0.1
    dense[np.arange(64), np.arange(64)] = True
    mask = masks.BlockMask.from_mask(masks.from_dense(dense), 16, 16, reorder="rcm")
    self.assertIsNotNone(mask.q_perm)
    lengths = jnp.array([40, 64], jnp.int32)
    expected = flashjax.dot_product_attention(
        q, k, v, mask=jnp.asarray(dense) & (jnp.arange(64) < lengths[:, None])[:, None, None])
    for implementation in ("xla", "xla_chunked", ["pallas_triton", "xla"]):
      out = flashjax.dot_product_attention(q, k, v, mask=mask, key_value_seq_lengths=lengths,
                                           implementation=implementation, interpret=True)
      chex.assert_trees_all_close(out, expected, atol=2e-5)
    for implementation in ("pallas_triton", "pallas_tpu", "pallas_mosaic_gpu"):
      with self.assertRaisesRegex(NotImplementedError, "RCM-reordered BlockMask"):
        _attention(implementation, q, k, v, mask=mask, key_value_seq_lengths=lengths)


PALLAS_NEEDS = (("pallas_triton", "a GPU"), ("pallas_tpu", "a TPU"),
                ("pallas_mosaic_gpu", r"an NVIDIA Hopper GPU \(compute capability 9.x\)"))


@absltest.skipUnless(ON_CPU, "checks what a CPU-only machine reports")
class TestPlatformChecks(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.q, self.k, self.v = _qkv(_rng(self), dtype="float16")
    self.cache = (jnp.zeros((B, NQ, D)), jnp.zeros((B, S, NKV, D)), jnp.zeros((B, S, NKV, D)),
                  np.array([3, S], np.int32))

  @parameterized.named_parameters(
      {"testcase_name": f"{name=}", "name": name, "needs": needs}
      for name, needs in PALLAS_NEEDS)
  def test_attention_names_interpret_true(self, name, needs):
    pattern = (rf"backend '{name}' needs {needs} but JAX's default backend is 'cpu': pass "
               r"interpret=True")
    for fn in (flashjax.dot_product_attention, jax.jit(flashjax.dot_product_attention,
                                                       static_argnames="implementation")):
      with self.assertRaisesRegex(api.BackendUnavailableError, pattern):
        fn(self.q, self.k, self.v, implementation=name)
    with self.assertLogs("flashjax", "DEBUG") as logs:
      out = flashjax.dot_product_attention(self.q, self.k, self.v, implementation=[name, "xla"])
    chex.assert_trees_all_equal(out, flashjax.dot_product_attention(self.q, self.k, self.v))
    self.assertRegex(logs.output[-1], rf"attention: backend 'xla' ran .*skipped {name}: "
                                      r"backend .* pass interpret=True")
    with self.assertNoLogs("flashjax", "DEBUG"):  # resolving runs nothing, so logs no "ran"
      self.assertEqual(flashjax.resolve_implementation(
          flashjax.dot_product_attention, self.q, self.k, self.v,
          implementation=[name, "xla"]), "xla")
    self.assertEqual(flashjax.resolve_implementation(
        flashjax.dot_product_attention, self.q, self.k, self.v, interpret=True,
        implementation=[name, "xla"]), name)

  @parameterized.named_parameters(
      {"testcase_name": f"{name=}", "name": name, "needs": needs}
      for name, needs in (("pallas_triton", "a GPU"), ("pallas_mosaic_gpu", "a GPU"),
                          ("pallas_tpu", "a TPU")))
  def test_decode_names_interpret_true(self, name, needs):
    with self.assertRaisesRegex(api.BackendUnavailableError,
                                rf"backend '{name}' needs {needs} .*interpret=True"):
      flashjax.decode_attention(*self.cache, implementation=name)
    with self.assertLogs("flashjax", "DEBUG") as logs:
      flashjax.decode_attention(*self.cache, implementation=[name, "xla"])
    self.assertRegex(logs.output[-1], rf"decode: backend 'xla' ran .*skipped {name}: ")
    with self.assertNoLogs("flashjax", "DEBUG"):  # resolving runs nothing, so logs no "ran"
      self.assertEqual(flashjax.resolve_implementation(
          flashjax.decode_attention, *self.cache, implementation=[name, "xla"]), "xla")
    self.assertEqual(flashjax.resolve_implementation(
        flashjax.decode_attention, *self.cache, implementation=[name, "xla"], interpret=True),
                     name)

  def test_cudnn_needs_a_gpu_and_lists_move_on(self):
    with self.assertRaisesRegex(api.BackendUnavailableError,
                                r"backend 'cudnn' needs a GPU .*no interpret mode"):
      flashjax.dot_product_attention(self.q, self.k, self.v, implementation="cudnn",
                                     interpret=True)
    out = flashjax.dot_product_attention(self.q, self.k, self.v, implementation=["cudnn", "xla"])
    chex.assert_trees_all_equal(out, flashjax.dot_product_attention(self.q, self.k, self.v))

  def test_resolve_implementation_defaults_and_errors(self):
    self.assertEqual(flashjax.resolve_implementation(flashjax.dot_product_attention, self.q,
                                                     self.k, self.v), "xla")
    inside = []
    jax.jit(lambda q: inside.append(flashjax.resolve_implementation(
        flashjax.dot_product_attention, q, self.k, self.v, implementation="xla_chunked"))
            or q)(self.q)
    self.assertEqual(inside, ["xla_chunked"])
    jitted = jax.jit(lambda *a: flashjax.dot_product_attention(
        *a, implementation=["pallas_tpu", "xla_chunked"], interpret=True))
    jitted(self.q, self.k, self.v)  # its trace is cached now
    self.assertEqual(flashjax.resolve_implementation(jitted, self.q, self.k, self.v),
                     "pallas_tpu")
    with self.assertRaisesRegex(ValueError, "did not dispatch"):
      flashjax.resolve_implementation(jnp.sin, self.q)
    with self.assertRaisesRegex(ValueError, r"scale=-1.0"):
      flashjax.resolve_implementation(flashjax.dot_product_attention, self.q, self.k, self.v,
                                      scale=-1.0)


if __name__ == "__main__":
  absltest.main()
