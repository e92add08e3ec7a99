"""The shared attention suite on the XLA backends, plus vmap (XLA only)."""

import chex
import jax
import jax.numpy as jnp
from absl.testing import absltest

from flashjax.ops.attention.block_sizes import BlockSizes
from tests import oracle
from tests.ops.attention import attention_suite


class _VmapCase:
  """vmap over an extra leading axis (the Pallas suites do not require it)."""

  def test_vmap(self):
    q_len, kv_len = self.SEQ_LENS[-1]
    q, k, v = (x.reshape((3, 1) + x.shape[1:]) for x in self.qkv(3, q_len, kv_len, 2, 1, 32))
    out = jax.vmap(lambda q, k, v: self.attention(q, k, v, is_causal=True))(q, k, v)
    chex.assert_shape(out, q.shape)
    expected = oracle.attention_oracle(q[:, 0], k[:, 0], v[:, 0],
                                       allowed=oracle.causal_mask(q_len, kv_len))
    self.assert_close(out[:, 0], expected, "float32")


class TestXla(_VmapCase, attention_suite.AttentionSuite):
  IMPLEMENTATION = "xla"


class TestXlaChunked(_VmapCase, attention_suite.AttentionSuite):
  """Small chunks, so that every case crosses chunk boundaries (and pads the last ones)."""

  IMPLEMENTATION = "xla_chunked"
  BLOCK_SIZES = BlockSizes(block_q=32, block_kv=64)

  def test_default_chunks(self):
    q, k, v = self.qkv(1, 600, 700, 2, 1, 32)
    out = self.attention(q, k, v, is_causal=True, block_sizes=None)
    expected = oracle.attention_oracle(q, k, v, allowed=oracle.causal_mask(600, 700))
    self.assert_close(out, expected, "float32")
    chex.assert_type(out, jnp.float32)


if __name__ == "__main__":
  absltest.main()
