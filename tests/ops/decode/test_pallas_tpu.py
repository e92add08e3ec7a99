"""Pallas Mosaic TPU split-K decode kernel, run by the TPU interpreter on CPU."""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp

from flashjax.ops.decode import block_sizes
from flashjax.ops.decode import pallas_tpu
from tests.ops.decode import decode_suite
from tests.ops.decode import test_pallas_triton as cases


class TestPallasTpuDecode(decode_suite.DecodeSuite):
  """The suite's D = 64 / 32 with Nkv = 1, 2, 4 covers the whole-row and shared lane tiles."""

  IMPLEMENTATION = "pallas_tpu"
  INTERPRET = True


class PallasTpuKernelTest(cases.PallasTritonKernelTest):
  """The Triton kernel's cases, plus the lane tilings the suite does not reach."""

  BACKEND = pallas_tpu

  @parameterized.named_parameters(
      # D % 128 == 0: one group per tile.
      dict(testcase_name="head_dim=128", num_kv_heads=2, head_dim=128, dtype=jnp.float32),
      # Neither: D is zero-padded to 128.
      dict(testcase_name="head_dim=48_num_kv_heads=3", num_kv_heads=3, head_dim=48,
           dtype=jnp.float32),
  )
  def test_lane_tiling(self, num_kv_heads, head_dim, dtype):
    seed = self.seed()
    args = cases.make_inputs(seed, 2, 96, 2 * num_kv_heads, num_kv_heads, head_dim, dtype,
                             [96, 45])
    heads = jax.random.randint(jax.random.key(seed + 1), (2, 2), 0, num_kv_heads, jnp.int32)
    out = self.decode(*args, head_indices=heads, scale=0.2, logits_soft_cap=None,
                      block_sizes=block_sizes.DecodeBlockSizes(block_kv=32, num_splits=2))
    self.check(out, args, heads, 0.2, None)


class SplitBlocksTest(parameterized.TestCase):
  """The KV index map visits each live block once and never moves on a dead step."""

  @parameterized.named_parameters(
      dict(testcase_name=f"{length=}_{num_splits=}", length=length, num_splits=num_splits)
      for length, num_splits in itertools.product((0, 1, 64, 65, 300, 512), (1, 3, 4))
  )
  def test_block_walk(self, length, num_splits):
    block_kv, max_len = 64, 512
    steps = -(-(-(-max_len // block_kv)) // num_splits)
    walk = [
        tuple(int(x) for x in pallas_tpu._split_blocks(
            jnp.int32(length), split, step, block_kv=block_kv, num_splits=num_splits))
        for split in range(num_splits) for step in range(steps)
    ]
    live_blocks = [block for block, live in walk if live]
    self.assertEqual(live_blocks, list(range(-(-length // block_kv))))
    blocks = [block for block, _ in walk]
    for previous, (block, live) in zip(blocks, walk[1:]):
      if not live:
        self.assertEqual(block, previous, f"{walk=}")  # same block: no new DMA
    self.assertLessEqual(max(blocks), max(0, -(-length // block_kv) - 1))


if __name__ == "__main__":
  absltest.main()
