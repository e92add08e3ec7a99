"""flashjax.sparse_mlp's pallas_triton kernels compiled for a GPU (no interpret mode).

Skipped unless jax.default_backend() == "gpu". On the GPU machine:
  python -m pytest -q -m gpu tests/ops/sparse_mlp/test_sparse_mlp_gpu.py
"""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashjax
from flashjax.ops.sparse_mlp import reference
from flashjax.ops.sparse_mlp.block_sizes import BlockSizes
from tests.ops.sparse_mlp.test_sparse_mlp import make_inputs, oracle

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]
_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2, jnp.float16: 1e-2}


def _grid():
  cases = []
  for rows in (1, 7, 64, 256):
    for d, f in ((64, 256), (256, 1024), (4096, 16384)):
      for k in (1, 100, f):
        for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
          if d == 4096 and (rows in (7, 256) or dtype != jnp.bfloat16 or k == 100):
            continue  # the float64 oracle of the large shape is slow: a few cases only
          bias = (rows + k) % 2 == 0
          layout = "FD" if (rows + d) % 3 else "DF"
          name = f"{rows=}_{d=}_{f=}_{k=}_{jnp.dtype(dtype).name}_{bias=}_{layout}"
          cases.append((name, rows, d, f, k, dtype, bias, layout))
  return cases


class SparseMLPGpuTest(parameterized.TestCase):

  def _check(self, out, expected, dtype):
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_close(np.asarray(out.astype(jnp.float32)), expected,
                                atol=_TOL[dtype], rtol=_TOL[dtype])

  @parameterized.named_parameters(*_grid())
  def test_compiled_matches_oracle(self, rows, d, f, k, dtype, bias, layout):
    inputs = make_inputs(rows + d + k, rows=rows, d=d, f=f, k=k, dtype=dtype, bias=bias,
                         w1_layout=layout)
    out = jax.jit(lambda a: flashjax.sparse_mlp(**a, w1_layout=layout,
                                                implementation="pallas_triton"))(inputs)
    self.assertEqual(out.dtype, dtype)
    self._check(out, oracle(**inputs, w1_layout=layout), dtype)

  @parameterized.named_parameters(
      (f"{activation=}_{gated=}", activation, gated)
      for activation in ("relu", "gelu", "silu") for gated in (False, True))
  def test_activations(self, activation, gated):
    inputs = make_inputs(3, rows=33, d=512, f=2048, k=700, dtype=jnp.bfloat16, gated=gated,
                         w1_layout="FD")
    out = flashjax.sparse_mlp(**inputs, activation=activation, w1_layout="FD",
                              implementation="pallas_triton")
    self._check(out, oracle(**inputs, activation=activation, w1_layout="FD"), jnp.bfloat16)

  @parameterized.named_parameters(
      ("small_tiles", BlockSizes(block_k=16, block_k_fc2=16, block_d=16, block_out=16,
                                 block_b=16, num_splits=5, num_warps=2, num_stages=2)),
      ("large_tiles", BlockSizes(block_k=128, block_k_fc2=128, block_d=128, block_out=128,
                                 block_b=128, num_splits=1, num_warps=8, num_stages=2)),
  )
  def test_explicit_tiles(self, sizes):
    inputs = make_inputs(5, rows=100, d=512, f=4096, k=1000, dtype=jnp.bfloat16,
                         w1_layout="FD")
    out = flashjax.sparse_mlp(**inputs, w1_layout="FD", implementation="pallas_triton",
                              block_sizes=sizes)
    self._check(out, oracle(**inputs, w1_layout="FD"), jnp.bfloat16)

  def test_traced_out_of_range_ids_never_read_outside(self):
    inputs = make_inputs(9, rows=8, d=256, f=1024, k=64, dtype=jnp.float32, w1_layout="FD")
    ids = np.asarray(inputs["neuron_indices"]).copy()
    ids[[0, 5, 63]] = [1024, -7, 2**30]
    inputs["neuron_indices"] = jnp.asarray(ids)
    out = jax.jit(lambda a: flashjax.sparse_mlp(**a, w1_layout="FD",
                                                implementation="pallas_triton"))(inputs)
    expected = oracle(**{**inputs, "neuron_indices": np.where(
        (ids >= 0) & (ids < 1024), ids, -1)}, w1_layout="FD")
    self._check(out, expected, jnp.float32)

  def test_gradients(self):
    inputs = make_inputs(13, rows=16, d=256, f=1024, k=300, dtype=jnp.float32, gated=True,
                         w1_layout="FD")
    ids = inputs.pop("neuron_indices")
    loss = lambda fn: lambda p: jnp.sum(jnp.sin(fn(**p)))
    ours = jax.grad(loss(lambda **a: flashjax.sparse_mlp(
        neuron_indices=ids, activation="silu", w1_layout="FD",
        implementation="pallas_triton", **a)))(inputs)
    ref = jax.grad(loss(lambda **a: reference.sparse_mlp_reference(
        neuron_indices=ids, activation="silu", w1_layout="FD", **a)))(inputs)
    chex.assert_trees_all_close(ours, ref, atol=1e-3, rtol=1e-3)


if __name__ == "__main__":
  absltest.main()
