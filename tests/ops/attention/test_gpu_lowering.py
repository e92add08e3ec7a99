"""The GPU attention backends' kernels lowered for CUDA on a CPU host (tests/gpu_lowering.py).

For pallas_mosaic_gpu this lowers the compiled code paths that interpret mode does not take
(register layouts, transposed SMEM views, register wgmma operands, TMA reductions, Refs
through pl.kernel): forward, dQ and dK/dV, or the fused backward. pallas_triton and
partially_fused lower to Triton IR. What this cannot check: the PTX compilation and the
run (the *_gpu.py suites on a GPU).
"""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import flashjax
from flashjax.ops.attention import pallas_mosaic_gpu
from flashjax.ops.attention import pallas_mosaic_gpu_vjp
from flashjax.ops.attention.block_sizes import BlockSizes
from tests import gpu_lowering


def _lowered_kernels(head_dim=128, q_heads=4, kv_heads=2, length=512,
                     implementation="pallas_mosaic_gpu", grad=True, **kwargs) -> set[str]:
  """Exports forward + backward (grad=False: forward only) of one call for CUDA; returns the
  kernel names in the module."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, length, q_heads, head_dim)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((2, length, kv_heads, head_dim)), jnp.bfloat16)

  def attention(q, k, v):
    return flashjax.dot_product_attention(q, k, v, implementation=implementation, **kwargs)

  fn = (lambda q, k, v: jax.vjp(attention, q, k, v)[1](q)) if grad else attention
  text = gpu_lowering.export_for_cuda(fn, q, k, k)
  return gpu_lowering.kernel_names(text)


class TritonLoweringTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("causal_gqa", dict(is_causal=True), 64),
      ("documents_d128", dict(segment_ids=jnp.asarray(np.repeat(np.arange(4), 128)[None]
                                                      .repeat(2, 0).astype(np.int32))), 128),
      ("flags_dispatch", dict(is_causal=True, block_sizes=BlockSizes(64, 64,
                                                                     dispatch="flags")), 64),
  )
  def test_pallas_triton(self, kwargs, head_dim):
    names = _lowered_kernels(head_dim, implementation="pallas_triton", **kwargs)
    self.assertTrue({"flashjax_triton_fwd", "flashjax_triton_dq", "flashjax_triton_dkdv"}
                    <= names, names)

  def test_partially_fused(self):  # forward only: its backward is XLA's
    names = _lowered_kernels(64, 4, 4, implementation="partially_fused", grad=False,
                             is_causal=True)
    self.assertTrue({"partially_fused_scores", "partially_fused_pv"} <= names, names)


class MosaicGpuLoweringTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("dense_persistent", {}, 128),
      ("causal_gqa", dict(is_causal=True), 128),
      ("causal_d64", dict(is_causal=True), 64),
      ("soft_cap_window", dict(mask=flashjax.masks.sliding_window(512, 512, 100, 20),
                               logits_soft_cap=5.0), 128),
      ("stored_tiles", dict(mask=flashjax.masks.tree(
          np.concatenate([[-1], np.random.default_rng(1).integers(0, np.arange(1, 512))]))),
       128),
  )
  def test_two_kernel_backward(self, kwargs, head_dim):
    names = _lowered_kernels(head_dim, **kwargs)
    self.assertTrue({"flashjax_mosaic_gpu_fwd", "flashjax_mosaic_gpu_dq",
                     "flashjax_mosaic_gpu_dkdv"} <= names, names)

  @parameterized.named_parameters(
      ("dense_persistent", {}, 128),
      ("causal_per_item", dict(is_causal=True, block_sizes=BlockSizes(128, 128)), 128),
      ("documents_d64", dict(segment_ids=jnp.asarray(np.repeat(np.arange(4), 128)[None]
                                                     .repeat(2, 0).astype(np.int32))), 64),
      ("stored_tiles_soft_cap", dict(mask=flashjax.masks.tree(
          np.concatenate([[-1], np.random.default_rng(3).integers(0, np.arange(1, 512))])),
                                     logits_soft_cap=5.0), 128),
  )
  def test_intra_warpgroup_overlap_forward(self, kwargs, head_dim):
    """The experimental overlapped forward (INTRA_WG_OVERLAP) lowers: S and P V products
    of one run_state, the softmax between the S wait and the P V wait."""
    with mock.patch.object(pallas_mosaic_gpu, "INTRA_WG_OVERLAP", True):
      names = _lowered_kernels(head_dim, grad=False, **kwargs)
    self.assertIn("flashjax_mosaic_gpu_fwd", names)

  def test_documents(self):
    ids = np.sort(np.random.default_rng(2).integers(0, 5, (2, 512)), axis=1).astype(np.int32)
    names = _lowered_kernels(segment_ids=jnp.asarray(ids), is_causal=True)
    self.assertIn("flashjax_mosaic_gpu_dkdv", names)

  @parameterized.named_parameters(
      ("split_d128", 128, True, dict(is_causal=True)),
      ("unsplit_d128", 128, False, dict(is_causal=True)),
      ("d64", 64, True, dict(is_causal=True)),
      # One consumer at D = 32: run at D = 64 (fused_head_dim); unpadded, Mosaic GPU refuses
      # the dQ product's mismatched swizzles.
      ("one_consumer_d32", 32, True, dict(is_causal=True, block_sizes=BlockSizes(
          64, 64, fused_backward=True))),
      ("dense_persistent", 128, True, dict(block_sizes=BlockSizes(128, 128, persistent=True,
                                                                  fused_backward=True))),
  )
  def test_fused_backward(self, head_dim, split, kwargs):
    kwargs.setdefault("block_sizes", BlockSizes(128, 128, fused_backward=True))
    with mock.patch.object(pallas_mosaic_gpu_vjp, "SPLIT_DQ", split):
      names = _lowered_kernels(head_dim, **kwargs)
    self.assertIn("flashjax_mosaic_gpu_dkdv_dq", names)
    self.assertNotIn("flashjax_mosaic_gpu_dq", names)

  @parameterized.parameters(False, True)
  def test_backward_under_vmap(self, fused):
    """vmap over the gradient: the two-kernel backward batches through plgpu.kernel; the
    fused one (pl.kernel with Refs, no batching rule) refuses with NotImplementedError."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((3, 1, 256, 4, 64)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((3, 1, 256, 2, 64)), jnp.bfloat16)

    def attention(q, k, v):
      return flashjax.dot_product_attention(
          q, k, v, implementation="pallas_mosaic_gpu", is_causal=True,
          block_sizes=BlockSizes(128, 128, fused_backward=fused))

    grads = jax.vmap(lambda q, k, v: jax.vjp(attention, q, k, v)[1](q))
    if fused:
      with self.assertRaisesRegex(NotImplementedError, "fused_backward=False"):
        gpu_lowering.export_for_cuda(grads, q, k, k)
      return
    text = gpu_lowering.export_for_cuda(grads, q, k, k)
    # Forward, dQ and dK/dV, batched inside plgpu.kernel (which drops the kernel names).
    self.assertEqual(text.count("stablehlo.custom_call @mosaic_gpu"), 3)

  def test_lowering_errors_surface(self):
    """The export really lowers the kernel bodies: an op without a Mosaic GPU lowering rule
    inside the backward fails it."""
    scores = pallas_mosaic_gpu_vjp._dscores  # pylint: disable=protected-access
    with mock.patch.object(pallas_mosaic_gpu_vjp, "_dscores",
                           lambda *a, **k: jnp.cumsum(scores(*a, **k), axis=1)):
      with self.assertRaisesRegex(NotImplementedError, "cumsum"):
        _lowered_kernels(is_causal=True)


if __name__ == "__main__":
  absltest.main()
