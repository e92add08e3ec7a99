"""Latency protocol and dataset, predictors on synthetic latencies, evolution, kernel picks."""

import json
import os
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np
from flax import nnx

from flashjax.models import TransformerConfig
from flashjax.ops.attention.api import dot_product_attention
from flashjax.search import evolution
from flashjax.search import kernel_choice as kc
from flashjax.search import latency
from flashjax.search import predictor
from flashjax.search import supernet as sn
from flashjax.search.space import SearchSpace

SPACE = SearchSpace(embed_dims=(16, 32), layer_counts=(1, 2), ffn_dims=(32, 64),
                    head_counts=(1, 2), head_dim=8)
BASE = TransformerConfig(vocab_size=40, max_len=32)


class ProtocolTest(absltest.TestCase):

  def test_trimmed_mean_drops_ten_percent_each_end(self):
    samples = [100.0, 1, 2, 3, 4, 5, 6, 7, 8, -50.0]
    self.assertEqual(latency.trimmed_mean(samples), 4.5)  # mean of 1..8
    self.assertEqual(latency.trimmed_mean([3.0, 1.0]), 2.0)  # floor(0.2) = 0 dropped
    self.assertEqual(latency.trimmed_mean(list(range(20)), 0.25), 9.5)
    with self.assertRaisesRegex(ValueError, "trim=0.5"):
      latency.trimmed_mean([1.0], 0.5)
    with self.assertRaisesRegex(ValueError, "samples"):
      latency.trimmed_mean([])

  def test_measure_protocol(self):
    calls = []
    times = iter([0.0, 1.0] + [i * 10.0 for i in range(40)])

    def fn():
      calls.append(1)
      return np.zeros(1)

    with mock.patch.object(latency.time, "perf_counter", side_effect=lambda: next(times)):
      out = latency.measure(fn, warmup=2, repeats=10)
    self.assertLen(calls, 12)
    self.assertLen(out["samples_ms"], 10)
    self.assertEqual(out["warmup"], 2)
    with self.assertRaisesRegex(ValueError, "warmup=0"):
      latency.measure(fn, warmup=0)


