"""Public API: input validation (errors name the values), normalisation, and dispatch.

Covers flashjax.dot_product_attention; flashjax.decode_attention's API tests are in
tests/ops/decode/test_api.py.
"""

import math
import sys
import types
import zlib
from unittest import mock

import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import flashjax
from flashjax import masks
from flashjax.ops.attention import api
from flashjax.ops.attention.block_sizes import BlockSizes
from tests import oracle

B, T, S, NQ, NKV, D = 2, 24, 40, 4, 2, 16


def _rng(test: absltest.TestCase) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32(test.id().encode()))


def _qkv(rng, batch=B, q_len=T, kv_len=S, q_heads=NQ, kv_heads=NKV, head_dim=D,
         dtype=jnp.float32):
  normal = lambda shape: jnp.asarray(rng.standard_normal(shape), dtype)
  return (normal((batch, q_len, q_heads, head_dim)), normal((batch, kv_len, kv_heads,
                                                             head_dim)),
          normal((batch, kv_len, kv_heads, head_dim)))


def _fake_module(name: str, fn_name: str, fn) -> types.ModuleType:
  module = types.ModuleType(name)
  setattr(module, fn_name, fn)
  return module


def _bad_attention_cases():
  """(name, kwargs overrides given the inputs, regex the message must match)."""
  ids_t = np.zeros((B, T), np.int32)
  return [
      ("query_rank", lambda q, k, v: dict(query=q[0]), r"query.shape=\(24, 4, 16\)"),
      ("key_rank", lambda q, k, v: dict(key=k[..., 0]), r"key.shape=\(2, 40, 2\)"),
      ("batch", lambda q, k, v: dict(query=q[:1]), r"query.shape=\(1, 24, 4, 16\).*"
                                                    r"key.shape=\(2, 40, 2, 16\)"),
      ("head_dim", lambda q, k, v: dict(query=q[..., :8]), r"query.shape=\(2, 24, 4, 8\)"),
      ("kv_shapes", lambda q, k, v: dict(value=v[:, :8]), r"value.shape=\(2, 8, 2, 16\)"),
      ("heads", lambda q, k, v: dict(query=q[:, :, :3]), r"q_heads=3, kv_heads=2"),
      ("dtype_mismatch", lambda q, k, v: dict(key=k.astype(jnp.bfloat16)),
       r"key.dtype=bfloat16"),
      ("int_dtype", lambda q, k, v: dict(query=q.astype(jnp.int32), key=k.astype(jnp.int32),
                                         value=v.astype(jnp.int32)), r"query.dtype=int32"),
      ("not_array", lambda q, k, v: dict(query=q.tolist()),
       r"query must be a jax or numpy array, got list"),
      ("mask_shape", lambda q, k, v: dict(mask=jnp.ones((B, 3, T, S), bool)),
       r"mask.shape=\(2, 3, 24, 40\)"),
      ("mask_rank", lambda q, k, v: dict(mask=jnp.ones((S,), bool)), r"mask.shape=\(40,\)"),
      ("mask_rank5", lambda q, k, v: dict(mask=jnp.ones((1, B, NQ, T, S), bool)),
       r"mask.shape=\(1, 2, 4, 24, 40\)"),
      ("mask_dtype", lambda q, k, v: dict(mask=jnp.ones((T, S), jnp.float32)),
       r"mask.dtype=float32"),
      ("mask_type", lambda q, k, v: dict(mask="causal"), r"mask of type str"),
      ("mask_object_len", lambda q, k, v: dict(mask=masks.causal(T + 1, S)),
       r"mask.shape=\(25, 40\)"),
      ("mask_object_batch", lambda q, k, v: dict(
          query=q[..., :NKV, :], mask=masks.document((np.zeros((3, S), np.int32),) * 2)),
       r"mask.shape=\(3, 1, 40, 40\)"),
      ("block_mask_shape", lambda q, k, v: dict(
          mask=masks.BlockMask.from_mask(masks.causal(T, S + 1), 16, 16)),
       r"mask.shape=\(1, 1, 24, 41\)"),
      ("block_mask_vs_block_sizes", lambda q, k, v: dict(
          mask=masks.BlockMask.from_mask(masks.causal(T, S), 16, 16),
          block_sizes=BlockSizes(32, 16)), r"mask.block_q=16"),
      ("block_sizes_type", lambda q, k, v: dict(block_sizes=(32, 32)),
       r"block_sizes=\(32, 32\)"),
      ("segment_ids_self", lambda q, k, v: dict(segment_ids=ids_t), r"q_len=24 != kv_len=40"),
      ("segment_ids_shape", lambda q, k, v: dict(segment_ids=(ids_t[:, :5], np.zeros(
          (B, S), np.int32))), r"q_segment_ids.shape=\(2, 5\)"),
      ("segment_ids_dtype", lambda q, k, v: dict(segment_ids=(ids_t.astype(np.float32),
                                                              np.zeros((B, S), np.int32))),
       r"q_segment_ids.dtype=float32"),
      ("segment_ids_tuple", lambda q, k, v: dict(segment_ids=(ids_t,) * 3),
       r"len\(segment_ids\)=3"),
      ("bias_shape", lambda q, k, v: dict(bias=jnp.ones((B, NQ, T, 7))),
       r"bias.shape=\(2, 4, 24, 7\)"),
      ("bias_dtype", lambda q, k, v: dict(bias=jnp.ones((T, S), jnp.int32)), r"dtype=int32"),
      ("scale_zero", lambda q, k, v: dict(scale=0.0), r"scale=0.0"),
      ("scale_negative", lambda q, k, v: dict(scale=-2), r"scale=-2.0"),
      ("soft_cap", lambda q, k, v: dict(logits_soft_cap=-1.0), r"logits_soft_cap=-1.0"),
      ("soft_cap_nan", lambda q, k, v: dict(logits_soft_cap=math.nan), r"logits_soft_cap=nan"),
      ("implementation_unknown", lambda q, k, v: dict(implementation="cuda"), r"'cuda'"),
      ("implementation_in_list", lambda q, k, v: dict(implementation=["xla", "triton"]),
       r"'triton'"),
      ("implementation_empty", lambda q, k, v: dict(implementation=[]),
       r"implementation=\[\]"),
      ("is_causal", lambda q, k, v: dict(is_causal="yes"), r"is_causal='yes'"),
  ]


