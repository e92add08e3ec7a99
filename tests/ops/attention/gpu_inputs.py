"""Inputs and tolerances shared by the compiled-kernel (GPU) attention tests."""

import jax
import jax.numpy as jnp

# Tolerances on max|err| / max(1, max|ref|), by input dtype: (output, gradients).
TOLERANCE = {jnp.float32: (2e-5, 1e-4), jnp.bfloat16: (2e-2, 3e-2),
             jnp.float16: (5e-3, 1e-2)}


def random_qkv_do(seed, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, dtype):
  """Fresh normal q [B, T, Nq, D], k / v [B, S, Nkv, D] and an output cotangent like q."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (batch, q_len, num_heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, kv_len, num_kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, kv_len, num_kv_heads, head_dim), dtype)
  do = jax.random.normal(keys[3], q.shape, dtype)
  return q, k, v, do
