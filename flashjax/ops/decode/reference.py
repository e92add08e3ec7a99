"""Reference decode attention: dense float32 at Precision.HIGHEST over all heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from flashjax.ops.decode import base


class Reference(base.DecodeBackend):
  """Decode attention computed densely, with unselected heads zeroed afterwards.

  Takes the backend-protocol keywords (flashjax.ops.decode.base): keys j >= lengths[b] are
  masked, length 0 gives zeros; interpret and block_sizes are ignored. Returns [B, Nq, D] in
  query's dtype.
  """

  name = "reference"

  def attend(self, args: base.DecodeArgs) -> jax.Array:
    nq, (s, nkv) = args.query.shape[1], args.key_cache.shape[1:3]
    q = args.query.astype(jnp.float32)
    k = jnp.repeat(args.key_cache.astype(jnp.float32), nq // nkv, axis=2)
    v = jnp.repeat(args.value_cache.astype(jnp.float32), nq // nkv, axis=2)
    logits = jnp.einsum("bnd,bsnd->bns", q, k, precision=lax.Precision.HIGHEST) * args.scale
    cap = args.logits_soft_cap
    if cap is not None:
      logits = cap * jnp.tanh(logits / cap)
    valid = jnp.arange(s)[None, :] < args.lengths[:, None]  # [B, S]
    logits = jnp.where(valid[:, None, :], logits, -jnp.inf)
    has_key = jnp.any(valid, axis=-1)[:, None, None]
    probs = jnp.where(has_key, jax.nn.softmax(jnp.where(has_key, logits, 0.0), axis=-1), 0.0)
    out = jnp.einsum("bns,bsnd->bnd", probs, v, precision=lax.Precision.HIGHEST)
    if args.head_indices is not None:
      group_of_head = jnp.arange(nq) // (nq // nkv)  # [Nq]
      keep = jnp.any(args.head_indices[:, :, None] == group_of_head, axis=1)  # [B, Nq]
      out = jnp.where(keep[:, :, None], out, 0.0)
    return out.astype(args.query.dtype)


decode_reference = Reference()
