"""Saving and restoring training state: orbax-checkpoint, or flax msgpack without orbax.

A state is any pytree of arrays. It is stored flat, one entry per leaf named by its
dotted tree path ("params.layers.0.attn.q_proj"), next to a JSON-serialisable `meta` dict,
and restored into the structure of a template tree (a freshly initialised state), so
namedtuples of optax states and integer keys of nnx.List come back as they were.

Backends: "orbax" (orbax.checkpoint.CheckpointManager, one directory per step) and
"msgpack" (flax.serialization, one file `step_XXXXXXXX.msgpack` per step, written to a
temporary name and renamed). "auto" picks orbax when it imports.

Sharded states (e.g. a Trainer on a mesh): with orbax, jax.Array leaves are written as they
are, every device writing its own shards (no gather to the host), and `restore` reads each
leaf straight onto its target sharding: the template leaf's (a sharded jax.Array or a
jax.ShapeDtypeStruct with `sharding`), or the `shardings` argument's. The target mesh may
differ from the saved one (another shape or device count): orbax reads the slices each
device needs. msgpack gathers to the host on save and places the restored arrays with
jax.device_put.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
from typing import Any

import jax
import numpy as np
from flax import serialization

BACKENDS = ("auto", "orbax", "msgpack")


def _key_name(key: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _dtype(leaf: Any) -> np.dtype:
  return leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


def flatten(tree: Any) -> dict[str, Any]:
  """{dotted path: leaf} of a pytree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  flat = {".".join(_key_name(k) for k in path): leaf for path, leaf in leaves}
  if len(flat) != len(leaves):
    raise ValueError("two leaves of the state have the same dotted path")
  return flat


def unflatten_like(template: Any, flat: dict[str, Any]) -> Any:
  """The tree of `template` with every leaf taken from `flat` (shapes checked).

  Args:
    template: a pytree with the wanted structure (leaves give the expected shapes).
    flat: {dotted path: array}, e.g. from `flatten`.

  Returns:
    The restored tree.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  out = []
  for path, leaf in leaves:
    name = ".".join(_key_name(k) for k in path)
    if name not in flat:
      raise ValueError(f"checkpoint has no entry {name!r}")
    value = flat[name]
    if tuple(np.shape(value)) != tuple(np.shape(leaf)):
      raise ValueError(f"checkpoint entry {name!r} has shape {np.shape(value)}, expected "
                       f"{np.shape(leaf)}")
    if isinstance(value, jax.Array) and value.dtype == _dtype(leaf):
      out.append(value)  # restored onto its target (sharded) placement: keep it
      continue
    xp = jax.numpy if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)) else np
    out.append(xp.asarray(value, dtype=_dtype(leaf)))
  return jax.tree_util.tree_unflatten(treedef, out)


class _DropOrbaxInfo(logging.Filter):
  """Drops orbax's INFO / DEBUG records (a dozen lines per save) from the absl logger."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


@contextlib.contextmanager
def _quiet_orbax():
  logger = logging.getLogger("absl")
  drop = _DropOrbaxInfo()
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


def orbax_available() -> bool:
  try:
    import orbax.checkpoint  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


