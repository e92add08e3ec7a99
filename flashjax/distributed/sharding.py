"""Sharding of the flashjax Transformer's parameters, optimizer state and KV cache.

Two tables, in the style of Flax's logical axis rules:

  PARAM_AXES    parameter path (regex over the dotted nnx path, e.g.
                "layers.0.attn.q_proj") -> a logical name per dimension ("embed", "heads", ...)
  DEFAULT_RULES logical name -> mesh axis (or axes), e.g. "embed" -> "fsdp", "heads" -> "model"

so one table serves every mesh: a logical name whose mesh axis is not in the mesh (or whose
dimension does not divide by the axis size) stays whole. With the default rules

  data:N            parameters replicated, batch split (data parallel)
  fsdp:N            d_model split over "fsdp" (FSDP / ZeRO-3: XLA all-gathers per use and
                    reduce-scatters the gradients), batch split
  model:N           heads, KV heads, MLP units and vocabulary split (tensor parallel)
  data:2,model:2    both (and data:2,fsdp:2,model:2)

A parameter no PARAM_AXES entry matches raises a ValueError naming its path (a new layer must
be added to the table rather than be silently replicated). Everything here is data
(PartitionSpec / NamedSharding trees); flashjax.models.training.Trainer(mesh=...) and
flashjax.distributed.ShardedDecoder apply them through jax.jit shardings.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flashjax.distributed import mesh as mesh_lib

_LOG = logging.getLogger("flashjax")

# (regex over the dotted parameter path without its trailing ".value", logical axes).
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed\.embedding", ("vocab", "embed")),
    (r"positions\.embedding", (None, "embed")),
    (r"lm_head", ("embed", "vocab")),
    (r".*\.attn\.q_proj", ("embed", "heads", None)),
    (r".*\.attn\.[kv]_proj", ("embed", "kv_heads", None)),
    (r".*\.attn\.o_proj", ("heads", None, "embed")),
    (r".*\.attn\.q_bias", ("heads", None)),
    (r".*\.attn\.[kv]_bias", ("kv_heads", None)),
    (r".*\.attn\.o_bias", (None,)),
    (r".*\.mlp\.(gate|up)", ("embed", "mlp")),
    (r".*\.mlp\.down", ("mlp", "embed")),
    (r".*\.mlp\.fc[12]", ("mlp", "embed")),
    (r".*\.mlp\.fc1_bias", ("mlp",)),
    (r".*\.mlp\.fc2_bias", (None,)),
    (r"(.*\.)?\w*norm\.(scale|bias)", (None,)),
)

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "vocab": "model",
}


def _key_name(key: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def param_path(path: Sequence[Any]) -> str:
  """Dotted name of a tree path, without nnx's trailing ".value"."""
  names = [_key_name(k) for k in path]
  if names and names[-1] == "value":
    names = names[:-1]
  return ".".join(names)


def logical_axes(path: str, ndim: int,
                 table: Sequence[tuple[str, tuple[str | None, ...]]] = PARAM_AXES
                 ) -> tuple[str | None, ...]:
  """The logical axes of the parameter at dotted `path` (first full match of `table`)."""
  for pattern, axes in table:
    if re.fullmatch(pattern, path):
      if len(axes) != ndim:
        raise ValueError(f"parameter {path!r} has {ndim} dims but its rule {pattern!r} names "
                         f"{len(axes)}: {axes}")
      return axes
  raise ValueError(f"no sharding rule matches parameter {path!r}; add (regex, logical axes) "
                   f"to the table (flashjax.distributed.sharding.PARAM_AXES)")


def _check_rules(rules: Mapping[str, Any]) -> None:
  if not isinstance(rules, Mapping):
    raise ValueError(f"rules={rules!r} must be a dict of logical axis -> mesh axis")
  for name, target in rules.items():
    targets = target if isinstance(target, tuple) else (target,)
    for axis in targets:
      if axis is not None and axis not in mesh_lib.MESH_AXES:
        raise ValueError(f"rules[{name!r}]={target!r} names an unknown mesh axis {axis!r} "
                         f"(known: {mesh_lib.MESH_AXES})")


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Any] | None = None, *, what: str = "array"
                    ) -> PartitionSpec:
  """PartitionSpec of an array with logical `axes` and `shape` on `mesh`.

  A logical axis maps to its rule's mesh axes that are in the mesh, not yet used by an
  earlier dimension, and whose product divides the dimension; otherwise the dimension stays
  whole (logged at DEBUG, logger "flashjax").
  """
  rules = DEFAULT_RULES if rules is None else rules
  used: set[str] = set()
  entries: list[Any] = []
  for name, dim in zip(axes, shape):
    target = rules.get(name) if name is not None else None
    targets = target if isinstance(target, tuple) else (target,)
    mesh_axes = tuple(a for a in targets if a is not None and a in mesh.axis_names
                      and a not in used)
    size = 1
    for a in mesh_axes:
      size *= mesh.shape[a]
    if mesh_axes and dim % size:
      _LOG.debug("%s: dimension %s (%d) does not divide by mesh axes %s (%d): kept whole",
                 what, name, dim, mesh_axes, size)
      mesh_axes = ()
    used.update(mesh_axes)
    entries.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1
                   else mesh_axes)
  while entries and entries[-1] is None:
    entries.pop()
  return PartitionSpec(*entries)


