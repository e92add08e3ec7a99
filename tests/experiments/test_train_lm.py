"""Tests of the train_lm experiment kind and configs/train_lm.py."""

from __future__ import annotations

import json
import math
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import ml_collections

from configs import train_lm as train_lm_config
from experiments import launch
from experiments import train_lm


def _small(run_dir: str, **overrides) -> ml_collections.ConfigDict:
  """The CPU config shrunk further: 6 steps of a 1-layer model on 300 kB of the corpus."""
  config = train_lm_config.get_config("cpu")
  config.model.num_layers = 1
  config.model.d_model = 32
  config.model.num_heads = 2
  config.model.num_kv_heads = 1
  config.model.d_ff = 64
  config.seq_len = 32
  config.batch_size = 4
  config.num_steps = 6
  config.optimizer.warmup_steps = 2
  config.eval_every = 3
  config.eval_rows = 8
  config.log_every = 2
  config.checkpoint_every = 3
  config.corpus_max_bytes = 300_000
  config.throughput_iters = 3
  config.throughput_warmup = 1
  config.sample_tokens = 6
  config.progress = False
  config.run_dir = run_dir
  for name, value in overrides.items():
    config[name] = value
  return config


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters((f"{arg=}", arg) for arg in sorted(train_lm_config.VARIANTS))
  def test_points_apply_and_models_build(self, arg):
    config = train_lm_config.get_config(arg)
    points = launch.expand_sweep(config.sweep)
    self.assertNotEmpty(points)
    for point in points:
      point_config = launch.apply_point(config, point)
      model = train_lm.model_config(point_config)
      self.assertEqual(model.attention_impl, point["attention_impl"])
    if arg.startswith("gpu"):
      self.assertBetween(model.num_params(), 20e6, 50e6)
      self.assertLessEqual(config.time_budget_s, 600)

  def test_bad_arg_raises(self):
    with self.assertRaisesRegex(ValueError, "arg='tpu'"):
      train_lm_config.get_config("tpu")


class RunPointTest(parameterized.TestCase):

  def test_train_writes_outputs_and_resumes(self):
    with tempfile.TemporaryDirectory() as tmp:
      config = _small(tmp)
      metrics = train_lm.run_point(config, {})
      for name in ("val_loss", "train_loss", "tokens_per_s", "val_ppl"):
        self.assertTrue(math.isfinite(metrics[name]), name)
      self.assertEqual((metrics["steps"], metrics["resumed_from"]), (6, None))
      self.assertLess(metrics["val_loss"], math.log(256))
      self.assertTrue(metrics["sample"].startswith(config.sample_prompt))
      self.assertTrue(os.path.getsize(os.path.join(tmp, train_lm.PLOT_FILE)) > 1000)
      with open(os.path.join(tmp, train_lm.HISTORY_FILE)) as f:
        history = [json.loads(line) for line in f]
      self.assertEqual([e["step"] for e in history if "val_loss" in e], [3, 6])
      self.assertEqual([e["step"] for e in history if "loss" in e], [2, 4, 6])
      # A second run finds the final checkpoint and trains no further.
      again = train_lm.run_point(config, {})
      self.assertEqual((again["steps"], again["resumed_from"]), (6, 6))
      self.assertAlmostEqual(again["val_loss"], metrics["val_loss"], places=5)
      with open(os.path.join(tmp, train_lm.HISTORY_FILE)) as f:
        self.assertLen(f.readlines(), len(history))

  def test_time_budget_fits_the_schedule(self):
    with tempfile.TemporaryDirectory() as tmp:
      config = _small(tmp, num_steps=0, calibration_steps=2, time_budget_s=2.5,
                      checkpoint_backend="msgpack")
      metrics = train_lm.run_point(config, {})
    self.assertGreater(metrics["num_steps"], 3)
    self.assertIn(metrics["stopped_by"], ("num_steps", "time_budget"))
    self.assertLess(metrics["train_time_s"], 2.5 + 10.0)
    self.assertEqual(metrics["checkpoint_backend"], "msgpack")

  def test_mesh_matches_one_device_and_resumes(self):
    with tempfile.TemporaryDirectory() as tmp:
      one = train_lm.run_point(_small(tmp, mode="throughput"), {})
      sharded = train_lm.run_point(_small(tmp, mode="throughput", mesh="data:2,model:4"), {})
      self.assertEqual((one["mesh"], one["devices"]), (None, 1))
      self.assertEqual((sharded["mesh"], sharded["devices"]), ("data:2,model:4", 8))
      self.assertAlmostEqual(sharded["initial_loss"], one["initial_loss"], delta=1e-5)
      self.assertAlmostEqual(sharded["loss_after"], one["loss_after"], delta=1e-4)
      config = _small(tmp, mesh="fsdp:2,data:2,model:2", num_steps=3, eval_every=3,
                      checkpoint_every=3)
      metrics = train_lm.run_point(config, {})
      self.assertEqual((metrics["steps"], metrics["devices"]), (3, 8))
      self.assertTrue(math.isfinite(metrics["val_loss"]))
      again = train_lm.run_point(config, {})  # restores the sharded checkpoint
      self.assertEqual((again["steps"], again["resumed_from"]), (3, 3))
      self.assertAlmostEqual(again["val_loss"], metrics["val_loss"], places=5)
      with self.assertRaisesRegex(ValueError, "'data:3'"):
        train_lm.run_point(_small(tmp, mode="throughput", mesh="data:3"), {})

  def test_throughput_and_unavailable_cudnn(self):
    with tempfile.TemporaryDirectory() as tmp:
      metrics = train_lm.run_point(_small(tmp, mode="throughput"), {})
      self.assertGreater(metrics["tokens_per_s"], 0)
      self.assertEqual(metrics["samples"], 3)
      self.assertTrue(metrics["finite"])
      with self.assertRaisesRegex(NotImplementedError, "GPU"):
        train_lm.run_point(_small(tmp, attention_impl="jax_nn_cudnn"), {})
      with self.assertRaisesRegex(ValueError, "mode"):
        train_lm.run_point(_small(tmp, mode="eval"), {})


if __name__ == "__main__":
  absltest.main()
