"""XLA attention backends: "xla" (one fused softmax over T x S) and "xla_chunked".

Both follow the backend protocol of docs/architecture.md and are plain jax.numpy, so jax
autodiff, jit and vmap apply. Grouped-query attention never repeats K/V: queries are viewed
as [B, T, Nkv, G, D] (query head n = kv head n // G, group member n % G) and contracted
against the Nkv key heads directly.

Masks are evaluated from their cheapest description: `is_causal`, segment ids and the
`ElementRule` of a flashjax.masks Mask are computed from positions (per chunk in
"xla_chunked"); Mask objects without a rule use `to_dense()`, a BlockMask is expanded to
its element mask in the original token order (reference.expand_block_mask, which undoes an
RCM permutation), and bool arrays are used as given (sliced per chunk in "xla_chunked").

Numerics: logits and softmax statistics are float32 (float32 inputs contract at
Precision.HIGHEST, low-precision inputs at the default precision with float32
accumulation); probabilities are cast to the value dtype for the P @ V product, which is
normalised afterwards. Rows with no allowed key output zeros with zero gradients: masked
logits never reach `exp` (double `where`) and the row maximum is a stop-gradient shift.
Both take `return_residual=True` (the row log-sum-exp [B, T, Nq] as jax.nn returns it, -inf
for rows without an allowed key) and a traced `scale` (a float32 scalar array).

"xla_chunked" scans key/value chunks with an online softmax (running max, running sum,
rescaled accumulator) inside a sequential map over query chunks, so no T x S array is built
for computable masks; each kv step is rematerialised in the backward pass. Chunk sizes are
`block_sizes.block_q` x `block_sizes.block_kv` when given, else up to
DEFAULT_CHUNK x DEFAULT_CHUNK. api.py registers it as the name "xla_chunked".
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from flashjax.masks import masks as masks_lib
from flashjax.masks.block_mask import BlockMask
from flashjax.masks.rule import ElementRule
from flashjax.ops.attention import base
from flashjax.ops.attention.reference import expand_block_mask
from flashjax.ops.tiling import pad_axis

DEFAULT_CHUNK = 512


def matmul_precision(dtype) -> lax.Precision:
  """HIGHEST for float32 operands, DEFAULT (float32 accumulation) for 16-bit ones."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else lax.Precision.DEFAULT


def residual(shift: jax.Array, denom: jax.Array, dtype) -> jax.Array:
  """Log-sum-exp [B, T, K * G] in dtype from float32 [B, K, G, T] softmax statistics.

  -inf for rows without an allowed key (denom 0); no gradient flows through it (as
  jax.nn.dot_product_attention's residual).
  """
  lse = lax.stop_gradient(shift) + jnp.log(lax.stop_gradient(denom))
  b, k, g, t = lse.shape
  return lse.transpose(0, 3, 1, 2).reshape(b, t, k * g).astype(dtype)


