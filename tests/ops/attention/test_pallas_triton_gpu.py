"""GPU-only checks of the pallas_triton backend: compiled Triton kernels, no interpret mode.

Skipped unless JAX runs on a GPU. Run on the GPU machine with
  JAX_PLATFORMS=cuda python -m pytest -q -s tests/ops/attention/test_pallas_triton_gpu.py
(`-s` shows the rough forward timing line).
"""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashjax import benchmarking
from flashjax.ops.attention import pallas_triton
from flashjax.ops.attention import reference
from tests.ops.attention import gpu_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]

_TOLERANCE = gpu_inputs.TOLERANCE
_inputs = gpu_inputs.random_qkv_do


def _assert_close(actual, expected, tol, name):
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  chex.assert_tree_all_finite(actual)
  err = np.max(np.abs(actual - expected)) / max(1.0, np.max(np.abs(expected)))
  assert err <= tol, f"{name}: relative max error {err:.3e} > {tol=}"


def _check_against_reference(q, k, v, do, tol, **kwargs):
  """Forward and q/k/v gradients of the kernel vs the float32 reference."""
  # Mask arrays reach the kernel as constants (host-built BlockMasks) and the reference as
  # arguments (no XLA constant folding of T x S masks).
  arrays = {name: kwargs.pop(name) for name in ("mask", "q_segment_ids", "kv_segment_ids")
            if name in kwargs}
  kernel = jax.jit(lambda q, k, v: pallas_triton.dot_product_attention(
      q, k, v, bias=None, interpret=False, **arrays, **kwargs))
  oracle = jax.jit(lambda q, k, v, arrays: reference.mha_reference(q, k, v, **arrays,
                                                                    **kwargs))
  out, vjp = jax.vjp(kernel, q, k, v)
  grads = vjp(do)
  f32 = lambda x: x.astype(jnp.float32)
  ref_out, ref_vjp = jax.vjp(lambda q, k, v: oracle(q, k, v, arrays), f32(q), f32(k), f32(v))
  ref_grads = ref_vjp(f32(do))
  _assert_close(out, ref_out, tol[0], "out")
  for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
    _assert_close(g, rg, tol[1], name)


class PallasTritonGpuTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{dtype.__name__}_{head_dim=}_{causal=}_{soft_cap=}_{q_len=}_{kv_len=}_{heads=}",
       dtype, head_dim, causal, soft_cap, q_len, kv_len, heads)
      for dtype, head_dim, causal, soft_cap, q_len, kv_len, heads in (
          (jnp.bfloat16, 128, False, None, 1024, 1024, (4, 4)),
          (jnp.bfloat16, 128, True, None, 1024, 1024, (8, 2)),
          (jnp.float16, 64, True, None, 512, 512, (4, 1)),
          (jnp.float32, 64, True, None, 512, 512, (4, 2)),
          (jnp.bfloat16, 256, True, None, 512, 512, (2, 2)),
          (jnp.bfloat16, 80, False, 30.0, 1000, 777, (4, 2)),
          (jnp.float32, 32, True, 20.0, 300, 300, (2, 1)),
      ))
  def test_matches_reference(self, dtype, head_dim, causal, soft_cap, q_len, kv_len, heads):
    q, k, v, do = _inputs(0, 2, q_len, kv_len, *heads, head_dim, dtype)
    _check_against_reference(q, k, v, do, _TOLERANCE[dtype], is_causal=causal,
                             logits_soft_cap=soft_cap, scale=head_dim ** -0.5)

  @parameterized.named_parameters(
      (f"{dtype.__name__}", dtype) for dtype in (jnp.bfloat16, jnp.float32))
  def test_documents_and_dense_mask(self, dtype):
    batch, length, heads = 2, 1024, 4
    q, k, v, do = _inputs(1, batch, length, length, heads, 2, 64, dtype)
    rng = np.random.default_rng(0)
    ids = np.sort(rng.integers(0, 5, (batch, length)), axis=1).astype(np.int32)
    _check_against_reference(q, k, v, do, _TOLERANCE[dtype], is_causal=True,
                             q_segment_ids=jnp.asarray(ids), kv_segment_ids=jnp.asarray(ids),
                             scale=0.125)
    # Per-head random band with fully masked query rows (stored tiles + zero rows).
    pos = np.arange(length)
    band = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < 200)
    mask = band[None, None] & (rng.random((1, heads, length, length)) < 0.5)
    mask[:, :, 100:140] = False
    _check_against_reference(q, k, v, do, _TOLERANCE[dtype], mask=jnp.asarray(mask),
                             scale=0.125)

  def test_empty_blocks_are_never_loaded(self):
    """Keys of a segment no query belongs to are NaN: only EMPTY tiles hold them."""
    batch, length = 2, 1024
    q, k, v, do = _inputs(2, batch, length, length, 4, 4, 128, jnp.bfloat16)
    q_ids = np.zeros((batch, length), np.int32)
    kv_ids = np.zeros((batch, length), np.int32)
    kv_ids[:, 512:768] = 9
    k_nan = k.at[:, 512:768].set(jnp.nan)
    v_nan = v.at[:, 512:768].set(jnp.nan)
    kwargs = dict(q_segment_ids=jnp.asarray(q_ids), kv_segment_ids=jnp.asarray(kv_ids),
                  scale=128 ** -0.5)
    fn = lambda q, k, v: pallas_triton.dot_product_attention(
        q, k, v, bias=None, interpret=False, **kwargs)
    out, vjp = jax.vjp(jax.jit(fn), q, k_nan, v_nan)
    dq, dk, dv = vjp(do)
    chex.assert_tree_all_finite((out, dq, dk, dv))
    ref_out = reference.mha_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                      v.astype(jnp.float32), **kwargs)
    _assert_close(out, ref_out, _TOLERANCE[jnp.bfloat16][0], "out")

  @parameterized.named_parameters((f"{causal=}", causal) for causal in (False, True))
  def test_forward_timing(self, causal):
    """Rough forward / forward+backward timing (B=4, T=4096, N=32, D=128, bf16)."""
    batch, length, heads, head_dim = 4, 4096, 32, 128
    q, k, v, do = _inputs(3, batch, length, length, heads, heads, head_dim, jnp.bfloat16)
    fwd = jax.jit(lambda q, k, v: pallas_triton.dot_product_attention(
        q, k, v, bias=None, is_causal=causal, scale=head_dim ** -0.5, interpret=False))
    fwd_bwd = jax.jit(lambda q, k, v, do: jax.vjp(
        lambda q, k, v: pallas_triton.dot_product_attention(
            q, k, v, bias=None, is_causal=causal, scale=head_dim ** -0.5, interpret=False),
        q, k, v)[1](do))
    t_fwd = benchmarking.time_fn(fwd, q, k, v)
    t_all = benchmarking.time_fn(fwd_bwd, q, k, v, do)
    flops = benchmarking.attention_flops(batch, length, length, heads, head_dim, causal)
    print(f"\npallas_triton {causal=} B={batch} T={length} N={heads} D={head_dim} bf16: "
          f"fwd {1e3 * t_fwd.median_s:.2f} ms ({flops / t_fwd.median_s / 1e12:.0f} TFLOP/s, "
          f"compile {t_fwd.compile_s:.1f} s); fwd+bwd {1e3 * t_all.median_s:.2f} ms "
          f"({3.5 * flops / t_all.median_s / 1e12:.0f} TFLOP/s)")
    out = fwd(q, k, v)
    ref_out = reference.mha_reference(q[:1, :, :2].astype(jnp.float32),
                                      k[:1, :, :2].astype(jnp.float32),
                                      v[:1, :, :2].astype(jnp.float32), is_causal=causal,
                                      scale=head_dim ** -0.5)
    _assert_close(out[:1, :, :2], ref_out, _TOLERANCE[jnp.bfloat16][0], "out")


if __name__ == "__main__":
  absltest.main()
