"""experiments/kernel_choice_eval.py and the tuning-table helpers of kernel_choice."""

import dataclasses
import json
import pathlib
import tempfile
from unittest import mock

from absl.testing import absltest

from experiments import kernel_choice_eval
from flashjax.search import kernel_choice as kc

_LABELS = ("64x64 s2 grid", "128x64 s2 grid", "128x128 s2 grid", "128x128 s3 grid",
           "128x128 s2 persistent", "128x128 s3 persistent")


def _tuning_rows(scale_persistent: float) -> list[dict]:
  """Tuning-study rows of 4 problems timed by synthetic_latency; persistent candidates
  scaled by `scale_persistent` (two 'devices' that disagree about the persistent grid)."""
  rows = []
  # The last problem has too few programs (64 < 132 SMs) for the persistent grid to pay.
  for batch, length, density in ((1, 4096, 1.0), (4, 2048, 0.5), (2, 8192, 0.125),
                                 (1, 1024, 1.0)):
    shape = kc.AttentionShape(batch, length, length, 8, 128)
    candidates = []
    for label in _LABELS:
      config = kc.candidate_from_label(label)
      ms = kc.synthetic_latency(shape, density, config)
      candidates.append({"label": label,
                         "ms": ms * (scale_persistent if config.persistent else 1.0)})
    candidates.append({"label": "128x128 s4 persistent", "ms": None})  # failed: SMEM
    best = min((c for c in candidates if c["ms"]), key=lambda c: c["ms"])
    win = kc.candidate_from_label(best["label"])
    rows.append({"status": "ok", "point": {"implementation": "pallas_mosaic_gpu",
                                           "batch": batch, "q_len": length, "kv_len": length,
                                           "head_dim": 128, "mask": f"m{density}"},
                 "metrics": {"density_bucket": density, "candidates": json.dumps(candidates),
                             "best": best["label"], "best_ms": best["ms"],
                             "best_block_sizes": json.dumps(
                                 {"block_q": win.block_q, "block_kv": win.block_kv,
                                  "num_stages": win.num_stages,
                                  "persistent": win.persistent}),
                             "heuristic_ms": candidates[2]["ms"]}})
  rows.append({"status": "error", "point": {}, "metrics": {}})
  return rows


class TuningTableHelpersTest(absltest.TestCase):

  def test_candidate_labels(self):
    self.assertEqual(kc.candidate_from_label("128x64 s3 persistent"),
                     kc.KernelCandidate(128, 64, 3, True))
    self.assertEqual(kc.candidate_from_label("64x64 s2 grid"),
                     kc.KernelCandidate(64, 64, 2, False))
    self.assertEqual(kc.candidate_from_label("128x128"), kc.KernelCandidate(128, 128))
    for bad in ("", "128", "128x64 w4", "axb s2"):
      with self.assertRaisesRegex(ValueError, "candidate label"):
        kc.candidate_from_label(bad)

  def test_samples_skip_failed_candidates_and_rows(self):
    samples = kc.samples_from_tuning_rows(_tuning_rows(1.0), num_heads=8)
    self.assertLen(samples, 4 * len(_LABELS))
    self.assertEqual(samples[0].shape, kc.AttentionShape(1, 4096, 4096, 8, 128))


class KernelChoiceEvalTest(absltest.TestCase):

  def _write(self, root, name, rows):
    directory = pathlib.Path(root) / name
    directory.mkdir()
    (directory / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (directory / "config.json").write_text(json.dumps({"num_heads": 8}))
    return directory / "results.jsonl"

  def test_methods_and_table_transfer(self):
    root = tempfile.mkdtemp()
    same = self._write(root, "a", _tuning_rows(1.0))
    other = self._write(root, "b", _tuning_rows(1.5))  # persistent 1.5x slower on b
    tables = {"a": kernel_choice_eval.load_table(same),
              "b": kernel_choice_eval.load_table(other)}
    with mock.patch.dict(kernel_choice_eval.MLP, steps=100, hidden=(16,)):
      result = kernel_choice_eval.evaluate(tables)
    held_out = {"predictor, held out", "predictor (decay), held out", "ranking, held out",
                "ranking per head dim, held out"}
    self.assertEqual(set(result["a"]), held_out | {"predictor, b", "table of b", "heuristic"})
    for methods in result.values():
      for summary in methods.values():
        self.assertEqual(summary["problems"], 4)
        self.assertGreaterEqual(summary["max_slowdown"], 0.0)
    # b's winners are never persistent: on a, where persistent can win, b's table loses
    # exactly where a's best is persistent.
    a_rows, _ = tables["a"]
    a_persistent = ["persistent" in row["metrics"]["best"] for row in a_rows]
    self.assertTrue(any(a_persistent) and not all(a_persistent))
    for persistent, pick in zip(a_persistent, result["a"]["table of b"]["rows"]):
      self.assertFalse(pick["pick"]["persistent"])
      if persistent:
        self.assertGreater(pick["slowdown"], 0.0)
      else:
        self.assertAlmostEqual(pick["slowdown"], 0.0)
    text = kernel_choice_eval.markdown(result)
    self.assertIn("| a | table of b | 4 |", text)

  def test_kernel_stage_rows(self):
    # A hat_search kernel.jsonl: two head dims whose synthetic winners differ; an untimed row.
    wide, tall = kc.KernelCandidate(128, 64), kc.KernelCandidate(64, 128)
    rows = []
    for problem, (head_dim, length) in enumerate(((128, 1024), (128, 2048), (64, 1024),
                                                  (64, 2048))):
      shape = kc.AttentionShape(2, length, length, 8, head_dim)
      for config in (wide, tall):
        ms = 1.0 if (config == wide) == (head_dim == 128) else 1.3
        rows.append({"problem": problem, "shape": dataclasses.asdict(shape), "density": 0.5,
                     "config": dataclasses.asdict(config), "latency_ms": ms})
    rows.append({**rows[0], "latency_ms": None})
    path = pathlib.Path(tempfile.mkdtemp()) / "kernel.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    samples = kernel_choice_eval.load_kernel_rows(path)
    self.assertLen(samples, 8)
    with mock.patch.dict(kernel_choice_eval.MLP, steps=100, hidden=(16,)):
      result = kernel_choice_eval.evaluate({}, {"h100": samples})
    methods = result["h100"]
    self.assertLen(methods, 4)
    self.assertEqual(methods["ranking per head dim, held out"]["within_tolerance"], 1.0)
    self.assertEqual(methods["ranking, held out"]["problems"], 4)
    path.write_text(json.dumps({**rows[0], "latency_ms": None}))
    with self.assertRaisesRegex(ValueError, "no timed rows"):
      kernel_choice_eval.load_kernel_rows(path)

  def test_missing_config_is_named(self):
    root = pathlib.Path(tempfile.mkdtemp())
    (root / "results.jsonl").write_text("")
    with self.assertRaisesRegex(FileNotFoundError, "config.json"):
      kernel_choice_eval.load_table(root / "results.jsonl")


if __name__ == "__main__":
  absltest.main()
