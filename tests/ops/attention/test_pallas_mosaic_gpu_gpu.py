"""pallas_mosaic_gpu compiled on a Hopper GPU: the shared suite without interpret mode.

Skipped unless JAX runs on a GPU. Run on the GPU machine with
  JAX_PLATFORMS=cuda python -m pytest -q tests/ops/attention/test_pallas_mosaic_gpu_gpu.py
The gradient cases run too: on the GPU they check the Mosaic forward's residuals feeding the
pallas_triton backward kernels.
"""

import jax
import pytest

from tests.ops.attention import test_pallas_mosaic_gpu

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]


class TestPallasMosaicGpuCompiled(test_pallas_mosaic_gpu.MosaicGpuSuite):
  INTERPRET = False
  SKIP_CASES = {}

