"""experiments/attention_bench.py's harness: memory-sized reference checks, the timing method,
the kernel and tiles that ran (CPU, Pallas in interpret mode, small shapes)."""

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from configs import quickstart
from experiments import attention_bench
from experiments import report
from flashjax.ops.attention import pallas_triton
import third_party
from third_party import torch_peers

_BIG_GB = 100.0  # a budget every small case fits whole


def _config(**overrides):
  config = quickstart.get_config("cpu")
  # T = S = 96 is not a power of two: the last query chunk of a 64-row plan is partial.
  config.update(dict(implementation="xla", mask="document", mode="fwd", batch=4, q_len=96,
                     kv_len=96, num_heads=2, num_kv_heads=1, head_dim=16, doc_len=24,
                     block_q=None, block_kv=None, warmup=0, iters=2, dtype="float32"))
  config.check_budget_gb = None
  config.check_rows = None
  config.update(overrides)
  return config


def _perturbed(config, mask, where):
  """The xla backend's fn with +0.5 added to output `where` = (name, index)."""
  attend = attention_bench._flashjax_fn(config, mask)  # pylint: disable=protected-access
  fn = attend if config.mode == "fwd" else attention_bench.with_grads(attend)
  name, index = where

  def wrong(*inputs):
    out = fn(*inputs)
    if config.mode == "fwd":
      return out.at[index].add(0.5)
    grads = dict(zip(("dq", "dk", "dv"), out))
    grads[name] = grads[name].at[index].add(0.5)
    return grads["dq"], grads["dk"], grads["dv"]

  return wrong


def _below_four_rows(config) -> float:
  """A budget just below four batch rows at the smallest query chunk."""
  return attention_bench.reference_bytes(config, 4, attention_bench.MIN_CHECK_CHUNK) - 1


class CheckPlanTest(parameterized.TestCase):

  def test_subset_shrinks_with_the_budget(self):
    config = _config(mode="fwd_bwd")
    whole = attention_bench.plan_check(config, _BIG_GB * 1e9)
    self.assertEqual((whole.rows, whole.q_chunk), ((0, 1, 2, 3), 96))
    # Just below the whole check: the query chunk halves first, every row is still checked.
    chunked = attention_bench.plan_check(
        config, attention_bench.reference_bytes(config, 4, 96) - 1)
    self.assertEqual((chunked.rows, chunked.q_chunk), ((0, 1, 2, 3), 64))
    # Below four rows at the smallest chunk: fewer rows, spread over the batch.
    small_budget = _below_four_rows(config)
    small = attention_bench.plan_check(config, small_budget)
    self.assertEqual(small.rows, (0, 3))
    self.assertLessEqual(small.call_bytes, small_budget)
    if small.q_chunk < 96:  # the largest chunk that fits the two rows
      bigger = 2 * small.q_chunk if 2 * small.q_chunk < 96 else 96
      self.assertGreater(attention_bench.reference_bytes(config, 2, bigger), small_budget)
    tiny = attention_bench.reference_bytes(config, 1, attention_bench.MIN_CHECK_CHUNK)
    one = attention_bench.plan_check(config, tiny)
    self.assertEqual((one.rows, one.q_chunk), ((0,), attention_bench.MIN_CHECK_CHUNK))
    self.assertLessEqual(one.call_bytes, tiny)
    with self.assertRaisesRegex(attention_bench.CheckSkipped, "GB > check budget"):
      attention_bench.plan_check(config, tiny - 1)
    with self.assertRaisesRegex(ValueError, "budget=0"):
      attention_bench.plan_check(config, 0)

  def test_estimate_grows_with_every_dimension(self):
    config = _config(mode="fwd")
    base = attention_bench.reference_bytes(config, 2, 32)
    self.assertGreater(attention_bench.reference_bytes(config, 3, 32), base)
    self.assertGreater(attention_bench.reference_bytes(config, 2, 64), base)
    self.assertGreater(attention_bench.reference_bytes(_config(mode="fwd_bwd"), 2, 32), base)
    # The score matrix dominates a long sequence: the whole B4 T4k N32 fwd_bwd check (which
    # ran out of memory on an H100 80GB) needs more than half of that card.
    big = _config(mode="fwd_bwd", batch=4, q_len=4096, kv_len=4096, num_heads=32,
                  num_kv_heads=32, head_dim=128)
    self.assertGreater(attention_bench.reference_bytes(big, 4, 4096), 40e9)

  def test_check_rows_and_budget_fields(self):
    config = _config(check_rows=2)
    self.assertEqual(attention_bench.plan_check(config, _BIG_GB * 1e9).rows, (0, 3))
    self.assertEqual(attention_bench.check_budget(_config(check_budget_gb=1.5)), 1.5e9)
    with self.assertRaisesRegex(ValueError, "check_budget_gb=-1"):
      attention_bench.check_budget(_config(check_budget_gb=-1.0))
    with self.assertRaisesRegex(ValueError, "check_rows=0"):
      attention_bench.plan_check(_config(check_rows=0), _BIG_GB * 1e9)


