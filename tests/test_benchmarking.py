"""Tests of flashjax.benchmarking (counters, ceilings, timers) and the third_party peers."""

import importlib.util
import time

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from flashjax import benchmarking
from flashjax.masks.rule import Band, ElementRule
import third_party


class CountersTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{mode=}_{causal=}", mode, causal, factor)
      for mode, mult in (("fwd", 1.0), ("bwd", 2.5), ("fwd_bwd", 3.5))
      for causal, half in ((False, 1.0), (True, 0.5))
      for factor in [mult * half])
  def test_attention_flops(self, mode, causal, factor):
    b, t, s, n, d = 2, 384, 640, 3, 80
    flops = benchmarking.attention_flops(b, t, s, n, d, causal=causal, mode=mode)
    self.assertEqual(flops, 4 * b * n * t * s * d * factor)

  def test_bad_mode_raises(self):
    with self.assertRaisesRegex(ValueError, "mode='bogus'"):
      benchmarking.attention_flops(1, 8, 8, 1, 8, mode="bogus")

  def test_masked_flops_of_full_mask_equal_dense(self):
    rng = np.random.default_rng(0)
    b, t, s, n, d = 3, 40, 56, 2, 16
    pairs = benchmarking.count_allowed_pairs(np.ones((t, s), bool), batch=b)
    self.assertEqual(pairs, b * t * s)
    for mode in ("fwd", "fwd_bwd"):
      self.assertEqual(benchmarking.masked_attention_flops(n, d, pairs, mode),
                       benchmarking.attention_flops(b, t, s, n, d, mode=mode))
    mask = rng.random((t, s)) < 0.3
    self.assertEqual(benchmarking.masked_attention_flops(n, d, mask.sum()),
                     4 * n * d * mask.sum())

  def test_count_allowed_pairs(self):
    rng = np.random.default_rng(1)
    t = 33
    causal = np.tril(np.ones((t, t), bool))
    self.assertEqual(benchmarking.count_allowed_pairs(causal, batch=4), 4 * t * (t + 1) / 2)
    per_batch_head = rng.random((2, 3, t, t)) < 0.5
    want = per_batch_head.sum() / 3  # per head, summed over the batch
    self.assertAlmostEqual(benchmarking.count_allowed_pairs(per_batch_head, batch=2), want)

    class HasDense:
      def to_dense(self):
        return causal

    self.assertEqual(benchmarking.count_allowed_pairs(HasDense(), batch=2), t * (t + 1))
    with self.assertRaisesRegex(ValueError, "batch"):
      benchmarking.count_allowed_pairs(per_batch_head, batch=5)

  def test_decode_kv_bytes(self):
    lengths = np.array([3, 17, 0])
    nkv, d = 4, 8
    got = benchmarking.decode_kv_bytes(lengths, nkv, d, jnp.bfloat16)
    self.assertEqual(got, 2 * 2 * d * nkv * lengths.sum())
    heads = np.array([[0, 2], [1, 1], [3, 0]])  # row 1 reads one head twice: counts once
    got = benchmarking.decode_kv_bytes(lengths, nkv, d, np.float32, head_indices=heads)
    self.assertEqual(got, 2 * 4 * d * (3 * 2 + 17 * 1 + 0))
    with self.assertRaisesRegex(ValueError, "head_indices"):
      benchmarking.decode_kv_bytes(lengths, nkv, d, np.float32, head_indices=heads[:2])

  def test_ceilings(self):
    self.assertAlmostEqual(benchmarking.percent_of_ceiling(395e12, 790e12), 50.0)
    with self.assertRaisesRegex(ValueError, "ceiling=0"):
      benchmarking.percent_of_ceiling(1.0, 0)
    # H200: both ceilings measured; the datasheet's beside them.
    h200 = benchmarking.device_ceilings("NVIDIA H200", jnp.bfloat16)
    self.assertEqual(h200["flops_per_s"], benchmarking.H200_BF16_MATMUL_FLOPS_PER_S)
    self.assertEqual(h200["hbm_bytes_per_s"], benchmarking.H200_HBM_BYTES_PER_S)
    self.assertEqual((h200["flops_source"], h200["hbm_source"]), ("measured", "measured"))
    self.assertEqual(h200["datasheet_hbm_bytes_per_s"], 4.8e12)
    self.assertEqual(h200["device"], "NVIDIA H200")
    self.assertIn("H200", h200["source"])
    self.assertEqual(h200["l2_bytes"], 50e6)  # io_model's L2 credits read it from here
    self.assertNotIn("flops_per_s", benchmarking.device_ceilings("NVIDIA H200", np.float32))
    self.assertEqual(benchmarking.device_ceilings("NVIDIA H200", jnp.float16)["flops_per_s"],
                     benchmarking.H200_BF16_MATMUL_FLOPS_PER_S)
    # H100 SXM5: copy bandwidth measured, matmul from the datasheet.
    h100 = benchmarking.device_ceilings("NVIDIA H100 80GB HBM3", jnp.bfloat16)
    self.assertEqual(h100["hbm_bytes_per_s"], benchmarking.H100_HBM_BYTES_PER_S)
    self.assertEqual(h100["hbm_source"], "measured")
    self.assertEqual(h100["flops_per_s"], 989.4e12)
    self.assertEqual(h100["flops_source"], "datasheet")
    self.assertEqual(h100["datasheet_hbm_bytes_per_s"], 3.35e12)
    self.assertIn("SXM5", h100["source"])
    self.assertLess(h100["hbm_bytes_per_s"], h200["hbm_bytes_per_s"])  # H100 HBM3 < H200 HBM3e
    # Unknown kinds (CPU, TPU, other GPUs, empty) have no ceilings.
    for kind in ("cpu", "TPU v5 lite", "NVIDIA A100-SXM4-80GB", "NVIDIA H800", "", None):
      self.assertIsNone(benchmarking.device_ceilings(kind), kind)

  def test_ceilings_other_hopper_kinds(self):
    want = {  # kind -> (device, flops, hbm, both from the datasheet)
        "NVIDIA H100 PCIe": ("NVIDIA H100 PCIe", 756.5e12, 2.0e12),
        "NVIDIA H100 NVL": ("NVIDIA H100 NVL", 835.5e12, 3.9e12),
        "NVIDIA H200 NVL": ("NVIDIA H200 NVL", 835.5e12, 4.8e12),
        "NVIDIA GH200 480GB": ("NVIDIA GH200 480GB", 989.4e12, 4.0e12),
        "NVIDIA GH200 144G HBM3e": ("NVIDIA GH200 144G HBM3e", 989.4e12, 4.9e12),
    }
    for kind, (device, flops, hbm) in want.items():
      got = benchmarking.device_ceilings(kind, jnp.float16)
      self.assertEqual((got["device"], got["flops_per_s"], got["hbm_bytes_per_s"]),
                       (device, flops, hbm), kind)
      self.assertEqual((got["flops_source"], got["hbm_source"]), ("datasheet", "datasheet"))
      self.assertEqual(got["datasheet_flops_per_s"], flops)
    # GH200 contains "H200": it must not get the H200's measured numbers.
    self.assertNotEqual(benchmarking.device_ceilings("NVIDIA GH200 480GB")["hbm_bytes_per_s"],
                        benchmarking.H200_HBM_BYTES_PER_S)

  def test_environment_info(self):
    info = benchmarking.environment_info()
    self.assertEqual(info["jax_version"], jax.__version__)
    self.assertEqual(info["backend"], jax.default_backend())
    self.assertEqual(info["device_kind"], jax.devices()[0].device_kind)
    if info["git_commit"] is not None:
      self.assertRegex(info["git_commit"], r"^[0-9a-f]{40}$")


