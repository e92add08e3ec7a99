"""Analytical IO model of attention algorithms: HBM bytes, FLOPs and a roofline time.

Four algorithms, for one attention call of B x N heads, T queries, S keys, head dim D and
input itemsize e (scores S = Q K^T and probabilities P in `score_itemsize` bytes, softmax
statistics in float32):

* "naive": S written to HBM, a softmax kernel reads S and writes P, then P @ V reads P.
  Score-sized traffic 4 * B*N*T*S (write S, read S, write P, read P).
* "partial_fused": the partially fused softmax of "Speed is all you need" (Chen et al.,
  2023): S written once, one pass reads it for the row max and sum (written and read back
  as float32 statistics), and exp / normalise are fused into the P @ V kernel, which reads S
  again. Score-sized traffic 3 * B*N*T*S plus 2 * 2 * B*N*T float32 statistics.
* "flash": FlashAttention. Each query tile is read once and its output written once; every
  query-tile pass re-reads the K/V tiles it visits, so K and V are read cdiv(T, block_q)
  times; the float32 log-sum-exp (B*N*T) is written for the backward pass.
* "flash_skip": FlashAttention with block skipping: only the non-empty tiles' K/V are read
  and only their FLOPs are spent (`nonempty_tiles` over all batch rows and heads).

Forward FLOPs are 4 * D per (query, key) pair computed: all T x S pairs for "naive",
"partial_fused" and "flash", block_q * block_kv per non-empty tile for "flash_skip". The
backward pass costs 2.5 x the forward FLOPs (benchmarking's convention). Backward bytes:

* "flash" / "flash_skip" (FlashAttention-2 passes): a preprocessing pass reads dO and O and
  writes delta = rowsum(dO * O) (float32); the dK/dV pass reads K and V once, writes dK and
  dV once, and per visited tile reads the Q and dO tiles and the float32 LSE and delta of
  its rows; the dQ pass reads Q, dO, LSE and delta once, writes dQ, and per visited tile
  reads the K and V tiles.
* "naive" / "partial_fused" (unfused backward over materialised scores): dP = dO V^T is
  written, dS = P * (dP - delta) reads P and dP and writes dS, dV = P^T dO reads P, dQ = dS K
  and dK = dS^T Q read dS: 7 score-sized transfers; Q, K, V, O once, dO three times (dP, dV,
  delta), dQ, dK, dV written once, delta written and read (float32).

Grouped-query attention is modelled per query head in the FlashAttention terms (each query
head's programs load their group's K/V tiles; L2 sharing across a group is not credited); the
naive algorithms read K and V once per KV head. Mask tile loads of partial tiles, masks
themselves and the RCM permutation gathers are not counted.

`roofline_ms` = max(FLOPs / peak, bytes / bandwidth), with the ceilings given or those of a
device kind (`benchmarking.device_ceilings`: measured where measured, else the vendor
datasheet; default: the running device's kind).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from flashjax import benchmarking

ALGORITHMS = ("naive", "partial_fused", "flash", "flash_skip")
MODES = ("fwd", "bwd", "fwd_bwd")
_F32 = 4  # bytes of the float32 softmax statistics (row max / sum, LSE, delta)
_BWD_FLOP_FACTOR = 2.5


@dataclasses.dataclass(frozen=True)
class IOCost:
  """Modelled cost of one attention call.

  Attributes:
    flops: floating-point operations (2 per multiply-add of the two matmuls).
    hbm_bytes: bytes moved between HBM and the chip.
  """

  flops: float
  hbm_bytes: float

  def __add__(self, other: "IOCost") -> "IOCost":
    return IOCost(self.flops + other.flops, self.hbm_bytes + other.hbm_bytes)

  @property
  def intensity(self) -> float:
    """FLOPs per byte."""
    return self.flops / self.hbm_bytes

  def roofline_ms(self, peak_flops_per_s: float | None = None,
                  bytes_per_s: float | None = None, *, device_kind: str | None = None,
                  dtype: Any = "bfloat16") -> float:
    """max(FLOPs / peak, bytes / bandwidth) in milliseconds.

    Args:
      peak_flops_per_s: matmul ceiling; None: the device kind's (`device_ceilings`).
      bytes_per_s: HBM ceiling; None: the device kind's.
      device_kind: whose ceilings fill the ones not given; None: the running device's.
      dtype: compute dtype for the device's matmul ceiling (bf16 / fp16 only).

    Raises:
      ValueError: a ceiling that is not positive, or one left None for a device kind
        without that ceiling (e.g. "cpu", or a float32 dtype).
    """
    if peak_flops_per_s is None or bytes_per_s is None:
      kind = benchmarking.running_device_kind() if device_kind is None else device_kind
      ceilings = benchmarking.device_ceilings(kind, dtype) or {}
      if peak_flops_per_s is None:
        peak_flops_per_s = ceilings.get("flops_per_s")
      if bytes_per_s is None:
        bytes_per_s = ceilings.get("hbm_bytes_per_s")
      if peak_flops_per_s is None or bytes_per_s is None:
        raise ValueError(f"no {'matmul' if peak_flops_per_s is None else 'HBM'} ceiling for "
                         f"device_kind={kind!r}, {dtype=}; known kinds: "
                         f"{[spec.name for spec in benchmarking.DEVICE_SPECS]}")
    if not (peak_flops_per_s > 0 and bytes_per_s > 0):
      raise ValueError(f"ceilings must be positive: {peak_flops_per_s=}, {bytes_per_s=}")
    return 1e3 * max(self.flops / peak_flops_per_s, self.hbm_bytes / bytes_per_s)


@dataclasses.dataclass(frozen=True)
class Shape:
  """Attention problem size.

  Attributes:
    batch: B.
    q_len: T.
    kv_len: S.
    num_heads: query heads N.
    head_dim: D.
    itemsize: bytes per element of q, k, v, o and their gradients.
    num_kv_heads: KV heads (None: N).
    score_itemsize: bytes per element of materialised S / P / dP / dS (None: itemsize).
  """

  batch: int
  q_len: int
  kv_len: int
  num_heads: int
  head_dim: int
  itemsize: int = 2
  num_kv_heads: int | None = None
  score_itemsize: int | None = None

  def __post_init__(self):
    for name in ("batch", "q_len", "kv_len", "num_heads", "head_dim", "itemsize"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"Shape.{name}={value!r} must be a positive int")
    for name in ("num_kv_heads", "score_itemsize"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"Shape.{name}={value!r} must be a positive int or None")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def score_bytes(self) -> int:
    return self.score_itemsize or self.itemsize


def dense_tiles(shape: Shape, block_q: int, block_kv: int) -> int:
  """Tiles of the full T x S grid over all batch rows and heads: B*N*cdiv(T,bq)*cdiv(S,bkv)."""
  _check_blocks(block_q, block_kv)
  return (shape.batch * shape.num_heads * math.ceil(shape.q_len / block_q)
          * math.ceil(shape.kv_len / block_kv))


def _check_blocks(block_q: int, block_kv: int) -> None:
  if not (isinstance(block_q, int) and isinstance(block_kv, int) and block_q > 0
          and block_kv > 0):
    raise ValueError(f"tiles must be positive ints: {block_q=}, {block_kv=}")


def _unfused_forward(shape: Shape, score_transfers: int, stat_transfers: int) -> IOCost:
  b, n, t, s, d = shape.batch, shape.num_heads, shape.q_len, shape.kv_len, shape.head_dim
  e = shape.itemsize
  io = e * (2 * b * n * t * d + 2 * b * shape.kv_heads * s * d)  # q, o; k, v
  scores = score_transfers * shape.score_bytes * b * n * t * s
  stats = stat_transfers * _F32 * b * n * t
  return IOCost(4.0 * b * n * t * s * d, float(io + scores + stats))


def _unfused_backward(shape: Shape, forward_flops: float) -> IOCost:
  b, n, t, s, d = shape.batch, shape.num_heads, shape.q_len, shape.kv_len, shape.head_dim
  e = shape.itemsize
  q_like = b * n * t * d
  kv_like = b * shape.kv_heads * s * d
  # Reads q, o, dO x3; writes dq. Reads k, v; writes dk, dv.
  io = e * (6 * q_like + 4 * kv_like)
  scores = 7 * shape.score_bytes * b * n * t * s
  delta = 2 * _F32 * b * n * t
  return IOCost(_BWD_FLOP_FACTOR * forward_flops, float(io + scores + delta))


def _flash_forward(shape: Shape, tiles: float, block_q: int, block_kv: int) -> IOCost:
  b, n, t, d, e = shape.batch, shape.num_heads, shape.q_len, shape.head_dim, shape.itemsize
  io = e * 2 * b * n * t * d + _F32 * b * n * t  # q read, o written, LSE written
  kv = e * 2 * block_kv * d * tiles  # a K and a V tile per visited tile
  return IOCost(4.0 * block_q * block_kv * d * tiles, float(io + kv))


def _flash_backward(shape: Shape, tiles: float, block_q: int, block_kv: int,
                    forward_flops: float) -> IOCost:
  b, n, t, s, d = shape.batch, shape.num_heads, shape.q_len, shape.kv_len, shape.head_dim
  e = shape.itemsize
  rows = b * n * t
  preprocess = e * 2 * rows * d + _F32 * rows  # read dO, O; write delta
  # dK/dV pass: k, v read and dk, dv written once; per tile the q, dO tiles, LSE and delta.
  dkdv = e * 4 * b * n * s * d + tiles * block_q * (e * 2 * d + 2 * _F32)
  # dQ pass: q, dO, LSE, delta read and dq written once; per tile the k and v tiles.
  dq = e * 3 * rows * d + 2 * _F32 * rows + tiles * block_kv * e * 2 * d
  return IOCost(_BWD_FLOP_FACTOR * forward_flops, float(preprocess + dkdv + dq))


def attention_cost(algorithm: str, shape: Shape, mode: str = "fwd", *, block_q: int = 128,
                   block_kv: int = 64, nonempty_tiles: float | None = None) -> IOCost:
  """Modelled FLOPs and HBM bytes of one attention call.

  Args:
    algorithm: one of ALGORITHMS (see the module docstring).
    shape: the problem size.
    mode: "fwd", "bwd" or "fwd_bwd".
    block_q: query tile of the FlashAttention algorithms.
    block_kv: key tile of the FlashAttention algorithms.
    nonempty_tiles: "flash_skip" only: non-empty block_q x block_kv tiles summed over batch
      rows and heads (at most `dense_tiles`); None: all of them.

  Returns:
    The IOCost.
  """
  if algorithm not in ALGORITHMS:
    raise ValueError(f"unknown {algorithm=}; known: {ALGORITHMS}")
  if mode not in MODES:
    raise ValueError(f"{mode=} must be one of {MODES}")
  if algorithm in ("naive", "partial_fused"):
    forward = (_unfused_forward(shape, 4, 0) if algorithm == "naive"
               else _unfused_forward(shape, 3, 4))
    backward = _unfused_backward(shape, forward.flops)
  else:
    full = dense_tiles(shape, block_q, block_kv)
    tiles = full
    if algorithm == "flash_skip" and nonempty_tiles is not None:
      if not 0 <= nonempty_tiles <= full:
        raise ValueError(f"{nonempty_tiles=} must lie in [0, {full}] (all tiles)")
      tiles = nonempty_tiles
    forward = _flash_forward(shape, tiles, block_q, block_kv)
    backward = _flash_backward(shape, tiles, block_q, block_kv, forward.flops)
  if mode == "fwd":
    return forward
  if mode == "bwd":
    return backward
  return forward + backward


def implementation_algorithm(implementation: str) -> str:
  """The algorithm an attention implementation runs, for the model columns of benchmarks.

  flashjax Pallas backends and FlexAttention skip empty tiles ("flash_skip"); the XLA
  backends and the XLA peer materialise scores ("naive"); the "partially_fused" backend is
  "partial_fused" (modelled on the full mask: its causal calls also skip the tiles above the
  diagonal, which the model does not count); the other peers (cuDNN, torch SDPA, Pallas
  Triton mha) are FlashAttention on the full mask ("flash").

  Args:
    implementation: a flashjax backend name or "peer:NAME".

  Returns:
    One of ALGORITHMS.
  """
  if implementation == "partially_fused":
    return "partial_fused"
  if implementation.startswith("pallas") or implementation == "peer:torch_flex":
    return "flash_skip"
  if implementation in ("xla", "peer:jax_nn_xla"):
    return "naive"
  return "flash"


# ------------------------------------------------- rule for the "partially_fused" backend
# Assumed fixed cost per kernel launch (not measured here): flash 1 kernel, the partially
# fused backend 2, unfused XLA 3 (QK^T, softmax, P @ V).
LAUNCH_MS = 0.004
_KERNELS = {"partial_fused": 2, "flash": 1, "naive": 3}


@dataclasses.dataclass(frozen=True)
class PartialFusedPrediction:
  """Modelled forward times (ms) behind `prefer_partially_fused`; a prediction, unmeasured.

  Attributes:
    partially_fused_ms, flash_ms, naive_ms: modelled time of each algorithm.
    scores_in_l2: whether the T x S scores of all heads fit the L2 cache.
    kv_in_l2: whether K and V of all heads fit the L2 cache.
  """

  partially_fused_ms: float
  flash_ms: float
  naive_ms: float
  scores_in_l2: bool
  kv_in_l2: bool

  @property
  def beats_flash(self) -> bool:
    return self.partially_fused_ms < self.flash_ms

  @property
  def beats_naive(self) -> bool:
    return self.partially_fused_ms < self.naive_ms

  @property
  def prefer(self) -> bool:
    """Fastest of the three."""
    return self.beats_flash and self.beats_naive


def predict_partially_fused(t: int, s: int, head_dim: int, dtype: Any, device_kind: str, *,
                            batch: int = 1, num_heads: int = 1,
                            num_kv_heads: int | None = None, block_q: int = 128,
                            block_kv: int = 64) -> PartialFusedPrediction:
  """Modelled forward time of the partially fused softmax vs FlashAttention vs unfused XLA.

  A prediction from this module's byte / FLOP counts, not a measurement: no GPU timing of
  the "partially_fused" backend exists yet. Per algorithm (module docstring lines
  "partial_fused", "flash" at block_q x block_kv, "naive"):

    time = max(FLOPs / matmul peak, HBM bytes / bandwidth) + kernels * LAUNCH_MS

  with two cache credits, both from the device's L2 capacity (the ceilings' `l2_bytes`): when
  the scores of all heads (B*N*T*S items) fit in L2, score-sized *reads* are served from L2
  (writes still reach HBM):
  "partial_fused" keeps 1 of its 3 score transfers, "naive" 2 of 4; when K and V of all heads
  fit, FlashAttention's re-reads of K/V after the first are served from L2. float32 has no
  matmul ceiling in benchmarking.device_ceilings, so float32 compares bytes and launches only.
  The ceilings are benchmarking.device_ceilings(device_kind) (measured where measured).

  Args:
    t, s: query and key lengths.
    head_dim: D.
    dtype: input dtype (its itemsize is that of q, k, v, o and the stored scores).
    device_kind: e.g. "NVIDIA H100 80GB HBM3" or "NVIDIA H200".
    batch, num_heads, num_kv_heads: B, query heads N, KV heads (None: N).
    block_q, block_kv: FlashAttention tiles compared against (pallas_triton's defaults).

  Returns:
    The PartialFusedPrediction.

  Raises:
    ValueError: a device kind without ceilings or L2 size, or bad sizes (naming them).
  """
  itemsize = np.dtype(dtype).itemsize
  ceilings = benchmarking.device_ceilings(device_kind, dtype)
  if ceilings is None:
    raise ValueError(f"no ceilings / L2 size for {device_kind=}; known kinds: "
                     f"{[spec.name for spec in benchmarking.DEVICE_SPECS]}")
  shape = Shape(batch, t, s, num_heads, head_dim, itemsize, num_kv_heads)
  l2 = ceilings["l2_bytes"]
  score_bytes = float(shape.score_bytes * batch * num_heads * t * s)
  scores_in_l2 = score_bytes <= l2
  kv_in_l2 = 2 * itemsize * batch * shape.kv_heads * s * head_dim <= l2

  costs = {name: attention_cost(name, shape, "fwd", block_q=block_q, block_kv=block_kv)
           for name in _KERNELS}
  hbm = {name: cost.hbm_bytes for name, cost in costs.items()}
  if scores_in_l2:
    hbm["partial_fused"] -= 2 * score_bytes
    hbm["naive"] -= 2 * score_bytes
  if kv_in_l2:
    passes = math.ceil(t / block_q)
    hbm["flash"] -= (passes - 1) * 2 * itemsize * batch * num_heads * head_dim * (
        math.ceil(s / block_kv) * block_kv)
  peak = ceilings.get("flops_per_s")

  def ms(name):
    memory = hbm[name] / ceilings["hbm_bytes_per_s"]
    compute = 0.0 if peak is None else costs[name].flops / peak
    return 1e3 * max(memory, compute) + _KERNELS[name] * LAUNCH_MS

  return PartialFusedPrediction(ms("partial_fused"), ms("flash"), ms("naive"), scores_in_l2,
                                kv_in_l2)


def prefer_partially_fused(t: int, s: int, head_dim: int, dtype: Any, device_kind: str,
                           **sizes: Any) -> bool:
  """Whether the "partially_fused" backend is predicted faster than both FlashAttention and
  unfused XLA for this forward (`predict_partially_fused(...).prefer`; unmeasured)."""
  return predict_partially_fused(t, s, head_dim, dtype, device_kind, **sizes).prefer
