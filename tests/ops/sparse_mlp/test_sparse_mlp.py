"""flashjax.sparse_mlp on every backend (Pallas in interpret mode) against a float64 oracle.

The oracle computes the whole MLP densely and zeroes the unselected hidden units, so it
checks the gathers independently of flashjax's reference (which gathers too).
"""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

import flashjax
from flashjax.ops.attention import api as attention_api
from flashjax.ops.sparse_mlp import reference
from flashjax.ops.sparse_mlp.block_sizes import BlockSizes

_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}
_ACT = {"relu": lambda h: np.maximum(h, 0),
        "gelu": lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3))),
        "silu": lambda h: h / (1 + np.exp(-h))}


def oracle(x, w1, w2, neuron_indices, *, b1=None, b2=None, w3=None, activation="relu", w1_layout="DF"):
  """Dense MLP in float64 with the hidden units outside `ids` (or -1 ids) zeroed."""
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  x2 = f64(x).reshape(-1, x.shape[-1])
  to_df = lambda w: f64(w) if w1_layout == "DF" else f64(w).T
  hidden = x2 @ to_df(w1) + (0 if b1 is None else f64(b1))
  hidden = _ACT[activation](hidden)
  if w3 is not None:
    hidden = hidden * (x2 @ to_df(w3))
  keep = np.zeros(w2.shape[0], bool)
  ids = np.asarray(neuron_indices)
  keep[ids[ids >= 0]] = True
  out = (hidden * keep) @ f64(w2) + (0 if b2 is None else f64(b2))
  return out.reshape(x.shape)


def make_inputs(seed, *, rows, d, f, k, dtype, bias=True, gated=False, w1_layout="DF",
                lead=None):
  """Random inputs scaled so the output is O(1); ids are k distinct neurons."""
  rng = np.random.default_rng(seed)
  cast = lambda a: jnp.asarray(a, dtype)
  w1_shape = (d, f) if w1_layout == "DF" else (f, d)
  x_shape = (rows, d) if lead is None else (rows, lead, d)
  inputs = dict(
      x=cast(rng.standard_normal(x_shape)),
      w1=cast(rng.standard_normal(w1_shape) / np.sqrt(d)),
      w2=cast(rng.standard_normal((f, d)) / np.sqrt(k)),
      neuron_indices=jnp.asarray(rng.choice(f, k, replace=False), jnp.int32),
      b1=jnp.asarray(rng.standard_normal(f) * 0.5, jnp.float32) if bias else None,
      b2=cast(rng.standard_normal(d) * 0.5) if bias else None,
      w3=cast(rng.standard_normal(w1_shape) / np.sqrt(d)) if gated else None,
  )
  return inputs


_CASES = [
    # (name, rows, d, F, k, dtype, bias)
    ("B1_d64_F256_k1_f32", 1, 64, 256, 1, jnp.float32, True),
    ("B7_d256_F1024_k100_bf16", 7, 256, 1024, 100, jnp.bfloat16, True),
    ("B64_d64_F256_kF_f16_nobias", 64, 64, 256, 256, jnp.float16, False),
    ("B7_d64_F1024_k100_f32_nobias", 7, 64, 1024, 100, jnp.float32, False),
    ("B64_d256_F256_k100_bf16", 64, 256, 256, 100, jnp.bfloat16, True),
    ("B1_d256_F1024_kF_f16", 1, 256, 1024, 1024, jnp.float16, True),
]


