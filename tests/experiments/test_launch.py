"""Tests of the study launcher (experiments.launch) and report (experiments.report).

The launcher is driven with a tiny experiment module written into a temporary directory:
it records every call in a log file, fails on one point and is "unsupported" on another.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
from absl.testing import parameterized
import ml_collections

from configs import quickstart
from experiments import attention_bench
from experiments import launch
from experiments import report

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_EXPERIMENT = textwrap.dedent("""\
    import json

    def run_point(config, point):
      with open(config.call_log, "a") as f:
        f.write(json.dumps(point, sort_keys=True) + "\\n")
      if config.x == config.fail_x and config.mode == "b":
        raise RuntimeError("boom at x=%d" % config.x)
      if config.x == config.fail_x and config.mode == "c":
        raise NotImplementedError("mode c cannot do x=%d" % config.x)
      return {"y": config.x * config.nested.scale + len(config.mode), "mode_len": 1}

    def check_point(config):
      if config.mode not in ("a", "b", "c", "d"):
        raise ValueError("config.mode=%r is not a mode" % config.mode)
    """)

_CONFIG = textwrap.dedent("""\
    import ml_collections

    def get_config(arg=None):
      c = ml_collections.ConfigDict()
      c.experiment = "{module}"
      c.call_log = "{call_log}"
      c.x = 0
      c.mode = "a"
      c.fail_x = 2
      c.nested = ml_collections.ConfigDict({{"scale": 1.5}})
      c.modes = ("a", "b")
      c.sweep = [{{"mode": c.get_ref("modes")}},
                 {{"x": [1, 2, 3], "nested.scale": [1.0, 2.0, 3.0]}}]
      c.report = ml_collections.ConfigDict({{"plots": [{{"x": "x", "y": "y"}}]}})
      return c
    """)


class SweepTest(parameterized.TestCase):

  def test_product_and_zip(self):
    sweep = [{"a": [1, 2]}, {"b": ["x", "y", "z"], "c": [0.1, 0.2, 0.3]}]
    points = launch.expand_sweep(sweep)
    self.assertLen(points, 6)
    self.assertEqual(points[0], {"a": 1, "b": "x", "c": 0.1})
    self.assertEqual(points[1], {"a": 1, "b": "y", "c": 0.2})
    self.assertEqual(points[3], {"a": 2, "b": "x", "c": 0.1})
    self.assertEqual(launch.expand_sweep(None), [{}])
    self.assertEqual(launch.expand_sweep([]), [{}])

  @parameterized.named_parameters(
      ("unequal_zip", [{"a": [1, 2], "b": [1]}], "equal lengths"),
      ("repeated_field", [{"a": [1]}, {"a": [2]}], "repeated"),
      ("empty_axis", [{}], "non-empty"),
  )
  def test_bad_sweeps_raise(self, sweep, message):
    with self.assertRaisesRegex(ValueError, message):
      launch.expand_sweep(sweep)

  def test_field_reference_follows_override(self):
    c = ml_collections.ConfigDict({"sizes": (1, 2)})
    c.sweep = [{"size": c.get_ref("sizes")}]
    c.sizes = (4, 5, 6)
    self.assertEqual(launch.expand_sweep(c.sweep), [{"size": 4}, {"size": 5}, {"size": 6}])

  def test_point_key_and_apply_point(self):
    self.assertEqual(launch.point_key({"b": (1, 2), "a": "x"}),
                     launch.point_key({"a": "x", "b": [1, 2]}))
    c = ml_collections.ConfigDict({"a": 1, "inner": {"b": 2.0}})
    c.lock()
    d = launch.apply_point(c, {"a": 5, "inner.b": 3.0})
    self.assertEqual((d.a, d.inner.b), (5, 3.0))
    self.assertEqual((c.a, c.inner.b), (1, 2.0))  # the original is untouched
    for bad in ("missing", "inner.missing", "nope.b"):
      with self.assertRaisesRegex(ValueError, f"sweep field '{bad}'"):
        launch.apply_point(c, {bad: 1})


class LaunchTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp(prefix="fj_launch_test_")
    self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
    self.module = f"fj_fake_experiment_{self._testMethodName}"
    with open(os.path.join(self.dir, f"{self.module}.py"), "w") as f:
      f.write(_EXPERIMENT)
    self.call_log = os.path.join(self.dir, "calls.jsonl")
    self.config_path = os.path.join(self.dir, "config.py")
    with open(self.config_path, "w") as f:
      f.write(_CONFIG.format(module=self.module, call_log=self.call_log))
    sys.path.insert(0, self.dir)
    self.addCleanup(sys.path.remove, self.dir)
    self.workdir = os.path.join(self.dir, "work")

  def config(self):
    spec = importlib.util.spec_from_file_location(f"{self.module}_config", self.config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()

  def calls(self):
    if not os.path.exists(self.call_log):
      return []
    with open(self.call_log) as f:
      return [json.loads(line) for line in f]

  def results(self):
    with open(os.path.join(self.workdir, launch.RESULTS_FILE)) as f:
      return [json.loads(line) for line in f]

  def test_end_to_end(self):
    rows = launch.run(self.config(), self.workdir, progress=False)
    self.assertLen(rows, 6)
    self.assertLen(self.calls(), 6)
    by_point = {(r["point"]["mode"], r["point"]["x"]): r for r in rows}
    self.assertEqual(by_point[("b", 2)]["status"], "error")
    self.assertIn("RuntimeError: boom at x=2", by_point[("b", 2)]["error"])
    self.assertIn("Traceback", by_point[("b", 2)]["traceback"])
    ok = by_point[("a", 3)]
    self.assertEqual(ok["status"], "ok")
    self.assertEqual(ok["metrics"]["y"], 3 * 3.0 + 1)  # nested.scale zipped with x
    for row in rows:
      for name in ("device_kind", "jax_version", "git_commit"):
        self.assertIn(name, row["env"])
    with open(os.path.join(self.workdir, launch.CONFIG_FILE)) as f:
      saved = json.load(f)
    self.assertEqual(saved["sweep"][0], {"mode": ["a", "b"]})
    with open(os.path.join(self.workdir, report.REPORT_FILE)) as f:
      text = f.read()
    self.assertIn("| mode | x | nested.scale | status | y | mode_len | error |", text)
    self.assertIn("5 ok, 1 error", text)
    self.assertIn("boom at x=2", text)
    self.assertTrue(os.path.getsize(os.path.join(self.workdir, "y_vs_x.png")) > 1000)

  def test_unsupported_is_recorded_and_not_retried(self):
    config = self.config()
    config.modes = ("a", "c")
    rows = launch.run(config, self.workdir, progress=False)
    statuses = {(r["point"]["mode"], r["point"]["x"]): r["status"] for r in rows}
    self.assertEqual(statuses[("c", 2)], "unsupported")
    self.assertEqual(sum(s == "ok" for s in statuses.values()), 5)
    launch.run(config, self.workdir, progress=False)
    self.assertLen(self.calls(), 6)

  def test_resume_after_torn_write(self):
    config = self.config()
    launch.run(config, self.workdir, progress=False)
    path = os.path.join(self.workdir, launch.RESULTS_FILE)
    with open(path, "rb") as f:
      lines = f.read().splitlines(keepends=True)
    # A crash: the last two points never finished, the third-last was half written.
    lost = [json.loads(line)["key"] for line in lines[-3:]]
    with open(path, "wb") as f:
      f.write(b"".join(lines[:-3]) + lines[-3][: len(lines[-3]) // 2])
    self.assertLen(report.read_rows(self.workdir), 3)  # the torn line is skipped
    os.remove(self.call_log)

    rows = launch.run(config, self.workdir, progress=False)
    rerun = [launch.point_key(p) for p in self.calls()]
    self.assertCountEqual(rerun, lost)  # only the lost points ran again
    keys = [r["key"] for r in self.results()]
    self.assertLen(keys, 6)
    self.assertLen(set(keys), 6)  # no point lost or repeated
    self.assertLen(rows, 6)

  @parameterized.named_parameters((f"{retry_failed=}", retry_failed)
                                  for retry_failed in (True, False))
  def test_failed_point_retry(self, retry_failed):
    config = self.config()
    launch.run(config, self.workdir, progress=False)
    os.remove(self.call_log)
    launch.run(config, self.workdir, progress=False, retry_failed=retry_failed)
    want = [{"mode": "b", "nested.scale": 2.0, "x": 2}] if retry_failed else []
    self.assertEqual(self.calls(), want)

  def test_sweep_may_grow_but_config_may_not_change(self):
    config = self.config()
    launch.run(config, self.workdir, progress=False)
    os.remove(self.call_log)
    config.modes = ("a", "b", "d")
    rows = launch.run(config, self.workdir, progress=False, retry_failed=False)
    self.assertLen(rows, 9)
    self.assertEqual({p["mode"] for p in self.calls()}, {"d"})
    config.fail_x = 3
    with self.assertRaisesRegex(ValueError, r"different config \(fields \['fail_x'\]\)"):
      launch.run(config, self.workdir, progress=False)

  def test_check_point_refuses_a_bad_point_before_any_point_runs(self):
    config = self.config()
    config.modes = ("a", "zz")
    with self.assertRaisesRegex(ValueError, r'point \{"mode": "zz", "nested.scale": 1.0, '
                                r'"x": 1\}: config.mode=\'zz\' is not a mode'):
      launch.run(config, self.workdir, progress=False)
    self.assertEqual(self.calls(), [])
    self.assertFalse(os.path.exists(os.path.join(self.workdir, launch.RESULTS_FILE)))

  def test_resume_with_a_none_field(self):
    # A config holding a None field (e.g. partially_fused's prediction_device on a GPU)
    # resumed in a workdir with results: the config check must not trip over the None.
    config = self.config()
    with config.unlocked():
      config.unused = None
    launch.run(config, self.workdir, progress=False)
    os.remove(self.call_log)
    config.modes = ("a", "b", "d")
    launch.run(config, self.workdir, progress=False, retry_failed=False)
    self.assertEqual({p["mode"] for p in self.calls()}, {"d"})

  def test_command_line(self):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([self.dir, _REPO]), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.launch", f"--config={self.config_path}",
         f"--workdir={self.workdir}", "--config.modes=('a',)", "--config.fail_x=-1"],
        capture_output=True, text=True, cwd=_REPO, env=env, timeout=120, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("| a | 3 | 3 | ok |", proc.stdout)
    self.assertEqual([r["status"] for r in self.results()], ["ok"] * 3)
    os.remove(os.path.join(self.workdir, report.REPORT_FILE))
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.report", f"--workdir={self.workdir}"],
        capture_output=True, text=True, cwd=_REPO, env=env, timeout=120, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertTrue(os.path.exists(os.path.join(self.workdir, report.REPORT_FILE)))
    # A sweep with a failed point exits 1 after writing its report; a bad value exits 1
    # before any point runs, both with one line naming the problem.
    for mode, message in (("b", "1 of 3 points failed"), ("zz", "config.mode='zz' is not")):
      proc = subprocess.run(
          [sys.executable, "-m", "experiments.launch", f"--config={self.config_path}",
           f"--workdir={os.path.join(self.dir, 'work_' + mode)}", f"--config.modes=('{mode}',)"],
          capture_output=True, text=True, cwd=_REPO, env=env, timeout=120, check=False)
      self.assertEqual(proc.returncode, 1, proc.stderr[-3000:])
      self.assertIn(message, proc.stderr.strip().splitlines()[-1])
    proc = subprocess.run(  # a misspelt override: one line, not a traceback
        [sys.executable, "-m", "experiments.launch", f"--config={self.config_path}",
         f"--workdir={self.workdir}", "--config.modez=('a',)"],
        capture_output=True, text=True, cwd=_REPO, env=env, timeout=120, check=False)
    self.assertEqual(proc.returncode, 1, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    self.assertLen(lines, 1, proc.stderr[-3000:])
    self.assertStartsWith(lines[0], "FATAL Flags parsing error: a --config override names no "
                          "field of the config: 'modez'")


class AttentionBenchTest(parameterized.TestCase):
  """The quickstart's experiment kind on tiny shapes (CPU; Pallas in interpret mode)."""

  def config(self, **overrides):
    config = quickstart.get_config("cpu")
    config.update(dict(q_len=128, kv_len=128, batch=2, num_heads=2, num_kv_heads=1,
                       head_dim=32, block_q=64, block_kv=64, window=16, doc_len=24,
                       warmup=0, iters=2))
    config.update(overrides)
    return config

  @parameterized.named_parameters(
      (f"{implementation=}_{mask=}_{mode=}", implementation, mask, mode)
      for implementation, mask, mode in (
          ("xla", "causal", "fwd"), ("xla", "document", "fwd_bwd"), ("xla", "tree", "fwd"),
          ("xla", "prefix_lm", "fwd"), ("xla", "global", "fwd"), ("xla", "dilated", "fwd"),
          ("pallas_triton", "sliding_window", "fwd"), ("peer:jax_nn_xla", "document", "fwd"),
          ("xla", "random_banded", "fwd")))
  def test_point(self, implementation, mask, mode):
    config = self.config(implementation=implementation, mask=mask, mode=mode)
    metrics = attention_bench.run_point(config, {})
    self.assertTrue(metrics["within_tol"], metrics)
    self.assertLess(metrics["max_abs_err"], 1e-4)
    self.assertEqual(metrics["samples"], 2)
    self.assertGreater(metrics["useful_tflops"], 0)
    self.assertBetween(metrics["density"], 1e-3, 1.0)
    self.assertGreaterEqual(metrics["block_density"], metrics["density"])
    if mode == "fwd_bwd":
      self.assertContainsSubset({"max_abs_err_dq", "max_abs_err_dk", "max_abs_err_dv"},
                                metrics)

  def test_unsupported_peer_and_unknown_mask(self):
    config = self.config(implementation="peer:pallas_triton_mha", mask="sliding_window")
    with self.assertRaises(NotImplementedError):
      attention_bench.run_point(config, {})
    with self.assertRaisesRegex(ValueError, "config.mask='nope' is not a mask family"):
      attention_bench.run_point(self.config(mask="nope"), {})

  @parameterized.named_parameters(
      ("batch", dict(batch=-1), r"config.batch=-1 must be an int >= 1"),
      ("heads", dict(num_heads=3, num_kv_heads=2), r"num_heads=3 must be a multiple"),
      ("dtype", dict(dtype="int8"), r"config.dtype='int8' must be one of"),
      ("implementation", dict(implementation="nope"), r"implementation='nope' is not one"),
      ("peer", dict(implementation="peer:nope"), r"implementation='peer:nope' is not one"))
  def test_check_point_names_the_bad_field(self, fields, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      attention_bench.check_point(self.config(**fields))

  @parameterized.named_parameters((f"{arg=}", arg) for arg in ("cpu", "gpu"))
  def test_quickstart_points_are_valid(self, arg):
    config = quickstart.get_config(arg)
    points = launch.expand_sweep(config.sweep)
    self.assertLen(points, len(config.implementations) * len(config.masks))
    self.assertIn("xla", config.implementations)
    for point in points:
      launch.apply_point(config, point)


class CiTest(absltest.TestCase):

  def test_readme_test_command_is_what_ci_runs(self):
    with open(os.path.join(_REPO, "README.md")) as f:
      readme = f.read()
    with open(os.path.join(_REPO, ".ci", "run")) as f:
      ci = f.read()
    commands = re.findall(r'^pip install -e "\.\[test\]" && (python -m pytest[^\n]*)$', readme,
                          re.MULTILINE)
    self.assertLen(commands, 1)
    self.assertIn(f"\n{commands[0]} || status=$?\n", ci)
    self.assertIn('python -m pip install -e ".[test]"', ci)
    self.assertIn('"$status" -eq 5', ci)


if __name__ == "__main__":
  absltest.main()
