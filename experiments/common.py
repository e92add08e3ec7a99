"""Pieces the experiment kinds share (study-only; library code lives in flashjax/)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

from absl import flags
import jax


def under_workdir(explicit: str, field: str, *parts: str) -> str:
  """`explicit` when set, else <launcher --workdir>/<parts...>.

  Args:
    explicit: the config's own directory field (empty: not set).
    field: that field's name, for the error message.
    *parts: path below the launcher's workdir.

  Raises:
    ValueError: neither `explicit` nor a launcher --workdir is given.
  """
  if explicit:
    return explicit
  workdir = flags.FLAGS["workdir"].value if "workdir" in flags.FLAGS else None
  if not workdir:
    raise ValueError(f"config.{field} is empty and there is no launcher --workdir")
  return os.path.join(workdir, *parts)


def write_json(path: str, value: Any) -> None:
  """Writes `value` as JSON to a temporary name, then renames it (never half-written)."""
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=1)
  os.replace(path + ".tmp", path)


def rows_per_shape(path: str, shapes: Any, bench: Any) -> list[dict[str, Any]]:
  """rows = bench(*shape) for each shape in turn, all rows so far rewritten to `path` (JSON)
  after each shape, so a cut run keeps its finished shapes."""
  rows: list[dict[str, Any]] = []
  for shape in shapes:
    rows += bench(*shape)
    write_json(path, rows)
  return rows


@contextlib.contextmanager
def switched(module: Any, name: str, value: Any) -> Iterator[None]:
  """A module-level kernel switch (e.g. pallas_mosaic_gpu.INTRA_WG_OVERLAP, read when a call
  is traced) set to `value` for the block, then restored."""
  previous = getattr(module, name)
  setattr(module, name, value)
  try:
    yield
  finally:
    setattr(module, name, previous)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def interpret(config: Any) -> bool:
  """config.interpret when set, else Pallas in interpret mode exactly on a CPU."""
  if config.interpret is not None:
    return bool(config.interpret)
  return jax.default_backend() == "cpu"
