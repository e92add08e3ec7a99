"""Tests of the decode_bench experiment kind and its configs (CPU; Pallas in interpret mode)."""

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax.numpy as jnp
import numpy as np

from configs import ablate_batch_size
from configs import bench_decode_gpu
from configs import tune_decode_splits
from experiments import decode_bench
from experiments import launch
from experiments import report
from flashjax import workloads
import third_party
from third_party import torch_peers

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(**overrides):
  config = ablate_batch_size.get_config("cpu")
  # chunk_mb is below one batch row, so generation and the check run row by row.
  config.update(dict(batch=3, kv_len=64, num_heads=4, num_kv_heads=2, head_dim=16, warmup=0,
                     iters=2, loop_iters=2, chunk_mb=0.001))
  config.update(overrides)
  return config


class FakeTorchPeer(third_party.TorchPeer):
  """Stands in for the torch child: records the case and returns a canned result."""

  def __init__(self):
    super().__init__("torch_sdpa", "decode")
    self.calls = []

  def available(self):
    return third_party.Availability(True)

  def run(self, case, arrays, timeout_s=900, keep_alive=False):
    self.calls.append((case, arrays, keep_alive))
    return {"compile_s": 0.5, "median_ms": 0.02, "p10_ms": 0.019, "p90_ms": 0.021,
            "mean_ms": 0.02, "min_ms": 0.018, "samples": case["iters"],
            "timing": "cuda_events", "max_abs_err": 3e-3, "torch_version": "fake"}


class RunPointTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{implementation=}_{head_density=}_{ragged=}", implementation, head_density, ragged)
      for implementation, head_density, ragged in (
          ("xla", 1.0, False), ("xla", 0.5, True), ("pallas_triton", 1.0, True),
          ("pallas_triton", 0.25, False), ("pallas_mosaic_gpu", 0.5, False),
          ("peer:jax_nn_xla", 1.0, False), ("peer:pallas_decode", 1.0, True)))
  def test_point(self, implementation, head_density, ragged):
    nkv = 4
    config = _config(implementation=implementation, head_density=head_density, ragged=ragged,
                     num_kv_heads=nkv)
    metrics = decode_bench.run_point(config, {})
    if implementation.startswith("peer:"):
      self.assertNotIn("kernel", metrics)
    else:  # the name asked for stays the point's; the kernel that ran is reported
      self.assertEqual(metrics["kernel"], implementation.replace("pallas_mosaic_gpu",
                                                                 "pallas_triton"))
    if metrics.get("kernel") == "pallas_triton":
      # 64 positions are one tile of the heuristic's shortest (64): one split.
      self.assertEqual((metrics["launch_block_kv"], metrics["launch_splits"]), (64, 1))
    else:
      self.assertNotIn("launch_splits", metrics)
    self.assertTrue(metrics["within_tol"], metrics)
    self.assertLess(metrics["max_abs_err"], 1e-4)
    groups = max(1, round(head_density * nkv))
    self.assertEqual(metrics["groups"], groups)
    self.assertEqual(metrics["input_sets"], config.input_sets)
    # 2 (K and V) * 4 bytes * D per valid entry of each selected group.
    full = 2 * 4 * config.head_dim * config.kv_len * config.batch * nkv
    if ragged:
      self.assertBetween(metrics["dense_kv_bytes"], full / 2, full)
    else:
      self.assertEqual(metrics["dense_kv_bytes"], full)
    self.assertAlmostEqual(metrics["kv_bytes"] / metrics["dense_kv_bytes"], groups / nkv)
    self.assertAlmostEqual(metrics["dense_equiv_tbps"] / metrics["kv_tbps"], nkv / groups)
    self.assertEqual(metrics["step_timing"], "loop")
    self.assertEqual(metrics["us_per_step"], metrics["median_us_loop"])
    self.assertGreater(metrics["median_us_wall"], 0)
    self.assertEqual(metrics["loop_calls"], 2)
    self.assertAlmostEqual(metrics["kv_tbps"],
                           metrics["kv_bytes"] / metrics["us_per_step"] / 1e6)
    self.assertNotIn("pct_of_ceiling", metrics)  # no known ceiling on CPU

  @parameterized.named_parameters(
      (f"{peer=}", peer)
      for peer in ("jax_nn_xla", "jax_nn_cudnn", "pallas_decode", "torch_sdpa"))
  def test_peers_are_dense_only(self, peer):
    config = _config(implementation=f"peer:{peer}", head_density=0.5)
    with self.assertRaisesRegex(NotImplementedError, "computes every head"):
      decode_bench.run_point(config, {})

  def test_bad_values(self):
    with self.assertRaisesRegex(ValueError, "name='nope'"):
      decode_bench.run_point(_config(implementation="peer:nope"), {})
    with self.assertRaisesRegex(ValueError, "head_density=1.5"):
      decode_bench.run_point(_config(head_density=1.5), {})

  def test_point_over_memory_budget_is_unsupported(self):
    with self.assertRaisesRegex(NotImplementedError, r"needs .* GB on the device .* budget"):
      decode_bench.run_point(_config(memory_budget_gb=1e-6), {})

  def test_fit_sets_reads_the_config(self):
    config = _config(input_sets=8, min_rotation_mb=2.5)
    # Sets of 1 MB with 0.25 MB of temporaries each, 0.1 MB fixed: 2 fit 2.7 MB.
    self.assertEqual(decode_bench._fit_sets(config, 2**20, 2**18, 1e5, None, "device")[0], 3)
    self.assertEqual(
        decode_bench._fit_sets(config, 2**20, 2**18, 1e5, 2**20 * 2.7, "device")[0], 2)

  def test_torch_peer_case_and_metrics(self):
    fake = FakeTorchPeer()
    config = _config(implementation="peer:torch_sdpa", ragged=True, input_sets=2,
                     torch_memory_gb=1.0, dtype="bfloat16")
    with mock.patch.object(third_party, "decode_peers", return_value={"torch_sdpa": fake}):
      metrics = decode_bench.run_point(config, {})
      (case, arrays, keep_alive), = fake.calls
      self.assertTrue(keep_alive)
      self.assertIsNone(case["check_rows"])
      self.assertEqual(case["input_sets"], 2)
      self.assertEqual((case["batch"], case["kv_len"], case["num_kv_heads"]), (3, 64, 2))
      chex.assert_shape(arrays["lengths"], (3,))
      self.assertTrue(np.all((arrays["lengths"] >= 32) & (arrays["lengths"] <= 64)))
      self.assertEqual(metrics["kv_bytes"], 2 * 2 * 16 * 2 * float(arrays["lengths"].sum()))
      self.assertAlmostEqual(metrics["us_per_step"], 20.0)
      self.assertAlmostEqual(metrics["median_us_events"], 20.0)
      self.assertEqual(metrics["max_abs_err"], 3e-3)
      self.assertTrue(metrics["within_tol"])  # bfloat16 tolerance
      config.check_rows = 2
      decode_bench.run_point(config, {})
      self.assertEqual(fake.calls[-1][0]["check_rows"], [0, 2])
      config.torch_memory_gb = 1e-6
      with self.assertRaisesRegex(NotImplementedError, "torch child"):
        decode_bench.run_point(config, {})
    self.assertLen(fake.calls, 2)

  @parameterized.named_parameters(
      (f"{implementation=}_{head_density=}", implementation, head_density)
      for implementation, head_density in (("pallas_triton", 0.5), ("peer:jax_nn_xla", 1.0)))
  def test_one_program_timing(self, implementation, head_density):
    config = _config(implementation=implementation, head_density=head_density, batch=5,
                     num_kv_heads=4, wall_timing=False, check_rows=3, loop_iters=3)
    metrics = decode_bench.run_point(config, {})
    self.assertTrue(metrics["within_tol"], metrics)
    self.assertLess(metrics["max_abs_err"], 1e-4)
    self.assertNotIn("median_us_wall", metrics)
    self.assertNotIn("kv_tbps_wall", metrics)
    # 3 calls rounded up to whole loop iterations over the 2 input sets.
    self.assertEqual(metrics["loop_calls"], 4)
    self.assertEqual(metrics["input_sets"], 2)
    self.assertEqual(metrics["us_per_step"], metrics["median_us_loop"])
    self.assertBetween(metrics["median_us_loop"], metrics["p10_us_loop"],
                       metrics["p90_us_loop"])
    self.assertGreater(metrics["compile_s"], 0)
    self.assertGreater(metrics["kv_tbps"], 0)

  def test_one_program_output_is_checked(self):
    # A wrong step must show in max_abs_err on the one-program path too.
    config = _config(implementation="pallas_triton", wall_timing=False, loop_iters=2)
    right = decode_bench._flashjax_fn(config)
    wrong = lambda *args, **kwargs: right(*args, **kwargs) * 1.5
    with mock.patch.object(decode_bench, "_flashjax_fn", return_value=wrong):
      metrics = decode_bench.run_point(config, {})
    self.assertGreater(metrics["max_abs_err"], 1e-2)
    self.assertFalse(metrics["within_tol"])

  def test_block_sizes_reach_the_kernel(self):
    config = _config(implementation="pallas_triton", num_splits=4, block_kv=16)
    metrics = decode_bench.run_point(config, {})
    self.assertEqual((metrics["launch_block_kv"], metrics["launch_splits"]), (16, 4))
    self.assertTrue(metrics["within_tol"], metrics)
    with self.assertRaisesRegex(ValueError, "num_splits=5 exceeds"):
      decode_bench.run_point(_config(implementation="pallas_triton", num_splits=5,
                                     block_kv=16), {})
    with self.assertRaisesRegex(ValueError, "no flashjax block sizes"):
      decode_bench.run_point(_config(implementation="peer:jax_nn_xla", num_splits=2), {})

  def test_launch_parameters_reach_the_kernel(self):
    config = _config(implementation="pallas_triton", num_splits=2, block_kv=16, num_warps=4,
                     num_stages=2)
    with mock.patch.object(decode_bench.flashjax, "decode_attention",
                           wraps=decode_bench.flashjax.decode_attention) as spy:
      metrics = decode_bench.run_point(config, {})
    sizes = spy.call_args.kwargs["block_sizes"]
    self.assertEqual((sizes.block_kv, sizes.num_splits, sizes.num_warps, sizes.num_stages),
                     (16, 2, 4, 2))
    self.assertTrue(metrics["within_tol"], metrics)
    with self.assertRaisesRegex(ValueError, "no flashjax block sizes.*num_warps"):
      decode_bench.run_point(_config(implementation="peer:jax_nn_xla", num_warps=4), {})