class DatasetTest(absltest.TestCase):

  def test_collection_resumes_after_a_kill(self):
    trainer = sn.SuperTrainer(sn.SuperTransformer(SPACE, BASE, rngs=nnx.Rngs(0)),
                              __import__("flashjax.models.training",
                                         fromlist=["x"]).OptimizerConfig())
    path = os.path.join(tempfile.mkdtemp(), "latency.jsonl")
    kwargs = dict(num_samples=3, batch=1, prefill_tokens=4, decode_tokens=2, vocab_size=40,
                  warmup=1, repeats=3, seed=5)
    real = latency.time_tasks
    calls = []

    def dies_on_third(*args, **kw):
      calls.append(1)
      if len(calls) == 3:
        raise KeyboardInterrupt("killed")
      return real(*args, **kw)

    with mock.patch.object(latency, "time_tasks", side_effect=dies_on_third):
      with self.assertRaises(KeyboardInterrupt):
        latency.collect_dataset(path, SPACE, trainer.sub_model, **kwargs)
    with open(path, "a") as f:
      f.write('{"index": 2, "torn')  # a half-written line
    self.assertLen(latency.read_jsonl(path), 2)
    with mock.patch.object(latency, "time_tasks", side_effect=real) as again:
      rows = latency.collect_dataset(path, SPACE, trainer.sub_model, **kwargs)
    self.assertEqual(again.call_count, 1)  # only the missing sample
    self.assertEqual([r["index"] for r in rows], [0, 1, 2])
    with open(path) as f:
      self.assertEqual([json.loads(line)["index"] for line in f], [0, 1, 2])
    for row in rows:
      self.assertGreater(row["prefill_ms"], 0)
      self.assertGreater(row["decode_ms"], 0)
      self.assertEqual(row["device_kind"], latency.device_info()["device_kind"])
      self.assertEqual(row["arch"], latency.sample_arch(SPACE, 5, row["index"]).to_dict())
      self.assertLen(row["prefill_timing"]["samples_ms"], 3)
      self.assertGreater(row["compile_s"], row["lower_s"])
      self.assertGreater(row["lower_s"], 0)
    # A file measured on another device, or for another task, is not extended.
    kwargs["num_samples"] = 4
    with mock.patch.object(latency, "device_info", return_value={
        "backend": "gpu", "device_kind": "NVIDIA H200", "jax_version": "x"}):
      with self.assertRaisesRegex(ValueError, r"line 1 has backend='cpu' \(now 'gpu'\), "
                                  r"device_kind='cpu' \(now 'NVIDIA H200'\)"):
        latency.collect_dataset(path, SPACE, trainer.sub_model, **kwargs)
    with self.assertRaisesRegex(ValueError, "task=.*'decode_tokens': 2.*now.*'decode_tokens': 3"):
      latency.collect_dataset(path, SPACE, trainer.sub_model, **{**kwargs, "decode_tokens": 3})
    self.assertLen(latency.read_jsonl(path), 3)

  def test_compiled_in_groups_keeps_order_and_finishes_a_group_first(self):
    built = []

    def build(item):
      built.append(item)
      return item * 10

    seen = []
    for item, value in latency.compiled_in_groups(iter(range(5)), build, 2):
      seen.append((item, value, len(built)))
    # Items 0-1 built before 0 is yielded, 2-3 before 2, 4 before 4.
    self.assertEqual(seen, [(0, 0, 2), (1, 10, 2), (2, 20, 4), (3, 30, 4), (4, 40, 5)])
    with self.assertRaisesRegex(ValueError, "workers=0"):
      list(latency.compiled_in_groups([1], build, 0))

  def test_threaded_compiles_measure_the_same_samples(self):
    trainer = sn.SuperTrainer(sn.SuperTransformer(SPACE, BASE, rngs=nnx.Rngs(0)),
                              __import__("flashjax.models.training",
                                         fromlist=["x"]).OptimizerConfig())
    kwargs = dict(num_samples=3, batch=1, prefill_tokens=4, decode_tokens=2, vocab_size=40,
                  warmup=1, repeats=2, seed=5)
    root = tempfile.mkdtemp()
    serial = latency.collect_dataset(os.path.join(root, "a.jsonl"), SPACE, trainer.sub_model,
                                     **kwargs)
    compiled_at = []
    real_time = latency.time_tasks

    def timing(tasks, **kw):  # all compiles of a group end before its first timing
      compiled_at.append(len(compile_calls))
      return real_time(tasks, **kw)

    compile_calls = []
    real_compile = latency.compile_tasks

    def compiling(*args, **kw):
      compile_calls.append(1)
      return real_compile(*args, **kw)

    with mock.patch.object(latency, "time_tasks", side_effect=timing), \
         mock.patch.object(latency, "compile_tasks", side_effect=compiling):
      threaded = latency.collect_dataset(os.path.join(root, "b.jsonl"), SPACE,
                                         trainer.sub_model, compile_workers=2, **kwargs)
    self.assertEqual(compiled_at, [2, 2, 3])  # groups {0, 1} and {2}
    self.assertEqual([r["arch"] for r in threaded], [r["arch"] for r in serial])
    self.assertEqual([r["compile_workers"] for r in threaded], [2, 2, 2])
    for row in threaded:
      self.assertGreater(row["decode_ms"], 0)
    with self.assertRaisesRegex(ValueError, "compile_workers=0"):
      latency.collect_dataset(os.path.join(root, "c.jsonl"), SPACE, trainer.sub_model,
                              compile_workers=0, **kwargs)


def _synthetic_dataset(n, seed=0):
  rng = np.random.default_rng(seed)
  archs = [SPACE.sample(rng) for _ in range(n)]
  x = np.stack([SPACE.features(a) for a in archs])
  costs = [latency.arch_cost(a, SPACE, vocab_size=40, batch=1, prefill_tokens=8,
                             decode_tokens=4) for a in archs]
  # Latency: per-layer overhead + per-FLOP time, with a mild nonlinearity in width.
  y = np.asarray([0.3 + 0.5 * c["num_layers"] + 2e-5 * c["decode_flops"] ** 0.9
                  for c in costs])
  return archs, x, y, costs


