"""Context-parallel (sequence-sharded) attention over one mesh axis.

q, k and v arrive sharded along the sequence over the mesh axis `axis_name` (P devices);
every device computes the output rows of the queries it holds. Two strategies:

  ring       P steps: the local queries attend the K/V shard held now (with
             `flashjax.ops.attention.api.attention_with_lse`, which also returns the row
             log-sum-exp), the partial results are merged by the log-sum-exp rule, and K/V (with
             their segment ids) move to the next device (`lax.ppermute`). Shard pairs the mask
             leaves empty are skipped (a static schedule built host-side from the Mask); the
             ring still passes K/V. The backward is a custom VJP running the same ring: dQ
             stays, dK/dV travel with K/V and a last ppermute returns them to their owners.
  allgather  K/V (and kv segment ids) are all-gathered, then one local call per query chunk;
             gradients by autodiff (the all-gather transposes to a reduce-scatter). Any
             backend works here, Pallas included.

`plan_context_parallel` makes the static choices (strategy, layout, per-pair schedule) and
says why; `load_balance` measures how evenly a layout spreads the mask's non-empty tiles.
The design is in docs/scaling.md.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from flashjax import masks as masks_lib
from flashjax.distributed import layout as layout_lib
from flashjax.ops.attention import api as attention_api
from flashjax.ops.attention import base as attention_base
from flashjax.ops.attention.api import dot_product_attention

logger = logging.getLogger("flashjax")

STRATEGIES = ("ring", "allgather")
# strategy=None picks "allgather" when each device holds at most this many query rows: a ring
# step would then compute too little to hide its K/V transfer, and the gathered K/V
# (P * T_local rows) is small.
ALLGATHER_MAX_LOCAL_LEN = 1024
# Backends that return the row log-sum-exp the ring merges with (attention_with_lse).
# pallas_mosaic_gpu returns it too, but takes bf16 / fp16 only and the ring runs in float32.
LSE_BACKENDS = frozenset({"xla", "xla_chunked", "jax_nn", "cudnn", "pallas_triton"})
# Backends whose kernels run the ring's backward from the global lse / delta
# (AttentionBackend.backward_from_stats); the ring's backward is jnp for the others.
KERNEL_BACKWARD_BACKENDS = frozenset({"pallas_triton"})
_EMPTY, _PARTIAL, _FULL = masks_lib.EMPTY, masks_lib.PARTIAL, masks_lib.FULL


# ----------------------------------------------------------------------------- host side


def _combined_mask(mask: Any, is_causal: bool, q_len: int, kv_len: int):
  """The user's mask AND causal as one Mask, or None for all-allowed."""
  if mask is not None and not isinstance(mask, masks_lib.Mask):
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
      raise ValueError(f"mask dtype {arr.dtype} must be bool (or pass a flashjax Mask)")
    mask = masks_lib.from_dense(arr)
  if mask is not None and tuple(mask.shape[-2:]) != (q_len, kv_len):
    raise ValueError(f"mask.shape={tuple(mask.shape)} must end in (T, S) = {(q_len, kv_len)}")
  if is_causal:
    causal = masks_lib.causal(q_len, kv_len)
    mask = causal if mask is None else mask & causal
  return mask


def _chunk_kinds(mask, q_chunk: int, kv_chunk: int, nq: int, nk: int) -> np.ndarray:
  """Kinds [nq, nk] of the chunk grid, over all leading (batch, head) entries."""
  if mask is None:
    return np.full((nq, nk), _FULL, np.int8)
  kinds = np.asarray(mask.block_kinds(q_chunk, kv_chunk)).reshape(-1, nq, nk)
  empty = (kinds == _EMPTY).all(axis=0)
  full = (kinds == _FULL).all(axis=0)
  return np.where(empty, _EMPTY, np.where(full, _FULL, _PARTIAL)).astype(np.int8)


def _sub_mask(mask, q0: int, q1: int, k0: int, k1: int):
  """mask[..., q0:q1, k0:k1] as a Mask: a shifted rule when computable, else dense."""
  rule = mask.rule()
  if rule is None:
    return masks_lib.from_dense(mask.dense_tile(q0, q1, k0, k1))
  # j - i = (j' - i') + (k0 - q0) for local positions i', j': shift the band by it.
  shift = k0 - q0
  band = masks_lib.Band(None if rule.band.lo is None else rule.band.lo - shift,
                        None if rule.band.hi is None else rule.band.hi - shift)
  cut = lambda a, lo, hi: None if a is None else np.asarray(a)[:, lo:hi]
  sub = masks_lib.ElementRule(band, cut(rule.q_segment_ids, q0, q1),
                              cut(rule.kv_segment_ids, k0, k1),
                              cut(rule.kv_in_prefix, k0, k1))
  return masks_lib.RuleMask(q1 - q0, k1 - k0, sub, batched=len(mask.shape) == 4)


