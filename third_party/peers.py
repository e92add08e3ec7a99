"""Peer attention implementations behind one interface, for side-by-side benchmarks.

Every peer has a `name`, an `op` ("attention" or "decode") and `available()`, which returns an
`Availability` (falsy with a reason when the peer cannot run here; it never raises). Peers
that run inside this JAX process (`JaxPeer`) build a function with `make(...)`:

  attention: peer.make(mask: PeerMask, *, scale=None) -> fn(q, k, v) -> out
             q [B, T, Nq, D], k/v [B, S, Nkv, D], out [B, T, Nq, D]
  decode:    peer.make(*, head_indices=None, scale=None) -> fn(q, k_cache, v_cache, lengths)
             q [B, Nq, D], caches [B, S_max, Nkv, D], lengths int32 [B], out [B, Nq, D]

`make` (or the first call of `fn`) raises NotImplementedError when the peer cannot express
the mask or shapes; a benchmark records that and goes on. Peers in another framework
(torch) run in a separate process: see `third_party.torch_peers`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Availability:
  """Whether a peer can run here; truthy iff `ok`.

  Attributes:
    ok: the peer can run.
    reason: why not (or a caveat, e.g. "deprecated upstream", when it can).
  """

  ok: bool
  reason: str = ""

  def __bool__(self) -> bool:
    return self.ok


@dataclasses.dataclass(frozen=True, eq=False)
class PeerMask:
  """A mask in the forms peers understand.

  `dense` always describes the mask exactly (None: no mask). When `structured` is True the
  other fields describe the same mask too, ANDed together: a band lo <= j - i <= hi (None:
  unbounded) and segment ids (query i may attend key j only when their ids are equal).
  Peers use the structured form when they can (no dense T x S traffic), else `dense`.

  Attributes:
    q_len: T.
    kv_len: S.
    dense: bool [B|1, N|1, T, S] or None.
    structured: whether band / segment fields describe the mask exactly.
    band_lo: lower band bound or None.
    band_hi: upper band bound or None (0 with band_lo None is plain causal).
    q_segment_ids: int32 [B|1, T] or None.
    kv_segment_ids: int32 [B|1, S] or None.
  """

  q_len: int
  kv_len: int
  dense: np.ndarray | None = None
  structured: bool = True
  band_lo: int | None = None
  band_hi: int | None = None
  q_segment_ids: np.ndarray | None = None
  kv_segment_ids: np.ndarray | None = None

  @property
  def is_full(self) -> bool:
    return self.dense is None

  @property
  def is_causal(self) -> bool:
    return self.structured and self.band_lo is None and self.band_hi == 0

  @property
  def self_segments(self) -> bool:
    """Segment ids shared by queries and keys (document masks in self-attention)."""
    return (self.q_segment_ids is not None and self.q_len == self.kv_len
            and np.array_equal(self.q_segment_ids, self.kv_segment_ids))

  def window(self) -> tuple[int, int] | None:
    """(left, right) such that i - left <= j <= i + right, or None without a band."""
    if self.band_lo is None and self.band_hi is None:
      return None
    left = self.q_len if self.band_lo is None else -self.band_lo
    right = self.kv_len if self.band_hi is None else self.band_hi
    return left, right

  @classmethod
  def from_mask(cls, mask: Any, q_len: int, kv_len: int) -> "PeerMask":
    """Builds the peer view of None, a bool array or a flashjax.masks.Mask.

    Args:
      mask: None (no mask), a bool array [T, S] or [B|1, N|1, T, S], or a Mask (with
        `.to_dense()` and `.rule()`).
      q_len: T.
      kv_len: S.

    Returns:
      The PeerMask.
    """
    if mask is None:
      return cls(q_len, kv_len)
    dense = np.asarray(mask.to_dense() if hasattr(mask, "to_dense") else mask, dtype=bool)
    if dense.ndim == 2:
      dense = dense[None, None]
    if dense.ndim != 4 or dense.shape[2:] != (q_len, kv_len):
      raise ValueError(f"mask shape does not fit: {dense.shape=}, {q_len=}, {kv_len=}")
    rule = mask.rule() if hasattr(mask, "rule") else None
    if rule is None or rule.kv_in_prefix is not None:
      return cls(q_len, kv_len, dense, structured=False)
    seg = lambda a: None if a is None else np.asarray(a, dtype=np.int32)
    return cls(q_len, kv_len, dense, True, rule.band.lo, rule.band.hi,
               seg(rule.q_segment_ids), seg(rule.kv_segment_ids))


class JaxPeer:
  """A peer that runs in this process; subclasses implement `available` and `make`."""

  name: str
  op: str

  def available(self) -> Availability:
    raise NotImplementedError

  def __repr__(self):
    return f"{type(self).__name__}({self.name!r})"


def _module_available(module: str) -> Availability:
  try:
    importlib.import_module(module)
  except ImportError as e:
    return Availability(False, f"cannot import {module}: {e}")
  return Availability(True)


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _pallas_gpu_available(module: str, interpret: bool) -> Availability:
  """jax.experimental.pallas.ops.gpu examples: a GPU (or interpret mode) and the module."""
  if not (_on_gpu() or interpret):
    return Availability(False, f"needs a GPU (or interpret=True), backend is "
                        f"{jax.default_backend()!r}")
  found = _module_available(module)
  if found and tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11):
    return Availability(True, "deprecated upstream on jax >= 0.11 (tokamax replaces it)")
  return found


class JaxNnAttention(JaxPeer):
  """jax.nn.dot_product_attention with implementation "cudnn" or "xla".

  Causal and banded masks use `is_causal` / `local_window_size`; anything else (segment ids,
  trees, ...) is passed as a dense bool mask (cuDNN applies it as a bias, no block skipping).
  """

  op = "attention"

  def __init__(self, implementation: str):
    if implementation not in ("cudnn", "xla"):
      raise ValueError(f"{implementation=} must be 'cudnn' or 'xla'")
    self.implementation = implementation
    self.name = f"jax_nn_{implementation}"

  def available(self) -> Availability:
    if self.implementation == "cudnn" and not _on_gpu():
      return Availability(False, f"cuDNN needs a GPU, backend is {jax.default_backend()!r}")
    return Availability(True)

  def make(self, mask: PeerMask, *, scale: float | None = None) -> Callable[..., jax.Array]:
    kwargs = dict(scale=scale, implementation=self.implementation)
    if mask.structured and mask.q_segment_ids is None:  # also the no-mask case
      if mask.is_causal:
        kwargs["is_causal"] = True
      else:
        kwargs["local_window_size"] = mask.window()  # None: no band
      return jax.jit(functools.partial(jax.nn.dot_product_attention, **kwargs))
    # The dense mask is a jit argument, not a constant baked into the program.
    dense = jnp.asarray(mask.dense)
    core = jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, **kwargs))
    return lambda q, k, v: core(q, k, v, dense)


class PallasTritonMha(JaxPeer):
  """jax.experimental.pallas.ops.gpu.attention.mha (Triton lowering; segment ids, causal).

  Deprecated upstream on jax 0.11 in favour of tokamax; it still runs there. It needs
  Nq == Nkv, T == S for segment ids, sequence lengths divisible by its blocks, and cannot
  express windows or arbitrary masks (NotImplementedError).
  """

  op = "attention"
  name = "pallas_triton_mha"
  _MODULE = "jax.experimental.pallas.ops.gpu.attention"

  def __init__(self, interpret: bool = False, block_q: int = 128, block_k: int = 128):
    self.interpret = interpret
    self.block_q = block_q
    self.block_k = block_k

  def available(self) -> Availability:
    return _pallas_gpu_available(self._MODULE, self.interpret)

  def make(self, mask: PeerMask, *, scale: float | None = None) -> Callable[..., jax.Array]:
    attention = importlib.import_module(self._MODULE)
    causal = False
    segment_ids = None
    if not mask.is_full:
      if not mask.structured:
        raise NotImplementedError(f"{self.name} supports only causal and segment-id masks")
      if mask.window() not in (None, (mask.q_len, 0)):
        raise NotImplementedError(f"{self.name} cannot express band {mask.window()=}")
      causal = mask.is_causal
      if mask.q_segment_ids is not None:
        if not mask.self_segments:
          raise NotImplementedError(f"{self.name} needs identical query/key segment ids")
        segment_ids = jnp.asarray(mask.q_segment_ids)

    def fn(q, k, v):
      if q.shape[2] != k.shape[2]:
        raise NotImplementedError(f"{self.name} needs Nq == Nkv: {q.shape=}, {k.shape=}")
      t, s = q.shape[1], k.shape[1]
      blocks = attention.BlockSizes(
          block_q=min(self.block_q, t), block_k=min(self.block_k, s),
          block_q_dkv=min(32, t), block_kv_dkv=min(32, s), block_q_dq=min(32, t),
          block_kv_dq=min(32, s))
      seg = None if segment_ids is None else jnp.broadcast_to(segment_ids, (q.shape[0], t))
      return attention.mha(q, k, v, seg, sm_scale=_scale(scale, q), causal=causal,
                           block_sizes=blocks, interpret=self.interpret)

    return jax.jit(fn)


def _scale(scale: float | None, q: jax.Array) -> float:
  return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


class JaxNnDecode(JaxPeer):
  """Decode through jax.nn.dot_product_attention (one query token, key_value_seq_lengths)."""

  op = "decode"

  def __init__(self, implementation: str):
    if implementation not in ("cudnn", "xla"):
      raise ValueError(f"{implementation=} must be 'cudnn' or 'xla'")
    self.implementation = implementation
    self.name = f"jax_nn_{implementation}"

  def available(self) -> Availability:
    return JaxNnAttention(self.implementation).available()

  def make(self, *, head_indices: Any = None,
           scale: float | None = None) -> Callable[..., jax.Array]:
    if head_indices is not None:
      raise NotImplementedError(f"{self.name} computes every head (no head_indices)")

    def fn(q, k_cache, v_cache, lengths):
      out = jax.nn.dot_product_attention(
          q[:, None], k_cache, v_cache, scale=scale, key_value_seq_lengths=lengths,
          implementation=self.implementation)
      return out[:, 0]

    return jax.jit(fn)


class PallasDecode(JaxPeer):
  """jax.experimental.pallas.ops.gpu.decode_attention.gqa (split-K, Triton lowering)."""

  op = "decode"
  name = "pallas_decode"
  _MODULE = "jax.experimental.pallas.ops.gpu.decode_attention"

  def __init__(self, interpret: bool = False, block_k: int = 128, k_splits: int = 16):
    self.interpret = interpret
    self.block_k = block_k
    self.k_splits = k_splits

  def available(self) -> Availability:
    return _pallas_gpu_available(self._MODULE, self.interpret)

  def make(self, *, head_indices: Any = None,
           scale: float | None = None) -> Callable[..., jax.Array]:
    if head_indices is not None:
      raise NotImplementedError(f"{self.name} computes every head (no head_indices)")
    decode = importlib.import_module(self._MODULE)

    def fn(q, k_cache, v_cache, lengths):
      s_max = k_cache.shape[1]
      block_k = min(self.block_k, s_max)
      k_splits = max(1, min(self.k_splits, s_max // block_k))
      return decode.gqa(q, k_cache, v_cache, kv_seq_len=lengths, sm_scale=_scale(scale, q),
                        block_k=block_k, k_splits=k_splits, interpret=self.interpret)

    return jax.jit(fn)