def soft_cap(logits: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(logits / cap), or logits unchanged when cap is None."""
  return logits if cap is None else cap * jnp.tanh(logits / cap)


def masked_row_max(logits: jax.Array, allowed: jax.Array | None) -> jax.Array:
  """Max over the last axis of the allowed logits ([..., S] -> [...]); -inf if none."""
  if allowed is not None:
    logits = jnp.where(allowed, logits, -jnp.inf)
  return lax.stop_gradient(jnp.max(logits, axis=-1))


def finite_shift(row_max: jax.Array) -> jax.Array:
  """The softmax shift: the row max, or 0 for rows without any finite allowed logit."""
  return jnp.where(jnp.isneginf(row_max), 0.0, row_max)


def masked_exp(logits: jax.Array, allowed: jax.Array | None, shift: jax.Array) -> jax.Array:
  """exp(logits - shift[..., None]) where allowed, exactly 0 (and 0 gradient) elsewhere."""
  shift = shift[..., None]
  if allowed is None:
    return jnp.exp(logits - shift)
  # The inner where keeps exp's argument at 0 on masked entries, so neither the forward
  # nor the backward pass ever sees inf there.
  return jnp.where(allowed, jnp.exp(jnp.where(allowed, logits, shift) - shift), 0.0)


def safe_divide(acc: jax.Array, denom: jax.Array) -> jax.Array:
  """acc / denom[..., None], with rows of denom == 0 (no allowed key) giving acc (zeros)."""
  return acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]


def _group(x: jax.Array | None, kv_heads: int) -> jax.Array | None:
  """[Bx, Nx, tq, tk] -> [Bx, Nkv|1, G|1, tq, tk] (Nx is 1 or Nq = Nkv * G)."""
  if x is None:
    return None
  bx, nx, tq, tk = x.shape
  if nx == 1:
    return x[:, :, None]
  return x.reshape(bx, kv_heads, nx // kv_heads, tq, tk)


def _and(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
  if a is None:
    return b
  if b is None:
    return a
  return a & b


class MaskParts:
  """All mask inputs of one call, evaluated on any (query chunk, key chunk) window.

  Attributes:
    q_len, kv_len: true T and S (positions >= kv_len are padding and never allowed).
    kv_padded: whether windows may reach keys >= kv_len.
    is_causal: j <= i.
    q_seg, kv_seg: int32 [B, T'] / [B, S'] (T', S' >= T, S after padding) or None.
    rule: ElementRule with jnp arrays, or None.
    dense: bool [Bm, Nm, T', S'] or None.
  """

  def __init__(self, *, mask: Any, q_segment_ids: Any, kv_segment_ids: Any, is_causal: bool,
               q_len: int, kv_len: int):
    self.q_len, self.kv_len, self.is_causal = q_len, kv_len, is_causal
    self.kv_padded = False
    self.q_seg = None if q_segment_ids is None else jnp.asarray(q_segment_ids, jnp.int32)
    self.kv_seg = None if kv_segment_ids is None else jnp.asarray(kv_segment_ids, jnp.int32)
    self.rule, dense = None, None
    if isinstance(mask, BlockMask):
      dense = expand_block_mask(mask)
    elif isinstance(mask, masks_lib.Mask):
      rule = mask.rule()
      if rule is None:
        dense = mask.to_dense()
      else:
        conv = lambda a: None if a is None else jnp.asarray(a)
        self.rule = ElementRule(rule.band, conv(rule.q_segment_ids),
                                conv(rule.kv_segment_ids), conv(rule.kv_in_prefix))
    elif mask is not None:
      dense = mask
    if dense is not None:
      dense = jnp.asarray(dense, dtype=bool)
      dense = dense.reshape((1,) * (4 - dense.ndim) + dense.shape)
    self.dense = dense

  def pad(self, q_pad: int, kv_pad: int) -> None:
    """Extends the per-position arrays by q_pad queries and kv_pad keys (never allowed)."""
    self.kv_padded = kv_pad > 0
    if self.q_seg is not None:
      self.q_seg = jnp.pad(self.q_seg, ((0, 0), (0, q_pad)))
      self.kv_seg = jnp.pad(self.kv_seg, ((0, 0), (0, kv_pad)))
    if self.dense is not None:
      self.dense = jnp.pad(self.dense, ((0, 0), (0, 0), (0, q_pad), (0, kv_pad)))

  def window(self, q0: Any, tq: int, k0: Any, tk: int) -> jax.Array | None:
    """Allowed-ness of queries q0..q0+tq-1 and keys k0..k0+tk-1.

    Args:
      q0: first query position (int or traced int).
      tq: number of query positions (static).
      k0: first key position.
      tk: number of key positions (static).

    Returns:
      bool broadcastable to [B, Nq, tq, tk], or None when every pair is allowed.
    """
    q_pos = q0 + jnp.arange(tq, dtype=jnp.int32)
    kv_pos = k0 + jnp.arange(tk, dtype=jnp.int32)
    ok = None
    if self.is_causal:
      ok = (kv_pos[None, :] <= q_pos[:, None])[None, None]
    if self.q_seg is not None:
      q_ids = lax.dynamic_slice_in_dim(self.q_seg, q0, tq, axis=1)
      kv_ids = lax.dynamic_slice_in_dim(self.kv_seg, k0, tk, axis=1)
      ok = _and(ok, (q_ids[:, :, None] == kv_ids[:, None, :])[:, None])
    if self.rule is not None:
      # Rule arrays have the true lengths; clipped positions only affect padding, which is
      # discarded (queries) or excluded by the bounds check (keys).
      rule_ok = self.rule.evaluate(jnp.minimum(q_pos, self.q_len - 1),
                                   jnp.minimum(kv_pos, self.kv_len - 1))
      ok = _and(ok, rule_ok.reshape((-1, 1, tq, tk)))
    if self.dense is not None:
      bm, nm = self.dense.shape[:2]
      ok = _and(ok, lax.dynamic_slice(self.dense, (0, 0, q0, k0), (bm, nm, tq, tk)))
    if self.kv_padded:
      ok = _and(ok, (kv_pos < self.kv_len)[None, None, None, :])
    return ok


def _logits(q: jax.Array, k: jax.Array, scale: float, cap: float | None) -> jax.Array:
  """q [B, tq, K, G, D], k [B, tk, K, D] -> float32 logits [B, K, G, tq, tk]."""
  s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32,
                 precision=matmul_precision(q.dtype))
  return soft_cap(s * scale, cap)


def _pv(p: jax.Array, v: jax.Array) -> jax.Array:
  """p [B, K, G, tq, tk] float32, v [B, tk, K, D] -> float32 [B, K, G, tq, D]."""
  return jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v,
                    preferred_element_type=jnp.float32, precision=matmul_precision(v.dtype))


def _from_grouped(out: jax.Array, dtype) -> jax.Array:
  """[B, K, G, T, D] -> [B, T, K * G, D] in dtype."""
  b, k, g, t, d = out.shape
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, d).astype(dtype)


class Xla(base.AttentionBackend):
  """Attention with one softmax over the full [T, S] logits (backend "xla").

  Takes the canonical arguments of flashjax.ops.attention.base, a bias included, and a
  traced scale; block_sizes and interpret are ignored. `return_residual=True` also returns
  the log-sum-exp of the allowed logits, [B, T, Nq] in query's dtype.
  """

  name = "xla"
  supports_bias = True

  def attend(self, args: base.AttentionArgs, *, return_residual: bool = False):
    return _attend_dense(args.query, args.key, args.value, args.bias, args.mask,
                         args.q_segment_ids, args.kv_segment_ids, args.is_causal, args.scale,
                         args.logits_soft_cap, return_residual)


def _attend_dense(query, key, value, bias, mask, q_segment_ids, kv_segment_ids, is_causal,
                  scale, logits_soft_cap, return_residual):
  b, t, nq, d = query.shape
  s, nkv = key.shape[1], key.shape[2]
  parts = MaskParts(mask=mask, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                    is_causal=is_causal, q_len=t, kv_len=s)
  allowed = _group(parts.window(0, t, 0, s), nkv)
  logits = _logits(query.reshape(b, t, nkv, nq // nkv, d), key, scale, logits_soft_cap)
  if bias is not None:
    logits = logits + _group(bias, nkv).astype(jnp.float32)
  shift = finite_shift(masked_row_max(logits, allowed))
  p = masked_exp(logits, allowed, shift)
  denom = jnp.sum(p, axis=-1)
  out = _from_grouped(safe_divide(_pv(p, value), denom), query.dtype)
  if return_residual:
    return out, residual(shift, denom, query.dtype)
  return out


class XlaChunked(base.AttentionBackend):
  """Online-softmax attention over kv chunks, one query chunk at a time ("xla_chunked").

  As `Xla`; `block_sizes.block_q` / `.block_kv` set the chunk sizes (default up to
  DEFAULT_CHUNK each). T and S need not be chunk multiples.
  """

  name = "xla_chunked"
  supports_bias = True

  def attend(self, args: base.AttentionArgs, *, return_residual: bool = False):
    return _attend_chunked(args.query, args.key, args.value, args.bias, args.mask,
                           args.q_segment_ids, args.kv_segment_ids, args.is_causal,
                           args.scale, args.logits_soft_cap, args.block_sizes,
                           return_residual)


def _attend_chunked(query, key, value, bias, mask, q_segment_ids, kv_segment_ids, is_causal,
                    scale, logits_soft_cap, block_sizes, return_residual):
  b, t, nq, d = query.shape
  s, nkv = key.shape[1], key.shape[2]
  g = nq // nkv
  if block_sizes is None:
    cq, ck = min(t, DEFAULT_CHUNK), min(s, DEFAULT_CHUNK)
  else:
    cq, ck = block_sizes.block_q, block_sizes.block_kv
  n_q, n_kv = -(-t // cq), -(-s // ck)
  t_pad, s_pad = n_q * cq, n_kv * ck

  parts = MaskParts(mask=mask, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                    is_causal=is_causal, q_len=t, kv_len=s)
  parts.pad(t_pad - t, s_pad - s)
  q = pad_axis(query, 1, t_pad).reshape(b, t_pad, nkv, g, d)
  k = pad_axis(key, 1, s_pad)
  v = pad_axis(value, 1, s_pad)
  if bias is not None:
    bias = pad_axis(pad_axis(bias, 2, t_pad), 3, s_pad)

  def q_chunk(qi):
    q0 = qi * cq
    q_blk = lax.dynamic_slice_in_dim(q, q0, cq, axis=1)

    def kv_step(carry, kj):
      row_max, row_sum, acc = carry
      k0 = kj * ck
      k_blk = lax.dynamic_slice_in_dim(k, k0, ck, axis=1)
      v_blk = lax.dynamic_slice_in_dim(v, k0, ck, axis=1)
      logits = _logits(q_blk, k_blk, scale, logits_soft_cap)  # [B, K, G, cq, ck]
      if bias is not None:
        bb, bn = bias.shape[:2]
        logits = logits + _group(lax.dynamic_slice(bias, (0, 0, q0, k0), (bb, bn, cq, ck)),
                                 nkv).astype(jnp.float32)
      allowed = _group(parts.window(q0, cq, k0, ck), nkv)
      new_max = jnp.maximum(row_max, masked_row_max(logits, allowed))
      shift = finite_shift(new_max)
      p = masked_exp(logits, allowed, shift)
      rescale = jnp.exp(row_max - shift)  # 0 while no allowed key was seen (-inf max)
      row_sum = rescale * row_sum + jnp.sum(p, axis=-1)
      acc = rescale[..., None] * acc + _pv(p, v_blk)
      return (new_max, row_sum, acc), None

    init = (jnp.full((b, nkv, g, cq), -jnp.inf, jnp.float32),
            jnp.zeros((b, nkv, g, cq), jnp.float32),
            jnp.zeros((b, nkv, g, cq, d), jnp.float32))
    (row_max, row_sum, acc), _ = lax.scan(jax.checkpoint(kv_step), init,
                                          jnp.arange(n_kv, dtype=jnp.int32))
    # [B, K, G, cq, D] and the softmax statistics [B, K, G, cq]
    return safe_divide(acc, row_sum), finite_shift(row_max), row_sum

  out, shift, denom = lax.map(q_chunk, jnp.arange(n_q, dtype=jnp.int32))  # [n_q, B, ...]
  out = out.transpose(1, 2, 3, 0, 4, 5).reshape(b, nkv, g, t_pad, d)
  out = _from_grouped(out, query.dtype)[:, :t]
  if not return_residual:
    return out
  stats = [x.transpose(1, 2, 3, 0, 4).reshape(b, nkv, g, t_pad)[..., :t]
           for x in (shift, denom)]
  return out, residual(*stats, query.dtype)


dot_product_attention = Xla()
dot_product_attention_chunked = XlaChunked()