class TestAttentionValidation(parameterized.TestCase):

  @parameterized.named_parameters(
      {"testcase_name": f"{name=}", "make": make, "pattern": pattern}
      for name, make, pattern in _bad_attention_cases())
  def test_bad_input_raises_value_error_naming_it(self, make, pattern):
    q, k, v = _qkv(_rng(self))
    kwargs = dict(query=q, key=k, value=v)
    kwargs.update(make(q, k, v))
    with self.assertRaisesRegex(ValueError, pattern):
      flashjax.dot_product_attention(**kwargs)

  def test_segment_ids_must_come_in_pairs_for_cross_attention(self):
    q, k, v = _qkv(_rng(self), kv_len=T)
    with self.assertRaisesRegex(ValueError, r"kv_segment_ids.shape=\(2, 5\)"):
      flashjax.dot_product_attention(q, k, v, segment_ids=(np.zeros((B, T), np.int32),
                                                            np.zeros((B, 5), np.int32)))


class _Recorder:
  """A fake backend that records its keyword arguments and runs (or refuses) the call."""

  def __init__(self, supported: bool = True):
    self.calls = []
    self.supported = supported

  def __call__(self, query, key, value, **kwargs):
    self.calls.append(kwargs)
    if not self.supported:
      raise NotImplementedError("fake backend: not supported")
    from flashjax.ops.attention import xla  # pylint: disable=g-import-not-at-top
    return xla.dot_product_attention(query, key, value, **kwargs)