class TimersTest(parameterized.TestCase):

  def test_time_fn_counts_and_rotates(self):
    seen = []

    def fn(x):
      seen.append(int(x[0]))
      return x * 2

    sets = [(jnp.full((4,), i),) for i in range(3)]
    timing = benchmarking.time_fn(fn, warmup=2, iters=20, arg_sets=sets)
    self.assertLen(seen, 1 + 2 + 20)
    self.assertEqual(seen[:6], [0, 1, 2, 0, 1, 2])
    self.assertLen(timing.times_s, 20)
    self.assertEqual(timing.method, "wall")
    self.assertLessEqual(timing.p10_s, timing.median_s)
    self.assertLessEqual(timing.median_s, timing.p90_s)
    self.assertLessEqual(timing.min_s, timing.mean_s)
    summary = timing.summary()
    self.assertEqual(summary["samples"], 20)
    self.assertAlmostEqual(summary["median_ms"], 1e3 * timing.median_s)

  def test_time_fn_reports_first_call_separately(self):
    calls = []

    def fn(x):
      if not calls:
        time.sleep(0.2)  # stands in for compilation
      calls.append(1)
      return x + 1

    timing = benchmarking.time_fn(fn, jnp.ones(3), warmup=0, iters=20)
    self.assertGreaterEqual(timing.compile_s, 0.2)
    self.assertLess(timing.median_s, 0.1)

  def test_time_fn_rejects_mixed_inputs(self):
    with self.assertRaisesRegex(ValueError, "arg_sets"):
      benchmarking.time_fn(lambda x: x, jnp.ones(2), arg_sets=[(jnp.ones(2),)])
    with self.assertRaisesRegex(ValueError, "iters=0"):
      benchmarking.time_fn(lambda x: x, jnp.ones(2), iters=0)

  def test_time_in_loop_calls_fn_every_iteration(self):
    calls = []

    def fn(x, y):
      jax.debug.callback(lambda: calls.append(1))
      return x @ y

    rng = np.random.default_rng(2)
    sets = [tuple(jnp.asarray(rng.standard_normal((16, 16)), jnp.float32) for _ in range(2))
            for _ in range(2)]
    timing = benchmarking.time_in_loop(fn, iters=7, repeats=3, arg_sets=sets)
    self.assertEqual(timing.calls_per_sample, 8)  # 7 rounded up to 2 sets x 4 trips
    self.assertLen(calls, 8 * (1 + 3))
    self.assertLen(timing.times_s, 3)
    self.assertEqual(timing.method, "loop")

  def test_time_in_loop_is_not_hoisted(self):
    # With the work hoisted out of the loop, 4x the iterations would cost about the same
    # total time; per-iteration time would then drop about 4x.
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((384, 384)), jnp.float32)
    fn = lambda a: jnp.tanh(a @ a) @ a
    short = benchmarking.time_in_loop(fn, x, iters=4, repeats=5)
    long = benchmarking.time_in_loop(fn, x, iters=16, repeats=5)
    self.assertGreater(long.median_s, 0.4 * short.median_s)
    self.assertEqual(long.calls_per_sample, 16)


  def test_output_and_loop_checks_the_first_set_and_calls_every_set(self):
    calls = []

    def fn(x):
      jax.debug.callback(lambda: calls.append(1))
      return jnp.tanh(x) * 3

    rng = np.random.default_rng(4)
    sets = tuple((jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),) for _ in range(3))
    program = jax.jit(benchmarking.output_and_loop(fn, trips=2))
    timing, (out, checksum) = benchmarking.time_program(program, sets, repeats=4,
                                                        calls_per_run=2 * 3 + 1)
    np.testing.assert_allclose(out, np.tanh(np.asarray(sets[0][0])) * 3, rtol=1e-6)
    want = 2 * sum(float(np.sum(np.tanh(np.asarray(s[0], np.float64)) * 3)) for s in sets)
    self.assertAlmostEqual(float(checksum), want, places=4)
    self.assertLen(calls, (1 + 2 * 3) * (1 + 4))  # first run + 4 timed runs
    self.assertLen(timing.times_s, 4)
    self.assertEqual((timing.method, timing.calls_per_sample), ("loop", 7))
    self.assertGreater(timing.compile_s, 0)
    with self.assertRaisesRegex(ValueError, "trips=0"):
      benchmarking.output_and_loop(fn, trips=0)
    with self.assertRaisesRegex(ValueError, "calls_per_run=0"):
      benchmarking.time_program(program, sets, repeats=1, calls_per_run=0)

  def test_time_program_divides_by_the_calls(self):
    def program(seconds):
      time.sleep(seconds)
      return seconds

    timing, first = benchmarking.time_program(program, 0.02, repeats=3, calls_per_run=4)
    self.assertEqual(first, 0.02)
    self.assertBetween(timing.median_s, 0.005, 0.05 / 4 + 0.05)


class SizingTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{max_sets=}_{rotation_mb=}_{budget=}", max_sets, rotation_mb, budget, want)
      for max_sets, rotation_mb, budget, want in (
          (4, None, None, 4), (4, None, 2**20 * 2.9, 2), (4, 0.5, None, 1),
          (8, 2.5, None, 3), (8, 2.5, 2**20 * 2.7, 2), (1, None, 2**20 * 1.4, 1)))
  def test_fit_input_sets(self, max_sets, rotation_mb, budget, want):
    # Sets of 1 MB with 0.25 MB of temporaries each, 0.1 MB fixed.
    rotation = None if rotation_mb is None else rotation_mb * 2**20
    num_sets, need = benchmarking.fit_input_sets(2**20, 2**18, 1e5, budget,
                                                 max_sets=max_sets,
                                                 min_rotation_bytes=rotation)
    self.assertEqual(num_sets, want)
    self.assertEqual(need, num_sets * 1.25 * 2**20 + 1e5)

  def test_fit_input_sets_refuses_what_does_not_fit(self):
    with self.assertRaisesRegex(NotImplementedError,
                                r"needs 0.0011 GB on the torch child .* budget 0.001 GB"):
      benchmarking.fit_input_sets(1e6, 0, 1e5, 1e6, max_sets=2, where="torch child")
    with self.assertRaisesRegex(ValueError, "max_sets=0"):
      benchmarking.fit_input_sets(1e6, 0, 0, None, max_sets=0)

  def test_device_memory_budget(self):
    self.assertEqual(benchmarking.device_memory_budget(2.5), 2.5e9)

    class Device:
      def __init__(self, stats):
        self.stats = stats

      def memory_stats(self):
        return self.stats

    device = Device({"bytes_limit": 100, "bytes_in_use": 20})
    self.assertAlmostEqual(benchmarking.device_memory_budget(device=device), 72.0)
    self.assertAlmostEqual(benchmarking.device_memory_budget(fraction=0.5, device=device),
                           40.0)
    self.assertIsNone(benchmarking.device_memory_budget(device=Device(None)))
    self.assertIsNone(benchmarking.device_memory_budget(device=Device({"bytes_in_use": 5})))
    with self.assertRaisesRegex(ValueError, "fraction=1.5"):
      benchmarking.device_memory_budget(fraction=1.5, device=device)

  @parameterized.parameters((1e-3, 1e-5, 1, 1000, 100), (1e-3, 1e-5, 1, 50, 50),
                            (1e-3, 1.0, 4, 50, 4), (1e-3, 0.0, 1, 10**12, 10**6),
                            (1e-3, 3e-4, 1, 100, 4))
  def test_loop_calls(self, target, step, low, high, want):
    self.assertEqual(benchmarking.loop_calls(target, step, low, high), want)

  def test_loop_calls_rejects_bad_bounds(self):
    with self.assertRaisesRegex(ValueError, "min_calls=5, max_calls=2"):
      benchmarking.loop_calls(1.0, 1.0, 5, 2)


