"""Packaging: only flashjax is installed; flashjax-launch finds the checkout's configs."""

import os
import subprocess
import sys
import tempfile
import tomllib

from absl.testing import absltest
import setuptools

from flashjax import cli

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
  with open(os.path.join(_REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


class PackagingTest(absltest.TestCase):

  def test_only_flashjax_is_installed(self):
    find = _pyproject()["tool"]["setuptools"]["packages"]["find"]
    packages = setuptools.find_packages(where=_REPO, include=find["include"],
                                        exclude=find.get("exclude", ()))
    self.assertIn("flashjax", packages)
    self.assertIn("flashjax.ops.attention", packages)
    top_level = {name.split(".")[0] for name in packages}
    self.assertEqual(top_level, {"flashjax"})

  def test_console_command(self):
    scripts = _pyproject()["project"]["scripts"]
    self.assertEqual(scripts["flashjax-launch"], "flashjax.cli:main")
    self.assertTrue(callable(cli.main))

  def test_checkout_and_config_paths(self):
    self.assertTrue(cli.is_checkout(_REPO))
    self.assertEqual(cli.find_checkout(cwd=tempfile.gettempdir()), _REPO)  # editable install
    elsewhere = tempfile.mkdtemp(prefix="fj_pkg_test_")
    self.addCleanup(os.rmdir, elsewhere)
    quick = os.path.join(_REPO, "configs", "quickstart.py")
    self.assertEqual(cli.resolve_config("configs/quickstart.py", _REPO, elsewhere), quick)
    self.assertEqual(cli.resolve_config("configs/quickstart.py:cpu", _REPO, elsewhere),
                     quick + ":cpu")
    # Found where it is given, or left alone for the launcher's own error.
    self.assertEqual(cli.resolve_config("configs/quickstart.py:cpu", _REPO, _REPO),
                     "configs/quickstart.py:cpu")
    self.assertEqual(cli.resolve_config("nope.py:x", _REPO, elsewhere), "nope.py:x")
    argv = cli.rewrite_argv(["prog", "--config", "configs/train_lm.py:cpu", "--workdir=w",
                             "--config.iters=3"], _REPO, elsewhere)
    self.assertEqual(argv, ["prog", "--config", os.path.join(_REPO, "configs/train_lm.py:cpu"),
                            "--workdir=w", "--config.iters=3"])

  def test_env_override(self):
    old = os.environ.get("FLASHJAX_REPO")
    self.addCleanup(lambda: os.environ.__setitem__("FLASHJAX_REPO", old) if old is not None
                    else os.environ.pop("FLASHJAX_REPO", None))
    os.environ["FLASHJAX_REPO"] = _REPO
    self.assertEqual(cli.find_checkout(), _REPO)
    os.environ["FLASHJAX_REPO"] = tempfile.gettempdir()
    self.assertIsNone(cli.find_checkout())

  def test_launch_from_another_directory(self):
    # The console command's code path (python -m flashjax.cli == flashjax-launch) from a
    # directory without configs/: --help lists the configs; a GPU-sized variant is refused
    # on this CPU host with the CPU variant's name, so the config file was found and loaded.
    elsewhere = tempfile.mkdtemp(prefix="fj_pkg_test_")
    self.addCleanup(os.rmdir, elsewhere)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("FLASHJAX_REPO", None)
    proc = subprocess.run([sys.executable, "-m", "flashjax.cli", "--helpshort"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    self.assertIn("configs/ablate_block_size.py: ", proc.stdout, proc.stderr[-2000:])
    self.assertIn(":cpu  ", proc.stdout)
    proc = subprocess.run(
        [sys.executable, "-m", "flashjax.cli", "--config=configs/ablate_block_size.py:gpu",
         f"--workdir={elsewhere}/w"], cwd=elsewhere, env=env, capture_output=True, text=True,
        timeout=120, check=False)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("configs/ablate_block_size.py:cpu instead", proc.stderr)
    self.assertFalse(os.path.exists(os.path.join(elsewhere, "w")))


if __name__ == "__main__":
  absltest.main()
