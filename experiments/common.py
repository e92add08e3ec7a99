"""Pieces the experiment kinds share (study-only; library code lives in flashjax/)."""

from __future__ import annotations

import os

from absl import flags


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