class PredictorTest(absltest.TestCase):

  def test_mlp_fits_synthetic_latencies(self):
    _, x, y, costs = _synthetic_dataset(160)
    train, test = predictor.split_indices(len(y), 0.25, seed=1)
    mlp = predictor.fit_mlp(x[train], y[train], hidden=(64, 64, 64), steps=1500, lr=3e-3)
    m = predictor.metrics(y[test], mlp.predict(x[test]))
    self.assertGreater(m["r2"], 0.95, m)
    self.assertLess(m["mape"], 5.0, m)
    cost_x = np.asarray([[c["decode_flops"], c["decode_bytes"], c["num_layers"]]
                         for c in costs])
    linear = predictor.fit_linear(cost_x[train], y[train])
    self.assertGreater(predictor.metrics(y[test], linear.predict(cost_x[test]))["r2"], 0.9)
    path = os.path.join(tempfile.mkdtemp(), "p.json")
    mlp.save(path)
    np.testing.assert_allclose(predictor.MLPPredictor.load(path).predict(x[:4]),
                               mlp.predict(x[:4]), rtol=1e-5)

  def test_metrics_and_bad_inputs(self):
    m = predictor.metrics([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    self.assertEqual((m["rmse"], m["mape"], m["r2"]), (0.0, 0.0, 1.0))
    self.assertAlmostEqual(predictor.metrics([1.0, 2.0], [1.1, 1.8])["mape"], 10.0)
    with self.assertRaisesRegex(ValueError, "steps=0"):
      predictor.fit_mlp(np.ones((4, 2)), np.ones(4), steps=0)
    with self.assertRaisesRegex(ValueError, "positive"):
      predictor.fit_mlp(np.ones((4, 2)), -np.ones(4))
    with self.assertRaisesRegex(ValueError, "weight_decay=-0.1"):
      predictor.fit_mlp(np.ones((4, 2)), np.ones(4), weight_decay=-0.1)


class EvolutionTest(absltest.TestCase):

  def test_finds_the_optimum_of_a_synthetic_objective(self):
    choices = (4,) * 10
    target = (3, 1, 0, 2, 3, 1, 0, 2, 3, 1)
    calls = []

    def fitness(genes):
      calls.append(genes)
      return float(sum((g - t) ** 2 for g, t in zip(genes, target)))

    result = evolution.evolve(choices, fitness, population=40, parents=8, mutations=16,
                              crossovers=16, generations=30, seed=0)
    self.assertEqual(result.best_genes, target)
    self.assertEqual(result.best_fitness, 0.0)
    best = [h["best_fitness"] for h in result.history]
    self.assertEqual(best, sorted(best, reverse=True))  # never worse
    self.assertLen(calls, len(set(calls)))  # memoised
    self.assertLess(len(calls), 4 ** 10 / 100)

  def test_constraint_and_resume(self):
    choices = (5, 5)
    fitness = lambda g: -float(g[0] + g[1])  # bigger is better, but bounded by the budget
    feasible = lambda g: g[0] + g[1] <= 5
    seen = {}
    result = evolution.evolve(choices, fitness, feasible, population=6, parents=2,
                              mutations=2, crossovers=2, generations=8, seed=1,
                              on_evaluate=seen.__setitem__)
    self.assertEqual(result.best_fitness, -5.0)
    self.assertTrue(all(feasible(g) for g in result.evaluated))
    again = evolution.evolve(choices, lambda g: self.fail("re-evaluated"), feasible,
                             population=6, parents=2, mutations=2, crossovers=2,
                             generations=8, seed=1, known=seen)
    self.assertEqual(again.best_genes, result.best_genes)
    with self.assertRaisesRegex(ValueError, "population=7"):
      evolution.evolve(choices, fitness, population=7, parents=2, mutations=2, crossovers=2)
    with self.assertRaisesRegex(ValueError, "feasible"):
      evolution.evolve(choices, fitness, lambda g: False, population=3, parents=1,
                       mutations=1, crossovers=1, max_tries=5)

  def test_pareto_front(self):
    points = [(1, 5, "a"), (2, 4, "b"), (2, 6, "c"), (3, 4, "d"), (4, 1, "e")]
    self.assertEqual([p[2] for p in evolution.pareto_front(points)], ["a", "b", "e"])


class KernelCandidateTest(absltest.TestCase):

  def test_predictor_picks_near_the_best_on_held_out_shapes(self):
    configs = [kc.KernelCandidate(bq, bk, st, ps) for bq in (32, 64, 128) for bk in (32, 64, 128)
               for st in (0, 3) for ps in (False, True)]
    shapes = [kc.AttentionShape(b, t, t, n, d) for b in (1, 4) for t in (512, 1024, 4096)
              for n in (8, 16) for d in (64, 128)]
    problems = [(s, dens) for s in shapes for dens in (0.25, 0.6, 1.0)]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(problems))
    held = {problems[i] for i in order[:len(problems) // 4]}
    samples = [kc.KernelSample(s, d, c, kc.synthetic_latency(s, d, c))
               for s, d in problems for c in configs]
    train = [r for r in samples if (r.shape, r.density) not in held]
    test = [r for r in samples if (r.shape, r.density) in held]
    pred = kc.fit_kernel_predictor(train, hidden=(64, 64), steps=2000, lr=3e-3)
    result = kc.evaluate_choices(pred, test)
    self.assertEqual(result["problems"], len(held))
    self.assertGreaterEqual(result["within_tolerance"], 0.8, result["mean_slowdown"])
    pick = kc.choose_candidate(pred, shapes[0], 0.5, configs)
    self.assertIn(pick, configs)
    self.assertEqual(pick.block_sizes().block_q, pick.block_q)

  def test_ranking_baseline(self):
    shape = kc.AttentionShape(1, 64, 64, 1, 16)
    a, b, c = kc.KernelCandidate(32, 32), kc.KernelCandidate(64, 64), kc.KernelCandidate(16, 16)
    # a is best on problem 0.5, b on 1.0; c did not run on 1.0 (counts as its slowest, 4 ms)
    ms = {(0.5, a): 1.0, (0.5, b): 1.1, (0.5, c): 1.05, (1.0, a): 3.0, (1.0, b): 2.0,
          (1.0, c): None}
    samples = [kc.KernelSample(shape, d, cfg, v) for (d, cfg), v in ms.items() if v]
    # sums of log(latency / the problem's best): b log 1.1 = 0.095, a log 1.5 = 0.405,
    # c log 1.05 + log 1.5 = 0.454 -> b, a, c
    self.assertEqual(kc.fit_ranking(samples), [b, a, c])
    picked = kc.evaluate_picks(kc.ranking_picker([b, a, c]), samples)
    self.assertEqual(picked["problems"], 2)
    self.assertAlmostEqual(picked["mean_slowdown"], (1.1 / 1.0 - 1) / 2)
    self.assertEqual(picked["within_tolerance"], 0.5)
    with self.assertRaisesRegex(ValueError, "in the ranking"):
      kc.ranking_picker([c])(shape, 1.0, [a, b])
    lopo = kc.leave_one_problem_out(samples, method="ranking")
    # held out 0.5: fitted on 1.0 alone -> b first (1.1 on 0.5); held out 1.0: a first (3.0)
    self.assertAlmostEqual(lopo["mean_slowdown"], (0.1 + 0.5) / 2)
    with self.assertRaisesRegex(ValueError, "method='knn'"):
      kc.leave_one_problem_out(samples, method="knn")

  def test_head_dim_ranking(self):
    wide, tall = kc.KernelCandidate(128, 64), kc.KernelCandidate(64, 128)
    samples = []
    # D 128: `wide` wins on three problems, D 64: `tall` on two; more D 128 problems, so the
    # overall ranking puts `wide` first.
    for head_dim, lengths, winner in ((128, (512, 1024, 2048), wide), (64, (512, 1024), tall)):
      for length in lengths:
        shape = kc.AttentionShape(2, length, length, 8, head_dim)
        for config in (wide, tall):
          samples.append(kc.KernelSample(shape, 0.5, config, 1.0 if config == winner else 1.3))
    pick = kc.head_dim_ranking_picker(samples)
    for head_dim, expected in ((128, wide), (64, tall), (256, wide)):  # 256: the overall one
      self.assertEqual(pick(kc.AttentionShape(1, 256, 256, 4, head_dim), 0.3, [tall, wide]),
                       expected)
    self.assertEqual(kc.evaluate_picks(pick, samples)["within_tolerance"], 1.0)
    self.assertEqual(kc.evaluate_picks(kc.ranking_picker(kc.fit_ranking(samples)), samples)
                     ["within_tolerance"], 0.6)
    lopo = kc.leave_one_problem_out(samples, method="head_dim_ranking")
    self.assertEqual(lopo["within_tolerance"], 1.0)  # each D keeps another problem

  def test_bad_values(self):
    with self.assertRaisesRegex(ValueError, "block_q=48"):
      kc.KernelCandidate(48, 64)
    with self.assertRaisesRegex(ValueError, "density=0"):
      kc.kernel_features(kc.AttentionShape(1, 8, 8, 1, 8), 0, kc.KernelCandidate(8, 8))
    with self.assertRaisesRegex(ValueError, "q_len=0"):
      kc.AttentionShape(1, 0, 8, 1, 8)

  def test_problem_is_shared_by_its_configurations(self):
    problem = kc.make_problem(kc.AttentionShape(1, 256, 192, 2, 16), 0.4, mask_block=64,
                              dtype="float32", seed=3)
    dense = np.asarray(problem.mask.to_dense()).reshape(256, 192)
    tiles = dense.reshape(4, 64, 3, 64)
    # whole 64 x 64 tiles, at least one a query row, not all on
    self.assertTrue(np.all(tiles == tiles[:, :1, :, :1]))
    self.assertTrue(tiles[:, 0, :, 0].any(axis=1).all())
    self.assertFalse(dense.all())
    q, k, v = problem.args
    self.assertGreater(float(np.abs(np.asarray(q)).mean()), 0.5)  # random, not zeros
    reference = dot_product_attention(q, k, v, mask=problem.mask, implementation="xla")
    for config in (kc.KernelCandidate(32, 32), kc.KernelCandidate(64, 32)):
      compiled = kc.compile_kernel(problem, config, interpret=True)
      self.assertIs(compiled.args, problem.args)
      self.assertEqual(compiled.calls, 1)
      np.testing.assert_allclose(np.asarray(compiled.fn(*compiled.args)), reference,
                                 atol=2e-5, rtol=2e-5)
      self.assertGreater(compiled.compile_s, compiled.lower_s)
    # 1 + 2 calls a run: the first's output returned, two more in a loop (their sum)
    looped = kc.compile_kernel(problem, kc.KernelCandidate(32, 64), interpret=True,
                               loop_calls=2)
    self.assertEqual(looped.calls, 3)
    out, checksum = looped.fn(*looped.args)
    np.testing.assert_allclose(np.asarray(out), reference, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(float(checksum), 2 * float(np.sum(reference)), rtol=1e-4)
    with self.assertRaisesRegex(ValueError, "loop_calls=-1"):
      kc.compile_kernel(problem, kc.KernelCandidate(32, 32), loop_calls=-1)
    with self.assertRaisesRegex(ValueError, "block_q=128 must divide .* mask_block=64"):
      kc.compile_kernel(problem, kc.KernelCandidate(128, 32), interpret=True)
    with self.assertRaisesRegex(ValueError, "mask_block=48"):
      kc.make_problem(problem.shape, 0.4, mask_block=48)
    with self.assertRaisesRegex(ValueError, "density=1.5"):
      kc.make_problem(problem.shape, 1.5)

  def test_measure_kernel_runs_in_interpret_mode(self):
    ms = kc.measure_kernel(kc.AttentionShape(1, 64, 64, 1, 16), 0.5, kc.KernelCandidate(32, 32),
                           dtype="float32", warmup=1, repeats=2, interpret=True)
    self.assertGreater(ms, 0)


if __name__ == "__main__":
  absltest.main()