class CheckErrorsTest(parameterized.TestCase):

  def run_check(self, config, where, budget_gb):
    mask = attention_bench.build_mask(config, np.random.default_rng(config.seed))
    sets = attention_bench.input_sets(config)
    config.check_budget_gb = budget_gb
    return attention_bench.check_errors(config, _perturbed(config, mask, where), sets, mask)

  @parameterized.named_parameters(
      ("fwd_last_query_row", "fwd", ("out", (3, 95, 1, 7))),
      ("dq_last_query_row", "fwd_bwd", ("dq", (3, 95, 0, 3))),
      ("dk_first_key", "fwd_bwd", ("dk", (3, 0, 0, 5))),
      ("dv_last_key", "fwd_bwd", ("dv", (3, 95, 0, 0))))
  def test_chunked_and_subset_checks_match_the_full_one(self, mode, where):
    config = _config(mode=mode)
    name = f"max_abs_err_{where[0]}"
    full = self.run_check(config, where, _BIG_GB)
    self.assertEqual((full["check"], full["check_q_chunk"]), ("all rows", 96))
    self.assertAlmostEqual(full[name], 0.5, delta=1e-2)
    self.assertFalse(full["within_tol"])
    chunk_gb = attention_bench.reference_bytes(config, 4, 32) / 1e9
    chunked = self.run_check(config, where, chunk_gb)
    self.assertEqual((chunked["check"], chunked["check_q_chunk"]), ("all rows", 32))
    subset_gb = _below_four_rows(config) / 1e9
    subset = self.run_check(config, where, subset_gb)
    self.assertEqual((subset["check"], subset["check_batch_rows"]), ("subset", [0, 3]))
    for other in (chunked, subset):
      for key in full:
        if key.startswith("max_abs_err"):
          self.assertAlmostEqual(other[key], full[key], delta=1e-5, msg=key)
      self.assertFalse(other["within_tol"])

  def test_unperturbed_point_passes_and_records_the_plan(self):
    config = _config(mode="fwd_bwd", implementation="pallas_triton", block_q=32, block_kv=16,
                     check_budget_gb=_below_four_rows(_config(mode="fwd_bwd")) / 1e9)
    metrics = attention_bench.run_point(config, {})
    self.assertTrue(metrics["within_tol"], metrics)
    self.assertLess(metrics["max_abs_err"], 1e-4)
    self.assertEqual(metrics["check"], "subset")
    self.assertEqual(metrics["check_batch_rows"], [0, 3])
    self.assertIn(metrics["check_q_chunk"], (16, 32, 64, 96))
    self.assertLessEqual(metrics["check_call_gb"], metrics["check_budget_gb"])

  def test_too_small_budget_says_skipped(self):
    config = _config(mode="fwd_bwd", check_budget_gb=1e-9)
    metrics = attention_bench.run_point(config, {})
    self.assertRegex(metrics["check"], r"^skipped: the smallest float32 reference call")
    self.assertIsNone(metrics["within_tol"])
    self.assertIsNone(metrics["max_abs_err"])
    self.assertEqual(report.check_flag(metrics), report.NOT_CHECKED)

  def test_out_of_memory_retries_smaller_then_skips(self):
    config = _config(mode="fwd", check_budget_gb=_BIG_GB)
    mask = attention_bench.build_mask(config, np.random.default_rng(0))
    sets = attention_bench.input_sets(config)
    fn = attention_bench._flashjax_fn(config, mask)  # pylint: disable=protected-access
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    plans = []
    real = attention_bench._checked_errors  # pylint: disable=protected-access

    def first_fails(config, got, inputs, mask, plan):
      plans.append(plan)
      if len(plans) == 1:
        raise oom
      return real(config, got, inputs, mask, plan)

    with mock.patch.object(attention_bench, "_checked_errors", first_fails):
      metrics = attention_bench.check_errors(config, fn, sets, mask)
    self.assertLen(plans, 2)
    self.assertLess(plans[1].call_bytes, plans[0].call_bytes)
    self.assertLessEqual(plans[1].call_bytes, plans[0].call_bytes / 2)
    self.assertTrue(metrics["within_tol"])
    with mock.patch.object(attention_bench, "_checked_errors", side_effect=oom):
      metrics = attention_bench.check_errors(config, fn, sets, mask)
    self.assertRegex(metrics["check"], r"^skipped: .*ran out of memory")
    with mock.patch.object(attention_bench, "_checked_errors",
                           side_effect=RuntimeError("a real bug")):
      with self.assertRaisesRegex(RuntimeError, "a real bug"):
        attention_bench.check_errors(config, fn, sets, mask)


