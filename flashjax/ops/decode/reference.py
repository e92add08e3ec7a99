"""Reference decode attention: dense float32 at Precision.HIGHEST over all heads."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def decode_reference(
    query: jax.Array,
    key_cache: jax.Array,
    value_cache: jax.Array,
    lengths: jax.Array,
    *,
    head_indices: jax.Array | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Decode attention computed densely, with unselected heads zeroed afterwards.

  Args:
    query: [B, Nq, D].
    key_cache: [B, S_max, Nkv, D].
    value_cache: [B, S_max, Nkv, D].
    lengths: int [B]; keys j >= lengths[b] are masked, length 0 gives zeros.
    head_indices: None or int [B, K] KV-group ids to keep per sequence.
    scale: logit scale (None: 1 / sqrt(D)).
    logits_soft_cap: None or cap > 0: logits = cap * tanh(logits / cap).
    interpret: ignored.

  Returns:
    [B, Nq, D] in query's dtype.
  """
  del interpret
  b, nq, d = query.shape
  s, nkv = key_cache.shape[1], key_cache.shape[2]
  if scale is None:
    scale = 1.0 / math.sqrt(d)
  q = query.astype(jnp.float32)
  k = jnp.repeat(key_cache.astype(jnp.float32), nq // nkv, axis=2)
  v = jnp.repeat(value_cache.astype(jnp.float32), nq // nkv, axis=2)
  logits = jnp.einsum("bnd,bsnd->bns", q, k, precision=lax.Precision.HIGHEST) * scale
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  valid = jnp.arange(s)[None, :] < jnp.asarray(lengths)[:, None]  # [B, S]
  logits = jnp.where(valid[:, None, :], logits, -jnp.inf)
  has_key = jnp.any(valid, axis=-1)[:, None, None]
  probs = jnp.where(has_key, jax.nn.softmax(jnp.where(has_key, logits, 0.0), axis=-1), 0.0)
  out = jnp.einsum("bns,bsnd->bnd", probs, v, precision=lax.Precision.HIGHEST)
  if head_indices is not None:
    group_of_head = jnp.arange(nq) // (nq // nkv)  # [Nq]
    keep = jnp.any(jnp.asarray(head_indices)[:, :, None] == group_of_head, axis=1)  # [B, Nq]
    out = jnp.where(keep[:, :, None], out, 0.0)
  return out.astype(query.dtype)
