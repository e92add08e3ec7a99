"""tests/conftest.py: CPU by default, JAX's own platform when `-m gpu` asks for GPU tests."""

import os

from absl.testing import absltest
from absl.testing import parameterized

from tests import conftest


class PlatformSelectionTest(parameterized.TestCase):

  @parameterized.parameters(
      ("gpu", True), ("gpu and not slow", True), ("gpu or slow", True), ("(gpu)", True),
      ("not slow", False), ("not gpu", False), ("slow", False), ("", False), (None, False),
      ("not slow and not gpu", False))
  def test_selects_gpu_tests(self, markexpr, expected):
    self.assertEqual(conftest.selects_gpu_tests(markexpr), expected)

  def test_platforms(self):
    self.assertEqual(conftest.jax_platforms("not slow", {}), "cpu")  # default CI run
    self.assertIsNone(conftest.jax_platforms("gpu", {}))  # JAX picks the GPU if present
    self.assertEqual(conftest.jax_platforms("gpu", {"JAX_PLATFORMS": "cpu"}), "cpu")
    self.assertEqual(conftest.jax_platforms("not slow", {"JAX_PLATFORMS": "cuda"}), "cuda")

  def test_xla_flags_add_cpu_devices_and_fast_compiles(self):
    fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    self.assertEqual(conftest.xla_flags(""),
                     f"--xla_force_host_platform_device_count=8 {fast}")
    self.assertEqual(conftest.xla_flags("--xla_dump_to=/tmp/x"),
                     f"--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8 {fast}")
    own = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=3"
    self.assertEqual(conftest.xla_flags(own),  # the caller's values are kept
                     f"{own} --xla_llvm_disable_expensive_passes=true")

  def test_this_run_has_the_flags(self):
    import jax  # pylint: disable=import-outside-toplevel
    flags = os.environ["XLA_FLAGS"]
    for name in conftest.CPU_XLA_FLAGS:
      self.assertIn(f"--{name}=", flags)
    count = flags.split("--xla_force_host_platform_device_count=")[1].split()[0]
    self.assertLen(jax.devices("cpu"), int(count))

  def test_this_run_is_on_cpu(self):
    import jax  # pylint: disable=import-outside-toplevel
    self.assertEqual(jax.default_backend(), "cpu")


if __name__ == "__main__":
  absltest.main()