def _reference(q, k, v, allowed):
  """float32 HIGHEST attention of [B, T, N, D] inputs, allowed bool [B|1, N|1, T, S]."""
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  logits = jnp.einsum("btnd,bsnd->bnts", q, k, precision=jax.lax.Precision.HIGHEST)
  logits = jnp.where(allowed, logits / np.sqrt(q.shape[-1]), -jnp.inf)
  return jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(logits, axis=-1), v,
                    precision=jax.lax.Precision.HIGHEST)


class _FakeMask:
  """The parts of flashjax.masks.Mask that PeerMask reads."""

  def __init__(self, dense, rule):
    self._dense, self._rule = dense, rule

  def to_dense(self):
    return self._dense

  def rule(self):
    return self._rule


def _masks(t, batch, rng):
  """name -> (mask object, dense [B|1, 1, T, T]) for causal, document, window, random."""
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  causal = j <= i
  seg = np.sort(rng.integers(0, 4, size=(batch, t)), axis=1).astype(np.int32)
  doc = (seg[:, :, None] == seg[:, None, :]) & causal
  window = causal & (j >= i - 16)
  random = (rng.random((t, t)) < 0.3) | (i == j)
  return {
      "causal": (_FakeMask(causal, ElementRule(Band(None, 0))), causal[None, None]),
      "document": (_FakeMask(doc[:, None], ElementRule(Band(None, 0), seg, seg)),
                   doc[:, None]),
      "window": (_FakeMask(window, ElementRule(Band(-16, 0))), window[None, None]),
      "random": (_FakeMask(random, None), random[None, None]),
  }


