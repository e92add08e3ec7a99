"""Launch configuration of the Pallas split-K decode kernels, and their shared bookkeeping.

A split-K decode kernel runs one program per (sequence b, selected KV group k, split s). The
program streams the KV blocks of split s of sequence b through fast memory and writes a
partial softmax state (row max m, row sum l, unnormalised output o) in float32; the splits
are then merged with log-sum-exp weights (`merge_splits`).

Splits are laid out per sequence from its *length*, not from the cache size: sequence b has
nb = cdiv(lengths[b], block_kv) live blocks and split s covers the blocks
[s * bps, min((s + 1) * bps, nb)) with bps = cdiv(nb, num_splits). Every split of a long
sequence does the same work, and a sequence much shorter than S_max does not leave most of
its programs idle on dead cache. Splits that start at or past nb read nothing and write the
neutral state (m = -inf, l = 0, o = 0).

Number of splits (`num_splits_heuristic`). Decode reads each KV byte once, so the goal is to
keep every core streaming while each split stays long enough that its fixed cost (loading the
query tile, writing and merging a [R, D] float32 partial) stays small next to its KV traffic:

  num_splits = clamp(floor(waves * num_cores / (B * K)), 1, max(1, nblocks // min_blocks))

with nblocks = cdiv(S_max, block_kv). GPU defaults: waves = 2, min_blocks = 1, num_cores = the
device's SM count (132 on an H200, also the fallback in interpret mode), i.e. about 264
programs. Measured on the H200 (S = 4096, Nq = 32, Nkv = 8, D = 128 bf16, block_kv = 128;
docs/decode.md): the best split counts were 32 at B = 1, 4 at B = 8 and 1 at B = 32, each
about 256 programs, which is what this formula gives, and 2 or 4 splits gained nothing at
B = 128 with 4 of 8 groups; an earlier rule asking for >= 4 waves (16, 9 and 3 splits at
B = 1, 8, 32) measured 32%, 19% and 2% slower there. On TPU the grid runs sequentially on
each TensorCore, so splits only help to feed both cores of a megacore chip: waves = 1,
num_cores = 2 (unmeasured: no TPU is reachable from this project).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

H200_SM_COUNT = 132


def _is_pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Tile and launch parameters of a split-K decode kernel.

  Attributes:
    block_kv: cache positions per tile (power of two >= 16).
    num_splits: splits of each sequence's cache, or None for `num_splits_heuristic`.
    num_warps: GPU warps per program (Triton), None for the backend default.
    num_stages: software-pipelining depth (Triton), None for the backend default.
  """

  block_kv: int = 128
  num_splits: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    if not isinstance(self.block_kv, int) or not _is_pow2(self.block_kv) or self.block_kv < 16:
      raise ValueError(f"DecodeConfig.block_kv={self.block_kv!r} must be a power of two >= 16")
    for name in ("num_splits", "num_warps", "num_stages"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"DecodeConfig.{name}={value!r} must be a positive int or None")


def num_splits_heuristic(
    batch: int,
    num_groups: int,
    max_len: int,
    block_kv: int,
    *,
    num_cores: int,
    waves: int,
    min_blocks: int = 1,
) -> int:
  """Splits per sequence so that batch * num_groups * splits programs fill the device.

  Args:
    batch: B, sequences in the batch.
    num_groups: K, KV groups computed per sequence.
    max_len: S_max, cache capacity.
    block_kv: cache positions per tile.
    num_cores: SMs (GPU) or TensorCores (TPU) the grid is spread over.
    waves: programs wanted per core.
    min_blocks: fewest blocks of a full-length sequence per split.

  Returns:
    The number of splits, >= 1.
  """
  wanted = waves * num_cores // max(batch * num_groups, 1)
  most = max(1, -(-max_len // block_kv) // min_blocks)
  return max(1, min(wanted, most))


def gpu_core_count() -> int:
  """SM count of the default GPU, or the H200's 132 elsewhere (interpret mode)."""
  device = jax.devices()[0]
  return int(getattr(device, "core_count", 0) or H200_SM_COUNT)


def group_ids(head_indices: jax.Array | None, batch: int, num_kv_heads: int) -> jax.Array:
  """KV group computed by each (sequence, slot): int32 [B, K] (K = Nkv when None)."""
  if head_indices is None:
    return jnp.broadcast_to(jnp.arange(num_kv_heads, dtype=jnp.int32), (batch, num_kv_heads))
  return head_indices.astype(jnp.int32)


def select_queries(
    query: jax.Array, head_indices: jax.Array | None, num_kv_heads: int, rows: int
) -> jax.Array:
  """Query heads of the selected groups, packed one group per tile.

  Args:
    query: [B, Nq, D].
    head_indices: None or int32 [B, K] selected KV groups.
    num_kv_heads: Nkv.
    rows: tile height >= G = Nq // Nkv; rows past G are zero.

  Returns:
    [B, K, rows, D]: row g < G holds query head head_indices[b, k] * G + g.
  """
  batch, num_heads, head_dim = query.shape
  grouped = query.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
  if head_indices is not None:
    grouped = jnp.take_along_axis(grouped, head_indices[:, :, None, None], axis=1)
  return jnp.pad(grouped, ((0, 0), (0, 0), (0, rows - grouped.shape[2]), (0, 0)))


def merge_splits(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
  """Merges per-split softmax states with log-sum-exp weights.

  Args:
    o: float32 [B, K, splits, R, D] unnormalised partial outputs.
    m: float32 [B, K, splits, R] partial row maxima (-inf for splits that read nothing).
    l: float32 [B, K, splits, R] partial row sums (0 for splits that read nothing).

  Returns:
    float32 [B, K, R, D] normalised outputs; rows of a sequence with no key are 0.
  """
  m_max = jnp.max(m, axis=2, keepdims=True)
  m_max = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
  weight = jnp.exp(m - m_max)  # [B, K, splits, R], 0 for dead splits
  total = jnp.sum(weight * l, axis=2)
  out = jnp.einsum("bksr,bksrd->bkrd", weight, o, precision=jax.lax.Precision.HIGHEST)
  return out / jnp.where(total > 0, total, 1.0)[..., None]


def scatter_groups(
    out: jax.Array, head_indices: jax.Array | None, num_kv_heads: int, num_heads: int
) -> jax.Array:
  """Places the computed groups into the full head axis, zeros elsewhere.

  Args:
    out: [B, K, R, D] per selected group, rows [0, G) valid.
    head_indices: None or int32 [B, K].
    num_kv_heads: Nkv.
    num_heads: Nq.

  Returns:
    [B, Nq, D].
  """
  batch, _, _, head_dim = out.shape
  group = num_heads // num_kv_heads
  out = out[:, :, :group]
  if head_indices is not None:
    full = jnp.zeros((batch, num_kv_heads, group, head_dim), out.dtype)
    out = full.at[jnp.arange(batch)[:, None], head_indices].set(out)
  return out.reshape(batch, num_heads, head_dim)