class Checkpointer:
  """Keeps the latest `max_to_keep` checkpoints of a training run in `directory`."""

  def __init__(self, directory: str, *, backend: str = "auto", max_to_keep: int = 2):
    """Opens (and creates) the checkpoint directory.

    Args:
      directory: where the checkpoints live.
      backend: "auto", "orbax" or "msgpack" (module docstring).
      max_to_keep: checkpoints kept; older ones are deleted.
    """
    if backend not in BACKENDS:
      raise ValueError(f"{backend=} must be one of {BACKENDS}")
    if backend == "auto":
      backend = "orbax" if orbax_available() else "msgpack"
    if not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(f"{max_to_keep=} must be a positive int")
    self.directory = os.path.abspath(directory)
    self.backend = backend
    self.max_to_keep = max_to_keep
    os.makedirs(self.directory, exist_ok=True)
    self._manager = None
    if backend == "orbax":
      import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
      self._ocp = ocp
      with _quiet_orbax():
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                 create=True))

  def _msgpack_path(self, step: int) -> str:
    return os.path.join(self.directory, f"step_{step:08d}.msgpack")

  def _msgpack_steps(self) -> list[int]:
    names = glob.glob(os.path.join(self.directory, "step_*.msgpack"))
    return sorted(int(m.group(1)) for m in (re.search(r"step_(\d+)\.msgpack$", n)
                                            for n in names) if m)

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    if self._manager is not None:
      return self._manager.latest_step()
    steps = self._msgpack_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Writes the state and meta of `step` (blocking until it is on disk).

    Args:
      step: the training step the state belongs to.
      state: pytree of arrays.
      meta: JSON-serialisable dict stored beside it.
    """
    if self._manager is not None:
      # jax.Arrays go to orbax as they are: each device writes its shards.
      flat = {k: v if isinstance(v, jax.Array) else np.asarray(v)
              for k, v in flatten(state).items()}
      ocp = self._ocp
      with _quiet_orbax():
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                                         meta=ocp.args.JsonSave(meta)),
                           force=True)
        self._manager.wait_until_finished()
      return
    flat = {k: np.asarray(v) for k, v in flatten(state).items()}
    payload = serialization.msgpack_serialize({"state": flat, "meta": json.dumps(meta)})
    path = self._msgpack_path(step)
    with open(path + ".tmp", "wb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    for old in self._msgpack_steps()[:-self.max_to_keep]:
      os.remove(self._msgpack_path(old))

  def restore(self, step: int, template: Any, shardings: Any = None
              ) -> tuple[Any, dict[str, Any]]:
    """Reads the checkpoint of `step` into the structure of `template`.

    Args:
      step: a saved step.
      template: pytree with the structure and shapes of the saved state (arrays or
        jax.ShapeDtypeStructs). A leaf that is a jax.Array, or a ShapeDtypeStruct with a
        sharding, is restored onto that sharding; numpy leaves come back as numpy.
      shardings: None, or a pytree of the template's structure whose leaves are
        jax.sharding.Sharding (or None: the template's placement), e.g.
        `{"params": trainer.param_shardings, ...}`; it overrides the template's.

    Returns:
      (state, meta).
    """
    targets = self._targets(template, shardings)
    flat_template = flatten(template)
    if self._manager is not None:
      ocp = self._ocp
      abstract = {k: jax.ShapeDtypeStruct(np.shape(v), _dtype(v), sharding=targets[k])
                  for k, v in flat_template.items()}
      with _quiet_orbax():
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                          meta=ocp.args.JsonRestore()))
      flat, meta = dict(restored.state), dict(restored.meta)
    else:
      path = self._msgpack_path(step)
      if not os.path.exists(path):
        raise ValueError(f"no checkpoint of {step=} in {self.directory}")
      with open(path, "rb") as f:
        payload = serialization.msgpack_restore(f.read())
      flat, meta = payload["state"], json.loads(payload["meta"])
      flat = {k: jax.device_put(np.asarray(v, _dtype(flat_template[k])), targets[k])
              if targets.get(k) is not None and k in flat_template else v
              for k, v in flat.items()}
    return unflatten_like(template, flat), meta

  @staticmethod
  def _targets(template: Any, shardings: Any) -> dict[str, Any]:
    """{dotted path: target Sharding or None} of the template's leaves."""
    targets = {k: getattr(v, "sharding", None) if isinstance(v, (jax.Array,
                                                                 jax.ShapeDtypeStruct))
               else None for k, v in flatten(template).items()}
    if shardings is None:
      return targets
    is_sharding = lambda x: x is None or isinstance(x, jax.sharding.Sharding)
    try:
      leaves = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=is_sharding)[0]
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"shardings must be a pytree of jax.sharding.Sharding: {e}") from e
    for path, sharding in leaves:
      name = ".".join(_key_name(k) for k in path)
      if name not in targets:
        raise ValueError(f"shardings has an entry {name!r} that the template lacks")
      if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
        raise ValueError(f"shardings entry {name!r} is {sharding!r}, not a "
                         f"jax.sharding.Sharding")
      if sharding is not None:
        targets[name] = sharding
    return targets

  def close(self) -> None:
    if self._manager is not None:
      with _quiet_orbax():
        self._manager.close()
