"""GPU-only checks of the partially_fused backend: compiled Triton kernels, no interpret mode.

Skipped unless JAX runs on a GPU. Run on the GPU machine with
  JAX_PLATFORMS=cuda python -m pytest -q tests/ops/attention/test_partially_fused_gpu.py
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashjax.ops.attention import partially_fused
from flashjax.ops.attention import reference
from tests.ops.attention import gpu_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]

_TOLERANCE = gpu_inputs.TOLERANCE
_inputs = gpu_inputs.random_qkv_do


def _rel_err(actual, expected):
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  assert np.all(np.isfinite(actual))
  return np.max(np.abs(actual - expected)) / max(1.0, np.max(np.abs(expected)))


class PartiallyFusedGpuTest(parameterized.TestCase):

  @parameterized.product(
      shape=[(2, 256, 256, 4, 4, 64), (1, 300, 517, 8, 2, 128), (1, 1024, 1024, 4, 1, 80)],
      is_causal=[False, True],
      dtype=[jnp.float32, jnp.bfloat16, jnp.float16])
  def test_compiled_matches_reference(self, shape, is_causal, dtype):
    q, k, v, do = _inputs(sum(shape), *shape, dtype)
    kernel = jax.jit(lambda q, k, v: partially_fused.dot_product_attention(
        q, k, v, is_causal=is_causal, interpret=False))
    f32 = lambda x: x.astype(jnp.float32)
    oracle = jax.jit(lambda q, k, v: reference.mha_reference(q, k, v, is_causal=is_causal))
    out, vjp = jax.vjp(kernel, q, k, v)
    ref_out, ref_vjp = jax.vjp(oracle, f32(q), f32(k), f32(v))
    out_tol, grad_tol = _TOLERANCE[dtype]
    self.assertEqual(out.dtype, dtype)
    self.assertLessEqual(_rel_err(out, ref_out), out_tol)
    for name, g, rg in zip("qkv", vjp(do), ref_vjp(f32(do))):
      self.assertLessEqual(_rel_err(g, rg), grad_tol, msg=f"d{name}")


if __name__ == "__main__":
  absltest.main()