class SparseMLPSuite(parameterized.TestCase):
  """Backend-agnostic cases; subclasses set IMPL and the capability flags."""

  IMPL = "xla"
  INTERPRET = False
  LAYOUTS = ("DF", "FD")  # w1 layouts the backend runs

  def _call(self, inputs, **kwargs):
    return flashjax.sparse_mlp(**inputs, implementation=self.IMPL, interpret=self.INTERPRET,
                               **kwargs)

  def _check(self, out, expected, dtype):
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_close(np.asarray(out.astype(jnp.float32)), expected,
                                atol=_TOL[dtype], rtol=_TOL[dtype])

  @parameterized.named_parameters(*_CASES)
  def test_matches_oracle(self, rows, d, f, k, dtype, bias):
    layout = self.LAYOUTS[rows % len(self.LAYOUTS)]
    inputs = make_inputs(rows * 1000 + k, rows=rows, d=d, f=f, k=k, dtype=dtype, bias=bias,
                         w1_layout=layout)
    out = self._call(inputs, w1_layout=layout)
    chex.assert_shape(out, inputs["x"].shape)
    self.assertEqual(out.dtype, dtype)
    self._check(out, oracle(**inputs, w1_layout=layout), dtype)

  @parameterized.named_parameters(
      (f"{activation=}_{gated=}", activation, gated)
      for activation in ("gelu", "silu") for gated in (False, True))
  def test_activations_and_gate(self, activation, gated):
    layout = self.LAYOUTS[-1]
    inputs = make_inputs(7, rows=5, d=64, f=256, k=40, dtype=jnp.float32, gated=gated,
                         w1_layout=layout)
    out = self._call(inputs, activation=activation, w1_layout=layout)
    self._check(out, oracle(**inputs, activation=activation, w1_layout=layout), jnp.float32)

  def test_three_dim_input(self):
    layout = self.LAYOUTS[-1]
    inputs = make_inputs(3, rows=2, lead=3, d=64, f=256, k=50, dtype=jnp.float32,
                         w1_layout=layout)
    out = self._call(inputs, w1_layout=layout)
    chex.assert_shape(out, (2, 3, 64))
    self._check(out, oracle(**inputs, w1_layout=layout), jnp.float32)

  def test_gradients_match_reference(self):
    layout = self.LAYOUTS[-1]
    inputs = make_inputs(11, rows=6, d=64, f=256, k=70, dtype=jnp.float32, gated=True,
                         w1_layout=layout)
    ids = inputs.pop("neuron_indices")
    names = ("x", "w1", "w2", "b1", "b2", "w3")

    def loss(fn, params):
      out = fn(**params)
      return jnp.sum(out * jnp.cos(out))

    ours = jax.grad(lambda p: loss(
        lambda **a: flashjax.sparse_mlp(neuron_indices=ids, activation="silu",
                                        w1_layout=layout, implementation=self.IMPL,
                                        interpret=self.INTERPRET, **a), p))(inputs)
    ref = jax.grad(lambda p: loss(
        lambda **a: reference.sparse_mlp_reference(neuron_indices=ids, activation="silu",
                                                   w1_layout=layout, **a), p))(inputs)
    for name in names:
      chex.assert_tree_all_finite(ours[name])
      chex.assert_trees_all_close(ours[name], ref[name], atol=1e-4, rtol=1e-4,
                                  custom_message=name)
    # Unselected neurons get exactly zero weight gradient.
    unselected = np.setdiff1d(np.arange(256), np.asarray(ids))
    w2_grad = np.asarray(ours["w2"])
    self.assertTrue(np.all(w2_grad[unselected] == 0))
    self.assertGreater(np.abs(w2_grad[np.asarray(ids)]).min(), 0)

  def test_traced_out_of_range_ids_are_dropped(self):
    layout = self.LAYOUTS[-1]
    inputs = make_inputs(5, rows=4, d=64, f=256, k=20, dtype=jnp.float32, w1_layout=layout)
    ids = np.asarray(inputs["neuron_indices"]).copy()
    ids[[2, 9, 17]] = [256, -5, 10**6]  # out of range: contribute nothing
    inputs["neuron_indices"] = jnp.asarray(ids)
    run = jax.jit(lambda a: self._call(a, w1_layout=layout))
    out = run(inputs)
    expected = oracle(**{**inputs, "neuron_indices": np.where(
        (ids >= 0) & (ids < 256), ids, -1)}, w1_layout=layout)
    self._check(out, expected, jnp.float32)


class XlaTest(SparseMLPSuite):
  IMPL = "xla"


