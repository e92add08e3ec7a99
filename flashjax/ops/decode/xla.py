"""XLA decode backend ("xla"): one query token per sequence against a KV cache.

Queries are viewed as [B, Nkv, G, D] (query head n = KV group n // G). With head_indices
of K < Nkv groups per sequence, only those groups' K/V (and queries) are gathered along the
head axis, attended, and scattered back into a zero output; with K == Nkv every group is
computed and the unselected ones are zeroed. Logits and softmax statistics are float32;
cache entries j >= lengths[b] are masked, and a sequence of length 0 outputs zeros.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from flashjax.ops.attention.xla import (finite_shift, masked_exp, masked_row_max,
                                        matmul_precision, safe_divide, soft_cap)
from flashjax.ops.decode import base


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, scale: float,
            cap: float | None) -> jax.Array:
  """q [B, K, G, D], k/v [B, S, K, D], lengths [B] -> float32 [B, K, G, D]."""
  logits = jnp.einsum("bkgd,bskd->bkgs", q, k, preferred_element_type=jnp.float32,
                      precision=matmul_precision(q.dtype))
  logits = soft_cap(logits * scale, cap)
  allowed = (jnp.arange(k.shape[1])[None, :] < lengths[:, None])[:, None, None, :]
  p = masked_exp(logits, allowed, finite_shift(masked_row_max(logits, allowed)))
  acc = jnp.einsum("bkgs,bskd->bkgd", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32, precision=matmul_precision(v.dtype))
  return safe_divide(acc, jnp.sum(p, axis=-1))


class Xla(base.DecodeBackend):
  """Decode attention in plain XLA (backend "xla"); interpret and block_sizes are ignored."""

  name = "xla"

  def attend(self, args: base.DecodeArgs) -> jax.Array:
    return _decode(args.query, args.key_cache, args.value_cache, args.lengths,
                   args.head_indices, args.scale, args.logits_soft_cap)


def _decode(query, key_cache, value_cache, lengths, head_indices, scale, logits_soft_cap):
  b, nq, d = query.shape
  nkv = key_cache.shape[2]
  q = query.reshape(b, nkv, nq // nkv, d)
  lengths = jnp.asarray(lengths, jnp.int32)
  if head_indices is None:
    out = _attend(q, key_cache, value_cache, lengths, scale, logits_soft_cap)
  else:
    head_indices = jnp.asarray(head_indices, jnp.int32)
    if head_indices.shape[1] < nkv:
      kv_idx = head_indices[:, None, :, None]  # [B, 1, K, 1] along the cache's head axis
      k = jnp.take_along_axis(key_cache, kv_idx, axis=2)
      v = jnp.take_along_axis(value_cache, kv_idx, axis=2)
      q_sel = jnp.take_along_axis(q, head_indices[:, :, None, None], axis=1)
      out_sel = _attend(q_sel, k, v, lengths, scale, logits_soft_cap)
      out = jnp.zeros(q.shape, jnp.float32).at[jnp.arange(b)[:, None], head_indices].set(
          out_sel)
    else:
      out = _attend(q, key_cache, value_cache, lengths, scale, logits_soft_cap)
      selected = jnp.any(head_indices[:, :, None] == jnp.arange(nkv), axis=1)  # [B, Nkv]
      out = jnp.where(selected[:, :, None, None], out, 0.0)
  return out.reshape(b, nq, d).astype(query.dtype)


decode_attention = Xla()
