"""Tiles and splits of the Pallas split-K decode kernels (`DecodeBlockSizes`, heuristics).

A split-K decode kernel runs one program per (sequence b, selected KV group k, split s). The
program streams the KV blocks of split s of sequence b through fast memory and keeps a
partial softmax state (row max m, row sum l, unnormalised output o) in float32; the splits
are then merged with log-sum-exp weights (split_k.merge_splits, or pallas_triton's merge kernel).

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

with nblocks = cdiv(S_max, block_kv), then lowered to cdiv(nblocks, cdiv(nblocks,
num_splits)), the number of splits that own a block at full length (33 splits of 64 blocks
would leave one idle). GPU defaults: waves = 2, min_blocks = 1, num_cores = the
device's SM count (132 on an H200, also the fallback in interpret mode), i.e. about 264
programs. Measured on the H200 (S = 4096, Nq = 32, Nkv = 8, D = 128 bf16, block_kv = 128;
docs/decode.md): the best split counts were 32 at B = 1, 4 at B = 8 and 1 at B = 32, each
about 256 programs, which is what this formula gives, and 2 or 4 splits gained nothing at
B = 128 with 4 of 8 groups; an earlier rule asking for >= 4 waves (16, 9 and 3 splits at
B = 1, 8, 32) measured 32%, 19% and 2% slower there. On TPU the grid runs sequentially on
each TensorCore, so splits only help to feed both cores of a megacore chip: waves = 1,
num_cores = 2 (unmeasured: no TPU is reachable from this project).

Tile length (`launch_shape`, GPU). With 128-position tiles a short cache caps the split
count: B = 1, Nkv = 8, S = 1024 has 8 tiles per sequence, so at most 8 splits = 64 programs
for 132 SMs. When `block_kv` is left to the heuristic (None), the tile is halved, down to
64 positions, while B * K * tiles is below one program per SM (64 positions and 16 splits
there: 128 programs); caches long enough to give every SM a tile keep 128. The floor of 64
keeps a split's KV read (32 KB at D = 128 bf16) well above the float32 state it writes and
the merge reads back (R x D x 4 = 8 KB); tune_decode_splits measures 32-position splits as
the explicit num_splits = 32 at S = 1024. An explicit `num_splits` halves the tile (down to
16, Triton's smallest dot) until every split can own a tile; more splits than tiles of an
explicit `block_kv` is a ValueError (`check_num_splits`).
"""

from __future__ import annotations

import dataclasses

import jax

from flashjax.ops.tiling import cdiv, is_pow2, pow2_ceil

H200_SM_COUNT = 132
DEFAULT_BLOCK_KV = 128
# Smallest tile the split heuristic picks, and the smallest Triton tile (dot K >= 16).
MIN_AUTO_BLOCK_KV = 64
MIN_BLOCK_KV = 16


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """Tile and launch parameters of a split-K decode kernel (`block_sizes` of the API).

  Attributes:
    block_kv: cache positions per tile (power of two >= 16), or None: 128, shortened on a
      GPU to fill the device or fit `num_splits` (module docstring).
    num_splits: splits of each sequence's cache, or None for `num_splits_heuristic`.
    num_warps: GPU warps per program (Triton), None for the backend default.
    num_stages: software-pipelining depth (Triton), None for the backend default.
    xla_merge: pallas_triton only: write float32 partial states and merge the splits and
      place the groups in XLA (default) instead of the one-split direct store / Pallas merge
      kernel (False). On the H200 the XLA merge was as fast or faster at B = 1 (S=4096,
      Nkv=8: 15.7 us vs 33.3 us with the merge kernel; cuDNN 15.1), and within 5% at B = 8
      (configs/tune_decode_splits.py, docs/performance.md); pallas_tpu always merges in XLA.
  """

  block_kv: int | None = None
  num_splits: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  xla_merge: bool = True

  def __post_init__(self):
    if self.block_kv is not None and (
        not isinstance(self.block_kv, int) or not is_pow2(self.block_kv)
        or self.block_kv < MIN_BLOCK_KV):
      raise ValueError(f"DecodeBlockSizes.block_kv={self.block_kv!r} must be None or a power of "
                       f"two >= {MIN_BLOCK_KV}")
    for name in ("num_splits", "num_warps", "num_stages"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                or value < 1):
        raise ValueError(f"DecodeBlockSizes.{name}={value!r} must be a positive int or None")
    if not isinstance(self.xla_merge, bool):
      raise ValueError(f"DecodeBlockSizes.xla_merge={self.xla_merge!r} must be a bool")


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
  tiles = cdiv(max_len, block_kv)
  splits = max(1, min(wanted, tiles // min_blocks))
  return cdiv(tiles, cdiv(tiles, splits))  # drop splits that would own no block


def check_num_splits(num_splits: int, max_len: int, block_kv: int) -> None:
  """ValueError when some split could never own a tile of the cache."""
  tiles = cdiv(max_len, block_kv)
  if num_splits > max(1, tiles):
    raise ValueError(f"DecodeBlockSizes.num_splits={num_splits} exceeds the {tiles} tiles of "
                     f"{block_kv=} in S_max={max_len}: use fewer splits or a shorter tile")


def launch_shape(
    batch: int,
    num_groups: int,
    max_len: int,
    config: DecodeBlockSizes,
    *,
    num_cores: int,
    waves: int,
) -> tuple[int, int]:
  """(block_kv, num_splits) of a GPU split-K launch (module docstring: tile length).

  Args:
    batch: B.
    num_groups: K, KV groups computed per sequence.
    max_len: S_max.
    config: the caller's DecodeBlockSizes (None fields are chosen here).
    num_cores: SM count.
    waves: programs wanted per SM.

  Returns:
    The tile length (a power of two in [16, 128] unless config.block_kv says otherwise,
    never longer than S_max rounded up to a power of two) and the number of splits.

  Raises:
    ValueError: config.num_splits exceeds the tiles of config.block_kv.
  """
  # Tiles never need to be longer than the cache (rounded up to a power of two).
  cap = max(MIN_BLOCK_KV, pow2_ceil(max_len))
  if config.block_kv is not None:
    block_kv = min(config.block_kv, cap)
    num_splits = config.num_splits or num_splits_heuristic(
        batch, num_groups, max_len, block_kv, num_cores=num_cores, waves=waves)
  else:
    block_kv = min(DEFAULT_BLOCK_KV, cap)
    if config.num_splits is not None:
      while block_kv > MIN_BLOCK_KV and cdiv(max_len, block_kv) < config.num_splits:
        block_kv //= 2
    else:
      while (block_kv > MIN_AUTO_BLOCK_KV
             and batch * num_groups * cdiv(max_len, block_kv) < num_cores):
        block_kv //= 2
    num_splits = config.num_splits or num_splits_heuristic(
        batch, num_groups, max_len, block_kv, num_cores=num_cores, waves=waves)
  check_num_splits(num_splits, max_len, block_kv)
  return block_kv, num_splits


def gpu_core_count() -> int:
  """SM count of the default GPU, or the H200's 132 elsewhere (interpret mode)."""
  device = jax.devices()[0]
  return int(getattr(device, "core_count", 0) or H200_SM_COUNT)
