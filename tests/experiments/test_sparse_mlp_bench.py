"""The sparse MLP study: its config variants and points on CPU (interpret mode)."""

from absl.testing import absltest
import numpy as np

from configs import bench_sparse_mlp
from experiments import sparse_mlp_bench
from flashjax import benchmarking


class SparseMLPBenchTest(absltest.TestCase):

  def test_check_rows_spread_over_the_batch(self):
    np.testing.assert_array_equal(sparse_mlp_bench.check_rows(1), [0])
    rows = sparse_mlp_bench.check_rows(256)
    self.assertLen(rows, 8)
    self.assertEqual((rows[0], rows[-1]), (0, 255))

  def test_gpu_grid_is_the_issue_grid(self):
    c = bench_sparse_mlp.get_config("gpu")
    self.assertEqual(tuple(c.batches), (1, 8, 32, 64, 128, 256))
    self.assertEqual(tuple(c.densities), (0.05, 0.1, 0.25, 0.5, 1.0))
    self.assertEqual(tuple(map(tuple, c.shapes)), ((4096, 16384), (5120, 20480)))
    self.assertIn("dense_xla", c.implementations)

  def test_cpu_points_run_and_check(self):
    c = bench_sparse_mlp.get_config("cpu")
    with c.unlocked():
      c.batch, c.density, c.iters, c.repeats = 3, 0.25, 2, 1
    metrics = sparse_mlp_bench.run_point(c, {})
    self.assertTrue(metrics["within_tol"])
    self.assertEqual(metrics["k"], 128)
    self.assertGreater(metrics["median_us"], 0)
    self.assertEqual(set(metrics["tiles"]), set(sparse_mlp_bench._BLOCK_FIELDS))
    with c.unlocked():
      c.implementation = "dense_xla"
    with self.assertRaisesRegex(NotImplementedError, "density 1 only"):
      sparse_mlp_bench.run_point(c, {})

  def test_copy_bandwidth_is_positive(self):
    self.assertGreater(benchmarking.measured_copy_bandwidth(nbytes=1 << 20, iters=2), 0)


if __name__ == "__main__":
  absltest.main()
