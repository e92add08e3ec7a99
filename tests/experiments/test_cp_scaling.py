"""Tests of the cp_scaling experiment kind and configs/cp_scaling.py (fake CPU devices)."""

from __future__ import annotations

import jax
from absl.testing import absltest

from configs import cp_scaling as cp_config
from experiments import cp_scaling
from experiments import launch


class CpScalingTest(absltest.TestCase):

  def test_points_run_and_report(self):
    if jax.device_count() < 4:
      self.skipTest(f"needs 4 devices, has {jax.device_count()}")
    config = cp_config.get_config("cpu")
    self.assertLen(launch.expand_sweep(config.sweep), 12)
    self.assertLen(launch.expand_sweep(cp_config.get_config("gpu").sweep), 32)
    for point, want_len in (({"scaling": "weak", "devices": 4, "length": 256,
                              "mask": "causal"}, 1024),
                            ({"scaling": "strong", "devices": 2, "length": 256,
                              "mask": "documents"}, 256)):
      metrics = cp_scaling.run_point(launch.apply_point(config, point), point)
      self.assertEqual(metrics["seq_len"], want_len)
      self.assertGreater(metrics["tokens_per_s"], 0)
      self.assertAlmostEqual(metrics["tokens_per_s_per_device"] * point["devices"],
                             metrics["tokens_per_s"])
      self.assertGreaterEqual(metrics["load_balance"], 1.0)
      if point["mask"] == "causal":
        self.assertEqual((metrics["layout"], metrics["load_balance"]), ("zigzag", 1.0))

  def test_bad_points(self):
    config = cp_config.get_config("cpu")
    for point, message in (({"devices": 1024}, "devices=1024 but JAX has"),
                           ({"mask": "window"}, "mask='window'"),
                           ({"scaling": "linear"}, "scaling='linear'")):
      with self.assertRaisesRegex(ValueError, message):
        cp_scaling.run_point(launch.apply_point(config, point), point)


if __name__ == "__main__":
  absltest.main()
