"""The GPU decode kernels lowered for CUDA on a CPU host (tests/gpu_lowering.py): dense and
head-sparse, GQA, both GPU backends. The run itself is test_decode_gpu.py's."""

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import flashjax
from tests import gpu_lowering


class DecodeLoweringTest(parameterized.TestCase):

  @parameterized.product(implementation=("pallas_triton", "pallas_mosaic_gpu"),
                         head_sparse=(False, True))
  def test_lowers(self, implementation, head_sparse):
    rng = np.random.default_rng(0)
    batch, kv_len, q_heads, kv_heads, head_dim = 4, 1024, 16, 8, 128
    query = jnp.asarray(rng.standard_normal((batch, q_heads, head_dim)), jnp.bfloat16)
    cache = jnp.asarray(rng.standard_normal((batch, kv_len, kv_heads, head_dim)), jnp.bfloat16)
    lengths = jnp.asarray(rng.integers(1, kv_len, batch), jnp.int32)
    heads = jnp.asarray(np.sort(rng.permuted(np.tile(np.arange(kv_heads), (batch, 1)),
                                             axis=1)[:, :4], axis=1), jnp.int32)

    def decode(query, cache, lengths, heads):
      return flashjax.decode_attention(query, cache, cache, lengths,
                                       head_indices=heads if head_sparse else None,
                                       implementation=implementation)

    text = gpu_lowering.export_for_cuda(decode, query, cache, lengths, heads)
    self.assertTrue(gpu_lowering.kernel_names(text), "no flashjax kernel in the module")


if __name__ == "__main__":
  absltest.main()
