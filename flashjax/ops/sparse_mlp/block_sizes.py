"""Static tile parameters of the sparse MLP kernels (pallas_triton; pallas_tpu uses block_k)."""

from __future__ import annotations

import dataclasses


def _pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the two gather-GEMM kernels; None fields take the heuristic of `resolve`.

  Attributes:
    block_k: gathered neurons per fc1 program; power of two >= 16.
    block_k_fc2: gathered neurons per fc2 loop step; power of two >= 16.
    block_d: model-width chunk of the fc1 reduction loop; power of two >= 16.
    block_out: output columns per fc2 program; power of two >= 16.
    block_b: batch rows per program (rows past the batch are padding); power of two >= 16.
    num_splits: fc2 programs along the gathered neurons (partial sums added in XLA).
    num_warps: warps per program (pallas_triton).
    num_stages: software pipelining depth of the weight loads (pallas_triton).
  """

  block_k: int | None = None
  block_k_fc2: int | None = None
  block_d: int | None = None
  block_out: int | None = None
  block_b: int | None = None
  num_splits: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    for name in ("block_k", "block_k_fc2", "block_d", "block_out", "block_b"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 16 or not _pow2(value)):
        raise ValueError(f"{name}={value!r} must be None or a power of two >= 16")
    for name in ("num_splits", "num_warps", "num_stages"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}={value!r} must be None or a positive int")


def _pow2_ceil(x: int) -> int:
  return 1 << max(0, x - 1).bit_length()


def _largest_pow2_divisor(x: int, cap: int) -> int:
  block = cap
  while block > 16 and x % block:
    block //= 2
  return block


# Shared memory a Hopper (sm90) block may use.
SHARED_MEMORY_BYTES = 232448


def shared_memory_bytes(config: BlockSizes, itemsize: int, gated: bool) -> int:
  """Shared memory the pallas_triton fc1 kernel asks for with `config` (every field set).

  Triton keeps num_stages copies of each loop iteration's loads: the x chunk and the
  gathered w1 (and w3) tile. This matched, to the byte, the request Triton made on an H100
  for fc1 tiles it rejected. fc2 is not counted: its largest tiles (block_b = block_out =
  block_k_fc2 = 128, float32, 3 stages) compiled there, where the same rule would have
  predicted 393216 bytes.
  """
  return (config.num_stages * (config.block_b + config.block_k * (2 if gated else 1))
          * config.block_d * itemsize)


def resolve(config: BlockSizes | None, *, rows: int, d_model: int, k: int,
            num_cores: int = 132, itemsize: int = 2, gated: bool = False) -> BlockSizes:
  """Fills the None fields of `config` for `rows` x `d_model` inputs and k neurons.

  The op is weight-bandwidth bound at small batch: the heuristic picks tiles so that both
  kernels launch at least ~2 programs per core (num_cores, 132 on an H100 / H200) while each
  weight element is read once per block_b rows.

  Args:
    config: caller's choices (None = all heuristic).
    rows: batch rows (B, or B * T).
    d_model: model width d.
    k: gathered neurons (static bucket).
    num_cores: streaming multiprocessors (or cores) the grid should fill.
    itemsize: bytes per element of x and the weights.
    gated: whether w3 is loaded beside w1.

  Returns:
    A BlockSizes with every field set.
  """
  config = config or BlockSizes()
  block_b = config.block_b or min(128, max(16, _pow2_ceil(rows)))
  row_tiles = -(-rows // block_b)
  block_d = config.block_d or _largest_pow2_divisor(d_model, 128)
  # Measured on an H100 (docs/sparse_mlp.md): with many neurons (k >= 2d) wide tiles stream
  # best (64-neuron fc1 programs, 128 x 128 fc2 tiles); with few, small fc1 programs keep
  # ~2 per core busy.
  wide = k >= 2 * d_model
  block_out = config.block_out or _largest_pow2_divisor(d_model, 128 if wide else 64)
  block_k = config.block_k or 64
  while not (config.block_k or wide) and block_k > 16 and (
      -(-k // block_k) * row_tiles < 2 * num_cores):
    block_k //= 2
  block_k_fc2 = config.block_k_fc2 or min(128 if wide else 64, max(16, _pow2_ceil(k)))
  k_tiles = -(-k // block_k_fc2)
  if config.num_splits:
    num_splits = config.num_splits
  else:
    programs = -(-d_model // block_out) * row_tiles
    num_splits = max(1, min(k_tiles, -(-2 * num_cores // programs), 8))
  num_warps = config.num_warps or (8 if block_b >= 128 else 4)
  resolved = BlockSizes(block_k=block_k, block_k_fc2=block_k_fc2, block_d=block_d,
                        block_out=block_out, block_b=block_b, num_splits=num_splits,
                        num_warps=num_warps, num_stages=config.num_stages or 3)
  # Heuristic stages, then chunks, shrink until the pipelined tiles fit shared memory.
  while shared_memory_bytes(resolved, itemsize, gated) > SHARED_MEMORY_BYTES:
    if not config.num_stages and resolved.num_stages > 2:
      resolved = dataclasses.replace(resolved, num_stages=resolved.num_stages - 1)
    elif not config.block_d and resolved.block_d > 16:
      resolved = dataclasses.replace(resolved, block_d=resolved.block_d // 2)
    else:
      break  # the caller's own tiles: pallas_triton raises with the numbers
  return resolved

