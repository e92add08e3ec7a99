"""The hat_search study through the launcher: every stage, resume after a kill."""

import json
import os
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np

from configs import hat_search as study_config
from experiments import hat_predictor_cv
from experiments import hat_search
from experiments import launch
from flashjax.search import latency
from flashjax.search import predictor as predictor_lib
from flashjax.search import supernet as supernet_lib
from flashjax.search.space import Arch
from flashjax.search.space import SearchSpace


def _tiny_config(workdir):
  c = study_config.get_config("cpu")
  c.space.embed_dims = (16, 32)
  c.space.head_dim = 8
  c.baseline.embed_dim = 32
  c.seq_len = 32
  c.batch_size = 4
  c.super_steps = 6
  c.checkpoint_every = 3
  c.corpus_max_bytes = 60_000
  c.eval_rows = 2
  c.eval_batch_size = 2
  c.latency_samples = 5
  c.prefill_tokens = 8
  c.decode_tokens = 2
  c.warmup = 1
  c.repeats = 3
  c.predictor_hidden = (16,)
  c.predictor_steps = 50
  c.test_fraction = 0.4
  c.population, c.parents, c.mutations, c.crossovers, c.generations = 3, 1, 1, 1, 1
  c.retrain_steps = 2
  c.retrain_decode_batches = (1, 3)  # one batch besides the search's (latency_batch 2)
  c.compile_workers = 2  # the threaded compiles of every stage
  c.kernel.problems = 8
  c.kernel.block_qs = (32, 64)
  c.kernel.block_kvs = (32, 64)
  c.kernel.stages = (0,)
  c.kernel.steps = 50
  c.setup_dir = os.path.join(workdir, "stages")
  c.report_dir = workdir
  return c


def _rows(workdir):
  with open(os.path.join(workdir, launch.RESULTS_FILE)) as f:
    return [json.loads(line) for line in f]


class HatSearchStudyTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp(prefix="fj_hat_test_")
    self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)
    self.addCleanup(hat_search._TRAINERS.clear)
    hat_search._TRAINERS.clear()

  def test_variants(self):
    for arg in ("cpu", "gpu"):
      c = study_config.get_config(arg)
      self.assertEqual([p["stage"] for p in launch.expand_sweep(c.sweep)],
                       list(hat_search.STAGES))
      hat_search.space(c).check(hat_search.baseline_arch(c))
      self.assertEqual(c.parents + c.mutations + c.crossovers, c.population)
    gpu = study_config.get_config("gpu")
    self.assertEqual((gpu.population, gpu.parents, gpu.mutate_prob, gpu.generations),
                     (125, 25, 0.3, 30))
    with self.assertRaisesRegex(ValueError, "stage='nope'"):
      c = study_config.get_config("cpu")
      c.stage = "nope"
      hat_search.run_point(c, {})

  def test_predictor_cross_validation(self):
    space = SearchSpace(embed_dims=(16, 32), layer_counts=(1, 2), ffn_dims=(32, 64),
                        head_counts=(1, 2), head_dim=8)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(12):
      arch = space.sample(rng)
      cost = latency.arch_cost(arch, space, vocab_size=40, batch=1, prefill_tokens=8,
                               decode_tokens=4)
      rows.append({"features": [float(v) for v in space.features(arch)], "cost": cost,
                   # exactly linear in the linear baseline's columns
                   "prefill_ms": 0.1 + 1e-6 * cost["prefill_flops"] + 0.2 * cost["num_layers"],
                   "decode_ms": 0.3 + 1e-5 * cost["decode_bytes"] + 0.1 * cost["num_layers"]})
    config = study_config.get_config("cpu")
    config.predictor_hidden, config.predictor_steps = (8,), 20
    result = hat_predictor_cv.cross_validate(rows, 4, config)
    for target in hat_search.TARGETS:
      self.assertEqual(set(result[target]), {"mlp", "linear", "mlp_with_costs"})
      self.assertGreater(result[target]["linear"]["r2"], 0.999)
      self.assertLess(result[target]["linear"]["mape"], 0.1)
    with self.assertRaisesRegex(ValueError, "folds=13"):
      hat_predictor_cv.cross_validate(rows, 13, config)

  def test_measured_kernel_stage_times_problems_in_rounds(self):
    config = _tiny_config(self.workdir)
    config.stages = ("kernel",)
    config.compile_workers = 3
    k = config.kernel
    k.source, k.problems, k.test_fraction, k.rounds, k.mask_block = "measured", 2, 0.5, 2, 64
    k.loop_calls, k.warmup, k.repeats = 1, 1, 2
    k.lengths, k.batches, k.heads, k.head_dims = (128,), (1,), (1,), (16,)
    k.block_qs, k.block_kvs = (32,), (32, 64)
    real_measure_problem = hat_search._measure_problem
    measured, kill_at = [], [1]

    def measure_problem(config_, index, configs):
      measured.append(index)
      if index in kill_at:
        raise RuntimeError("killed")
      return real_measure_problem(config_, index, configs)

    path = os.path.join(config.setup_dir, "kernel", "kernel.jsonl")
    with mock.patch.object(hat_search, "_measure_problem", measure_problem):
      rows = launch.run(config, self.workdir, progress=False)
      self.assertEqual(rows[0]["status"], "error")
      first = latency.read_jsonl(path)  # the finished problem's rows only
      self.assertEqual([r["problem"] for r in first], [0, 0])
      measured.clear()
      kill_at.clear()
      rows = launch.run(config, self.workdir, progress=False)
    self.assertEqual(rows[0]["status"], "ok", rows[0].get("traceback"))
    self.assertEqual(measured, [1])  # problem 0 was not timed again
    kernel_rows = latency.read_jsonl(path)
    self.assertEqual(kernel_rows[:2], first)
    self.assertEqual([(r["problem"], r["config"]["block_kv"]) for r in kernel_rows],
                     [(0, 32), (0, 64), (1, 32), (1, 64)])
    for row in kernel_rows:
      self.assertEqual((row["mask_block"], row["rounds"], len(row["round_ms"])), (64, 2, 2))
      self.assertAlmostEqual(row["latency_ms"], np.mean(row["round_ms"]))
      self.assertGreater(row["compile_s"], row["lower_s"])
      self.assertGreater(row["lower_s"], 0)
    metrics = rows[0]["metrics"]
    self.assertEqual(metrics["kernel_samples"], 4)
    self.assertIn(metrics["kernel_round_agreement"], (0.0, 0.5, 1.0))  # of 2 problems
    for key in ("kernel_head_dim_ranking_within_tolerance", "kernel_ranking_lopo_within_tolerance",
                "kernel_head_dim_ranking_lopo_within_tolerance"):
      self.assertBetween(metrics[key], 0, 1)
    # Rows of the earlier protocol (a mask per configuration, one round) are not extended.
    with open(path, "w") as f:
      f.write(json.dumps({**kernel_rows[0], "mask_block": None, "rounds": None}) + "\n")
    with self.assertRaisesRegex(ValueError, "line 1 has mask_block=None \\(now 64\\)"):
      hat_search.stage_kernel(config)
    with open(path, "w") as f:
      f.write(json.dumps(kernel_rows[0]) + "\n")
    # Measured rows of another device are never extended (nor mixed into one predictor).
    with mock.patch.object(latency, "device_info", return_value={
        "backend": "gpu", "device_kind": "NVIDIA H200", "jax_version": "x"}):
      with self.assertRaisesRegex(ValueError, "device_kind='cpu' \\(now 'NVIDIA H200'\\)"):
        hat_search.stage_kernel(config)
    config.compile_workers = 0
    with self.assertRaisesRegex(Exception, "compile_workers=0"):
      launch.run(config, tempfile.mkdtemp(dir=self.workdir), progress=False)
    config.compile_workers = 2
    config.retrain_decode_batches = (1, 0)
    with self.assertRaisesRegex(ValueError, r"retrain_decode_batches=\(1, 0\)"):
      hat_search.check_point(config)
    config.retrain_decode_batches = (1,)
    config.predictor_weight_decay = -1.0
    with self.assertRaisesRegex(ValueError, "predictor_weight_decay=-1.0"):
      hat_search.check_point(config)
    config.predictor_weight_decay = 0.0
    config.kernel.mask_block = 32  # the 64-wide configurations would visit another density
    with self.assertRaisesRegex(ValueError, r"mask_block=32 must be a multiple .*\(32, 32, 64\)"):
      hat_search.check_point(config)
    config.kernel.mask_block, config.kernel.rounds = 64, 0
    with self.assertRaisesRegex(ValueError, "kernel.rounds=0"):
      hat_search.check_point(config)
    config.kernel.rounds, config.kernel.loop_calls = 2, -1
    with self.assertRaisesRegex(ValueError, "kernel.loop_calls=-1 must be an int >= 0"):
      hat_search.check_point(config)

  def test_study_runs_and_resumes_after_kills(self):
    config = _tiny_config(self.workdir)
    # 1. Killed inside the supernet training at its 5th step (a checkpoint exists at 3).
    real_step = supernet_lib.SuperTrainer.train_step
    calls = []

    def dies_at_fifth(self_, *args, **kwargs):
      calls.append(1)
      if len(calls) == 5:
        raise RuntimeError("killed")
      return real_step(self_, *args, **kwargs)

    with mock.patch.object(supernet_lib.SuperTrainer, "train_step", dies_at_fifth):
      rows = launch.run(config, self.workdir, progress=False)
    # The search and the retraining need the trained supernet and fail; latency, the
    # predictor and the kernel stage do not need it.
    self.assertEqual([r["status"] for r in rows],
                     ["error", "ok", "ok", "error", "error", "ok"])
    self.assertIn("killed", rows[0]["error"])
    self.assertIn("stage 'supernet' has not finished", rows[3]["error"])
    self.assertEqual(rows[1]["metrics"]["samples"], 5)

    # 2. A new process: the supernet resumes from step 3; the search stage fails.
    hat_search._TRAINERS.clear()
    with mock.patch.object(predictor_lib.MLPPredictor, "load",
                           side_effect=RuntimeError("no mlp")), \
         mock.patch.object(predictor_lib.LinearPredictor, "load",
                           side_effect=RuntimeError("no mlp")):
      rows = launch.run(config, self.workdir, progress=False)
    self.assertEqual([r["status"] for r in rows], ["ok"] * 3 + ["error"] * 2 + ["ok"])
    self.assertEqual(rows[0]["metrics"]["resumed_from_step"], 3)
    self.assertEqual(rows[0]["metrics"]["steps"], 6)
    self.assertIn("no mlp", rows[3]["error"])

    # 3. Again: the finished stages are not redone, the rest completes.
    hat_search._TRAINERS.clear()
    forbidden = AssertionError("a finished stage ran again")
    with mock.patch.object(supernet_lib, "train_supernet", side_effect=forbidden), \
         mock.patch.object(latency, "collect_dataset", side_effect=forbidden), \
         mock.patch.object(predictor_lib, "fit_mlp", side_effect=forbidden):
      rows = launch.run(config, self.workdir, progress=False)
    for row in rows:
      self.assertEqual(row["status"], "ok", row.get("traceback"))
    self.assertLen(_rows(self.workdir), 6 + 3 + 2)  # no finished stage ran twice
    metrics = {r["point"]["stage"]: r["metrics"] for r in rows}
    self.assertBetween(metrics["predictor"]["decode_ms_mlp_mape"], 0, 1e4)
    self.assertIn("decode_ms_linear_r2", metrics["predictor"])
    pred = metrics["predictor"]
    best = "mlp" if pred["decode_ms_mlp_mape"] <= pred["decode_ms_linear_mape"] else "linear"
    self.assertEqual(pred["decode_ms_search_predictor"], best)
    search = metrics["search"]
    self.assertLen(search["budgets_ms"], 2)
    with open(os.path.join(config.setup_dir, "search", "search_0.json")) as f:
      winner = Arch.from_dict(json.load(f)["arch"])
    # The search's constraint used the chosen predictor.
    self.assertAlmostEqual(hat_search._predictor(config)(winner),
                           search["budget0_predicted_ms"], places=5)
    rows_ = latency.read_jsonl(os.path.join(config.setup_dir, "latency", "latency.jsonl"))
    for forced in ("mlp", "linear"):
      config.search_predictor = forced
      fitted = hat_search.fit_predictors(config, rows_, tempfile.mkdtemp(dir=self.workdir))
      self.assertEqual(fitted["decode_ms_search_predictor"], forced)
    config.search_predictor = "best"
    with self.assertRaisesRegex(Exception, "search_predictor='knn'"):
      config.search_predictor = "knn"
      launch.run(config, tempfile.mkdtemp(dir=self.workdir), progress=False)
    config.search_predictor = "best"
    for i in range(2):
      self.assertLessEqual(search[f"budget{i}_predicted_ms"], search[f"budget{i}_ms"])
    retrain = metrics["retrain"]
    for name in ("baseline", "budget0", "budget1"):
      self.assertGreater(retrain[f"{name}_decode_ms"], 0)
      self.assertGreater(retrain[f"{name}_params_m"], 0)
    self.assertIn("budget0_speedup", retrain)
    with open(os.path.join(config.setup_dir, "retrain", "budget0.json")) as f:
      row = json.load(f)
    for batch in (1, 3):
      # tokens/s is batch x decode steps over the measured decode time at that batch
      self.assertAlmostEqual(row[f"decode_tok_s_b{batch}"],
                             batch * config.decode_tokens / row[f"decode_ms_b{batch}"] * 1e3)
      self.assertAlmostEqual(
          retrain[f"budget0_speedup_b{batch}"],
          retrain[f"budget0_decode_tok_s_b{batch}"] / retrain[f"baseline_decode_tok_s_b{batch}"])
    self.assertBetween(metrics["kernel"]["kernel_pick_within_tolerance"], 0, 1)
    stages = config.setup_dir
    for name in ("search/pareto.png", "search/trajectory.png", "search/pareto.json",
                 "latency/latency.jsonl", "retrain/baseline.json", "kernel/kernel.jsonl"):
      self.assertTrue(os.path.exists(os.path.join(stages, name)), name)
    with open(os.path.join(self.workdir, hat_search.REPORT_FILE)) as f:
      report = f.read()
    for heading in ("Latency predictor", "Search", "Retrained from scratch", "tok/s B=3",
                    "Kernel configurations", "search/pareto.png"):
      self.assertIn(heading, report)


if __name__ == "__main__":
  absltest.main()
