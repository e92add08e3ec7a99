"""Tests of flashjax.io_model against hand-computed byte and FLOP counts."""

from absl.testing import absltest
from absl.testing import parameterized
import chex

from flashjax import benchmarking
from flashjax import io_model

# B=1, T=S=4, N=1, D=2, bf16 (2 bytes), tiles 2 x 2: a 2 x 2 tile grid.
_TINY = io_model.Shape(batch=1, q_len=4, kv_len=4, num_heads=1, head_dim=2, itemsize=2)


class IOModelTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # naive: q, o, k, v 4*8*2 = 64 B; S write/read, P write/read 4*16*2 = 128 B.
      ("algorithm='naive'_mode='fwd'", "naive", "fwd", None, 128, 192),
      # partial fused: 64 + 3*16*2 = 96 score bytes + max and sum written and read 4*4*4 = 64.
      ("algorithm='partial_fused'_mode='fwd'", "partial_fused", "fwd", None, 128, 224),
      # flash: q + o 32 B, LSE 16 B, a K and a V tile (2*2*2 B each) per tile: 4 tiles 64 B.
      ("algorithm='flash'_mode='fwd'", "flash", "fwd", None, 128, 112),
      # causal skipping: 3 of 4 tiles, 3 * 4*2*2*2 = 96 FLOPs, 48 B of K/V.
      ("algorithm='flash_skip'_mode='fwd'", "flash_skip", "fwd", 3, 96, 96),
      # flash backward: preprocess 32 + 16; dK/dV 64 + 4 tiles * 2 rows * (8 + 8) = 192;
      # dQ 48 + 32 + 4 tiles * 2 keys * 8 = 144.
      ("algorithm='flash'_mode='bwd'", "flash", "bwd", None, 320, 384),
      # naive backward: (6 q-like + 4 kv-like) * 8 * 2 = 160; 7 * 32 = 224 scores; delta 32.
      ("algorithm='naive'_mode='bwd'", "naive", "bwd", None, 320, 416),
      ("algorithm='flash'_mode='fwd_bwd'", "flash", "fwd_bwd", None, 448, 496),
  )
  def test_hand_counts(self, algorithm, mode, tiles, flops, hbm_bytes):
    cost = io_model.attention_cost(algorithm, _TINY, mode, block_q=2, block_kv=2,
                                   nonempty_tiles=tiles)
    chex.assert_trees_all_close((cost.flops, cost.hbm_bytes), (float(flops), float(hbm_bytes)),
                                rtol=0)

  def test_flash_skip_partial_backward(self):
    # 3 tiles: dK/dV 64 + 3*2*16 = 160, dQ 80 + 3*2*8 = 128, preprocess 48.
    cost = io_model.attention_cost("flash_skip", _TINY, "bwd", block_q=2, block_kv=2,
                                   nonempty_tiles=3)
    self.assertEqual(cost.hbm_bytes, 48 + 160 + 128)
    self.assertEqual(cost.flops, 2.5 * 96)

  def test_flash_dense_kv_reread_per_query_tile(self):
    # Dense FA reads K and V cdiv(T, block_q) times: T=4096, block_q=128 -> 32 passes.
    shape = io_model.Shape(batch=2, q_len=4096, kv_len=4096, num_heads=8, head_dim=64)
    cost = io_model.attention_cost("flash", shape, block_q=128, block_kv=64)
    rows = 2 * 8 * 4096
    want = 2 * 2 * rows * 64 + 4 * rows + 32 * 2 * 2 * rows * 64
    self.assertEqual(cost.hbm_bytes, want)
    self.assertEqual(cost.flops, benchmarking.attention_flops(2, 4096, 4096, 8, 64))
    skip_all = io_model.attention_cost("flash_skip", shape, block_q=128, block_kv=64)
    self.assertEqual(skip_all, cost)

  def test_gqa_and_score_itemsize(self):
    shape = io_model.Shape(batch=1, q_len=4, kv_len=4, num_heads=2, head_dim=2, itemsize=2,
                           num_kv_heads=1, score_itemsize=4)
    cost = io_model.attention_cost("naive", shape)
    # q, o: 2 heads * 4 * 2 * 2 B * 2 = 64; k, v: 1 head: 32; scores 4 * 2 * 16 * 4 B = 512.
    self.assertEqual(cost.hbm_bytes, 64 + 32 + 512)
    self.assertEqual(cost.flops, 256)

  def test_roofline(self):
    cost = io_model.IOCost(flops=128.0, hbm_bytes=192.0)
    self.assertAlmostEqual(cost.roofline_ms(1e3, 1e3), 192.0)
    self.assertAlmostEqual(cost.roofline_ms(1e2, 1e3), 1280.0)
    big = io_model.IOCost(flops=790e12, hbm_bytes=1.0)
    self.assertAlmostEqual(big.roofline_ms(device_kind="NVIDIA H200"), 1e3)  # measured 790
    self.assertAlmostEqual(big.roofline_ms(device_kind="NVIDIA H100 80GB HBM3"),
                           1e3 * 790 / 989.4)  # datasheet 989.4 TFLOP/s
    copy = io_model.IOCost(flops=1.0, hbm_bytes=2.74e12)
    self.assertAlmostEqual(copy.roofline_ms(device_kind="NVIDIA H100 80GB HBM3"), 1e3)
    self.assertAlmostEqual(copy.roofline_ms(device_kind="NVIDIA H200"), 1e3 * 2.74 / 4.3)
    self.assertAlmostEqual(copy.roofline_ms(1e15, None, device_kind="NVIDIA H200"),
                           1e3 * 2.74e12 / 4.3e12)  # peak given: only the bandwidth looked up
    with self.assertRaisesRegex(ValueError, "device_kind='cpu'"):
      big.roofline_ms(device_kind="cpu")
    with self.assertRaisesRegex(ValueError, "matmul ceiling"):
      big.roofline_ms(device_kind="NVIDIA H200", dtype="float32")
    if benchmarking.device_ceilings(benchmarking.running_device_kind()) is None:
      with self.assertRaisesRegex(ValueError, "no matmul ceiling"):
        big.roofline_ms()  # default: the running device (here one without ceilings)
    self.assertAlmostEqual(cost.intensity, 128 / 192)
    with self.assertRaisesRegex(ValueError, "peak_flops_per_s"):
      cost.roofline_ms(0.0, 1.0)

  def test_flash_beats_naive_for_long_sequences(self):
    shape = io_model.Shape(batch=4, q_len=8192, kv_len=8192, num_heads=32, head_dim=64)
    naive = io_model.attention_cost("naive", shape)
    fused = io_model.attention_cost("partial_fused", shape)
    flash = io_model.attention_cost("flash", shape)
    self.assertGreater(naive.hbm_bytes, fused.hbm_bytes)
    # Scores cost 6 B per pair; K/V re-reads 4 * D / block_q = 2 B per pair.
    self.assertGreater(fused.hbm_bytes, 2.5 * flash.hbm_bytes)

  @parameterized.named_parameters(
      (f"{impl=}", impl, want) for impl, want in (
          ("pallas_triton", "flash_skip"), ("pallas_mosaic_gpu", "flash_skip"),
          ("peer:torch_flex", "flash_skip"), ("xla", "naive"), ("peer:jax_nn_xla", "naive"),
          ("peer:jax_nn_cudnn", "flash"), ("peer:torch_sdpa", "flash"),
          ("partially_fused", "partial_fused")))
  def test_implementation_algorithm(self, impl, want):
    self.assertEqual(io_model.implementation_algorithm(impl), want)

  def test_bad_input_raises(self):
    with self.assertRaisesRegex(ValueError, "algorithm="):
      io_model.attention_cost("sparse", _TINY)
    with self.assertRaisesRegex(ValueError, "mode="):
      io_model.attention_cost("flash", _TINY, "train")
    with self.assertRaisesRegex(ValueError, "nonempty_tiles="):
      io_model.attention_cost("flash_skip", _TINY, block_q=2, block_kv=2, nonempty_tiles=5)
    with self.assertRaisesRegex(ValueError, "block_q="):
      io_model.attention_cost("flash", _TINY, block_q=0)
    with self.assertRaisesRegex(ValueError, "Shape.q_len"):
      io_model.Shape(batch=1, q_len=0, kv_len=4, num_heads=1, head_dim=2)


if __name__ == "__main__":
  absltest.main()