def param_specs(params: Any, mesh: Mesh, rules: Mapping[str, Any] | None = None,
                table: Sequence[tuple[str, tuple[str | None, ...]]] = PARAM_AXES) -> Any:
  """A PartitionSpec per leaf of a parameter tree (e.g. nnx.state(model, nnx.Param)).

  Args:
    params: pytree of arrays (or ShapeDtypeStructs) with nnx paths.
    mesh: the mesh.
    rules: logical -> mesh axis rules (default DEFAULT_RULES).
    table: path -> logical axes (default PARAM_AXES).

  Returns:
    A tree of the same structure with PartitionSpec leaves.
  """
  if rules is not None:
    _check_rules(rules)

  def spec(path, leaf):
    name = param_path(path)
    return logical_to_spec(logical_axes(name, len(leaf.shape), table), leaf.shape, mesh,
                           rules, what=name)

  return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params: Any, mesh: Mesh, rules: Mapping[str, Any] | None = None,
                    table: Sequence[tuple[str, tuple[str | None, ...]]] = PARAM_AXES) -> Any:
  """NamedSharding per leaf of a parameter tree (param_specs on `mesh`)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules, table),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_params(params: Any, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> Any:
  """The parameter tree placed on the mesh per the rules (jax.device_put)."""
  return jax.device_put(params, param_shardings(params, mesh, rules))


def shard_model(model: Any, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> Any:
  """Places an nnx model's parameters on the mesh in place (nnx.update); returns the model."""
  from flax import nnx  # pylint: disable=import-outside-toplevel  # flax only when asked for
  state = nnx.state(model, nnx.Param)
  nnx.update(model, shard_params(state, mesh, rules))
  return model


def opt_state_shardings(tx: Any, opt_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
  """NamedShardings of an optax state: parameter-shaped parts (Adam's mu / nu) follow
  `params_shardings`, everything else (counts, hyperparameters) is replicated."""
  import optax  # pylint: disable=import-outside-toplevel
  replicated = mesh_lib.replicated(mesh)
  abstract = jax.eval_shape(lambda s: s, opt_state)
  # Parameter-shaped leaves first get a marker sharding; the rest are replicated.
  mapped = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract, params_shardings,
                                 transform_non_params=lambda _: replicated)
  return mapped


def cache_specs(cache: Any, mesh: Mesh, batch_axis: str | tuple[str, ...] | None = "data",
                head_axis: str | None = "model") -> Any:
  """PartitionSpecs of a KVCache: keys / values [B, S, Nkv, H] split over (batch, -, heads,
  -), lengths [B] over batch.

  Raises:
    ValueError: an axis not in the mesh, or B / Nkv not divisible by its axis size (named).
  """
  batch_axes = (batch_axis if isinstance(batch_axis, tuple)
                else () if batch_axis is None else (batch_axis,))
  batch_size, num_kv = cache.batch_size, cache.keys[0].shape[2]
  size = 1
  for axis in batch_axes:
    if axis not in mesh.axis_names:
      raise ValueError(f"batch_axis={batch_axis!r}: {axis!r} is not an axis of the mesh "
                       f"(axes {mesh.axis_names})")
    size *= mesh.shape[axis]
  if batch_size % size:
    raise ValueError(f"cache batch size B={batch_size} must be divisible by the {size} devices "
                     f"of batch_axis={batch_axis!r}")
  if head_axis is not None:
    if head_axis not in mesh.axis_names:
      raise ValueError(f"head_axis={head_axis!r} is not an axis of the mesh "
                       f"(axes {mesh.axis_names})")
    if num_kv % mesh.shape[head_axis]:
      raise ValueError(f"cache KV heads Nkv={num_kv} must be divisible by the "
                       f"{mesh.shape[head_axis]} devices of head_axis={head_axis!r}")
  lead = None if not batch_axes else batch_axes[0] if len(batch_axes) == 1 else batch_axes
  kv = PartitionSpec(lead, None, head_axis)
  return type(cache)(keys=tuple(kv for _ in cache.keys), values=tuple(kv for _ in cache.values),
                     lengths=PartitionSpec(lead))


def default_cache_axes(mesh: Mesh, num_kv_heads: int, batch_size: int
                       ) -> tuple[tuple[str, ...] | None, str | None]:
  """(batch_axis, head_axis) for a cache on `mesh`: the mesh's batch axes when B divides by
  them (else None), "model" when it is in the mesh and divides Nkv (else None)."""
  axes = mesh_lib.batch_axes(mesh)
  batch_axis = axes if axes and batch_size % mesh_lib.batch_size_divisor(mesh) == 0 else None
  head_axis = ("model" if "model" in mesh.axis_names
               and num_kv_heads % mesh.shape["model"] == 0 else None)
  return batch_axis, head_axis
