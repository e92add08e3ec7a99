""""pallas_mosaic_gpu" decode: a documented reuse of pallas_triton's kernel (interpret mode)."""

import zlib
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax.numpy as jnp
import numpy as np

import flashjax
from flashjax.ops.attention import api as attention_api
from flashjax.ops.decode import api as decode_api
from flashjax.ops.decode import block_sizes
from flashjax.ops.decode import pallas_mosaic_gpu
from flashjax.ops.decode import pallas_triton
from tests import oracle
from tests.ops.decode import decode_suite
from tests.ops.decode import test_pallas_triton as cases

_HOPPER_ORDER = ("pallas_mosaic_gpu", "pallas_triton", "xla")


class MosaicGpuDecodeAliasTest(parameterized.TestCase):

  def inputs(self, head_dim=32):
    return cases.make_inputs(zlib.crc32(self.id().encode()), 3, 96, 8, 2, head_dim,
                             jnp.bfloat16, [96, 1, 50])

  @parameterized.named_parameters(
      dict(testcase_name=f"{sparse=}_{num_splits=}", sparse=sparse, num_splits=num_splits)
      for sparse, num_splits in ((False, None), (True, 2)))
  def test_runs_the_triton_kernel(self, sparse, num_splits):
    args = self.inputs()
    heads = jnp.array([[1], [0], [1]], jnp.int32) if sparse else None
    config = block_sizes.DecodeBlockSizes(num_splits=num_splits)
    out = flashjax.decode_attention(*args, head_indices=heads, block_sizes=config,
                                    implementation="pallas_mosaic_gpu", interpret=True)
    triton = pallas_triton.decode_attention(*args, head_indices=heads, scale=32**-0.5,
                                            logits_soft_cap=None, interpret=True,
                                            block_sizes=config)
    chex.assert_trees_all_equal(out, triton)  # the same kernel, bit for bit
    expected = oracle.decode_oracle(*args, head_indices=heads)
    chex.assert_trees_all_close(np.asarray(out, np.float32), expected, atol=2e-2)

  def test_not_implemented_names_the_reused_kernel(self):
    args = self.inputs(head_dim=48)
    with self.assertRaisesRegex(NotImplementedError,
                                "pallas_mosaic_gpu decode runs pallas_triton.*head_dim=48"):
      flashjax.decode_attention(*args, implementation="pallas_mosaic_gpu", interpret=True)
    self.assertEqual(pallas_mosaic_gpu.KERNEL, "pallas_triton")
    self.assertEqual(decode_api.ALIASES, {"pallas_mosaic_gpu": "pallas_triton"})

  def test_default_order_on_hopper_skips_the_alias(self):
    self.enter_context(mock.patch.object(attention_api, "default_implementations",
                                         return_value=_HOPPER_ORDER))
    self.assertEqual(decode_api.default_implementations(), ("pallas_triton", "xla"))
    # implementation=None must reach pallas_triton without ever calling the alias.
    refuse = mock.Mock(side_effect=AssertionError("the alias was tried"))
    self.enter_context(mock.patch.object(pallas_mosaic_gpu, "decode_attention", refuse))
    args = self.inputs()
    out = flashjax.decode_attention(*args, interpret=True)
    refuse.assert_not_called()
    chex.assert_trees_all_close(np.asarray(out, np.float32), oracle.decode_oracle(*args),
                                atol=2e-2)
    # With a non power-of-two head dim pallas_triton refuses and xla runs.
    args = self.inputs(head_dim=48)
    out = flashjax.decode_attention(*args, interpret=True)
    refuse.assert_not_called()
    chex.assert_trees_all_close(np.asarray(out, np.float32), oracle.decode_oracle(*args),
                                atol=2e-2)


class TestMosaicGpuAliasPolicy(decode_suite.DecodeSuite):
  """The out-of-range and empty-input cases of the suite on the alias (the rest of the suite
  runs on pallas_triton, whose kernel the alias runs)."""

  IMPLEMENTATION = "pallas_mosaic_gpu"
  INTERPRET = True
  SKIP_CASES = {pattern: "runs on pallas_triton (same kernel)" for pattern in (
      "test_dense*", "test_head_sparse*", "test_lengths_edge_cases", "test_all_lengths_one",
      "test_low_precision*", "test_scale", "test_soft_cap*", "test_traced_lengths_and_heads")}


class DecodeBlockSizesTest(parameterized.TestCase):
  """The API's block_sizes argument: validation and pass-through to the backends."""

  def inputs(self):
    return cases.make_inputs(zlib.crc32(self.id().encode()), 2, 64, 4, 2, 16, jnp.float32,
                             [64, 33])

  def test_bad_block_sizes_raise_value_error(self):
    with self.assertRaisesRegex(ValueError, r"block_sizes=\(64, 2\) must be None or a"):
      flashjax.decode_attention(*self.inputs(), block_sizes=(64, 2))

  @parameterized.named_parameters(
      dict(testcase_name=f"{implementation=}", implementation=implementation)
      for implementation in ("pallas_triton", "pallas_tpu", "pallas_mosaic_gpu"))
  def test_split_count_reaches_the_backend(self, implementation):
    args = self.inputs()
    # 64 positions hold at most 4 tiles of 16: 5 splits is the backend's ValueError.
    with self.assertRaisesRegex(ValueError, "num_splits=5 exceeds"):
      flashjax.decode_attention(*args, implementation=implementation, interpret=True,
                                block_sizes=block_sizes.DecodeBlockSizes(block_kv=16, num_splits=5))
    out = flashjax.decode_attention(*args, implementation=implementation, interpret=True,
                                    block_sizes=block_sizes.DecodeBlockSizes(block_kv=16,
                                                                     num_splits=4))
    chex.assert_trees_all_close(out, oracle.decode_oracle(*args), atol=5e-5, rtol=1e-5)

  def test_xla_ignores_block_sizes(self):
    args = self.inputs()
    out = flashjax.decode_attention(*args, implementation="xla",
                                    block_sizes=block_sizes.DecodeBlockSizes(num_splits=64))
    chex.assert_trees_all_close(out, oracle.decode_oracle(*args), atol=5e-5, rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
