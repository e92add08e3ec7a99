"""Backend-agnostic attention test suite.

Each backend subclasses `AttentionSuite` in its own test file and sets the class
attributes; subclasses are collected by pytest automatically (the base class is not):

  class TestMyBackend(attention_suite.AttentionSuite):
    IMPLEMENTATION = "pallas_triton"
    INTERPRET = True
    SUPPORTS_BIAS = False                  # the backend must then raise NotImplementedError
    BLOCK_SIZES = BlockSizes(block_q=64, block_kv=32)
    SKIP_CASES = {"test_grad_*": "backward pass not written yet"}

Every case calls `flashjax.dot_product_attention(..., implementation=IMPLEMENTATION,
interpret=INTERPRET, block_sizes=BLOCK_SIZES)` on fresh random inputs (seeded by the test
id) and compares with `flashjax.ops.attention.reference.mha_reference` (float32, HIGHEST)
and with the float64 oracle of tests/oracle.py, whose masks come from their definitions.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import flashjax
from flashjax import masks
from flashjax.ops.attention import reference
from tests import oracle
from tests.ops.attention import random_inputs

ALL_DTYPES = ("float32", "bfloat16", "float16")


def _named(name: str, values) -> list[dict[str, Any]]:
  """named_parameters cases `name=value` for each value."""
  return [{"testcase_name": f"{name}={v!r}", name: v} for v in values]


class AttentionSuite(random_inputs.RandomInputs, parameterized.TestCase):
  """Cases every attention backend must pass; configure through the class attributes.

  Attributes:
    IMPLEMENTATION: backend name given to flashjax.dot_product_attention.
    INTERPRET: run Pallas backends in interpret mode.
    SUPPORTS_BIAS: False: the backend must raise NotImplementedError for a bias.
    SUPPORTS_GRAD: False: gradient cases are skipped.
    SUPPORTS_MASK_OBJECTS: False: flashjax.masks Mask / BlockMask inputs must raise
      NotImplementedError.
    SUPPORTS_SOFT_CAP: False: logits_soft_cap must raise NotImplementedError.
    DTYPES: input dtypes to test, a subset of ALL_DTYPES.
    HEAD_DIMS: head dims; the dense cases cycle through them along SEQ_LENS.
    SEQ_LENS: (T, S) pairs of the dense cases (the last one is used by most other cases);
      include lengths that are not block multiples.
    MASK_SEQ_LEN: T = S of the mask-family cases.
    BLOCK_SIZES: None or the backend's BlockSizes, passed as block_sizes=.
    SKIP_CASES: {fnmatch pattern on the test method name: reason} of skipped cases.
    TOLERANCES: {dtype name: (atol, rtol)} of forward outputs.
    GRAD_TOLERANCES: {dtype name: (atol, rtol)} of gradients.
  """

  __test__ = False

  IMPLEMENTATION: str = "xla"
  INTERPRET: bool = False
  SUPPORTS_BIAS: bool = True
  SUPPORTS_GRAD: bool = True
  SUPPORTS_MASK_OBJECTS: bool = True
  SUPPORTS_SOFT_CAP: bool = True
  DTYPES: tuple[str, ...] = ALL_DTYPES
  HEAD_DIMS: tuple[int, ...] = (32, 64)
  SEQ_LENS: tuple[tuple[int, int], ...] = ((128, 128), (72, 200))
  MASK_SEQ_LEN: int = 160
  BLOCK_SIZES: Any = None
  SKIP_CASES: Mapping[str, str] = {}
  TOLERANCES: Mapping[str, tuple[float, float]] = {
      "float32": (5e-5, 1e-5), "bfloat16": (2e-2, 0.0), "float16": (5e-3, 0.0)}
  GRAD_TOLERANCES: Mapping[str, tuple[float, float]] = {
      "float32": (2e-4, 1e-4), "bfloat16": (5e-2, 2e-2), "float16": (1e-2, 1e-2)}

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    cls.__test__ = cls.__dict__.get("__test__", True)

  def setUp(self):
    super().setUp()
    for pattern, reason in self.SKIP_CASES.items():
      if fnmatch.fnmatchcase(self._testMethodName, pattern):
        self.skipTest(reason)

  # Helpers.

  def skip_unless_dtype(self, dtype: str) -> None:
    if dtype not in self.DTYPES:
      self.skipTest(f"{self.IMPLEMENTATION} does not test {dtype=}")

  def attention(self, query, key, value, **kwargs) -> jax.Array:
    """flashjax.dot_product_attention with this backend's settings."""
    kwargs.setdefault("block_sizes", self.BLOCK_SIZES)
    return flashjax.dot_product_attention(query, key, value,
                                          implementation=self.IMPLEMENTATION,
                                          interpret=self.INTERPRET, **kwargs)

  @staticmethod
  def reference_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Public-API keyword arguments -> backend-protocol ones for mha_reference."""
    kwargs = dict(kwargs)
    kwargs.pop("block_sizes", None)
    segment_ids = kwargs.pop("segment_ids", None)
    if segment_ids is not None:
      q_ids, kv_ids = segment_ids if isinstance(segment_ids, tuple) else (segment_ids,) * 2
      kwargs.update(q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    mask = kwargs.get("mask")
    if isinstance(mask, (np.ndarray, jax.Array)):
      kwargs["mask"] = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    return kwargs

  def assert_close(self, actual, expected, dtype: str, grad: bool = False,
                   what: str = "") -> None:
    atol, rtol = (self.GRAD_TOLERANCES if grad else self.TOLERANCES)[dtype]
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    chex.assert_tree_all_finite(actual)
    chex.assert_trees_all_close(actual, np.asarray(jnp.asarray(expected, jnp.float32)), atol=atol,
                                rtol=rtol, custom_message=what)

  def check(self, query, key, value, *, allowed=None, **kwargs) -> jax.Array:
    """Runs the backend (jitted, kwargs closed over) against the reference and the oracle.

    Args:
      query: [B, T, Nq, D].
      key: [B, S, Nkv, D].
      value: [B, S, Nkv, D].
      allowed: the mask's definition for the oracle, bool broadcastable to [B, Nq, T, S]
        (None: everything allowed).
      **kwargs: dot_product_attention keyword arguments.

    Returns:
      The backend output.
    """
    dtype = jnp.dtype(query.dtype).name
    out = jax.jit(lambda q, k, v: self.attention(q, k, v, **kwargs))(query, key, value)
    chex.assert_shape(out, query.shape)
    chex.assert_type(out, query.dtype)
    ref = reference.mha_reference(query, key, value, **self.reference_kwargs(kwargs))
    self.assert_close(out, ref, dtype, what="vs mha_reference")
    expected = oracle.attention_oracle(
        query, key, value, allowed=allowed, bias=kwargs.get("bias"),
        scale=kwargs.get("scale"), logits_soft_cap=kwargs.get("logits_soft_cap"))
    self.assert_close(out, expected, dtype, what="vs float64 oracle")
    return out

  def check_grads(self, query, key, value, **kwargs) -> tuple[jax.Array, ...]:
    """Checks d(sum(out * ct))/d(q, k, v) against jax.grad of the reference."""
    if not self.SUPPORTS_GRAD:
      self.skipTest(f"{self.IMPLEMENTATION} has no gradients")
    dtype = jnp.dtype(query.dtype).name
    cotangent = self.normal(query.shape)
    ref_kwargs = self.reference_kwargs(kwargs)

    def loss(fn, q, k, v, **kw):
      return jnp.sum(fn(q, k, v, **kw).astype(jnp.float32) * cotangent)

    grads = jax.jit(jax.grad(lambda q, k, v: loss(self.attention, q, k, v, **kwargs),
                             argnums=(0, 1, 2)))(query, key, value)
    expected = jax.grad(lambda q, k, v: loss(reference.mha_reference, q, k, v, **ref_kwargs),
                        argnums=(0, 1, 2))(query, key, value)
    for name, g, e, x in zip("qkv", grads, expected, (query, key, value)):
      chex.assert_shape(g, x.shape)
      self.assert_close(g, e, dtype, grad=True, what=f"d{name}")
    return grads

  # Dense cases.

  @parameterized.named_parameters(_named("is_causal", (False, True)))
  def test_dense(self, is_causal):
    for i, (q_len, kv_len) in enumerate(self.SEQ_LENS):
      head_dim = self.HEAD_DIMS[i % len(self.HEAD_DIMS)]
      with self.subTest(q_len=q_len, kv_len=kv_len, head_dim=head_dim):
        q, k, v = self.qkv(2, q_len, kv_len, 2, 2, head_dim)
        allowed = oracle.causal_mask(q_len, kv_len) if is_causal else None
        self.check(q, k, v, is_causal=is_causal, allowed=allowed)

  @parameterized.named_parameters(
      {"testcase_name": f"{q_heads=}_{kv_heads=}_{is_causal=}", "q_heads": q_heads,
       "kv_heads": kv_heads, "is_causal": is_causal}
      for q_heads, kv_heads in ((4, 1), (4, 2)) for is_causal in (False, True))
  def test_gqa(self, q_heads, kv_heads, is_causal):
    q_len, kv_len = self.SEQ_LENS[-1]
    q, k, v = self.qkv(2, q_len, kv_len, q_heads, kv_heads, self.HEAD_DIMS[0])
    allowed = oracle.causal_mask(q_len, kv_len) if is_causal else None
    self.check(q, k, v, is_causal=is_causal, allowed=allowed)

  @parameterized.named_parameters(_named("scale", (0.05, 0.5)))
  def test_scale(self, scale):
    q_len, kv_len = self.SEQ_LENS[0]
    q, k, v = self.qkv(2, q_len, kv_len, 2, 1, self.HEAD_DIMS[0])
    self.check(q, k, v, scale=scale, is_causal=True,
               allowed=oracle.causal_mask(q_len, kv_len))

  @parameterized.named_parameters(_named("logits_soft_cap", (2.0, 30.0)))
  def test_soft_cap(self, logits_soft_cap):
    q_len, kv_len = self.SEQ_LENS[0]
    # Large inputs so that the cap changes the result.
    q, k, v = self.qkv(2, q_len, kv_len, 2, 2, self.HEAD_DIMS[0], scale=3.0)
    if not self.SUPPORTS_SOFT_CAP:
      with self.assertRaises(NotImplementedError):
        self.attention(q, k, v, logits_soft_cap=logits_soft_cap)
      return
    self.check(q, k, v, logits_soft_cap=logits_soft_cap, is_causal=True,
               allowed=oracle.causal_mask(q_len, kv_len))

  @parameterized.named_parameters(_named("bias_shape", ("BNTS", "1NTS", "B1TS", "TS")))
  def test_bias(self, bias_shape):
    q_len, kv_len = self.SEQ_LENS[-1]
    b, n = 2, 2
    q, k, v = self.qkv(b, q_len, kv_len, n, n, self.HEAD_DIMS[0])
    sizes = {"B": b, "N": n, "T": q_len, "S": kv_len, "1": 1}
    bias = self.normal(tuple(sizes[c] for c in bias_shape), scale=2.0)
    if not self.SUPPORTS_BIAS:
      with self.assertRaises(NotImplementedError):
        self.attention(q, k, v, bias=bias)
      return
    self.check(q, k, v, bias=bias, is_causal=True, allowed=oracle.causal_mask(q_len, kv_len))

  @parameterized.named_parameters(_named("dtype", ("bfloat16", "float16")))
  def test_low_precision(self, dtype):
    self.skip_unless_dtype(dtype)
    q_len, kv_len = self.SEQ_LENS[-1]
    q, k, v = self.qkv(2, q_len, kv_len, 4, 2, self.HEAD_DIMS[-1], dtype)
    self.check(q, k, v, is_causal=True, allowed=oracle.causal_mask(q_len, kv_len))

  # Masks given as arrays and segment ids.

  def _segment_ids(self, batch: int, length: int, num_segments: int = 3) -> np.ndarray:
    """Sorted (packed documents) int32 [batch, length] ids with random boundaries."""
    out = np.zeros((batch, length), np.int32)
    for row in range(batch):
      cuts = np.sort(self.rng().choice(np.arange(1, length), num_segments - 1, replace=False))
      out[row] = np.searchsorted(cuts, np.arange(length), side="right")
    return out

  @parameterized.named_parameters(_named("is_causal", (False, True)))
  def test_segment_ids(self, is_causal):
    length = self.MASK_SEQ_LEN
    q, k, v = self.qkv(2, length, length, 2, 2, self.HEAD_DIMS[0])
    ids = self._segment_ids(2, length)
    allowed = oracle.segment_mask(ids, ids)
    if is_causal:
      allowed = allowed & oracle.causal_mask(length, length)
    self.check(q, k, v, segment_ids=jnp.asarray(ids), is_causal=is_causal, allowed=allowed)

  def test_segment_ids_cross(self):
    q_len, kv_len = self.SEQ_LENS[-1]
    q, k, v = self.qkv(2, q_len, kv_len, 2, 1, self.HEAD_DIMS[0])
    q_ids, kv_ids = self._segment_ids(2, q_len), self._segment_ids(2, kv_len)
    self.check(q, k, v, segment_ids=(jnp.asarray(q_ids), jnp.asarray(kv_ids)),
               allowed=oracle.segment_mask(q_ids, kv_ids))

  @parameterized.named_parameters(_named("mask_shape", ("BNTS", "B1TS", "1NTS", "TS", "B11S",
                                                        "numpy_TS")))
  def test_bool_array(self, mask_shape):
    q_len, kv_len = self.SEQ_LENS[-1]
    b, n = 2, 2
    q, k, v = self.qkv(b, q_len, kv_len, n, n, self.HEAD_DIMS[0])
    sizes = {"B": b, "N": n, "T": q_len, "S": kv_len, "1": 1}
    shape = tuple(sizes[c] for c in mask_shape.removeprefix("numpy_"))
    mask = self.rng().random(shape) < 0.3
    if not mask_shape.startswith("numpy_"):
      mask = jnp.asarray(mask)
    self.check(q, k, v, mask=mask, allowed=np.asarray(mask))

  def test_bool_array_and_causal_and_segments(self):
    length = self.MASK_SEQ_LEN
    q, k, v = self.qkv(2, length, length, 2, 2, self.HEAD_DIMS[0])
    ids = self._segment_ids(2, length, num_segments=2)
    mask = self.rng().random((2, 1, length, length)) < 0.5
    allowed = mask & oracle.causal_mask(length, length) & oracle.segment_mask(ids, ids)
    self.check(q, k, v, mask=jnp.asarray(mask), is_causal=True, segment_ids=jnp.asarray(ids),
               allowed=allowed)

  # flashjax.masks Mask objects and BlockMasks.

  def block_mask_tiles(self) -> tuple[int, int]:
    """Tile sizes of the BlockMasks given to the backend."""
    if self.BLOCK_SIZES is None:
      return 32, 64
    return self.BLOCK_SIZES.block_q, self.BLOCK_SIZES.block_kv

  def _parents(self, length: int) -> np.ndarray:
    """Random tree over `length` nodes: node i's parent is an earlier node (0 is the root)."""
    return np.array([-1] + [self.rng().integers(0, i) for i in range(1, length)])

  def mask_case(self, family: str, batch: int, heads: int):
    """(T, S, mask, allowed): a Mask or BlockMask of `family` and its definition.

    Args:
      family: one of MASK_FAMILIES.
      batch: B.
      heads: Nq.

    Returns:
      T, S, the mask argument and the oracle's bool mask broadcastable to [B, Nq, T, S].
    """
    n = self.MASK_SEQ_LEN
    ids = self._segment_ids(batch, n)
    doc_window = masks.document(ids) & masks.sliding_window(n, n, left=40)
    doc_window_def = oracle.segment_mask(ids, ids) & oracle.sliding_window_mask(n, n, 40)
    if family == "causal":
      return n, n, masks.causal(n, n), oracle.causal_mask(n, n)
    if family == "causal_offset":  # the first 3 rows attend to nothing
      return n, n, masks.causal(n, n, offset=-3), oracle.causal_mask(n, n, -3)
    if family == "causal_cross":  # bottom-right aligned, T != S
      t, s = self.SEQ_LENS[-1]
      return t, s, masks.causal(t, s, offset=s - t), oracle.causal_mask(t, s, s - t)
    if family == "sliding_window":
      return n, n, masks.sliding_window(n, n, 19, 5), oracle.sliding_window_mask(n, n, 19, 5)
    if family == "document":
      return n, n, masks.document(ids), oracle.segment_mask(ids, ids) & oracle.causal_mask(
          n, n)
    if family == "document_bidirectional":
      return n, n, masks.document(ids, causal=False), oracle.segment_mask(ids, ids)
    if family == "prefix_lm":
      return n, n, masks.prefix_lm(ids, 6), oracle.prefix_lm_mask(ids, 6)
    if family == "tree":
      parents = self._parents(n)
      return n, n, masks.tree(parents), oracle.tree_mask(parents)
    if family == "dilated":
      return n, n, masks.dilated(n, n, 4, 3), oracle.dilated_mask(n, n, 4, 3)
    if family == "global_tokens":
      g = [0, 37, n - 1]
      return n, n, masks.global_tokens(n, n, 8, g), oracle.global_tokens_mask(n, n, 8, g)
    if family == "random_banded":
      mask = masks.random_banded(n, n, seed=int(self.rng().integers(1 << 16)))
      return n, n, mask, mask.to_dense()
    if family == "from_dense":
      dense = self.rng().random((batch, heads, n, n)) < 0.2
      return n, n, masks.from_dense(dense), dense
    if family == "and_computable":
      return n, n, doc_window, doc_window_def
    if family == "and_dense":
      dense = self.rng().random((n, n)) < 0.5
      return n, n, masks.from_dense(dense) & masks.causal(n, n), dense & oracle.causal_mask(
          n, n)
    if family == "or":
      g = [5, 70]
      return n, n, masks.dilated(n, n, 3, 4) | masks.global_tokens(n, n, 2, g), (
          oracle.dilated_mask(n, n, 3, 4) | oracle.global_tokens_mask(n, n, 2, g))
    if family == "block_mask":
      return n, n, masks.BlockMask.from_mask(doc_window, *self.block_mask_tiles()), (
          doc_window_def)
    if family == "block_mask_dense":
      dense = self.rng().random((batch, 1, n, n)) < 0.1
      return n, n, masks.BlockMask.from_mask(masks.from_dense(dense),
                                             *self.block_mask_tiles()), dense
    if family == "block_mask_rcm":
      parents = self._parents(n)
      tree_mask = masks.tree(parents)
      return n, n, masks.BlockMask.from_mask(tree_mask, *self.block_mask_tiles(),
                                             reorder="rcm"), oracle.tree_mask(parents)
    raise ValueError(f"unknown {family=}")

  MASK_FAMILIES = ("causal", "causal_offset", "causal_cross", "sliding_window", "document",
                   "document_bidirectional", "prefix_lm", "tree", "dilated", "global_tokens",
                   "random_banded", "from_dense", "and_computable", "and_dense", "or",
                   "block_mask", "block_mask_dense", "block_mask_rcm")

  @parameterized.named_parameters(_named("family", MASK_FAMILIES))
  def test_mask_family(self, family):
    b, n = 2, 2
    q_len, kv_len, mask, allowed = self.mask_case(family, b, n)
    q, k, v = self.qkv(b, q_len, kv_len, n, n, self.HEAD_DIMS[0])
    if not self.SUPPORTS_MASK_OBJECTS:
      with self.assertRaises(NotImplementedError):
        self.attention(q, k, v, mask=mask)
      return
    self.check(q, k, v, mask=mask, allowed=allowed)

  @parameterized.named_parameters(_named("family", ("sliding_window", "tree", "block_mask")))
  def test_mask_family_gqa_causal_segments(self, family):
    """A Mask ANDed with is_causal and segment ids, under GQA."""
    if not self.SUPPORTS_MASK_OBJECTS:
      self.skipTest(f"{self.IMPLEMENTATION} takes no Mask objects")
    b = 2
    q_len, kv_len, mask, allowed = self.mask_case(family, b, 4)
    if family == "block_mask":
      # A BlockMask already carries its tiles: combine with causal only.
      kwargs, allowed = {}, allowed & oracle.causal_mask(q_len, kv_len)
    else:
      ids = self._segment_ids(b, q_len, num_segments=2)
      kwargs = {"segment_ids": jnp.asarray(ids)}
      allowed = allowed & oracle.causal_mask(q_len, kv_len) & oracle.segment_mask(ids, ids)
    q, k, v = self.qkv(b, q_len, kv_len, 4, 2, self.HEAD_DIMS[-1])
    self.check(q, k, v, mask=mask, is_causal=True, allowed=allowed, **kwargs)

  @parameterized.named_parameters(_named("family", ("sliding_window", "tree", "block_mask",
                                                    "block_mask_rcm")))
  def test_grad_mask_family(self, family):
    if not self.SUPPORTS_MASK_OBJECTS:
      self.skipTest(f"{self.IMPLEMENTATION} takes no Mask objects")
    q_len, kv_len, mask, _ = self.mask_case(family, 2, 2)
    q, k, v = self.qkv(2, q_len, kv_len, 2, 2, self.HEAD_DIMS[0])
    self.check_grads(q, k, v, mask=mask)

  # Rows without any allowed key.

  def _zero_row_inputs(self):
    q_len, kv_len = self.SEQ_LENS[-1]
    q, k, v = self.qkv(2, q_len, kv_len, 2, 2, self.HEAD_DIMS[0])
    mask = self.rng().random((2, 2, q_len, kv_len)) < 0.5
    empty_rows = (np.array([0, 1, 1]), np.array([1, 0, 1]), np.array([0, q_len - 1, 3]))
    mask[empty_rows] = False
    return q, k, v, mask, empty_rows

  def test_zero_rows(self):
    q, k, v, mask, (bs, ns, ts) = self._zero_row_inputs()
    out = self.check(q, k, v, mask=jnp.asarray(mask), allowed=mask)
    chex.assert_trees_all_equal(np.asarray(out)[bs, ts, ns], np.zeros_like(out[bs, ts, ns]))

  def test_zero_rows_segment_ids(self):
    # Query segment 7 appears in no key: those rows attend to nothing.
    q_len, kv_len = self.SEQ_LENS[-1]
    q, k, v = self.qkv(2, q_len, kv_len, 2, 2, self.HEAD_DIMS[0])
    q_ids, kv_ids = self._segment_ids(2, q_len), self._segment_ids(2, kv_len)
    q_ids[:, :5] = 7
    out = self.check(q, k, v, segment_ids=(jnp.asarray(q_ids), jnp.asarray(kv_ids)),
                     allowed=oracle.segment_mask(q_ids, kv_ids))
    chex.assert_trees_all_equal(np.asarray(out[:, :5]), np.zeros_like(out[:, :5]))

  def test_grad_zero_rows(self):
    q, k, v, mask, (bs, ns, ts) = self._zero_row_inputs()
    dq, _, _ = self.check_grads(q, k, v, mask=jnp.asarray(mask))
    chex.assert_trees_all_equal(np.asarray(dq)[bs, ts, ns], np.zeros_like(dq[bs, ts, ns]))

  # Gradients.

  @parameterized.named_parameters(_named("is_causal", (False, True)))
  def test_grad_dense(self, is_causal):
    q_len, kv_len = self.SEQ_LENS[-1]
    q, k, v = self.qkv(2, q_len, kv_len, 2, 2, self.HEAD_DIMS[0])
    self.check_grads(q, k, v, is_causal=is_causal)

  def test_grad_gqa(self):
    q_len, kv_len = self.SEQ_LENS[0]
    q, k, v = self.qkv(1, q_len, kv_len, 4, 2, self.HEAD_DIMS[-1])
    self.check_grads(q, k, v, is_causal=True)

  def test_grad_segment_ids(self):
    length = self.MASK_SEQ_LEN
    q, k, v = self.qkv(2, length, length, 2, 1, self.HEAD_DIMS[0])
    self.check_grads(q, k, v, is_causal=True,
                     segment_ids=jnp.asarray(self._segment_ids(2, length)))

  def test_grad_soft_cap_scale(self):
    if not self.SUPPORTS_SOFT_CAP:
      self.skipTest(f"{self.IMPLEMENTATION} has no soft cap")
    q_len, kv_len = self.SEQ_LENS[0]
    q, k, v = self.qkv(1, q_len, kv_len, 2, 2, self.HEAD_DIMS[0], scale=3.0)
    self.check_grads(q, k, v, is_causal=True, logits_soft_cap=5.0, scale=0.3)

  @parameterized.named_parameters(_named("dtype", ("bfloat16", "float16")))
  def test_grad_low_precision(self, dtype):
    self.skip_unless_dtype(dtype)
    q_len, kv_len = self.SEQ_LENS[0]
    q, k, v = self.qkv(1, q_len, kv_len, 2, 2, self.HEAD_DIMS[0], dtype)
    self.check_grads(q, k, v, is_causal=True)

  # Transformations.

  def test_eager(self):
    q_len, kv_len = self.SEQ_LENS[0]
    q, k, v = self.qkv(1, q_len, kv_len, 2, 2, self.HEAD_DIMS[0])
    out = self.attention(q, k, v, is_causal=True)
    self.assert_close(out, oracle.attention_oracle(q, k, v, allowed=oracle.causal_mask(
        q_len, kv_len)), "float32")

  def test_jit(self):
    length = self.MASK_SEQ_LEN
    q, k, v = self.qkv(2, length, length, 4, 2, self.HEAD_DIMS[0])
    ids = self._segment_ids(2, length)
    mask = self.rng().random((2, 1, length, length)) < 0.7

    @jax.jit
    def fn(q, k, v, mask, ids):
      return self.attention(q, k, v, mask=mask, segment_ids=ids, is_causal=True)

    out = fn(q, k, v, jnp.asarray(mask), jnp.asarray(ids))
    expected = oracle.attention_oracle(
        q, k, v, allowed=mask & oracle.segment_mask(ids, ids) & oracle.causal_mask(length,
                                                                                   length))
    self.assert_close(out, expected, "float32")