class InputsTest(absltest.TestCase):

  def test_make_inputs_follow_the_config(self):
    config = _config(head_density=0.5, num_kv_heads=4, batch=8, ragged=True, dtype="bfloat16")
    sets = decode_bench.make_inputs(config, 2, 2)
    want = workloads.decode_inputs(batch=8, kv_len=64, num_heads=4, num_kv_heads=4,
                                   head_dim=16, dtype="bfloat16", groups=2, num_sets=2,
                                   seed=config.seed, ragged=True,
                                   chunk_bytes=config.chunk_mb * 2**20)
    chex.assert_trees_all_equal(sets, want)
    self.assertEqual(sets[0][1].dtype, jnp.bfloat16)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{arg=}", arg, points, per_impl)
      for arg, points, per_impl in (("core", 192, 32), ("all", 864, 144), ("grid", 720, 144)))
  def test_gpu_grid(self, arg, points, per_impl):
    config = bench_decode_gpu.get_config(arg)
    expanded = launch.expand_sweep(config.sweep)
    self.assertLen(expanded, points)
    self.assertLen([p for p in expanded if p["implementation"] == "pallas_triton"], per_impl)
    self.assertEqual(expanded[0]["implementation"], "peer:torch_sdpa")  # torch runs first
    self.assertTrue(config.torch_keep_alive)
    fast = arg == "grid"
    self.assertEqual(config.wall_timing, not fast)
    self.assertEqual(config.check_rows, 8 if fast else None)
    self.assertEqual("xla" in config.implementations, not fast)
    dense_peers = [p for p in expanded
                   if p["implementation"].startswith("peer:") and p["head_density"] == 1]
    self.assertLen(dense_peers, per_impl)  # 4 peers x a quarter of the densities
    for point in expanded[:: len(expanded) // 7]:
      point_config = launch.apply_point(config, point)
      self.assertEqual((point_config.num_heads, point_config.head_dim), (32, 128))
    with self.assertRaisesRegex(ValueError, "arg='nope' must be one of"):
      bench_decode_gpu.get_config("nope")

  def test_tune_splits_config(self):
    config = tune_decode_splits.get_config("gpu")
    expanded = launch.expand_sweep(config.sweep)
    self.assertLen(expanded, 96)
    self.assertEqual(config.wall_timing, False)
    variants = {(p["implementation"], p["num_splits"], p["xla_merge"]) for p in expanded}
    self.assertEqual(variants, {("pallas_triton", n, False) for n in (None, 4, 8, 16, 32, 64)}
                     | {("pallas_triton", None, True), ("peer:jax_nn_cudnn", None, False)})
    shapes = {(p["batch"], p["kv_len"], p["num_kv_heads"]) for p in expanded}
    self.assertLen(shapes, 12)
    point_config = launch.apply_point(config, expanded[3])
    self.assertEqual((point_config.num_splits, point_config.head_density), (16, 1.0))
    self.assertEqual(len(launch.expand_sweep(tune_decode_splits.get_config("cpu").sweep)), 20)
    with self.assertRaisesRegex(ValueError, "arg='tpu'"):
      tune_decode_splits.get_config("tpu")

  def test_tune_tiles_config(self):
    config = tune_decode_splits.get_config("gpu_tiles")
    expanded = launch.expand_sweep(config.sweep)
    self.assertLen(expanded, 28)
    self.assertEqual({(p["batch"], p["kv_len"], p["num_kv_heads"]) for p in expanded},
                     {(128, 4096, 8), (128, 4096, 32)})
    tiles = {(p["block_kv"], p["num_warps"], p["num_stages"]) for p in expanded
             if p["head_density"] == 1.0}
    self.assertLen(tiles, 11)
    self.assertIn((256, 8, 1), tiles)
    self.assertEqual({p["num_splits"] for p in expanded if p["head_density"] == 0.5},
                     {1, 2, 4})
    point_config = launch.apply_point(config, expanded[-1])
    self.assertEqual((point_config.implementation, point_config.num_splits,
                      point_config.num_warps, point_config.head_density, point_config.dtype),
                     ("pallas_triton", 4, None, 0.5, "bfloat16"))

  def test_ablation_configs(self):
    gpu = ablate_batch_size.get_config("full")
    self.assertLen(launch.expand_sweep(gpu.sweep), 3 * 9 * 2 * 4)
    self.assertNotIn("peer:jax_nn_cudnn", gpu.implementations)
    cpu = ablate_batch_size.get_config("cpu")
    self.assertEqual(cpu.dtype, "float32")
    self.assertLen(launch.expand_sweep(cpu.sweep), 3 * 3 * 2 * 2)


class TorchChildTest(absltest.TestCase):
  """The kept-alive torch child of third_party.torch_peers (torch itself is not needed)."""

  # Without torch the child reports the import error; with it, the unknown dtype.
  CASE = dict(batch=1, num_heads=2, num_kv_heads=1, head_dim=16, dtype="nope", kv_len=8,
              warmup=0, iters=1, seed=0, scale=None, input_sets=1)

  def setUp(self):
    super().setUp()
    torch_peers.close_child()
    self.addCleanup(torch_peers.close_child)

  def test_one_process_for_many_cases_and_a_new_one_after_a_crash(self):
    peer = torch_peers.TorchPeer("torch_sdpa", "decode")
    pids = []
    for _ in range(2):
      with self.assertRaisesRegex(RuntimeError, "torch_sdpa: .*Error"):
        peer.run(self.CASE, {"lengths": np.array([8])}, timeout_s=120, keep_alive=True)
      pids.append(torch_peers._CHILD.proc.pid)
    self.assertEqual(pids[0], pids[1])
    child = torch_peers._CHILD
    child.proc.kill()
    child.proc.wait()
    with self.assertRaisesRegex(RuntimeError, "torch_sdpa child process stopped"):
      child.measure("case.json", "out.json", 60, "torch_sdpa")
    with self.assertRaisesRegex(RuntimeError, "torch_sdpa: .*Error"):
      peer.run(self.CASE, {"lengths": np.array([8])}, timeout_s=120, keep_alive=True)
    self.assertNotEqual(torch_peers._CHILD.proc.pid, pids[0])
    torch_peers.close_child()
    self.assertIsNone(torch_peers._CHILD)

  def test_serve_answers_every_request(self):
    tmp = tempfile.mkdtemp(prefix="fj_torch_serve_")
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    case_path = os.path.join(tmp, "case.json")
    with open(case_path, "w") as f:
      json.dump(dict(self.CASE, op="decode", peer="torch_sdpa"), f)
    outs = [os.path.join(tmp, f"out{i}.json") for i in range(2)]
    requests = io.StringIO("".join(json.dumps([case_path, out]) + "\n" for out in outs))
    replies = io.StringIO()
    torch_peers.serve(requests, replies)
    self.assertEqual(replies.getvalue(), "done\ndone\n")
    for out in outs:
      with open(out) as f:
        self.assertIn("Error", json.load(f)["error"])


class LaunchTest(absltest.TestCase):

  def test_cpu_tune_splits_through_the_launcher(self):
    workdir = tempfile.mkdtemp(prefix="fj_tune_splits_test_")
    self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=_REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.launch",
         "--config=configs/tune_decode_splits.py:cpu", f"--workdir={workdir}",
         "--config.batches=(1,)", "--config.kv_lens=(200,)"],
        capture_output=True, text=True, cwd=_REPO, env=env, timeout=300, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    rows = report.read_rows(workdir)
    self.assertLen(rows, 5)
    launches = {}
    for row in rows:
      self.assertEqual(row["status"], "ok", row)
      self.assertTrue(row["metrics"]["within_tol"], row)
      point, metrics = row["point"], row["metrics"]
      if point["implementation"] == "pallas_triton":
        launches[point["num_splits"], point["xla_merge"]] = (
            metrics["launch_block_kv"], metrics["launch_splits"])
    # 200 positions, B x K = 2: the heuristic shortens the tile to 64 (4 tiles, 4 splits);
    # 2 splits keep 128-position tiles.
    self.assertEqual(launches, {(None, False): (64, 4), (2, False): (128, 2),
                                (4, False): (64, 4), (None, True): (64, 4)})


  def test_cpu_ablation_through_the_launcher(self):
    workdir = tempfile.mkdtemp(prefix="fj_decode_bench_test_")
    self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=_REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.launch",
         "--config=configs/ablate_batch_size.py:cpu", f"--workdir={workdir}",
         "--config.batches=(2,)", "--config.kv_heads=(2,)", "--config.kv_lens=(64,)",
         "--config.implementations=('xla', 'pallas_triton', 'peer:jax_nn_xla')"],
        capture_output=True, text=True, cwd=_REPO, env=env, timeout=300, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    rows = report.read_rows(workdir)
    statuses = {(r["point"]["implementation"], r["point"]["head_density"]): r["status"]
                for r in rows}
    self.assertEqual(statuses, {
        ("xla", 1.0): "ok", ("xla", 0.5): "ok", ("pallas_triton", 1.0): "ok",
        ("pallas_triton", 0.5): "ok", ("peer:jax_nn_xla", 1.0): "ok",
        ("peer:jax_nn_xla", 0.5): "unsupported"})
    for row in rows:
      if row["status"] == "ok":
        self.assertTrue(row["metrics"]["within_tol"], row)
        self.assertGreater(row["metrics"]["kv_tbps"], 0)
    with open(os.path.join(workdir, launch.CONFIG_FILE)) as f:
      self.assertEqual(json.load(f)["batches"], [2])
    with open(os.path.join(workdir, report.REPORT_FILE)) as f:
      text = f.read()
    self.assertIn("5 ok, 1 unsupported", text)
    self.assertIn("| kv_tbps |", text)
    for name in ("us_per_step", "kv_tbps", "dense_equiv_tbps"):
      self.assertGreater(os.path.getsize(os.path.join(workdir, f"{name}_vs_batch.png")), 1000)


if __name__ == "__main__":
  absltest.main()
