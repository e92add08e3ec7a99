"""Fresh random attention inputs for tests, seeded by the test id (reproducible, never zeros)."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np


class RandomInputs:
  """Mixin for absltest cases: rng() seeded by self.id(), normal(), qkv()."""

  def rng(self) -> np.random.Generator:
    """A generator seeded by the test id: fresh inputs per case, reproducible runs."""
    if not hasattr(self, "_rng"):
      self._rng = np.random.default_rng(zlib.crc32(self.id().encode()))
    return self._rng

  def normal(self, shape, dtype: str = "float32", scale: float = 1.0) -> jax.Array:
    return jnp.asarray(self.rng().standard_normal(shape) * scale, dtype=dtype)

  def qkv(self, batch: int, q_len: int, kv_len: int, q_heads: int, kv_heads: int,
          head_dim: int, dtype: str = "float32", scale: float = 1.0):
    """q [B, T, Nq, D] (times `scale`), k and v [B, S, Nkv, D] (k times `scale`)."""
    return (self.normal((batch, q_len, q_heads, head_dim), dtype, scale),
            self.normal((batch, kv_len, kv_heads, head_dim), dtype, scale),
            self.normal((batch, kv_len, kv_heads, head_dim), dtype))