def _mask_key(sub) -> tuple:
  """Hashable identity of a sub-mask (equal keys: equal masks), used to share branches."""
  if sub is None:
    return ("full",)
  rule = sub.rule()
  if rule is not None and not rule.has_segments:
    return ("band", rule.band.lo, rule.band.hi, sub.shape)
  return ("dense", sub.shape, hashlib.sha1(np.packbits(sub.to_dense()).tobytes()).hexdigest())


@dataclasses.dataclass(frozen=True)
class Call:
  """One local attention call: local q chunk `q_chunk` against local kv chunk `kv_chunk`
  (-1: all keys) under `mask` (None: all allowed)."""
  q_chunk: int
  kv_chunk: int
  mask: Any = dataclasses.field(compare=False)
  key: tuple = ()


@dataclasses.dataclass(frozen=True)
class ContextParallelPlan:
  """Static choices of one context-parallel call (see plan_context_parallel).

  Attributes:
    strategy: "ring" or "allgather".
    layout: "contiguous" or "zigzag".
    reason: why this strategy and layout.
    num_shards: P.
    q_len: T; kv_len: S.
    pair_kinds: int8 [P, P]: kind (0 empty, 1 partial, 2 full) of query shard i against kv
      shard j in the chosen layout; the ring skips the empty pairs.
    device_tiles: int [P]: non-empty (query tile, key tile) pairs per device (tiles of
      `tile`, summed over the mask's batch / head entries).
    tile: tile size of device_tiles.
    balance: device_tiles.max() / device_tiles.mean() (1.0: even work).
    skipped_pairs: shard pairs the ring skips.
    compute_steps: ring steps where some device computes (of P).
  """
  strategy: str
  layout: str
  reason: str
  num_shards: int
  q_len: int
  kv_len: int
  pair_kinds: np.ndarray = dataclasses.field(repr=False)
  device_tiles: np.ndarray
  tile: int
  balance: float
  skipped_pairs: int
  compute_steps: int
  # pair_calls[i][j]: Calls of query shard i against kv shard j (ring); row_calls[i]: Calls
  # of query shard i against all keys (allgather).
  pair_calls: tuple = dataclasses.field(repr=False, default=())
  row_calls: tuple = dataclasses.field(repr=False, default=())

  def summary(self) -> str:
    return (f"context parallel: {self.strategy}, {self.layout} layout over {self.num_shards} "
            f"shards (T={self.q_len}, S={self.kv_len}); {self.reason}; skips "
            f"{self.skipped_pairs} of {self.num_shards ** 2} shard pairs; load balance "
            f"{self.balance:.3f} (non-empty {self.tile}x{self.tile} tiles per device "
            f"{self.device_tiles.tolist()})")


