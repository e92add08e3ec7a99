"""What every study config shares: its variants, and which one runs on a CPU host.

A config module lists its variants (the `ARG` of `--config=FILE:ARG`) in a module-level
`VARIANTS` dict of `Variant`s and calls `choose_variant` in `get_config`:

  VARIANTS = {"gpu": Variant("..."), "full": Variant("..."), "cpu": Variant("...", cpu=True)}

  def get_config(arg=None):
    arg = common.choose_variant(arg, VARIANTS, default="full")
    ...
    common.tag(c, arg, VARIANTS)

* No argument: the default variant, except on a host where JAX runs on CPU, which gets the
  config's CPU variant (tiny shapes, Pallas in interpret mode) and says so in the log.
* An explicit variant is built as asked (tests inspect the GPU grids on a CPU).
* `tag` records the variant in the config (`study_variant`), so that the launcher refuses a
  GPU-sized variant on a CPU host with a message naming the CPU variant to run instead
  (`check_platform`; `--allow_interpret` runs it anyway, in interpret mode).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from absl import logging
import jax
import ml_collections

# The config field that records the variant (excluded from the launcher's resume check).
FIELD = "study_variant"


@dataclasses.dataclass(frozen=True)
class Variant:
  """One `--config=FILE:ARG` variant of a study config.

  Attributes:
    summary: one line for `launch --help` (shapes, points, expected time).
    cpu: sized for a CPU host (tiny shapes, Pallas in interpret mode).
  """
  summary: str
  cpu: bool = False


def on_cpu() -> bool:
  """Whether JAX's default backend is the CPU."""
  return jax.default_backend() == "cpu"


def cpu_variant(variants: Mapping[str, Variant]) -> str | None:
  """Name of the first CPU-sized variant, or None when the config has none."""
  return next((name for name, v in variants.items() if v.cpu), None)


def choose_variant(arg: str | None, variants: Mapping[str, Variant], *, default: str,
                   cpu: bool | None = None) -> str:
  """The variant `get_config(arg)` builds.

  Args:
    arg: the `:ARG` of `--config=FILE:ARG`; None or "" picks the default.
    variants: the config's VARIANTS.
    default: the variant without an argument on an accelerator host.
    cpu: whether JAX runs on CPU (default: asks JAX).

  Returns:
    `arg` when given (validated by the caller's own checks), else the CPU variant on a CPU
    host, else `default`.
  """
  if arg:
    return arg
  cpu_name = cpu_variant(variants)
  if cpu_name is not None and (on_cpu() if cpu is None else cpu):
    if cpu_name != default:
      logging.info("JAX runs on CPU: using the %r variant (tiny shapes, Pallas in interpret "
                   "mode); pass :%s for the %r grid", cpu_name, default, default)
    return cpu_name
  return default


def tag(c: ml_collections.ConfigDict, name: str, variants: Mapping[str, Variant], *,
        cpu_alternative: str = "") -> None:
  """Records variant `name` in `c.study_variant` (name, cpu, cpu_variant).

  Args:
    c: the config being built.
    name: the variant it was built as.
    variants: the config's VARIANTS.
    cpu_alternative: for a config without a CPU variant, the `FILE:ARG` a CPU host should
      run instead (named in the launcher's refusal).
  """
  if name not in variants:
    raise ValueError(f"variant {name!r} is not one of {sorted(variants)}")
  with c.unlocked():
    c[FIELD] = ml_collections.ConfigDict(
        {"name": name, "cpu": variants[name].cpu,
         "cpu_variant": cpu_variant(variants) or cpu_alternative})


def platform_problem(config: ml_collections.ConfigDict | Mapping, config_file: str, *,
                     cpu: bool | None = None) -> str | None:
  """Why `config` should not run on this host, or None.

  A variant sized for an accelerator (its `study_variant.cpu` is False) would run its GPU
  grid in interpret mode on a CPU host: hours, not minutes.

  Args:
    config: the study config (ConfigDict or its JSON dict).
    config_file: the config file as given to `--config` (without `:ARG`), for the message.
    cpu: whether JAX runs on CPU (default: asks JAX).

  Returns:
    The message naming the variant to run instead, or None when the config fits the host
    (or records no variant).
  """
  info = config.get(FIELD) if hasattr(config, "get") else None
  if not info or info["cpu"] or not (on_cpu() if cpu is None else cpu):
    return None
  name, cpu_name = info["name"], info["cpu_variant"]
  message = (f"--config={config_file}:{name} is sized for a GPU, and JAX runs on CPU here "
             "(its Pallas kernels would run in interpret mode for hours). ")
  if cpu_name and ".py" in cpu_name:
    message += (f"This config has no CPU variant; run --config={cpu_name} instead (tiny "
                "shapes)")
  elif cpu_name:
    message += (f"Run --config={config_file}:{cpu_name} instead (tiny shapes, the same "
                "code paths)")
  else:
    message += ("This config has no CPU variant; --config=configs/quickstart.py:cpu runs the "
                "attention backends on a CPU")
  return message + ", or pass --allow_interpret to run it anyway."
