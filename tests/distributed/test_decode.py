"""flashjax.distributed.sharded_decode_attention on fake CPU devices (tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import Mesh

import flashjax
from flashjax import distributed

B, S, NQ, NKV, D = 4, 32, 8, 4, 16


class ShardedDecodeTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if jax.device_count() < 8:
      self.skipTest(f"needs 8 devices, has {jax.device_count()}")
    rng = np.random.default_rng(0)
    self.q = jnp.asarray(rng.standard_normal((B, NQ, D)), jnp.float32)
    self.k = jnp.asarray(rng.standard_normal((B, S, NKV, D)), jnp.float32)
    self.v = jnp.asarray(rng.standard_normal((B, S, NKV, D)), jnp.float32)
    self.lengths = jnp.array([32, 5, 0, 17])

  @parameterized.named_parameters(
      ("batch_and_heads_2x4", (2, 4), "data", "heads", 2),
      ("heads_only_8", (1, 8), None, "heads", 3),  # Nkv=4 over 8 devices is refused below
      ("batch_only_4", (4, 2), "data", None, 1),
      ("dense_heads_4", (2, 4), "data", "heads", None),
  )
  def test_matches_single_device(self, shape, batch_axis, head_axis, k):
    mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "heads"))
    if head_axis is not None and NKV % mesh.shape[head_axis]:
      with self.assertRaisesRegex(ValueError, "Nkv=4"):
        distributed.sharded_decode_attention(self.q, self.k, self.v, self.lengths, mesh=mesh,
                                             head_axis=head_axis)
      mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 4), ("data", "heads"))
    ids = None
    if k is not None:
      ids = jnp.asarray(np.random.default_rng(1).integers(0, NKV, (B, k)))
    out = distributed.sharded_decode_attention(self.q, self.k, self.v, self.lengths,
                                               mesh=mesh, batch_axis=batch_axis,
                                               head_axis=head_axis, head_indices=ids)
    want = flashjax.decode_attention(self.q, self.k, self.v, self.lengths, head_indices=ids)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)

  def test_bad_axis(self):
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "heads"))
    with self.assertRaisesRegex(ValueError, "'model'"):
      distributed.sharded_decode_attention(self.q, self.k, self.v, self.lengths, mesh=mesh,
                                           head_axis="model")
    with self.assertRaisesRegex(ValueError, r"head_indices=\[\[4\]"):
      distributed.sharded_decode_attention(self.q, self.k, self.v, self.lengths, mesh=mesh,
                                           head_axis="heads",
                                           head_indices=np.array([[4], [0], [0], [0]]))


if __name__ == "__main__":
  absltest.main()