class PallasTritonTest(SparseMLPSuite):
  IMPL = "pallas_triton"
  INTERPRET = True

  def test_explicit_block_sizes_and_splits(self):
    inputs = make_inputs(21, rows=20, d=128, f=512, k=200, dtype=jnp.float32,
                         w1_layout="FD")
    sizes = BlockSizes(
        block_k=16, block_k_fc2=32, block_d=32, block_out=32, block_b=16, num_splits=3)
    out = self._call(inputs, w1_layout="FD", block_sizes=sizes)
    self._check(out, oracle(**inputs, w1_layout="FD"), jnp.float32)

  def test_tiles_over_shared_memory_raise(self):
    inputs = make_inputs(2, rows=4, d=256, f=512, k=128, dtype=jnp.bfloat16, w1_layout="FD")
    sizes = BlockSizes(block_k=128, block_d=256, block_b=128, num_stages=3)
    with self.assertRaisesRegex(ValueError, "393216 bytes of shared memory"):
      self._call(inputs, w1_layout="FD", block_sizes=sizes)

  def test_needs_interpret_off_gpu(self):
    if jax.default_backend() == "gpu":
      self.skipTest("runs compiled on a GPU")
    inputs = make_inputs(1, rows=2, d=64, f=256, k=8, dtype=jnp.float32)
    with self.assertRaisesRegex(attention_api.BackendUnavailableError, "interpret=True"):
      flashjax.sparse_mlp(**inputs, implementation="pallas_triton")
    # A fallback list moves on to xla.
    out = flashjax.sparse_mlp(**inputs, implementation=["pallas_triton", "xla"])
    self._check(out, oracle(**inputs), jnp.float32)


class PallasTpuTest(SparseMLPSuite):
  IMPL = "pallas_tpu"
  INTERPRET = True
  LAYOUTS = ("FD",)

  def test_df_layout_not_implemented(self):
    inputs = make_inputs(1, rows=2, d=64, f=256, k=8, dtype=jnp.float32, w1_layout="DF")
    with self.assertRaisesRegex(NotImplementedError, "w1_layout='FD'"):
      self._call(inputs, w1_layout="DF")


class ValidationTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.inputs = make_inputs(0, rows=3, d=64, f=256, k=10, dtype=jnp.float32)

  @parameterized.named_parameters(
      ("w1_shape", dict(w1=jnp.zeros((64, 128))), r"w1 .*shape=\(64, 128\)"),
      ("w2_rank", dict(w2=jnp.zeros((256,))), "w2 must be a \\[F, d\\] array"),
      ("x_rank", dict(x=jnp.zeros((64,))), r"x.shape=\(64,\)"),
      ("dtype_mismatch", dict(w2=jnp.zeros((256, 64), jnp.bfloat16)), "w2.dtype=bfloat16"),
      ("b1_shape", dict(b1=jnp.zeros((255,))), r"b1.shape=\(255,\)"),
      ("k_zero", dict(neuron_indices=jnp.zeros((0,), jnp.int32)), "k=0"),
      ("k_above_f", dict(neuron_indices=jnp.arange(257)), "k=257"),
      ("float_ids", dict(neuron_indices=jnp.arange(4.0)), "integer"),
      ("ids_2d", dict(neuron_indices=jnp.zeros((2, 2), jnp.int32)), "1-D integer"),
      ("out_of_range", dict(neuron_indices=jnp.asarray([1, 256, 3])), r"\[256\] outside"),
      ("negative", dict(neuron_indices=np.asarray([-1, 2])), r"\[-1\] outside"),
      ("duplicates", dict(neuron_indices=jnp.asarray([4, 7, 4])), r"repeats ids \[4\]"),
  )
  def test_bad_input_raises(self, override, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      flashjax.sparse_mlp(**{**self.inputs, **override})

  def test_bad_options_raise(self):
    with self.assertRaisesRegex(ValueError, "activation='tanh'"):
      flashjax.sparse_mlp(**self.inputs, activation="tanh")
    with self.assertRaisesRegex(ValueError, "w1_layout='NK'"):
      flashjax.sparse_mlp(**self.inputs, w1_layout="NK")
    with self.assertRaisesRegex(ValueError, "unknown implementation"):
      flashjax.sparse_mlp(**self.inputs, implementation="cuda")
    with self.assertRaisesRegex(ValueError, "block_k=48"):
      BlockSizes(block_k=48)

  def test_default_implementation_runs_on_cpu(self):
    out = flashjax.sparse_mlp(**self.inputs)
    chex.assert_trees_all_close(np.asarray(out), oracle(**self.inputs), atol=1e-5, rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
