"""Reference attention: dense float32 at Precision.HIGHEST, the oracle of the backend tests.

`mha_reference` takes the backend keyword protocol (flashjax.ops.attention.base), materialises
the whole [B|1, Nq|1, T, S] mask (Mask.to_dense(), or the expanded BlockMask with an RCM
permutation undone), repeats K/V heads for GQA and runs a plain softmax. It is deliberately
simple rather than fast; the array part is jitted, and the whole function can be jitted with
Mask objects closed over.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from flashjax.masks import block_mask as block_mask_lib
from flashjax.masks import masks as masks_lib
from flashjax.masks import rcm
from flashjax.masks.block_mask import BlockMask
from flashjax.ops.attention import base

_HIGHEST = lax.Precision.HIGHEST


def expand_block_mask(bm: BlockMask) -> jax.Array:
  """The element mask of a BlockMask in the original token order, bool [Bm, Nm, T, S].

  An RCM BlockMask describes the permuted sequences (mask[q_perm][:, kv_perm]); its
  expansion is un-permuted here, so the result always refers to the caller's q/k/v.
  """
  # jnp leaves: a host-built rule holds numpy ids, which cannot be indexed by traced
  # positions when this runs under jit.
  dense = block_mask_lib.expand_block_mask(jax.tree_util.tree_map(jnp.asarray, bm))
  return rcm.unpermute_dense_mask(dense, bm)


def dense_mask(
    *,
    mask: Any,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    is_causal: bool,
    q_len: int,
    kv_len: int,
) -> jax.Array | None:
  """AND of all mask arguments as a bool [B|1, Nq|1, T, S] array (None: all allowed).

  Args:
    mask: None | Mask | BlockMask | bool array of rank 2 to 4.
    q_segment_ids: None or int [B, T].
    kv_segment_ids: None or int [B, S].
    is_causal: allow only j <= i.
    q_len: T.
    kv_len: S.

  Returns:
    bool [B|1, Nq|1, T, S] or None.
  """
  parts = []
  if isinstance(mask, BlockMask):
    parts.append(expand_block_mask(mask))
  elif isinstance(mask, masks_lib.Mask):
    parts.append(jnp.asarray(mask.to_dense(), dtype=bool))
  elif mask is not None:
    parts.append(jnp.asarray(mask, dtype=bool))
  if is_causal:
    parts.append(jnp.tril(jnp.ones((q_len, kv_len), dtype=bool)))
  if q_segment_ids is not None:
    q_ids, kv_ids = jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids)
    parts.append((q_ids[:, :, None] == kv_ids[:, None, :])[:, None])
  if not parts:
    return None
  out = None
  for part in parts:
    part = part.reshape((1,) * (4 - part.ndim) + part.shape)
    out = part if out is None else out & part
  return out


@functools.partial(jax.jit, static_argnames=("scale", "logits_soft_cap"))
def _attend(query, key, value, bias, allowed, *, scale, logits_soft_cap):
  dtype = query.dtype
  q_heads, kv_heads = query.shape[2], key.shape[2]
  query, key, value = (x.astype(jnp.float32) for x in (query, key, value))
  key = jnp.repeat(key, q_heads // kv_heads, axis=2)
  value = jnp.repeat(value, q_heads // kv_heads, axis=2)
  logits = jnp.einsum("btnd,bsnd->bnts", query, key, precision=_HIGHEST) * scale
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if allowed is None:
    allowed = jnp.ones(logits.shape, dtype=bool)
  allowed = jnp.broadcast_to(allowed, logits.shape)
  # Rows without any allowed key: softmax over a constant row, zeroed afterwards; the
  # inner where keeps their gradients finite (and zero).
  has_key = jnp.any(allowed, axis=-1, keepdims=True)
  logits = jnp.where(allowed, logits, -jnp.inf)
  logits = jnp.where(has_key, logits, 0.0)
  probs = jnp.where(has_key, jax.nn.softmax(logits, axis=-1), 0.0)
  out = jnp.einsum("bnts,bsnd->btnd", probs, value, precision=_HIGHEST)
  return out.astype(dtype)


class Reference(base.AttentionBackend):
  """Dense float32 multi-head (grouped-query) attention: the oracle of the backend tests.

  Takes the backend-protocol keywords (flashjax.ops.attention.base), a bias included (added
  after the soft cap); block_sizes and interpret are ignored. Returns [B, T, Nq, D] in
  query's dtype; rows with no allowed key are zeros.
  """

  name = "reference"
  supports_bias = True

  def attend(self, args: base.AttentionArgs):
    allowed = dense_mask(mask=args.mask, q_segment_ids=args.q_segment_ids,
                         kv_segment_ids=args.kv_segment_ids, is_causal=args.is_causal,
                         q_len=args.q_len, kv_len=args.kv_len)
    bias = args.bias
    if bias is not None:
      bias = jnp.asarray(bias)
      bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    return _attend(args.query, args.key, args.value, bias, allowed, scale=float(args.scale),
                   logits_soft_cap=args.logits_soft_cap)


mha_reference = Reference()
