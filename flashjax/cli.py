r"""`flashjax-launch`: the study launcher (experiments/launch.py) from any directory.

  flashjax-launch --config=configs/quickstart.py --workdir=/tmp/fj_quick
  flashjax-launch --help      # the configs and their variants

The study configs and experiment kinds are folders of the repository (configs/,
experiments/, third_party/), not installed packages, so that no generic top-level name
(`configs`, `experiments`) lands in site-packages. This command finds the checkout (the
FLASHJAX_REPO environment variable, else the one flashjax itself was installed from with
`pip install -e`, else the current directory or one above it), puts it first on sys.path,
resolves a relative `--config=configs/...` against the checkout when it does not exist in
the current directory, and runs the launcher. From the repository root,
`python -m experiments.launch ...` does the same.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

_ENV = "FLASHJAX_REPO"


def is_checkout(path: str) -> bool:
  """Whether `path` holds the launcher and the configs (a flashjax repository checkout)."""
  return (os.path.isfile(os.path.join(path, "experiments", "launch.py"))
          and os.path.isdir(os.path.join(path, "configs")))


def find_checkout(cwd: str | None = None) -> str | None:
  """The repository checkout the launcher runs from, or None.

  Args:
    cwd: the directory to search upward from (default: the current directory).

  Returns:
    $FLASHJAX_REPO if set (it must be a checkout), else the directory above the flashjax
    package when that is a checkout (editable installs), else the first checkout among
    `cwd` and its parents.
  """
  if os.environ.get(_ENV):
    path = os.path.abspath(os.path.expanduser(os.environ[_ENV]))
    return path if is_checkout(path) else None
  package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if is_checkout(package_parent):
    return package_parent
  path = os.path.abspath(cwd or os.getcwd())
  while True:
    if is_checkout(path):
      return path
    parent = os.path.dirname(path)
    if parent == path:
      return None
    path = parent


def resolve_config(value: str, checkout: str, cwd: str | None = None) -> str:
  """`--config` value with a relative file that is missing here resolved in `checkout`.

  Args:
    value: FILE or FILE:ARG.
    checkout: the repository checkout.
    cwd: the directory a relative FILE is first looked up in (default: current).

  Returns:
    The value unchanged when FILE exists relative to `cwd` (or is absolute), else with FILE
    replaced by its absolute path in the checkout when it exists there.
  """
  path, sep, arg = value, "", ""
  head, colon, tail = value.rpartition(":")
  if colon and head.endswith(".py"):
    path, sep, arg = head, colon, tail
  if os.path.isabs(path) or os.path.exists(os.path.join(cwd or os.getcwd(), path)):
    return value
  candidate = os.path.join(checkout, path)
  if os.path.exists(candidate):
    return candidate + sep + arg
  return value


def rewrite_argv(argv: Sequence[str], checkout: str, cwd: str | None = None) -> list[str]:
  """argv with every `--config=FILE[:ARG]` (or `--config FILE[:ARG]`) resolved."""
  out = list(argv[:1])
  args = list(argv[1:])
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith("--config="):
      out.append("--config=" + resolve_config(arg[len("--config="):], checkout, cwd))
    elif arg == "--config" and i + 1 < len(args):
      out += [arg, resolve_config(args[i + 1], checkout, cwd)]
      i += 1
    else:
      out.append(arg)
    i += 1
  return out


def main(argv: Sequence[str] | None = None) -> None:
  """Console entry point `flashjax-launch`."""
  argv = list(sys.argv if argv is None else argv)
  checkout = find_checkout()
  if checkout is None:
    sys.exit("flashjax-launch needs a flashjax repository checkout (configs/ and "
             "experiments/): install flashjax with `pip install -e .` from a clone, run it "
             f"inside the clone, or set {_ENV}=/path/to/clone.")
  if checkout not in sys.path:
    sys.path.insert(0, checkout)
  from experiments import launch  # pylint: disable=import-outside-toplevel
  launch.run_main(rewrite_argv(argv, checkout))


if __name__ == "__main__":
  main()
