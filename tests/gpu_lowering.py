"""Lowering GPU kernels for CUDA on a CPU host (test helper).

`export_for_cuda` runs `jax.export` with platforms=["cuda"]: every Pallas kernel the function
calls goes through its GPU lowering (Pallas -> Mosaic GPU, or Pallas -> Triton IR) although no
GPU is present, so CI checks that the compiled code paths lower. It cannot check what happens
on the device: the PTX compilation and the run. The backends' platform checks (which refuse a
GPU backend on a CPU host) are bypassed for the export.
"""

import contextlib
import importlib
import re
from unittest import mock

import jax

_PLATFORM_CHECKS = ("flashjax.ops.attention.api.check_platform",
                    "flashjax.ops.decode.api.check_platform",
                    "flashjax.ops.sparse_mlp.pallas_triton.check_platform")
# XLA's Triton custom call has no export compatibility guarantee: nothing here is serialized
# for later, the module is only inspected.
_TRITON_CALL = "__gpu$xla.gpu.triton"


def export_for_cuda(fn, *args) -> str:
  """The StableHLO text of `fn(*args)` lowered for CUDA (raises what the lowering raises)."""
  # Import the modules first: one imported while attention.api's check is patched would bind
  # the mock as its own `check_platform` and keep it after the patches are undone.
  for target in _PLATFORM_CHECKS:
    importlib.import_module(target.rsplit(".", 1)[0])
  with contextlib.ExitStack() as stack:
    for target in _PLATFORM_CHECKS:
      stack.enter_context(mock.patch(target))
    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)])(*args)
  return exported.mlir_module()


def kernel_names(module_text: str) -> set[str]:
  """Names of the flashjax Pallas kernels in a lowered module (Mosaic GPU and Triton)."""
  return set(re.findall(r"flashjax_\w+|partially_fused_\w+", module_text))