class KernelFieldsTest(parameterized.TestCase):

  def fields(self, config, mask=None):
    sets = attention_bench.input_sets(config)
    if mask is not None:
      mask = attention_bench.kernel_mask(config, mask)
    return attention_bench.kernel_fields(config, mask, sets[0])

  def test_config_tiles(self):
    got = self.fields(_config(implementation="pallas_triton", block_q=32, block_kv=16,
                              mode="fwd_bwd"))
    self.assertEqual((got["backend"], got["fwd_tiles"], got["tiles_from"]),
                     ("pallas_triton", "32x16", "config"))
    self.assertEqual((got["dq_tiles"], got["dkdv_tiles"], got["bwd_backend"]),
                     ("32x16", "32x16", "pallas_triton"))
    self.assertEqual(set(got["kernel_params"]["params"]),
                     {"fwd_launch", "dq_launch", "dkdv_launch"})

  def test_default_tiles_are_what_the_backend_resolves(self):
    config = _config(implementation="pallas_triton", mode="fwd_bwd")
    got = self.fields(config)
    want = pallas_triton.default_block_sizes(16, 96, 96, interpret=True)
    self.assertEqual(got["fwd_tiles"], f"{want.block_q}x{want.block_kv}")
    self.assertEqual(got["dkdv_tiles"], f"{want.bwd_q}x{want.bwd_kv}")
    self.assertEqual(got["tiles_from"], "backend_default")
    metrics = attention_bench.run_point(config, {})
    self.assertEqual(metrics["fwd_tiles"], got["fwd_tiles"])
    self.assertEqual(metrics["bd_tiles"], got["fwd_tiles"])  # block density at those tiles

  def test_block_mask_fixes_the_tiles(self):
    config = _config(implementation="pallas_triton", mask="random_banded_rcm", q_len=64,
                     kv_len=64, block_q=16, block_kv=32)
    mask = attention_bench.build_mask(config, np.random.default_rng(0))
    got = self.fields(config, mask)
    self.assertEqual((got["fwd_tiles"], got["tiles_from"]), ("16x32", "block_mask"))

  def test_mosaic_backward_is_named(self):
    config = _config(implementation="pallas_mosaic_gpu", mode="fwd_bwd", dtype="bfloat16",
                     q_len=128, kv_len=128)
    got = self.fields(config)
    self.assertEqual(got["bwd_backend"], "pallas_mosaic_gpu")
    self.assertIn("dq_mask", got["plan_tiles"])
    wide = self.fields(_config(implementation="pallas_mosaic_gpu", mode="fwd_bwd",
                               dtype="bfloat16", q_len=128, kv_len=128, head_dim=256))
    self.assertEqual(wide["bwd_backend"], "pallas_triton")  # D=256: Triton's backward

  def test_xla_has_no_tiles(self):
    got = self.fields(_config(implementation="xla"))
    self.assertEqual(got, {"backend": "xla"})