def _default_tile(q_len: int, kv_len: int, pieces: int) -> int:
  return math.gcd(q_len // pieces, kv_len // pieces, 128)


def device_tile_counts(mask: Any, num_shards: int, *, layout: str = "contiguous",
                       tile: int | None = None, is_causal: bool = False) -> np.ndarray:
  """Non-empty (query tile, key tile) pairs whose query rows each device holds.

  Args:
    mask: a flashjax Mask (T, S) or (B|1, N|1, T, S), a bool array, or None (all allowed).
      With None, pass the lengths through a Mask (e.g. masks.full(T, S)).
    num_shards: P.
    layout: "contiguous" or "zigzag".
    tile: tile size (dividing T and S / (P * chunks)); default gcd(chunk, 128).
    is_causal: AND the causal mask.

  Returns:
    int64 [P]; entries of a batched / per-head mask are summed over them.
  """
  if mask is None:
    raise ValueError("mask=None: pass a Mask giving T and S, e.g. masks.full(T, S)")
  t, s = tuple(np.shape(mask) if not isinstance(mask, masks_lib.Mask) else mask.shape)[-2:]
  mask = _combined_mask(mask, is_causal, t, s)
  pieces = num_shards * layout_lib.chunks_per_device(layout)
  if t % pieces or s % pieces:
    raise ValueError(f"{layout} layout over {num_shards} shards needs T={t} and S={s} "
                     f"divisible by {pieces}")
  tile = tile or _default_tile(t, s, pieces)
  if (t // pieces) % tile or (s // pieces) % tile:
    raise ValueError(f"{tile=} must divide the chunk lengths {t // pieces}, {s // pieces}")
  nonempty = np.asarray(mask.block_kinds(tile, tile)) != _EMPTY  # [Bm, Nm, T/tile, S/tile]
  per_row = nonempty.reshape(-1, t // tile, s // tile).sum(axis=(0, 2))
  per_chunk = per_row.reshape(pieces, -1).sum(axis=1)
  return np.array([sum(per_chunk[c] for c in chunks)
                   for chunks in layout_lib.layout_chunks(layout, num_shards)], np.int64)


def load_balance(mask: Any, num_shards: int, *, layout: str = "contiguous",
                 tile: int | None = None, is_causal: bool = False) -> float:
  """max / mean over devices of the non-empty tile pairs they compute (1.0: even).

  Causal over 8 shards: about 1.9 contiguous (the last device does ~2x the mean), 1.0
  zig-zag. Arguments as in `device_tile_counts`.
  """
  counts = device_tile_counts(mask, num_shards, layout=layout, tile=tile,
                              is_causal=is_causal)
  mean = counts.mean()
  return float(counts.max() / mean) if mean else 1.0


def _resolve_strategy(strategy, implementation, local_len: int) -> tuple[str, str]:
  if strategy is not None:
    if strategy not in STRATEGIES:
      raise ValueError(f"{strategy=} must be None or one of {STRATEGIES}")
    return strategy, f"strategy={strategy!r} requested"
  names = ([implementation] if isinstance(implementation, str) else
           list(implementation) if implementation is not None else None)
  if names is not None and not any(n in LSE_BACKENDS for n in names):
    return "allgather", (f"implementation={implementation!r} cannot return the log-sum-exp "
                         f"the ring merges with (only {sorted(LSE_BACKENDS)} can)")
  if local_len <= ALLGATHER_MAX_LOCAL_LEN:
    return "allgather", (f"T_local={local_len} <= ALLGATHER_MAX_LOCAL_LEN="
                         f"{ALLGATHER_MAX_LOCAL_LEN}: a ring step is too short to hide its "
                         "transfer")
  return "ring", f"T_local={local_len} > ALLGATHER_MAX_LOCAL_LEN={ALLGATHER_MAX_LOCAL_LEN}"


def plan_context_parallel(q_len: int, kv_len: int, num_shards: int, *, mask: Any = None,
                          is_causal: bool = False, strategy: str | None = None,
                          layout: str | None = None,
                          implementation: str | Sequence[str] | None = None
                          ) -> ContextParallelPlan:
  """The static plan `context_parallel_attention` runs: strategy, layout, schedule.

  Rules (each choice is explained in `plan.reason`):
    layout=None: "zigzag" when T and S divide by 2P and zig-zag lowers `load_balance` of
      the mask (causal and other lower-triangular masks), else "contiguous".
    strategy=None: "allgather" when `implementation` names no backend that returns the
      log-sum-exp (LSE_BACKENDS: XLA / jax.nn backends and pallas_triton) or when T / P <=
      ALLGATHER_MAX_LOCAL_LEN (1024); else "ring".

  Args:
    q_len: T (global). kv_len: S (global).
    num_shards: P, devices along the sequence axis.
    mask: None, a flashjax Mask of shape (T, S) or (B|1, N|1, T, S), or a bool array.
    is_causal: AND the causal mask (j <= i).
    strategy: None (the rule above), "ring" or "allgather".
    layout: None (the rule above), "contiguous" or "zigzag".
    implementation: as in dot_product_attention (for the strategy rule).

  Returns:
    A ContextParallelPlan.
  """
  p = num_shards
  if q_len % p or kv_len % p:
    raise ValueError(f"T={q_len} and S={kv_len} must be divisible by the {p} shards of the "
                     "sequence axis")
  mask = _combined_mask(mask, is_causal, q_len, kv_len)
  why_layout = f"layout={layout!r} requested"
  if layout is None:
    layout, why_layout = "contiguous", "contiguous layout (zig-zag would not balance better)"
    if q_len % (2 * p) or kv_len % (2 * p):
      why_layout = f"contiguous layout (zig-zag needs T={q_len}, S={kv_len} divisible by {2 * p})"
    elif mask is not None:
      ratios = {name: load_balance(mask, p, layout=name) for name in layout_lib.LAYOUTS}
      if ratios["zigzag"] < ratios["contiguous"] - 1e-6:
        layout = "zigzag"
        why_layout = (f"zig-zag layout (load balance {ratios['zigzag']:.3f} vs contiguous "
                      f"{ratios['contiguous']:.3f})")
  cpd = layout_lib.chunks_per_device(layout)
  if q_len % (p * cpd) or kv_len % (p * cpd):
    raise ValueError(f"layout={layout!r} needs T={q_len} and S={kv_len} divisible by "
                     f"{p * cpd} ({p} shards x {cpd} chunks)")
  strategy, why = _resolve_strategy(strategy, implementation, q_len // p)
  cq, ck = q_len // (p * cpd), kv_len // (p * cpd)
  chunks = layout_lib.layout_chunks(layout, p)
  kinds = _chunk_kinds(mask, cq, ck, p * cpd, p * cpd)

  def sub(gq, gk, kind):
    if kind == _FULL:
      return None
    return _sub_mask(mask, gq * cq, (gq + 1) * cq, gk * ck, (gk + 1) * ck)

  pair_kinds = np.zeros((p, p), np.int8)
  pair_calls = []
  for i in range(p):
    row = []
    for j in range(p):
      calls = []
      for a, gq in enumerate(chunks[i]):
        for b, gk in enumerate(chunks[j]):
          if kinds[gq, gk] != _EMPTY:
            m = sub(gq, gk, kinds[gq, gk])
            calls.append(Call(a, b, m, (a, b) + _mask_key(m)))
      sub_kinds = kinds[np.ix_(chunks[i], chunks[j])]
      pair_kinds[i, j] = (_EMPTY if (sub_kinds == _EMPTY).all() else
                          _FULL if (sub_kinds == _FULL).all() else _PARTIAL)
      row.append(tuple(calls))
    pair_calls.append(tuple(row))
  row_calls = []
  if strategy == "allgather":
    row_kinds = _chunk_kinds(mask, cq, kv_len, p * cpd, 1)[:, 0]
    for i in range(p):
      calls = []
      for a, gq in enumerate(chunks[i]):
        if row_kinds[gq] != _EMPTY:
          m = None if row_kinds[gq] == _FULL else _sub_mask(mask, gq * cq, (gq + 1) * cq, 0,
                                                            kv_len)
          calls.append(Call(a, -1, m, (a,) + _mask_key(m)))
      row_calls.append(tuple(calls))
  counts = device_tile_counts(mask if mask is not None else masks_lib.full(q_len, kv_len),
                              p, layout=layout)
  steps = sum(any(pair_kinds[d, (d - s) % p] != _EMPTY for d in range(p)) for s in range(p))
  return ContextParallelPlan(
      strategy=strategy, layout=layout, reason=f"{why}; {why_layout}", num_shards=p,
      q_len=q_len, kv_len=kv_len, pair_kinds=pair_kinds, device_tiles=counts,
      tile=_default_tile(q_len, kv_len, p * cpd),
      balance=float(counts.max() / counts.mean()) if counts.mean() else 1.0,
      skipped_pairs=int((pair_kinds == _EMPTY).sum()), compute_steps=int(steps),
      pair_calls=tuple(pair_calls), row_calls=tuple(row_calls))


# ----------------------------------------------------------------------------- device side


def _merge(a, b):
  """Merges two partial attention results over disjoint key sets.

  Each is (o, lse): o the softmax-weighted values over its keys (normalised over them),
  lse = log sum exp of its logits. Over the union, lse = log(e^lse_a + e^lse_b) and
  o = (e^lse_a o_a + e^lse_b o_b) / e^lse; subtracting m = max(lse_a, lse_b) keeps the
  exponentials finite. A row with no allowed key (lse = -inf on both sides) stays
  (0, -inf).
  """
  (oa, la), (ob, lb) = a, b
  m = jnp.maximum(la, lb)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  wa, wb = jnp.exp(la - m), jnp.exp(lb - m)
  den = wa + wb
  safe = jnp.where(den > 0, den, 1.0)
  o = (oa * wa[..., None] + ob * wb[..., None]) / safe[..., None]
  return o, jnp.where(den > 0, m + jnp.log(safe), -jnp.inf)


def _piece(x, chunk: int, size: int):
  return x if x is None or chunk < 0 else x[:, chunk * size:(chunk + 1) * size]


def _block_forward(q, k, v, q_ids, kv_ids, *, calls, num_chunks, scale, implementation,
                   interpret):
  """(out f32 [B, Tl, Nq, H], lse f32 [B, Tl, Nq]) of the local queries against one kv
  shard (or, for allgather calls, all keys)."""
  cq = q.shape[1] // num_chunks
  ck = k.shape[1] // num_chunks
  parts = []
  for a in range(num_chunks):
    acc = None
    for call in (c for c in calls if c.q_chunk == a):
      seg = None if q_ids is None else (_piece(q_ids, a, cq), _piece(kv_ids, call.kv_chunk, ck))
      res = attention_api.attention_with_lse(
          _piece(q, a, cq), _piece(k, call.kv_chunk, ck), _piece(v, call.kv_chunk, ck),
          mask=call.mask, segment_ids=seg, scale=scale, implementation=implementation,
          interpret=interpret)
      res = (res[0].astype(jnp.float32), res[1].astype(jnp.float32))
      acc = res if acc is None else _merge(acc, res)
    if acc is None:
      shape = (q.shape[0], cq, q.shape[2])
      acc = (jnp.zeros(shape + (q.shape[3],), jnp.float32), jnp.full(shape, -jnp.inf))
    parts.append(acc)
  return (jnp.concatenate([o for o, _ in parts], axis=1),
          jnp.concatenate([l for _, l in parts], axis=1))


def _allowed(call, q_ids, kv_ids, num_kv_heads: int, group: int):
  """Bool [B|1, Nkv|1, G|1, Cq, Ck] of one call (mask AND segment ids), or None."""
  allowed = None
  if call.mask is not None:
    dense = np.asarray(call.mask.to_dense())
    if dense.ndim == 2:
      dense = dense[None, None, None]
    elif dense.shape[1] == 1:
      dense = dense[:, :, None]
    else:  # per query head n = kv_head * G + g
      dense = dense.reshape(dense.shape[0], num_kv_heads, group, *dense.shape[2:])
    allowed = jnp.asarray(dense)
  if q_ids is not None:
    same = q_ids[:, None, None, :, None] == kv_ids[:, None, None, None, :]
    allowed = same if allowed is None else allowed & same
  return allowed


def _chunk_grads(q, k, v, do, lse, delta, allowed, scale):
  """dq, dk, dv of one chunk pair given the rows' global lse and delta = sum(do * o).

  With the global statistics, P = exp(s - lse) is this pair's slice of the full softmax,
  so the usual attention backward applies pair by pair: dV = P^T dO, dS = P (dO V^T -
  delta), dQ = scale dS K, dK = scale dS^T Q.
  """
  b, tq, nq, h = q.shape
  nkv = k.shape[2]
  g = nq // nkv
  qg = q.reshape(b, tq, nkv, g, h)
  dog = do.reshape(b, tq, nkv, g, h)
  rows = lambda x: x.reshape(b, tq, nkv, g).transpose(0, 2, 3, 1)[..., None]
  s = jnp.einsum("btkgh,bskh->bkgts", qg, k) * scale
  lse_r = rows(lse)
  p = jnp.exp(s - jnp.where(jnp.isfinite(lse_r), lse_r, 0.0))
  if allowed is not None:
    p = jnp.where(allowed, p, 0.0)
  dv = jnp.einsum("bkgts,btkgh->bskh", p, dog)
  ds = p * (jnp.einsum("btkgh,bskh->bkgts", dog, v) - rows(delta))
  dq = jnp.einsum("bkgts,bskh->btkgh", ds, k).reshape(b, tq, nq, h) * scale
  dk = jnp.einsum("bkgts,btkgh->bskh", ds, qg) * scale
  return dq, dk, dv


_BACKENDS_RUN: dict[tuple, str] = {}


def _backend_run(call, q, k, q_ids, scale, implementation, interpret) -> str:
  """Name of the backend the forward ran for `call` on pieces shaped like q, k (cached).

  Traced abstractly on zeros of the pieces' shapes (no compute), so the backward follows
  the forward's choice also when `implementation` is a list or None.
  """
  key = (call.key, q.shape, k.shape, str(q.dtype), q_ids is not None, scale, implementation,
         interpret)
  if key not in _BACKENDS_RUN:
    def probe():
      seg = None
      if q_ids is not None:
        seg = (jnp.zeros(q.shape[:2], jnp.int32), jnp.zeros(k.shape[:2], jnp.int32))
      return attention_api.attention_with_lse(
          jnp.zeros(q.shape, q.dtype), jnp.zeros(k.shape, k.dtype), jnp.zeros(k.shape, k.dtype),
          mask=call.mask, segment_ids=seg, scale=scale, implementation=implementation,
          interpret=interpret)
    if len(_BACKENDS_RUN) >= 4096:
      _BACKENDS_RUN.clear()
    _BACKENDS_RUN[key] = attention_api.resolve_implementation(probe)
  return _BACKENDS_RUN[key]


def _call_grads(call, q, k, v, q_ids, kv_ids, do, lse, delta, *, scale, implementation,
                interpret):
  """dq, dk, dv of one chunk pair: the backend's kernels when the forward ran one of
  KERNEL_BACKWARD_BACKENDS, else the jnp `_chunk_grads`."""
  name = _backend_run(call, q, k, q_ids, scale, implementation, interpret)
  if name in KERNEL_BACKWARD_BACKENDS:
    backend = attention_api.load_backend(name, attention_api.ATTENTION_BACKENDS)
    args = attention_base.AttentionArgs.bind(
        q, k, v, mask=call.mask, q_segment_ids=q_ids, kv_segment_ids=kv_ids, scale=scale,
        interpret=interpret)
    return backend.backward_from_stats(args, do, lse, delta)
  allowed = _allowed(call, q_ids, kv_ids, k.shape[2], q.shape[2] // k.shape[2])
  return _chunk_grads(q, k, v, do, lse, delta, allowed, scale)


def _block_backward(q, k, v, q_ids, kv_ids, do, lse, delta, *, calls, num_chunks, scale,
                    implementation, interpret):
  cq = q.shape[1] // num_chunks
  ck = k.shape[1] // num_chunks
  dq, dk, dv = jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
  for call in calls:
    a, c = call.q_chunk, call.kv_chunk
    gq, gk, gv = _call_grads(
        call, _piece(q, a, cq), _piece(k, c, ck), _piece(v, c, ck), _piece(q_ids, a, cq),
        _piece(kv_ids, c, ck), _piece(do, a, cq), _piece(lse, a, cq), _piece(delta, a, cq),
        scale=scale, implementation=implementation, interpret=interpret)
    dq = dq.at[:, a * cq:(a + 1) * cq].add(gq)
    dk = dk.at[:, c * ck:(c + 1) * ck].add(gk)
    dv = dv.at[:, c * ck:(c + 1) * ck].add(gv)
  return dq, dk, dv


def _switch(index_table: list, branches: list, operands: tuple, axis_name: str):
  """branches[index_table[device]](*operands): one branch per distinct schedule entry."""
  if len(branches) == 1:
    return branches[0](*operands)
  index = jnp.asarray(np.asarray(index_table, np.int32))[lax.axis_index(axis_name)]
  return lax.switch(index, branches, *operands)


def _step_branches(plan: ContextParallelPlan, step: int, make):
  """(per-device branch index, branch functions) of ring step `step`, or None when every
  device's pair is empty. Devices with equal call lists share a branch."""
  p = plan.num_shards
  keyed: dict[tuple, int] = {}
  table, branches = [], []
  for d in range(p):
    calls = plan.pair_calls[d][(d - step) % p]
    key = tuple(c.key for c in calls)
    if key not in keyed:
      keyed[key] = len(branches)
      branches.append(make(calls))
    table.append(keyed[key])
  if all(not plan.pair_calls[d][(d - step) % p] for d in range(p)):
    return None
  return table, branches


def _ring(plan: ContextParallelPlan, axis_name: str, scale: float, implementation,
          interpret: bool):
  """Per-device ring attention (q, k, v, q_ids, kv_ids) -> out f32, with a ring VJP."""
  p = plan.num_shards
  nch = layout_lib.chunks_per_device(plan.layout)
  shift = [(d, (d + 1) % p) for d in range(p)]

  def pass_on(x):
    return x if p == 1 else lax.ppermute(x, axis_name, shift)

  def run_step(step, block, operands):
    """`block` (_block_forward or _block_backward) on this device's chunk pairs of ring step
    `step`, or None when no device has any."""
    sched = _step_branches(plan, step, lambda calls: functools.partial(
        block, calls=calls, num_chunks=nch, scale=scale, implementation=implementation,
        interpret=interpret))
    return None if sched is None else _switch(*sched, operands, axis_name)

  def forward(q, k, v, q_ids, kv_ids):
    o = jnp.zeros(q.shape, jnp.float32)
    lse = jnp.full(q.shape[:3], -jnp.inf, jnp.float32)
    held = (k, v, kv_ids)
    for step in range(p):  # at step s device d holds kv shard (d - s) mod P
      if step:
        held = pass_on(held)
      part = run_step(step, _block_forward, (q,) + held[:2] + (q_ids, held[2]))
      if part is not None:
        o, lse = _merge((o, lse), part)
    return o, lse

  @jax.custom_vjp
  def attend(q, k, v, q_ids, kv_ids):
    return forward(q, k, v, q_ids, kv_ids)[0]

  def attend_fwd(q, k, v, q_ids, kv_ids):
    o, lse = forward(q, k, v, q_ids, kv_ids)
    return o, (q, k, v, q_ids, kv_ids, o, lse)

  def attend_bwd(res, do):
    q, k, v, q_ids, kv_ids, o, lse = res
    delta = jnp.sum(do * o, axis=-1)
    dq = jnp.zeros_like(q)
    held = (k, v, kv_ids, jnp.zeros_like(k), jnp.zeros_like(v))
    for step in range(p):
      if step:
        held = pass_on(held)
      grads = run_step(step, _block_backward,
                       (q, held[0], held[1], q_ids, held[2], do, lse, delta))
      if grads is not None:
        dq = dq + grads[0]
        held = held[:3] + (held[3] + grads[1], held[4] + grads[2])
    # Device d now holds the dK/dV of kv shard d + 1: one more hop returns them.
    dk, dv = pass_on(held[3:])
    return dq, dk, dv, None, None

  attend.defvjp(attend_fwd, attend_bwd)
  return attend


def _allgather(plan: ContextParallelPlan, axis_name: str, scale: float, implementation,
               interpret: bool):
  """Per-device all-gather attention (q, k, v, q_ids, kv_ids) -> out (autodiff VJP)."""
  p = plan.num_shards
  nch = layout_lib.chunks_per_device(plan.layout)
  natural = (None if plan.layout == "contiguous" else
             np.argsort(layout_lib.layout_permutation(plan.kv_len, p, plan.layout)))

  def gather(x):
    if x is None:
      return None
    x = lax.all_gather(x, axis_name, axis=1, tiled=True)  # layout order
    return x if natural is None else jnp.take(x, natural, axis=1)

  def rows(q, k, v, q_ids, kv_ids, *, calls):
    cq = q.shape[1] // nch
    parts = []
    for a in range(nch):
      call = next((c for c in calls if c.q_chunk == a), None)
      if call is None:
        parts.append(jnp.zeros((q.shape[0], cq) + q.shape[2:], q.dtype))
        continue
      seg = None if q_ids is None else (_piece(q_ids, a, cq), kv_ids)
      parts.append(dot_product_attention(_piece(q, a, cq), k, v, mask=call.mask,
                                         segment_ids=seg, scale=scale,
                                         implementation=implementation,
                                         interpret=interpret))
    return jnp.concatenate(parts, axis=1)

  def attend(q, k, v, q_ids, kv_ids):
    k, v, kv_ids = gather(k), gather(v), gather(kv_ids)
    keyed: dict[tuple, int] = {}
    table, branches = [], []
    for d in range(p):
      key = tuple(c.key for c in plan.row_calls[d])
      if key not in keyed:
        keyed[key] = len(branches)
        branches.append(functools.partial(rows, calls=plan.row_calls[d]))
      table.append(keyed[key])
    return _switch(table, branches, (q, k, v, q_ids, kv_ids), axis_name)

  return attend


def _check_inputs(query, key, value, segment_ids, scale):
  """(q_ids, kv_ids) as int32 or (None, None); ValueError for bad input.

  Shapes, dtypes, GQA and segment ids are checked by tracing the single-device call
  abstractly (same messages as dot_product_attention, no compute).
  """
  for name, x in (("query", query), ("key", key), ("value", value)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be a rank-4 array [B, T|S, N, D], got "
                       f"{getattr(x, 'shape', type(x).__name__)}")
  jax.eval_shape(lambda: dot_product_attention(query, key, value, segment_ids=segment_ids,
                                               scale=scale, implementation="xla"))
  if segment_ids is None:
    return None, None
  pair = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
  return tuple(jnp.asarray(ids, jnp.int32) for ids in pair)


def context_parallel_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mesh: Mesh,
    axis_name: str,
    mask: Any = None,
    is_causal: bool = False,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    scale: float | None = None,
    implementation: str | Sequence[str] | None = None,
    layout: str | None = None,
    strategy: str | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Attention with the sequence sharded over mesh axis `axis_name` (context parallelism).

  Same result as `flashjax.dot_product_attention(query, key, value, mask=mask,
  is_causal=is_causal, segment_ids=segment_ids, scale=scale)` on one device (rows without
  an allowed key give zeros), computed by P = mesh.shape[axis_name] devices, each holding
  T / P queries and S / P keys. Inputs and output are in natural sequence order, sharded
  `PartitionSpec(None, axis_name)` (other mesh axes: replicated). With the zig-zag layout
  (chosen automatically for causal masks) the shards are reordered internally by two
  ppermutes before the attention and back after it (an all-to-all's traffic); callers never
  see the zig-zag order. Works under jit and jax.grad (ring: a custom VJP ring; allgather:
  autodiff).

  Args:
    query: [B, T, Nq, D] (the jax.nn layout).
    key: [B, S, Nkv, D], Nq % Nkv == 0 (GQA).
    value: like key.
    mesh: a jax.sharding.Mesh.
    axis_name: the mesh axis the sequence is sharded over; T and S must divide by its size.
    mask: None, a host-side flashjax Mask of shape (T, S) or (B|1, Nq|1, T, S), or a numpy
      bool array of those shapes. Must be static (built outside jit); shard pairs it leaves
      empty are skipped.
    is_causal: AND j <= i.
    segment_ids: int [B, T] (T == S) or (q_ids [B, T], kv_ids [B, S]), may be traced; they
      travel with their K/V. They do not drive the skipping (pass masks.document(ids) as
      `mask` for that, when the ids are concrete).
    scale: logit scale (a Python float), default 1 / sqrt(D).
    implementation: the local backend, as in dot_product_attention. The ring needs a
      backend returning the log-sum-exp (LSE_BACKENDS: the XLA / jax.nn backends and
      pallas_triton); None falls through to "xla". With pallas_triton the ring's forward
      runs its forward kernel per block and its backward runs its dQ and dK/dV kernels per
      block from the global lse / delta (KERNEL_BACKWARD_BACKENDS); for the other backends
      the ring's backward is jnp.
    layout: None (auto), "contiguous" or "zigzag"; see plan_context_parallel.
    strategy: None (auto), "ring" or "allgather"; see plan_context_parallel.
    interpret: run Pallas backends in interpret mode (as in dot_product_attention;
      required to run them on a CPU).

  Returns:
    [B, T, Nq, D] in query's dtype, sharded like query. The ring computes in float32.

  Raises:
    ValueError: bad input (axis_name not in the mesh, T or S not divisible by the shard
      count, shapes), naming the values.
  """
  q_ids, kv_ids = _check_inputs(query, key, value, segment_ids, scale)
  if axis_name not in mesh.axis_names:
    raise ValueError(f"{axis_name=} is not an axis of the mesh (axes {mesh.axis_names})")
  p = int(mesh.shape[axis_name])
  t, s = query.shape[1], key.shape[1]
  if t % p or s % p:
    raise ValueError(f"T={t} and S={s} must be divisible by the {p} devices of mesh axis "
                     f"{axis_name!r}")
  if scale is None:
    scale = 1.0 / math.sqrt(query.shape[3])
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
    raise ValueError(f"{scale=} must be a positive Python float (or None)")
  for name, flag in (("is_causal", is_causal), ("interpret", interpret)):
    if not isinstance(flag, bool):
      raise ValueError(f"{name}={flag!r} must be a bool")
  plan = plan_context_parallel(t, s, p, mask=mask, is_causal=is_causal, strategy=strategy,
                               layout=layout, implementation=implementation)
  logger.info("flashjax %s", plan.summary())
  with_ids = q_ids is not None
  args = (query, key, value) + ((q_ids, kv_ids) if with_ids else ())
  impl = tuple(implementation) if isinstance(implementation, list) else implementation
  return _sharded_fn(plan, mesh, axis_name, float(scale), impl, query.dtype, with_ids,
                     interpret)(*args)


def _program_key(plan: ContextParallelPlan) -> tuple:
  """Equal keys: plans that build the same program (masks compared by content)."""
  calls = lambda rows: tuple(tuple(c.key for c in cs) for cs in rows)
  return (plan.strategy, plan.layout, plan.num_shards, plan.q_len, plan.kv_len,
          tuple(calls(row) for row in plan.pair_calls), calls(plan.row_calls))


_PROGRAMS: dict[tuple, Any] = {}
_MAX_PROGRAMS = 64


def _sharded_fn(plan, mesh, axis_name, scale, implementation, dtype, with_ids, interpret):
  """The jitted shard_map of one plan, cached so repeated eager calls compile once."""
  key = (_program_key(plan), mesh, axis_name, scale, implementation, jnp.dtype(dtype),
         with_ids, interpret)
  if key in _PROGRAMS:
    return _PROGRAMS[key]
  p = plan.num_shards
  if plan.strategy == "ring":
    local = _ring(plan, axis_name, scale, implementation, interpret)
  else:
    local = _allgather(plan, axis_name, scale, implementation, interpret)
  zigzag = plan.layout == "zigzag"

  def per_device(q, k, v, *ids):
    q_i, kv_i = ids if with_ids else (None, None)
    if zigzag:
      q, k, v = (layout_lib.zigzag_local(x, axis_name, p) for x in (q, k, v))
      if with_ids:
        q_i, kv_i = (layout_lib.zigzag_local(x, axis_name, p) for x in (q_i, kv_i))
    if plan.strategy == "ring":  # merges in float32
      q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    out = local(q, k, v, q_i, kv_i).astype(dtype)
    return layout_lib.unzigzag_local(out, axis_name, p) if zigzag else out

  spec = PartitionSpec(None, axis_name)
  # jit: an eager shard_map would dispatch every op of the ring one by one.
  fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec,) * (5 if with_ids else 3),
                             out_specs=spec, check_vma=False))
  if len(_PROGRAMS) >= _MAX_PROGRAMS:
    _PROGRAMS.pop(next(iter(_PROGRAMS)))
  _PROGRAMS[key] = fn
  return fn
