"""pytest setup shared by all flashjax tests.

Tests run on CPU (Pallas backends in interpret mode): unless the caller chose a platform
with JAX_PLATFORMS, it is set to "cpu" before any test imports JAX. The exception is a run
that selects the GPU tests with a marker expression, e.g.

  python -m pytest -m gpu

There JAX picks its default platform (the GPU when one is present and jax[cuda] is
installed); the GPU tests skip themselves when JAX finds no GPU. A run selects the GPU
tests when its `-m` expression accepts a test marked `gpu` and rejects an unmarked one
("gpu", "gpu and not slow", "gpu or slow"); the default run ("not slow") stays on CPU.

A CPU run also gets XLA_FLAGS (read when JAX starts its backends, after this hook): 8 fake
host devices (--xla_force_host_platform_device_count=8) for the sharding tests of
tests/distributed, and XLA's CPU code generated without LLVM's optimisations
(--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true): the tests
compile many small programs and run each a few times, so compile time dominates; on 2 cores
this cut the suite's time by about a third (tests/models/test_transformer.py 67 -> 42 s).
HLO-level passes (fusion, layout) still run, so every test's program has the same structure.
A flag the caller's XLA_FLAGS already sets keeps the caller's value.
"""

from __future__ import annotations

import os

import pytest


def selects_gpu_tests(markexpr: str | None) -> bool:
  """Whether a `-m` expression asks for the GPU tests (see the module docstring)."""
  if not markexpr or not markexpr.strip():
    return False
  try:
    from _pytest.mark.expression import Expression  # pylint: disable=import-outside-toplevel
    expression = Expression.compile(markexpr)
    try:  # pytest >= 8.3 passes keyword arguments to the matcher
      wants_gpu = expression.evaluate(lambda name, **kwargs: name == "gpu")
      wants_plain = expression.evaluate(lambda name, **kwargs: False)
    except TypeError:
      wants_gpu = expression.evaluate(lambda name: name == "gpu")
      wants_plain = expression.evaluate(lambda name: False)
  except Exception:  # pylint: disable=broad-except  # unknown pytest internals or syntax
    words = markexpr.replace("(", " ").replace(")", " ").split()
    return "gpu" in words and "not" not in words[max(0, words.index("gpu") - 1):][:1]
  return wants_gpu and not wants_plain


def jax_platforms(markexpr: str | None, environ: dict[str, str]) -> str | None:
  """The JAX_PLATFORMS value the run gets: the caller's, else "cpu" unless GPU tests run."""
  if environ.get("JAX_PLATFORMS"):
    return environ["JAX_PLATFORMS"]
  return None if selects_gpu_tests(markexpr) else "cpu"


def pytest_configure(config: pytest.Config) -> None:
  platforms = jax_platforms(config.getoption("markexpr", None), dict(os.environ))
  if platforms is not None:
    os.environ["JAX_PLATFORMS"] = platforms
  if platforms == "cpu":
    os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))


CPU_DEVICE_COUNT = 8

# XLA flags of a CPU test run (see the module docstring); a flag the caller sets is kept.
CPU_XLA_FLAGS = {
    "xla_force_host_platform_device_count": str(CPU_DEVICE_COUNT),
    "xla_backend_optimization_level": "0",
    "xla_llvm_disable_expensive_passes": "true",
}


def xla_flags(flags: str) -> str:
  """flags with CPU_XLA_FLAGS added, except those the caller's flags already set."""
  added = [f"--{name}={value}" for name, value in CPU_XLA_FLAGS.items()
           if f"--{name}=" not in flags]
  return " ".join([flags.strip(), *added]).strip()
