"""The shared decode suite on the XLA backend, plus its KV-gather property."""

import jax
import jax.numpy as jnp
from absl.testing import absltest

from flashjax.ops.decode import xla
from tests import oracle
from tests.ops.decode import decode_suite


class TestXlaDecode(decode_suite.DecodeSuite):
  IMPLEMENTATION = "xla"

  def test_gathers_only_selected_kv_heads(self):
    """With K < Nkv the jaxpr gathers KV heads instead of reading whole caches."""
    q, kc, vc, lengths = self.inputs(2, 64, 8, 4, 32)
    heads = jnp.asarray(self.head_indices(2, 4, 1))
    fn = lambda *a: xla.decode_attention(*a, head_indices=heads, scale=0.2,
                                         logits_soft_cap=None)
    jaxpr = str(jax.make_jaxpr(fn)(q, kc, vc, jnp.asarray(lengths)))
    self.assertIn("gather", jaxpr)
    self.assertIn("f32[2,64,1,32]", jaxpr)  # K = 1 of the 4 KV heads
    out = fn(q, kc, vc, jnp.asarray(lengths))
    self.assert_close(out, oracle.decode_oracle(q, kc, vc, lengths, head_indices=heads,
                                                scale=0.2), "float32")


if __name__ == "__main__":
  absltest.main()
