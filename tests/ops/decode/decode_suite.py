"""Backend-agnostic decode attention test suite.

Each backend subclasses `DecodeSuite` in its own test file (subclasses are collected by
pytest automatically, the base class is not):

  class TestMyDecode(decode_suite.DecodeSuite):
    IMPLEMENTATION = "pallas_triton"
    INTERPRET = True
    SKIP_CASES = {"test_soft_cap*": "not written yet"}

Every case calls `flashjax.decode_attention(..., implementation=IMPLEMENTATION,
interpret=INTERPRET)` jitted on fresh random inputs (seeded by the test id) and compares with
`flashjax.ops.decode.reference.decode_reference` (float32, HIGHEST) and the float64 oracle
of tests/oracle.py.
"""

from __future__ import annotations

import fnmatch
import zlib
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import flashjax
from flashjax.ops.decode import reference
from tests import oracle

ALL_DTYPES = ("float32", "bfloat16", "float16")


def _named(name: str, values) -> list[dict[str, Any]]:
  return [{"testcase_name": f"{name}={v!r}", name: v} for v in values]


class DecodeSuite(parameterized.TestCase):
  """Cases every decode backend must pass; configure through the class attributes.

  Attributes:
    IMPLEMENTATION: backend name given to flashjax.decode_attention.
    INTERPRET: run Pallas backends in interpret mode.
    SUPPORTS_SOFT_CAP: False: logits_soft_cap must raise NotImplementedError.
    DTYPES: input dtypes to test, a subset of ALL_DTYPES.
    HEAD_DIMS: head dims; the cases cycle through them.
    MAX_LENS: cache lengths S_max; include one that is not a block multiple.
    SKIP_CASES: {fnmatch pattern on the test method name: reason} of skipped cases.
    TOLERANCES: {dtype name: (atol, rtol)}.
  """

  __test__ = False

  IMPLEMENTATION: str = "xla"
  INTERPRET: bool = False
  SUPPORTS_SOFT_CAP: bool = True
  DTYPES: tuple[str, ...] = ALL_DTYPES
  HEAD_DIMS: tuple[int, ...] = (64, 32)
  MAX_LENS: tuple[int, ...] = (256, 200)
  SKIP_CASES: Mapping[str, str] = {}
  TOLERANCES: Mapping[str, tuple[float, float]] = {
      "float32": (5e-5, 1e-5), "bfloat16": (2e-2, 0.0), "float16": (5e-3, 0.0)}

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    cls.__test__ = cls.__dict__.get("__test__", True)

  def setUp(self):
    super().setUp()
    for pattern, reason in self.SKIP_CASES.items():
      if fnmatch.fnmatchcase(self._testMethodName, pattern):
        self.skipTest(reason)

  # Helpers.

  def rng(self) -> np.random.Generator:
    """A generator seeded by the test id: fresh inputs per case, reproducible runs."""
    if not hasattr(self, "_rng"):
      self._rng = np.random.default_rng(zlib.crc32(self.id().encode()))
    return self._rng

  def inputs(self, batch: int, max_len: int, q_heads: int, kv_heads: int, head_dim: int,
             dtype: str = "float32", scale: float = 1.0):
    """(query [B, Nq, D], key_cache, value_cache [B, S_max, Nkv, D], lengths [B])."""
    normal = lambda shape, s=1.0: jnp.asarray(self.rng().standard_normal(shape) * s, dtype)
    lengths = self.rng().integers(1, max_len + 1, size=batch).astype(np.int32)
    return (normal((batch, q_heads, head_dim), scale),
            normal((batch, max_len, kv_heads, head_dim), scale),
            normal((batch, max_len, kv_heads, head_dim)), lengths)

  def head_indices(self, batch: int, kv_heads: int, k: int) -> np.ndarray:
    """int32 [B, k]: distinct random KV groups per sequence, in random order."""
    return np.stack([self.rng().permutation(kv_heads)[:k] for _ in range(batch)]).astype(
        np.int32)

  def decode(self, query, key_cache, value_cache, lengths, **kwargs) -> jax.Array:
    """flashjax.decode_attention with this backend's settings."""
    return flashjax.decode_attention(query, key_cache, value_cache, lengths,
                                     implementation=self.IMPLEMENTATION,
                                     interpret=self.INTERPRET, **kwargs)

  def assert_close(self, actual, expected, dtype: str, what: str = "") -> None:
    atol, rtol = self.TOLERANCES[dtype]
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    chex.assert_tree_all_finite(actual)
    chex.assert_trees_all_close(actual, np.asarray(jnp.asarray(expected, jnp.float32)),
                                atol=atol, rtol=rtol, custom_message=what)

  def check(self, query, key_cache, value_cache, lengths, **kwargs) -> jax.Array:
    """Runs the backend (jitted, kwargs closed over) against the reference and the oracle."""
    dtype = jnp.dtype(query.dtype).name
    out = jax.jit(lambda *args: self.decode(*args, **kwargs))(query, key_cache, value_cache,
                                                              lengths)
    chex.assert_shape(out, query.shape)
    chex.assert_type(out, query.dtype)
    ref = reference.decode_reference(query, key_cache, value_cache, jnp.asarray(lengths),
                                     **kwargs)
    self.assert_close(out, ref, dtype, "vs decode_reference")
    expected = oracle.decode_oracle(query, key_cache, value_cache, lengths, **kwargs)
    self.assert_close(out, expected, dtype, "vs float64 oracle")
    return out

  # Cases.

  @parameterized.named_parameters(
      {"testcase_name": f"{q_heads=}_{kv_heads=}", "q_heads": q_heads, "kv_heads": kv_heads}
      for q_heads, kv_heads in ((4, 4), (8, 2), (4, 1)))
  def test_dense(self, q_heads, kv_heads):
    for i, max_len in enumerate(self.MAX_LENS):
      with self.subTest(max_len=max_len):
        head_dim = self.HEAD_DIMS[i % len(self.HEAD_DIMS)]
        self.check(*self.inputs(3, max_len, q_heads, kv_heads, head_dim))

  @parameterized.named_parameters(
      {"testcase_name": f"{q_heads=}_{kv_heads=}_{k=}", "q_heads": q_heads,
       "kv_heads": kv_heads, "k": k}
      for q_heads, kv_heads, k in ((4, 4, 1), (4, 4, 3), (8, 4, 2), (8, 4, 4), (8, 2, 1)))
  def test_head_sparse(self, q_heads, kv_heads, k):
    for i, max_len in enumerate(self.MAX_LENS):
      with self.subTest(max_len=max_len):
        head_dim = self.HEAD_DIMS[i % len(self.HEAD_DIMS)]
        q, kc, vc, lengths = self.inputs(3, max_len, q_heads, kv_heads, head_dim)
        heads = self.head_indices(3, kv_heads, k)
        out = self.check(q, kc, vc, lengths, head_indices=jnp.asarray(heads))
        group = np.arange(q_heads) // (q_heads // kv_heads)
        for row in range(3):
          dropped = ~np.isin(group, heads[row])
          chex.assert_trees_all_equal(np.asarray(out[row])[dropped],
                                      np.zeros((dropped.sum(), head_dim), np.float32))

  def test_head_sparse_repeated_ids(self):
    q, kc, vc, lengths = self.inputs(2, self.MAX_LENS[0], 8, 4, self.HEAD_DIMS[0])
    self.check(q, kc, vc, lengths, head_indices=jnp.array([[2, 0, 2], [3, 3, 3]], jnp.int32))

  def test_lengths_edge_cases(self):
    """Lengths 0 (zeros), 1 and S_max in one batch, dense and head-sparse."""
    max_len = self.MAX_LENS[-1]
    q, kc, vc, _ = self.inputs(4, max_len, 8, 2, self.HEAD_DIMS[0])
    lengths = np.array([0, 1, max_len, max_len // 2 + 1], np.int32)
    out = self.check(q, kc, vc, lengths)
    chex.assert_trees_all_equal(np.asarray(out[0]), np.zeros_like(out[0]))
    self.check(q, kc, vc, lengths, head_indices=jnp.asarray(self.head_indices(4, 2, 1)))

  def test_all_lengths_one(self):
    q, kc, vc, _ = self.inputs(2, self.MAX_LENS[0], 4, 2, self.HEAD_DIMS[0])
    out = self.check(q, kc, vc, np.ones(2, np.int32))
    # With one visible key the output is that key's value row (per KV group).
    expected = jnp.repeat(vc[:, 0], 2, axis=1)
    self.assert_close(out, expected, "float32")

  @parameterized.named_parameters(_named("dtype", ("bfloat16", "float16")))
  def test_low_precision(self, dtype):
    if dtype not in self.DTYPES:
      self.skipTest(f"{self.IMPLEMENTATION} does not test {dtype=}")
    q, kc, vc, lengths = self.inputs(3, self.MAX_LENS[-1], 8, 2, self.HEAD_DIMS[0], dtype)
    self.check(q, kc, vc, lengths)
    self.check(q, kc, vc, lengths, head_indices=jnp.asarray(self.head_indices(3, 2, 1)))

  def test_scale(self):
    q, kc, vc, lengths = self.inputs(2, self.MAX_LENS[0], 4, 2, self.HEAD_DIMS[0])
    self.check(q, kc, vc, lengths, scale=0.4)

  @parameterized.named_parameters(_named("logits_soft_cap", (2.0, 30.0)))
  def test_soft_cap(self, logits_soft_cap):
    q, kc, vc, lengths = self.inputs(2, self.MAX_LENS[0], 4, 2, self.HEAD_DIMS[0], scale=3.0)
    if not self.SUPPORTS_SOFT_CAP:
      with self.assertRaises(NotImplementedError):
        self.decode(q, kc, vc, lengths, logits_soft_cap=logits_soft_cap)
      return
    self.check(q, kc, vc, lengths, logits_soft_cap=logits_soft_cap)

  def test_traced_lengths_and_heads(self):
    """lengths and head_indices as jit arguments (not constants), plus eager mode."""
    q, kc, vc, lengths = self.inputs(3, self.MAX_LENS[-1], 8, 4, self.HEAD_DIMS[0])
    heads = self.head_indices(3, 4, 2)
    out = jax.jit(lambda *a: self.decode(*a[:4], head_indices=a[4]))(
        q, kc, vc, jnp.asarray(lengths), jnp.asarray(heads))
    expected = oracle.decode_oracle(q, kc, vc, lengths, head_indices=heads)
    self.assert_close(out, expected, "float32")
    eager = self.decode(q, kc, vc, jnp.asarray(lengths), head_indices=jnp.asarray(heads))
    self.assert_close(eager, expected, "float32")

  def test_out_of_range_traced_values_follow_the_policy(self):
    """Traced lengths are clamped to [0, S_max], head ids outside [0, Nkv) ignored."""
    max_len = self.MAX_LENS[-1]
    q, kc, vc, _ = self.inputs(3, max_len, 4, 2, self.HEAD_DIMS[0])
    lengths = jnp.array([-3, max_len + 9, 5], jnp.int32)
    heads = jnp.array([[-1, 1], [2, 0], [7, -4]], jnp.int32)  # row 2: no valid id
    out = jax.jit(lambda *a: self.decode(*a[:4], head_indices=a[4]))(q, kc, vc, lengths,
                                                                     heads)
    expected = np.array(oracle.decode_oracle(q, kc, vc, np.array([0, max_len, 5])))
    expected[0, :2] = expected[1, 2:] = expected[2] = 0.0  # groups not validly selected
    self.assert_close(out, expected, "float32")
    dense = jax.jit(self.decode)(q, kc, vc, lengths)
    self.assert_close(dense, oracle.decode_oracle(q, kc, vc, np.array([0, max_len, 5])),
                      "float32")

  @parameterized.named_parameters(
      {"testcase_name": f"{batch=}_{max_len=}", "batch": batch, "max_len": max_len}
      for batch, max_len in ((2, 0), (0, 64)))
  def test_empty_inputs(self, batch, max_len):
    head_dim = self.HEAD_DIMS[0]
    q = jnp.ones((batch, 4, head_dim), jnp.float32)
    kc = vc = jnp.ones((batch, max_len, 2, head_dim), jnp.float32)
    lengths = np.zeros(batch, np.int32)
    heads = np.zeros((batch, 1), np.int32)
    for fn in (self.decode, jax.jit(self.decode)):
      out = fn(q, kc, vc, lengths)
      chex.assert_trees_all_equal(out, jnp.zeros_like(q))
      chex.assert_trees_all_equal(fn(q, kc, vc, lengths, head_indices=heads), out)
