"""Tests of the block-size tuning study (configs/tune_attention.py, experiments.attention_tune)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized

from configs import tune_attention
from experiments import attention_bench
from experiments import attention_tune
from experiments import launch
from flashjax.ops.attention import pallas_triton
from flashjax.ops.attention.block_sizes import BlockSizes
from flashjax.ops.attention.tuning import keys as tuning_keys
from flashjax.ops.attention.tuning import store as tuning_store

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{arg=}", arg, implementation, points, candidates) for arg, implementation, points,
      candidates in (("gpu", "pallas_mosaic_gpu", 9, 16), ("gpu_triton", "pallas_triton", 9, 24),
                     ("cpu", "pallas_triton", 3, 3)))
  def test_grid(self, arg, implementation, points, candidates):
    config = tune_attention.get_config(arg)
    expanded = [launch.apply_point(config, p) for p in launch.expand_sweep(config.sweep)]
    self.assertLen(expanded, points)
    for p in expanded:
      self.assertEqual(p.implementation, implementation)
      self.assertEqual(p.q_len, p.kv_len)
      self.assertLen(attention_tune._candidates(p), candidates)
    if arg == "cpu":
      self.assertEqual(config.dtype, "float32")
      self.assertIsNotNone(config.tuning_file)  # never the user cache
    else:
      self.assertEqual({(p.head_dim, p.batch, p.q_len) for p in expanded},
                       {(128, 4, 4096), (128, 1, 16384), (64, 8, 2048)})
      self.assertEqual({p.mask for p in expanded}, {"dense", "causal", "document"})
      self.assertEqual((config.dtype, config.num_heads), ("bfloat16", 32))
    with self.assertRaisesRegex(ValueError, "arg="):
      tune_attention.get_config("tpu")


class RunPointTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp(prefix="fj_tune_")
    self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
    tuning_store.clear_cache()

  def test_faster_heuristic_is_recorded_as_itself(self):
    config = tune_attention.get_config("cpu")
    config.update(dict(mask="causal", q_len=64, kv_len=64, head_dim=32, batch=1,
                       tuning_file=os.path.join(self.dir, "t.json")))
    calls = []

    def fake_time(cfg, fn, sets):  # the heuristic is timed first, then each candidate
      calls.append(fn)
      return {"median_ms": 0.5 if len(calls) == 1 else 1.0 + len(calls), "compile_s": 0.0}

    with mock.patch.object(attention_bench, "time_point", fake_time):
      metrics = attention_tune.run_point(config, {})
    self.assertLen(calls, 4)
    self.assertEqual((metrics["winner"], metrics["best_ms"], metrics["speedup"]),
                     ("heuristic", 0.5, 0.5 / 3.0))
    self.assertTrue(metrics["within_tol"])
    entries = list(tuning_store.load_entries(config.tuning_file).values())
    self.assertLen(entries, 1)
    heuristic = pallas_triton.default_block_sizes(32, 64, 64, interpret=True)
    self.assertEqual(tuning_store.block_sizes_from_dict(entries[0]["block_sizes"]), heuristic)
    self.assertEqual(tuning_keys.key_string(entries[0]["key"]), metrics["tuning_key"])
    self.assertEqual(json.loads(metrics["candidates"])[0], {"label": "32x32", "ms": 3.0})

  def test_winner_out_of_tolerance_is_not_recorded(self):
    config = tune_attention.get_config("cpu")
    config.update(dict(mask="dense", q_len=64, kv_len=64, batch=1,
                       tuning_file=os.path.join(self.dir, "t.json")))
    with mock.patch.object(attention_bench, "check_errors",
                           return_value={"max_abs_err": 1.0, "within_tol": False}):
      metrics = attention_tune.run_point(config, {})
    self.assertFalse(metrics["recorded"])
    self.assertFalse(os.path.exists(config.tuning_file))


class LauncherTest(absltest.TestCase):

  def test_cpu_variant_end_to_end(self):
    workdir = tempfile.mkdtemp(prefix="fj_tune_launch_")
    self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
    tuning_file = os.path.join(workdir, "tuning", "cpu.json")
    cmd = [sys.executable, "-m", "experiments.launch", "--config=configs/tune_attention.py:cpu",
           f"--workdir={workdir}", "--config.masks=('causal', 'document')",
           "--config.seq_lens=(64,)", f"--config.tuning_file={tuning_file}"]
    proc = subprocess.run(cmd, cwd=_REPO, capture_output=True, text=True, timeout=240)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(os.path.join(workdir, "results.jsonl")) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    self.assertLen(rows, 2)
    entries = tuning_store.load_entries(tuning_file)
    for row in rows:
      metrics = row["metrics"]
      self.assertEqual(row["status"], "ok", row.get("error"))
      self.assertTrue(metrics["within_tol"])
      self.assertTrue(metrics["recorded"])
      self.assertEqual(metrics["candidates_ok"], 3)
      self.assertIn(metrics["tuning_key"], entries)
      entry = entries[metrics["tuning_key"]]
      self.assertEqual(entry["key"]["device_kind"], "cpu")
      self.assertIsInstance(tuning_store.block_sizes_from_dict(entry["block_sizes"]), BlockSizes)
    text = tune_attention.write_summary(workdir)
    self.assertEqual(text.count("| candidate | ms |"), 2)
    self.assertIn("| 32x64 |", text)
    self.assertTrue(os.path.exists(os.path.join(workdir, "report.md")))


if __name__ == "__main__":
  absltest.main()
