"""Public decode API: input validation (errors name the values), dispatch, debug checks.

Covers flashjax.decode_attention (flashjax/ops/decode/api.py); the backends' numerics are in
decode_suite.py and the per-backend test files.
"""

import sys
import types
import zlib
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.experimental import checkify

import flashjax
from flashjax.ops.decode import api as decode_api
from tests import oracle

B, S, NQ, NKV, D = 2, 40, 4, 2, 16


def _rng(test: absltest.TestCase) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32(test.id().encode()))


def _fake_module(name: str, fn_name: str, fn) -> types.ModuleType:
  module = types.ModuleType(name)
  setattr(module, fn_name, fn)
  return module


def _decode_inputs(rng, batch=B, max_len=S, q_heads=NQ, kv_heads=NKV, head_dim=D):
  normal = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return (normal((batch, q_heads, head_dim)), normal((batch, max_len, kv_heads, head_dim)),
          normal((batch, max_len, kv_heads, head_dim)), np.array([3, max_len], np.int32))


def _bad_decode_cases():
  return [
      ("query_rank", lambda q, k, v, n: dict(query=q[0]), r"query.shape=\(4, 16\)"),
      ("cache_batch", lambda q, k, v, n: dict(key_cache=k[:1], value_cache=v[:1]),
       r"key_cache.shape=\(1, 40, 2, 16\)"),
      ("cache_shapes", lambda q, k, v, n: dict(value_cache=v[:, :5]),
       r"value_cache.shape=\(2, 5, 2, 16\)"),
      ("heads", lambda q, k, v, n: dict(query=q[:, :3]), r"q_heads=3, kv_heads=2"),
      ("dtype", lambda q, k, v, n: dict(query=q.astype(jnp.float16)),
       r"query.dtype=float16"),
      ("lengths_shape", lambda q, k, v, n: dict(lengths=n[:1]), r"shape=\(1,\)"),
      ("lengths_dtype", lambda q, k, v, n: dict(lengths=n.astype(np.float32)),
       r"dtype=float32"),
      ("lengths_high", lambda q, k, v, n: dict(lengths=np.array([3, S + 1])),
       r"lengths=\[3, 41\]"),
      ("lengths_negative", lambda q, k, v, n: dict(lengths=np.array([-1, 2])),
       r"lengths=\[-1, 2\]"),
      ("head_indices_k", lambda q, k, v, n: dict(head_indices=np.zeros((B, 3), np.int32)),
       r"head_indices.shape=\(2, 3\)"),
      ("head_indices_batch", lambda q, k, v, n: dict(head_indices=np.zeros((1, 1), np.int32)),
       r"head_indices.shape=\(1, 1\)"),
      ("head_indices_range", lambda q, k, v, n: dict(head_indices=np.array([[0], [2]])),
       r"head_indices=\[\[0\], \[2\]\]"),
      ("head_indices_dtype", lambda q, k, v, n: dict(head_indices=np.zeros((B, 1))),
       r"head_indices.dtype=float64"),
      ("scale", lambda q, k, v, n: dict(scale=0), r"scale=0.0"),
      ("implementation", lambda q, k, v, n: dict(implementation="cudnn"), r"'cudnn'"),
      ("debug_checks", lambda q, k, v, n: dict(debug_checks=1), r"debug_checks=1"),
      ("kv_heads", lambda q, k, v, n: dict(key_cache=k[:, :, :0], value_cache=v[:, :, :0]),
       r"kv_heads=0"),
  ]


class TestDecodeApi(parameterized.TestCase):

  @parameterized.named_parameters(
      {"testcase_name": f"{name=}", "make": make, "pattern": pattern}
      for name, make, pattern in _bad_decode_cases())
  def test_bad_input_raises_value_error_naming_it(self, make, pattern):
    q, k, v, n = _decode_inputs(_rng(self))
    kwargs = dict(query=q, key_cache=k, value_cache=v, lengths=n)
    kwargs.update(make(q, k, v, n))
    with self.assertRaisesRegex(ValueError, pattern):
      flashjax.decode_attention(**kwargs)

  def test_sequence_falls_through_to_xla(self):
    refuse = _fake_module("fake_decode_mod", "decode",
                          mock.Mock(side_effect=NotImplementedError("no")))
    self.enter_context(mock.patch.dict(sys.modules, {"fake_decode_mod": refuse}))
    self.enter_context(mock.patch.dict(decode_api.DECODE_BACKENDS,
                                       {"fake": ("fake_decode_mod", "decode")}))
    q, k, v, n = _decode_inputs(_rng(self))
    out = flashjax.decode_attention(q, k, v, n, implementation=("fake", "xla"))
    refuse.decode.assert_called_once()
    chex.assert_trees_all_close(out, oracle.decode_oracle(q, k, v, n), atol=2e-5)
    with self.assertRaisesRegex(NotImplementedError, "no"):
      flashjax.decode_attention(q, k, v, n, implementation="fake")

  def test_debug_checks_report_traced_out_of_range_values(self):
    q, k, v, _ = _decode_inputs(_rng(self))
    fn = jax.jit(lambda n, h: flashjax.decode_attention(q, k, v, n, head_indices=h,
                                                        debug_checks=True))
    checked = checkify.checkify(fn, errors=checkify.user_checks)
    err, _ = checked(jnp.array([3, S + 1]), jnp.array([[0], [1]]))
    self.assertRegex(err.get(), r"lengths=\[ 3 41\] must lie in \[0, S_max=40\]")
    err, _ = checked(jnp.array([3, S]), jnp.array([[0], [-2]]))
    self.assertRegex(err.get(), r"head_indices=\[\[ 0\]\n \[-2\]\] must lie in \[0, Nkv=2\)")
    err, out = checked(jnp.array([3, S]), jnp.array([[0], [1]]))
    self.assertIsNone(err.get())
    chex.assert_trees_all_close(out, oracle.decode_oracle(q, k, v, np.array([3, S]),
                                                          head_indices=np.array([[0], [1]])),
                                atol=2e-5)
    with self.assertRaisesRegex(ValueError, "checkify"):  # jit refuses unchecked checks
      fn(jnp.array([3, S]), jnp.array([[0], [1]]))

  def test_traced_lengths_skip_range_checks(self):
    q, k, v, n = _decode_inputs(_rng(self))
    out = jax.jit(flashjax.decode_attention)(q, k, v, jnp.asarray(n))
    chex.assert_trees_all_close(out, oracle.decode_oracle(q, k, v, n), atol=2e-5)



if __name__ == "__main__":
  absltest.main()
