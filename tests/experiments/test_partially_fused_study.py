"""configs/partially_fused.py: its grids, its summary and a CPU run through the launcher."""

import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from configs import partially_fused
from experiments import attention_bench
from experiments import launch
from experiments import report
from flashjax import io_model

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_H100 = "NVIDIA H100 80GB HBM3"


def _row(impl, mask, t, s, ms, within_tol=True, tiles="128x64"):
  point = {"implementation": impl, "q_len": t, "kv_len": s, "head_dim": 128, "mask": mask}
  metrics = {"median_ms": ms, "within_tol": within_tol, "roofline_device": _H100}
  if impl == "pallas_triton":
    metrics["fwd_tiles"] = tiles
  return {"key": repr(sorted(point.items())), "point": point, "status": "ok",
          "metrics": metrics}


class ConfigTest(parameterized.TestCase):

  @parameterized.parameters(("gpu", 84, "bfloat16"), ("cpu", 36, "float32"))
  def test_grid(self, arg, count, dtype):
    config = partially_fused.get_config(arg)
    points = launch.expand_sweep(config.sweep)
    self.assertLen(points, count)
    self.assertEqual(config.dtype, dtype)
    for point in points:
      cfg = launch.apply_point(config, point)
      self.assertIn(cfg.mask, attention_bench.MASK_FAMILIES)
      self.assertIn(cfg.implementation, partially_fused.IMPLEMENTATIONS)
    if arg == "gpu":  # the shape the model predicts partially_fused to win
      self.assertIn((512, 65536), {(p["q_len"], p["kv_len"]) for p in points})


class SummaryTest(absltest.TestCase):

  def test_winners_agreement_and_failed_checks(self):
    config = {"prediction_device": None, "dtype": "bfloat16", "batch": 1, "num_heads": 8,
              "num_kv_heads": 8}
    rows = [
        # K/V beyond L2, flash at 16-row query tiles: the model prefers partially_fused.
        _row("partially_fused", "dense", 512, 65536, 0.7),
        _row("pallas_triton", "dense", 512, 65536, 3.0, tiles="16x64"),
        _row("xla", "dense", 512, 65536, 2.0),
        # A square shape where FlashAttention is modelled fastest, measured slower: "no".
        _row("partially_fused", "dense", 4096, 4096, 0.5),
        _row("pallas_triton", "dense", 4096, 4096, 0.9),
        _row("xla", "dense", 4096, 4096, 2.0),
        # A failed check never wins; causal rows get no prediction.
        _row("partially_fused", "causal", 4096, 4096, 0.1, within_tol=False),
        _row("pallas_triton", "causal", 4096, 4096, 0.5),
        _row("xla", "causal", 4096, 4096, 1.5),
        # One algorithm measured (a cut run): no winner.
        _row("partially_fused", "causal", 8192, 8192, 0.6),
    ]
    self.assertTrue(io_model.prefer_partially_fused(512, 65536, 128, "bfloat16", _H100,
                                                    num_heads=8, block_q=16))
    self.assertFalse(io_model.prefer_partially_fused(4096, 4096, 128, "bfloat16", _H100,
                                                     num_heads=8))
    text = partially_fused.summarize(rows, config)
    lines = {tuple(l.split(" | ")[:4]): l for l in text.splitlines() if l.startswith("| ")}
    long_kv = lines[("| dense", "128", "512", "65536")]
    self.assertTrue(long_kv.endswith("| partially_fused | partially_fused | yes |"), long_kv)
    square = lines[("| dense", "128", "4096", "4096")]
    self.assertTrue(square.endswith("| partially_fused | pallas_triton | no |"), square)
    causal = lines[("| causal", "128", "4096", "4096")]
    self.assertTrue(causal.endswith("| - | 0.5 | 1.5 | pallas_triton | - | - |"), causal)
    alone = lines[("| causal", "128", "8192", "8192")]
    self.assertTrue(alone.endswith("| 0.6 | - | - | - | - | - |"), alone)
    self.assertIn("agrees with the measurement on 1 of 2 dense shapes", text)
    self.assertNotIn("not a test of the model", text)  # predicted for the device that ran


class LauncherTest(absltest.TestCase):

  def test_cpu_run_and_summary(self):
    workdir = tempfile.mkdtemp(prefix="fj_pf_study_")
    cmd = [sys.executable, "-m", "experiments.launch", "--config=configs/partially_fused.py:cpu",
           f"--workdir={workdir}", "--config.head_dims=(16,)", "--config.masks=('dense',)"]
    proc = subprocess.run(cmd, cwd=_REPO, capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    rows = report.read_rows(workdir)
    self.assertLen(rows, 9)
    for row in rows:
      self.assertEqual(row["status"], "ok", row.get("error"))
      self.assertTrue(row["metrics"]["within_tol"], row["point"])
    algorithms = {r["point"]["implementation"]: r["metrics"]["model_algorithm"] for r in rows}
    self.assertEqual(algorithms, {"partially_fused": "partial_fused",
                                  "pallas_triton": "flash_skip", "xla": "naive"})
    text = partially_fused.write_summary(workdir)
    self.assertTrue(os.path.exists(os.path.join(workdir, partially_fused.SUMMARY_FILE)))
    self.assertIn("not a test of the model", text)  # CPU measured, H100 predicted
    self.assertRegex(text, r"agrees with the measurement on \d of 3 dense shapes")


if __name__ == "__main__":
  absltest.main()
