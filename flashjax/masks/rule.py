"""Element masks that can be computed from positions and segment ids.

Causal, sliding-window, document, prefix-LM and segment-id masks never need a dense T x S
array: whether query i may attend key j follows from i, j and a few per-token arrays.
`ElementRule` is that description. The XLA backend evaluates it chunk by chunk, the Pallas
kernels evaluate it on iota tiles inside partial blocks, and `BlockMask` builders use it to
classify tiles without materialising the mask.

Query i may attend key j when all of the present parts hold:

    in_band(i, j)  or  kv_in_prefix[j]          (band: lo <= j - i <= hi)
    q_segment_ids[i] == kv_segment_ids[j]       (when segment ids are present)

`lo`/`hi` of None mean unbounded on that side; `kv_in_prefix` is only meaningful together
with segment ids (prefix-LM: a key in its segment's prefix is visible to the whole segment).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Band:
  """Static band bounds: allowed when lo <= j - i <= hi (None: unbounded)."""

  lo: int | None = None
  hi: int | None = None

  def __post_init__(self):
    if self.lo is not None and self.hi is not None and self.lo > self.hi:
      raise ValueError(f"empty band: {self.lo=} > {self.hi=}")

  @property
  def unbounded(self) -> bool:
    return self.lo is None and self.hi is None

  def __and__(self, other: "Band") -> "Band":
    lo = _pick(max, self.lo, other.lo)
    hi = _pick(min, self.hi, other.hi)
    return Band(lo, hi)


def _pick(fn, a, b):
  if a is None:
    return b
  if b is None:
    return a
  return fn(a, b)


def in_band(q_pos, kv_pos, band: Band, xp: Any = jnp):
  """Bool array broadcast from q_pos (rows) and kv_pos (cols): lo <= j - i <= hi."""
  diff = kv_pos - q_pos
  ok = xp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(kv_pos)), dtype=bool)
  if band.lo is not None:
    ok = ok & (diff >= band.lo)
  if band.hi is not None:
    ok = ok & (diff <= band.hi)
  return ok


def element_mask(q_pos, kv_pos, band: Band, q_seg=None, kv_seg=None, kv_in_prefix=None,
                 xp: Any = jnp):
  """Evaluates the rule on broadcastable position / id arrays.

  Works with jax.numpy (also inside Pallas kernels, on loaded tiles) and with numpy
  (`xp=np`, host-side BlockMask builders).

  Args:
    q_pos: int array of query positions, e.g. [bq, 1].
    kv_pos: int array of key positions, e.g. [1, bk].
    band: static band bounds.
    q_seg: optional query segment ids, broadcastable like q_pos.
    kv_seg: optional key segment ids, broadcastable like kv_pos.
    kv_in_prefix: optional bool array like kv_pos (prefix-LM).

  Returns:
    bool array of the broadcast shape.
  """
  ok = in_band(q_pos, kv_pos, band, xp)
  if kv_in_prefix is not None:
    ok = ok | kv_in_prefix
  if q_seg is not None:
    ok = ok & (q_seg == kv_seg)
  return ok


@dataclasses.dataclass(frozen=True, eq=False)
class ElementRule:
  """A computable mask: a static band plus optional per-token arrays (numpy or jax).

  Attributes:
    band: static band (causal with offset o is Band(None, o)).
    q_segment_ids: [B|1, T] int32 or None.
    kv_segment_ids: [B|1, S] int32 or None (present iff q_segment_ids is).
    kv_in_prefix: [B|1, S] bool or None (prefix-LM; needs segment ids).
  """

  band: Band = Band()
  q_segment_ids: Any = None
  kv_segment_ids: Any = None
  kv_in_prefix: Any = None

  def __post_init__(self):
    if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
      raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    if self.kv_in_prefix is not None and self.q_segment_ids is None:
      raise ValueError("kv_in_prefix needs segment ids")

  @property
  def has_segments(self) -> bool:
    return self.q_segment_ids is not None

  def evaluate(self, q_pos, kv_pos, batch=None, xp: Any = jnp):
    """Dense element mask for given positions.

    Args:
      q_pos: [tq] query positions.
      kv_pos: [tk] key positions.
      batch: None to keep the batch axis of the segment arrays, else a batch row index.
      xp: numpy-like module.

    Returns:
      bool [tq, tk] without segments, else [B|1, tq, tk] (or [tq, tk] if `batch` given).
    """
    qp = q_pos[:, None]
    kp = kv_pos[None, :]
    if not self.has_segments:
      return element_mask(qp, kp, self.band, xp=xp)
    # numpy ids indexed by traced positions must become jax arrays first.
    qs, ks, pre = (None if a is None else xp.asarray(a)
                   for a in (self.q_segment_ids, self.kv_segment_ids, self.kv_in_prefix))
    if batch is not None:
      qs, ks = qs[batch], ks[batch]
      pre = None if pre is None else pre[batch]
      return element_mask(qp, kp, self.band, qs[q_pos][:, None], ks[kv_pos][None, :],
                          None if pre is None else pre[kv_pos][None, :], xp=xp)
    return element_mask(qp[None], kp[None], self.band, qs[:, q_pos][:, :, None],
                        ks[:, kv_pos][:, None, :],
                        None if pre is None else pre[:, kv_pos][:, None, :], xp=xp)


def to_numpy_rule(rule: ElementRule) -> ElementRule:
  """Same rule with numpy arrays (for host-side builders)."""
  conv = lambda a: None if a is None else np.asarray(a)
  return ElementRule(rule.band, conv(rule.q_segment_ids), conv(rule.kv_segment_ids),
                     conv(rule.kv_in_prefix))


def int32_rule(rule: ElementRule) -> ElementRule:
  """Numpy rule with int32 segment ids and bool prefix flags."""
  if not rule.has_segments:
    return ElementRule(rule.band)
  pre = rule.kv_in_prefix
  return ElementRule(rule.band, np.asarray(rule.q_segment_ids, np.int32),
                     np.asarray(rule.kv_segment_ids, np.int32),
                     None if pre is None else np.asarray(pre, bool))


def dense_rule_mask(rule: ElementRule, q_len: int, kv_len: int):
  """Element mask of a rule as a jnp bool [B|1, 1, T, S]."""
  dense = rule.evaluate(jnp.arange(q_len), jnp.arange(kv_len), xp=jnp)
  return dense.reshape((-1, 1, q_len, kv_len))
