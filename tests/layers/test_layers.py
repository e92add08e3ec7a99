"""Tests of flashjax.layers: norms, rotary embeddings, segment positions, attention."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

from flashjax import layers

HIGHEST = jax.lax.Precision.HIGHEST


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _jit(module: nnx.Module, method: str = "__call__"):
  """module.method jitted over its arguments (weights closed over; eager ops are slow)."""
  graphdef, state = nnx.split(module)
  return jax.jit(lambda *args: getattr(nnx.merge(graphdef, state), method)(*args))


class NormTest(parameterized.TestCase):

  @parameterized.named_parameters((f"{dtype=}", dtype) for dtype in ("float32", "bfloat16"))
  def test_norms_match_numpy(self, dtype):
    x = 3 * _normal(0, (2, 5, 16)) + 1
    rms, ln = layers.RMSNorm(16, eps=1e-6), layers.LayerNorm(16, eps=1e-5)
    rms.scale[...] = _normal(1, (16,))
    ln.scale[...], ln.bias[...] = _normal(2, (16,)), _normal(3, (16,))
    x64 = np.asarray(x, np.float64)
    want_rms = x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + 1e-6) * np.asarray(
        rms.scale[...])
    centred = x64 - x64.mean(-1, keepdims=True)
    want_ln = centred / np.sqrt(np.mean(centred ** 2, -1, keepdims=True) + 1e-5) * np.asarray(
        ln.scale[...]) + np.asarray(ln.bias[...])
    tol = 1e-5 if dtype == "float32" else 5e-2
    for layer, want in ((rms, want_rms), (ln, want_ln)):
      got = layer(x.astype(dtype))
      self.assertEqual(got.dtype, jnp.dtype(dtype))
      chex.assert_trees_all_close(np.asarray(got, np.float64), want, atol=tol, rtol=tol)


class RotaryTest(parameterized.TestCase):

  def test_scores_depend_on_position_difference_only(self):
    q, k = _normal(4, (1, 1, 2, 32)), _normal(5, (1, 1, 2, 32))

    def score(i, j):
      qi = layers.apply_rope(q, jnp.array([[i]]), 100.0)
      kj = layers.apply_rope(k, jnp.array([[j]]), 100.0)
      return jnp.einsum("BTNH,BTNH->N", qi, kj, precision=HIGHEST)

    chex.assert_trees_all_close(score(7, 3), score(24, 20), atol=1e-4)
    chex.assert_trees_all_close(score(0, 0), jnp.einsum("BTNH,BTNH->N", q, k,
                                                        precision=HIGHEST), atol=1e-5)
    self.assertGreater(float(jnp.abs(score(7, 3) - score(7, 4)).max()), 1e-3)

  def test_pairs_features_half_apart(self):
    x = _normal(6, (1, 3, 1, 8))
    positions = jnp.array([[0, 1, 5]])
    got = np.asarray(layers.apply_rope(x, positions, 10.0), np.float64)
    x64 = np.asarray(x, np.float64)
    angles = np.array([0, 1, 5])[:, None] * 10.0 ** (-np.arange(0, 8, 2) / 8)
    c, s = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
    x1, x2 = x64[..., :4], x64[..., 4:]
    want = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    chex.assert_trees_all_close(got, want, atol=1e-5)

  def test_segment_positions_restart(self):
    ids = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3], [4, 4, 4, 4, 4, 4, 4, 4]])
    np.testing.assert_array_equal(layers.segment_positions(ids),
                                  [[0, 1, 2, 0, 1, 0, 1, 2], list(range(8))])


class AttentionTest(parameterized.TestCase):

  def _module(self, implementation="xla"):
    return layers.Attention(32, 4, 2, 8, use_bias=True, rope_theta=10000.0,
                            implementation=implementation,
                            decode_implementation=implementation, init_std=0.3,
                            rngs=nnx.Rngs(0))

  def test_matches_dense_reference(self):
    module = self._module()
    x = _normal(7, (2, 12, 32))
    ids = jnp.array([[1] * 5 + [2] * 7, [3] * 12])
    positions = layers.segment_positions(ids)
    got = _jit(module)(x, positions, ids)
    q, k, v = _jit(module, "_qkv")(x, positions)
    k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    s = jnp.einsum("BTNH,BSNH->BNTS", q, k, precision=HIGHEST) / np.sqrt(8)
    allowed = (ids[:, None, :, None] == ids[:, None, None, :]) & jnp.tril(
        jnp.ones((12, 12), bool))
    p = jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), axis=-1)
    heads = jnp.einsum("BNTS,BSNH->BTNH", p, v, precision=HIGHEST)
    want = jnp.einsum("BTNH,NHD->BTD", heads, module.o_proj[...], precision=HIGHEST)
    chex.assert_trees_all_close(got, want + module.o_bias[...], atol=1e-4)

  def test_decode_writes_the_cache_and_matches_prefill(self):
    module = self._module()
    x = _normal(8, (2, 6, 32))
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    full = _jit(module)(x, positions)
    cache = jnp.zeros((2, 8, 2, 8))
    out, keys, values = _jit(module, "prefill")(x[:, :5], positions[:, :5], cache, cache)
    chex.assert_trees_all_close(out, full[:, :5], atol=1e-5)
    step, keys, values = _jit(module, "decode")(x[:, 5], jnp.array([5, 5]), keys, values)
    chex.assert_trees_all_close(step, full[:, 5], atol=1e-5)
    _, k, _ = _jit(module, "_qkv")(x, positions)
    chex.assert_trees_all_close(keys[:, :6], k, atol=1e-6)
    np.testing.assert_array_equal(keys[:, 6:], 0)

  def test_jax_nn_decode_zeroes_unselected_groups(self):
    q, k, v = _normal(9, (2, 4, 8)), _normal(10, (2, 6, 2, 8)), _normal(11, (2, 6, 2, 8))
    lengths = jnp.array([3, 6])
    heads = jnp.array([[1], [0]], jnp.int32)
    decode = lambda impl: jax.jit(lambda *a: layers.cached_decode_attention(
        *a, head_indices=heads, implementation=impl))(q, k, v, lengths)
    ours, theirs = decode("xla"), decode("jax_nn_xla")
    chex.assert_trees_all_close(theirs, ours, atol=1e-5)
    np.testing.assert_array_equal(theirs[0, :2], 0)
    self.assertGreater(float(jnp.abs(theirs[0, 2:]).max()), 1e-3)


if __name__ == "__main__":
  absltest.main()
