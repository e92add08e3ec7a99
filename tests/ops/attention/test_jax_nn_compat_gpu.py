"""GPU-only checks of the jax.nn-compatible arguments: compiled kernels, no interpret mode.

Skipped unless JAX runs on a GPU. Run on the GPU machine with
  JAX_PLATFORMS=cuda python -m pytest -q -m gpu tests/ops/attention/test_jax_nn_compat_gpu.py

* "cudnn" (jax.nn's cuDNN path) agrees with flashjax's "xla" on rows with an allowed key.
* The Pallas GPU backends run the new arguments (sequence lengths, local window, traced
  scale) compiled, and the platform check lets them through.
* Decode's out-of-range policy holds for the compiled Triton kernel.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized

import flashjax
from flashjax.ops.attention import api

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]

B, T, NQ, NKV, D = 2, 256, 8, 2, 64
KV_LENS = np.array([256, 90], np.int32)
Q_LENS = np.array([200, 256], np.int32)


def _qkv(seed: int, dtype=jnp.bfloat16):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (B, T, NQ, D), dtype),
          jax.random.normal(keys[1], (B, T, NKV, D), dtype),
          jax.random.normal(keys[2], (B, T, NKV, D), dtype))


def _rows(kwargs) -> np.ndarray:
  """bool [B, T, NQ]: query rows with at least one allowed key."""
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  ok = np.ones((B, T, T), bool)
  if kwargs.get("is_causal"):
    ok &= j <= i
  if kwargs.get("local_window_size") is not None:
    left, right = kwargs["local_window_size"]
    ok &= (i - left <= j) & (j <= i + right)
  if kwargs.get("query_seq_lengths") is not None:
    ok &= i < np.asarray(kwargs["query_seq_lengths"])[:, None, None]
  if kwargs.get("key_value_seq_lengths") is not None:
    ok &= j < np.asarray(kwargs["key_value_seq_lengths"])[:, None, None]
  return np.broadcast_to(ok.any(-1)[:, :, None], (B, T, NQ))


def _close_on_rows(actual, expected, rows, atol=2e-2):
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  np.testing.assert_allclose(actual[rows], expected[rows], atol=atol)


PATTERNS = {
    "plain": {},
    "is_causal": dict(is_causal=True),
    "seq_lengths": dict(query_seq_lengths=Q_LENS, key_value_seq_lengths=KV_LENS),
    "causal_window_lengths": dict(is_causal=True, local_window_size=(64, 0),
                                  key_value_seq_lengths=KV_LENS),
}


class JaxNnCompatGpuTest(parameterized.TestCase):

  @parameterized.named_parameters(
      {"testcase_name": f"{name=}", "name": name} for name in PATTERNS)
  def test_cudnn_matches_xla(self, name):
    kwargs = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v)
              for k, v in PATTERNS[name].items()}
    q, k, v = _qkv(0)
    out, lse = jax.jit(lambda *a: flashjax.dot_product_attention(
        *a, implementation="cudnn", return_residual=True, **kwargs))(q, k, v)
    ref, ref_lse = flashjax.dot_product_attention(q, k, v, implementation="xla",
                                                  return_residual=True, **kwargs)
    rows = _rows(kwargs)
    _close_on_rows(out, ref, rows)
    _close_on_rows(lse, ref_lse, rows, atol=5e-2)
    self.assertEqual(flashjax.resolve_implementation(
        flashjax.dot_product_attention, q, k, v, implementation=["cudnn", "xla"], **kwargs),
                     "cudnn")

  def test_cudnn_traced_scale(self):
    q, k, v = _qkv(1)
    out = jax.jit(lambda s: flashjax.dot_product_attention(q, k, v, scale=s, is_causal=True,
                                                           implementation="cudnn"))(0.2)
    ref = flashjax.dot_product_attention(q, k, v, scale=0.2, is_causal=True)
    _close_on_rows(out, ref, np.ones((B, T, NQ), bool))

  @parameterized.named_parameters(
      {"testcase_name": f"{implementation=}", "implementation": implementation}
      for implementation in ("pallas_triton", "pallas_mosaic_gpu"))
  def test_pallas_runs_jax_nn_arguments_compiled(self, implementation):
    hopper = str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")
    if implementation == "pallas_mosaic_gpu" and not hopper:
      with self.assertRaisesRegex(api.BackendUnavailableError, "compute capability 9.x"):
        flashjax.dot_product_attention(*_qkv(2), implementation=implementation)
      return
    q, k, v = _qkv(2)
    kwargs = dict(local_window_size=(64, 8), query_seq_lengths=jnp.asarray(Q_LENS),
                  key_value_seq_lengths=jnp.asarray(KV_LENS))
    out = jax.jit(lambda s, *a: flashjax.dot_product_attention(
        *a, scale=s, implementation=implementation, **kwargs))(0.15, q, k, v)
    ref = flashjax.dot_product_attention(q, k, v, scale=0.15, implementation="xla", **kwargs)
    rows = _rows(kwargs)
    _close_on_rows(out, ref, rows)
    np.testing.assert_array_equal(np.asarray(out, np.float32)[~rows], 0.0)
    self.assertEqual(flashjax.resolve_implementation(flashjax.dot_product_attention, q, k, v),
                     api.default_implementations()[0])

  def test_decode_out_of_range_policy_compiled(self):
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (3, 8, 64), jnp.float32)
    kc = jax.random.normal(keys[1], (3, 128, 2, 64), jnp.float32)
    vc = jax.random.normal(keys[2], (3, 128, 2, 64), jnp.float32)
    lengths = jnp.array([-3, 140, 5], jnp.int32)
    heads = jnp.array([[-1, 1], [2, 0], [7, -4]], jnp.int32)
    out = jax.jit(lambda n, h: flashjax.decode_attention(
        q, kc, vc, n, head_indices=h, implementation="pallas_triton"))(lengths, heads)
    expected = np.array(flashjax.decode_attention(q, kc, vc, np.array([0, 128, 5]),
                                                  implementation="xla"))
    expected[0, :4] = expected[1, 4:] = expected[2] = 0.0
    chex.assert_tree_all_finite(out)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5)


if __name__ == "__main__":
  absltest.main()