class PeersTest(parameterized.TestCase):

  def test_peer_mask_views(self):
    masks = _masks(64, 2, np.random.default_rng(4))
    causal = third_party.PeerMask.from_mask(masks["causal"][0], 64, 64)
    self.assertTrue(causal.is_causal)
    self.assertEqual(causal.window(), (64, 0))
    doc = third_party.PeerMask.from_mask(masks["document"][0], 64, 64)
    self.assertTrue(doc.self_segments)
    self.assertEqual(third_party.PeerMask.from_mask(masks["window"][0], 64, 64).window(),
                     (16, 0))
    random = third_party.PeerMask.from_mask(masks["random"][0], 64, 64)
    self.assertFalse(random.structured)
    chex.assert_shape(random.dense, (1, 1, 64, 64))
    self.assertTrue(third_party.PeerMask.from_mask(None, 64, 64).is_full)
    with self.assertRaisesRegex(ValueError, "q_len=32"):
      third_party.PeerMask.from_mask(masks["random"][0], 32, 64)

  @parameterized.named_parameters(
      (f"{peer=}_{mask=}", peer, mask)
      for peer in ("jax_nn_xla", "pallas_triton_mha")
      for mask in ("full", "causal", "document", "window", "random"))
  def test_attention_peer_matches_reference(self, peer, mask):
    b, t, n, d = 2, 64, 2, 32
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, d)), jnp.float32) for _ in range(3))
    mask_obj, allowed = (None, np.ones((1, 1, t, t), bool)) if mask == "full" else _masks(
        t, b, rng)[mask]
    peer_mask = third_party.PeerMask.from_mask(mask_obj, t, t)
    adapter = third_party.attention_peers(interpret=True)[peer]
    self.assertTrue(adapter.available())
    if peer == "pallas_triton_mha" and mask in ("window", "random"):
      with self.assertRaises(NotImplementedError):
        adapter.make(peer_mask)
      return
    out = adapter.make(peer_mask)(q, k, v)
    chex.assert_trees_all_close(out, _reference(q, k, v, allowed), atol=2e-5, rtol=1e-5)

  @parameterized.named_parameters((f"{peer=}", peer) for peer in ("jax_nn_xla", "pallas_decode"))
  def test_decode_peer_matches_reference(self, peer):
    b, s, nq, nkv, d = 3, 256, 4, 2, 32
    rng = np.random.default_rng(6)
    q = jnp.asarray(rng.standard_normal((b, nq, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, nkv, d)), jnp.float32) for _ in range(2))
    lengths = jnp.asarray([1, 100, 256], jnp.int32)
    allowed = (np.arange(s)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]
    want = _reference(q[:, None], k, v, allowed)[:, 0]
    adapter = third_party.decode_peers(interpret=True)[peer]
    out = adapter.make()(q, k, v, lengths)
    chex.assert_trees_all_close(out, want, atol=2e-5, rtol=1e-5)
    with self.assertRaises(NotImplementedError):
      adapter.make(head_indices=jnp.zeros((b, 1), jnp.int32))

  def test_unavailable_peers_say_why(self):
    if jax.default_backend() != "gpu":
      cudnn = third_party.attention_peers()["jax_nn_cudnn"].available()
      self.assertFalse(cudnn)
      self.assertIn("GPU", cudnn.reason)
      self.assertFalse(third_party.attention_peers()["pallas_triton_mha"].available())
    torch_peer = third_party.attention_peers()["torch_sdpa"]
    if importlib.util.find_spec("torch") is None:
      self.assertFalse(torch_peer.available())
      self.assertIn("torch", torch_peer.available().reason)

  def test_torch_child_reports_errors(self):
    # Without torch the child reports the import error; with it, a bad dtype fails.
    case = {"batch": 1, "q_len": 16, "kv_len": 16, "num_heads": 1, "num_kv_heads": 1,
            "head_dim": 8, "dtype": "no_such_dtype", "mode": "fwd", "warmup": 0,
            "iters": 1, "input_sets": 1, "seed": 0, "scale": None, "structured": True,
            "band_lo": None, "band_hi": 0}
    with self.assertRaisesRegex(RuntimeError, "torch_sdpa: .*Error"):
      third_party.TorchPeer("torch_sdpa", "attention").run(case, {}, timeout_s=120)


if __name__ == "__main__":
  absltest.main()
