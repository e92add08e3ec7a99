"""flashjax.sparse_mlp's Triton kernels lowered for CUDA on a CPU host (tests/gpu_lowering.py):
ReLU and gated, both fc1 layouts. The run itself is test_sparse_mlp_gpu.py's."""

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import flashjax
from flashjax.ops.attention import api as attention_api
from flashjax.ops.sparse_mlp import pallas_triton as sparse_pallas_triton
from tests import gpu_lowering


class SparseMlpLoweringTest(parameterized.TestCase):

  @parameterized.product(gated=(False, True), w1_layout=("FD", "DF"))
  def test_lowers(self, gated, w1_layout):
    rng = np.random.default_rng(0)
    d, f, k = 256, 1024, 384
    x = jnp.asarray(rng.standard_normal((8, d)), jnp.bfloat16)
    w1 = jnp.asarray(rng.standard_normal((f, d) if w1_layout == "FD" else (d, f)), jnp.bfloat16)
    w2 = jnp.asarray(rng.standard_normal((f, d)), jnp.bfloat16)
    ids = jnp.asarray(np.sort(rng.choice(f, k, replace=False)), jnp.int32)

    def mlp(x, w1, w2, ids):
      return flashjax.sparse_mlp(x, w1, w2, ids, w3=w1 if gated else None,
                                 activation="silu" if gated else "relu", w1_layout=w1_layout,
                                 implementation="pallas_triton")

    names = gpu_lowering.kernel_names(gpu_lowering.export_for_cuda(mlp, x, w1, w2, ids))
    self.assertTrue({"flashjax_sparse_mlp_fc1", "flashjax_sparse_mlp_fc2"} <= names, names)
    # The export leaves the real platform check behind (a CPU call must still be refused).
    self.assertIs(sparse_pallas_triton.check_platform, attention_api.check_platform)
    with self.assertRaises(attention_api.BackendUnavailableError):
      mlp(x, w1, w2, ids)


if __name__ == "__main__":
  absltest.main()