class TestAttentionDispatch(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.refuse, self.accept = _Recorder(supported=False), _Recorder()
    modules = {"fake_refuse_mod": _fake_module("fake_refuse_mod", "attend", self.refuse),
               "fake_accept_mod": _fake_module("fake_accept_mod", "attend", self.accept)}
    registry = {"fake_refuse": ("fake_refuse_mod", "attend"),
                "fake_accept": ("fake_accept_mod", "attend"),
                "fake_missing": ("fake_missing_mod_that_does_not_exist", "attend")}
    self.enter_context(mock.patch.dict(sys.modules, modules))
    self.enter_context(mock.patch.dict(api.ATTENTION_BACKENDS, registry))
    self.q, self.k, self.v = _qkv(_rng(self))

  def expected(self, **kwargs):
    return oracle.attention_oracle(self.q, self.k, self.v, **kwargs)

  def test_sequence_falls_through_not_implemented(self):
    out = flashjax.dot_product_attention(self.q, self.k, self.v, is_causal=True,
                                         implementation=("fake_refuse", "fake_accept"))
    self.assertLen(self.refuse.calls, 1)
    self.assertLen(self.accept.calls, 1)
    chex.assert_trees_all_close(out, self.expected(allowed=oracle.causal_mask(T, S)),
                                atol=2e-5)

  def test_sequence_falls_through_missing_module_to_xla(self):
    out = flashjax.dot_product_attention(self.q, self.k, self.v,
                                         implementation=["fake_missing", "fake_refuse", "xla"])
    self.assertLen(self.refuse.calls, 1)
    chex.assert_trees_all_close(out, self.expected(), atol=2e-5)

  @parameterized.named_parameters([
      {"testcase_name": "name='fake_refuse'", "name": "fake_refuse",
       "pattern": "fake backend: not supported"},
      {"testcase_name": "name='fake_missing'", "name": "fake_missing",
       "pattern": "fake_missing_mod_that_does_not_exist is not available"}])
  def test_single_name_error_reaches_caller(self, name, pattern):
    with self.assertRaisesRegex(NotImplementedError, pattern):
      flashjax.dot_product_attention(self.q, self.k, self.v, implementation=name)

  def test_nothing_works_names_every_backend(self):
    with self.assertRaisesRegex(NotImplementedError,
                                r"fake_missing: .*not available; fake_refuse: fake backend"):
      flashjax.dot_product_attention(self.q, self.k, self.v,
                                     implementation=("fake_missing", "fake_refuse"))

  def test_none_on_cpu_picks_xla(self):
    self.assertEqual(api.default_implementations(), ("xla",))
    with mock.patch.dict(api.ATTENTION_BACKENDS, {"xla": ("fake_accept_mod", "attend")}):
      out = flashjax.dot_product_attention(self.q, self.k, self.v)
    self.assertLen(self.accept.calls, 1)
    chex.assert_trees_all_close(out, self.expected(), atol=2e-5)

  def test_backend_receives_normalised_arguments(self):
    rng = _rng(self)
    pad = jnp.asarray(rng.random((B, 1, 1, S)) < 0.8)  # key padding mask, jax.nn style
    bias = jnp.asarray(rng.standard_normal((T, S)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 2, (B, T)), jnp.int16)
    q, k, v = _qkv(rng, kv_len=T)
    flashjax.dot_product_attention(q, k, v, bias=bias[:, :T], mask=pad[..., :T],
                                   segment_ids=ids, implementation="fake_accept")
    (kwargs,) = self.accept.calls
    chex.assert_shape(kwargs["mask"], (B, 1, T, T))
    chex.assert_trees_all_equal(kwargs["mask"], jnp.broadcast_to(pad[..., :T], (B, 1, T, T)))
    chex.assert_shape(kwargs["bias"], (1, 1, T, T))
    self.assertEqual(kwargs["q_segment_ids"].dtype, jnp.int32)
    chex.assert_trees_all_equal(kwargs["q_segment_ids"], kwargs["kv_segment_ids"])
    self.assertEqual(kwargs["scale"], 1.0 / math.sqrt(D))
    self.assertEqual((kwargs["is_causal"], kwargs["logits_soft_cap"], kwargs["block_sizes"],
                      kwargs["interpret"]), (False, None, None, False))

  def test_mask_objects_pass_through(self):
    mask = masks.sliding_window(T, S, 3)
    flashjax.dot_product_attention(self.q, self.k, self.v, mask=mask,
                                   implementation="fake_accept")
    self.assertIs(self.accept.calls[0]["mask"], mask)


if __name__ == "__main__":
  absltest.main()
