"""Study configs pick their CPU variant on a CPU host, or the launcher refuses with its name."""

import importlib
import json
import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from configs import common
from experiments import launch

_CONFIGS = sorted(name[:-3] for name in os.listdir(launch.CONFIGS_DIR)
                  if name.endswith(".py") and name not in ("__init__.py", "common.py"))


def _module(name):
  return importlib.import_module(f"configs.{name}")


class ConfigVariantsTest(parameterized.TestCase):

  @parameterized.named_parameters((name, name) for name in _CONFIGS)
  def test_every_variant_builds_and_is_tagged(self, name):
    module = _module(name)
    variants = getattr(module, "VARIANTS", None)
    self.assertTrue(variants, f"configs/{name}.py has no VARIANTS (configs/common.py)")
    for arg, variant in variants.items():
      self.assertIsInstance(variant, common.Variant)
      info = module.get_config(arg).study_variant
      self.assertEqual((info.name, info.cpu), (arg, variant.cpu))

  @parameterized.named_parameters((name, name) for name in _CONFIGS)
  def test_cpu_host_runs_the_cpu_variant_or_is_told_which(self, name):
    module = _module(name)
    config = module.get_config()  # tests run on CPU (conftest)
    spec = f"configs/{name}.py"
    cpu_name = common.cpu_variant(module.VARIANTS)
    if cpu_name is not None:
      self.assertEqual(config.study_variant.name, cpu_name)
      self.assertEqual(json.loads(config.to_json_best_effort()),
                       json.loads(module.get_config(cpu_name).to_json_best_effort()))
      launch.check_platform(config, spec)  # runs
      gpu_sized = [arg for arg, v in module.VARIANTS.items() if not v.cpu]
    else:
      gpu_sized = list(module.VARIANTS)
    for arg in gpu_sized:
      gpu_config = module.get_config(arg)
      with self.assertRaisesRegex(launch.WrongPlatformError, "--allow_interpret") as caught:
        launch.check_platform(gpu_config, f"{spec}:{arg}", cpu=True)
      named = gpu_config.study_variant.cpu_variant
      self.assertTrue(named, "a GPU-only config names what a CPU host runs instead")
      if ".py" in named:  # another config's CPU variant: it exists and is CPU-sized
        self.assertIn(f"--config={named} ", str(caught.exception))
        other, arg_name = named.split(":")
        other_module = _module(os.path.basename(other)[:-3])
        self.assertTrue(other_module.VARIANTS[arg_name].cpu)
      else:
        self.assertIn(f"--config={spec}:{named} ", str(caught.exception))
      launch.check_platform(gpu_config, f"{spec}:{arg}", cpu=True, allow_interpret=True)
      launch.check_platform(gpu_config, f"{spec}:{arg}", cpu=False)

  def test_variant_line(self):
    module = _module("ablate_block_size")
    line = launch.variant_line(module.get_config("cpu"), "configs/ablate_block_size.py")
    self.assertStartsWith(line, "running configs/ablate_block_size.py:cpu (no variant given")
    line = launch.variant_line(module.get_config("cpu"), "configs/ablate_block_size.py:cpu")
    self.assertEqual(line, "running configs/ablate_block_size.py:cpu")

  def test_accelerator_host_keeps_the_default(self):
    variants = {"gpu": common.Variant("g"), "full": common.Variant("f"),
                "cpu": common.Variant("c", cpu=True)}
    self.assertEqual(common.choose_variant(None, variants, default="full", cpu=False), "full")
    self.assertEqual(common.choose_variant(None, variants, default="full", cpu=True), "cpu")
    self.assertEqual(common.choose_variant("gpu", variants, default="full", cpu=True), "gpu")
    no_cpu = {"all": common.Variant("a")}
    self.assertEqual(common.choose_variant("", no_cpu, default="all", cpu=True), "all")

  def test_resume_ignores_the_variant_label(self):
    # A workdir written before configs recorded study_variant still resumes.
    config = _module("ablate_block_size").get_config("cpu")
    workdir = tempfile.mkdtemp(prefix="fj_configs_test_")
    self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
    old = json.loads(config.to_json_best_effort())
    del old["study_variant"]
    with open(os.path.join(workdir, launch.CONFIG_FILE), "w") as f:
      json.dump(old, f)
    open(os.path.join(workdir, launch.RESULTS_FILE), "w").close()
    launch._check_config(workdir, config, json.loads(config.to_json_best_effort()))

  def test_help_lists_configs_and_variants(self):
    text = launch.usage()
    for name in _CONFIGS:
      self.assertIn(f"configs/{name}.py: ", text)
      for arg, variant in getattr(_module(name), "VARIANTS", {}).items():
        self.assertIn(f":{arg}  {variant.summary}", text)


if __name__ == "__main__":
  absltest.main()