class TimingTest(parameterized.TestCase):

  def test_timing_methods(self):
    config = _config(iters=3)
    fn = jax.jit(lambda x: x * 2.0)
    sets = [(np.ones((4,), np.float32),)]
    config.timing = "both"
    both = attention_bench.time_point(config, fn, sets)
    self.assertEqual((both["timing_method"], both["timing"]), ("loop", "loop"))
    self.assertEqual(both["wall_timing"], "wall")
    self.assertEqual(both["wall_samples"], 3)
    self.assertGreater(both["calls_per_sample"], 1)  # many calls in one jitted loop
    config.timing = "wall"
    wall = attention_bench.time_point(config, fn, sets)
    self.assertEqual((wall["timing_method"], wall["calls_per_sample"]), ("wall", 1))
    self.assertNotIn("wall_median_ms", wall)
    config.timing = "events"
    with self.assertRaisesRegex(ValueError, "'events'"):
      attention_bench.time_point(config, fn, sets)


class _RecordingTorchPeer(third_party.TorchPeer):
  """Stands in for the torch child: records keep_alive, returns a canned result."""

  def __init__(self):
    super().__init__("torch_sdpa", "attention")
    self.keep_alive = []

  def available(self):
    return third_party.Availability(True)

  def run(self, case, arrays, timeout_s=900, keep_alive=False):
    del case, arrays, timeout_s
    self.keep_alive.append(keep_alive)
    return {"compile_s": 0.1, "median_ms": 0.5, "timing": "cuda_events",
            "max_abs_err": 1e-6}


class TorchChildTest(absltest.TestCase):
  """Torch peers share one kept-alive child; an in-process point ends it first."""

  def _run(self, peer, **overrides):
    with mock.patch.object(third_party, "attention_peers",
                           return_value={"torch_sdpa": peer}), \
        mock.patch.object(torch_peers, "close_child") as close_child:
      metrics = attention_bench.run_point(_config(**overrides), {})
    return metrics, close_child.call_count

  def test_torch_out_of_memory_is_a_skip_with_the_reason(self):
    peer = _RecordingTorchPeer()
    peer.run = mock.Mock(side_effect=RuntimeError(
        "torch_sdpa: OutOfMemoryError: CUDA out of memory. Tried to allocate 32.00 GiB"))
    with self.assertRaisesRegex(NotImplementedError, "does not fit.*Tried to allocate 32"):
      self._run(peer, implementation="peer:torch_sdpa")
    peer.run = mock.Mock(side_effect=RuntimeError("torch_sdpa: ValueError: bad case"))
    with self.assertRaisesRegex(RuntimeError, "bad case"):  # other failures stay errors
      self._run(peer, implementation="peer:torch_sdpa")

  def test_torch_points_keep_the_child_and_kernel_points_end_it(self):
    peer = _RecordingTorchPeer()
    metrics, closed = self._run(peer, implementation="peer:torch_sdpa")
    self.assertEqual((peer.keep_alive, closed), ([True], 0))
    self.assertTrue(metrics["within_tol"])
    self.assertEqual(self._run(peer, implementation="peer:torch_sdpa",
                               torch_keep_alive=False)[1], 0)
    self.assertEqual(peer.keep_alive, [True, False])
    self.assertEqual(self._run(peer, implementation="xla")[1], 1)
    self.assertEqual(peer.keep_alive, [True, False])  # the xla point did not call the peer


if __name__ == "__main__":
  absltest.main()
