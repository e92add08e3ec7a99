"""Saving trained routers, head densities and calibrated neuron k's in one directory.

  save_routers(directory, routers)          # e.g. directory = <model checkpoint dir>/routers
  routers = load_routers(directory)         # RouterSet with the same router outputs
  logits, cache = model.decode_step(tokens, cache, sparsity=routers.policy())

Layout of the directory:

  routers.json   every router's shape (so the modules are rebuilt before their parameters
                 are read), the per-layer head densities, {batch size: k per layer} of the
                 neuron union and free notes (written to a temporary name, then renamed)
  params/        the router parameters through flashjax.models.checkpoint.Checkpointer
                 (orbax when it imports, else flax msgpack) as step 0, flat under
                 "head.<layer>..." and "neuron.<layer>..."

Saving again replaces the previous set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
from flax import nnx

from flashjax.models import checkpoint
from flashjax.sparsity.policy import SparsityPolicy
from flashjax.sparsity.routers import HeadRouter
from flashjax.sparsity.routers import NeuronRouter
from flashjax.sparsity.train import num_selected

FORMAT_VERSION = 1
META_FILE = "routers.json"
PARAMS_DIR = "params"


@dataclasses.dataclass
class RouterSet:
  """Everything a sparse decode needs from router training.

  Attributes:
    head_routers: per layer a HeadRouter or None (dense attention).
    neuron_routers: per layer a NeuronRouter or None (dense MLP).
    head_densities: per layer the share of KV groups kept (1.0 for dense layers).
    neuron_k: {batch size B: per layer the union size k_l(B) or None}.
    meta: free JSON-serialisable notes (metrics, data, model name).
  """

  head_routers: list[HeadRouter | None]
  neuron_routers: list[NeuronRouter | None]
  head_densities: list[float]
  neuron_k: dict[int, tuple[int | None, ...]] = dataclasses.field(default_factory=dict)
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    num_layers = len(self.head_routers)
    if len(self.neuron_routers) != num_layers or len(self.head_densities) != num_layers:
      raise ValueError(f"per-layer lists differ in length: {len(self.head_routers)=}, "
                       f"{len(self.neuron_routers)=}, {len(self.head_densities)=}")
    for batch_size, ks in self.neuron_k.items():
      if len(ks) != num_layers:
        raise ValueError(f"neuron_k[{batch_size}] has {len(ks)} entries, not {num_layers}")

  def head_k(self) -> tuple[int | None, ...]:
    """Per layer the KV groups kept, ceil(density * G), or None for layers without a router."""
    return tuple(None if r is None else num_selected(d, r.num_groups)
                 for r, d in zip(self.head_routers, self.head_densities))

  def policy(self) -> SparsityPolicy:
    """The SparsityPolicy of these routers (neuron routers only when any is set)."""
    neurons = any(r is not None for r in self.neuron_routers)
    return SparsityPolicy(self.head_routers, self.head_k(),
                          neuron_routers=self.neuron_routers if neurons else None,
                          neuron_k=self.neuron_k if neurons else None)


def _head_spec(router: HeadRouter) -> dict[str, Any]:
  d_model = (router.hidden or router.out).in_features
  hidden = router.hidden.out_features if router.hidden is not None else None
  return {"d_model": d_model, "num_groups": router.num_groups, "hidden": hidden}


def _neuron_spec(router: NeuronRouter) -> dict[str, Any]:
  return {"d_model": router.down.in_features, "d_ff": router.d_ff,
          "rank": router.down.out_features}


def _build(specs: list[dict[str, Any] | None], make) -> list[Any]:
  return [None if s is None else make(s) for s in specs]


def _state(routers: list[Any]) -> dict[str, Any]:
  return {str(l): nnx.state(r, nnx.Param) for l, r in enumerate(routers) if r is not None}


def save_routers(directory: str, routers: RouterSet) -> None:
  """Writes a RouterSet to directory (replacing one saved there before).

  Args:
    directory: target directory (created).
    routers: the routers, densities and k's.
  """
  meta = {
      "format_version": FORMAT_VERSION,
      "head": [None if r is None else _head_spec(r) for r in routers.head_routers],
      "neuron": [None if r is None else _neuron_spec(r) for r in routers.neuron_routers],
      "head_densities": [float(d) for d in routers.head_densities],
      "neuron_k": {str(b): list(ks) for b, ks in routers.neuron_k.items()},
      "meta": routers.meta,
  }
  text = json.dumps(meta, indent=1)  # fails before anything is written if not serialisable
  params_dir = os.path.join(directory, PARAMS_DIR)
  if os.path.isdir(params_dir):
    shutil.rmtree(params_dir)
  os.makedirs(directory, exist_ok=True)
  state = {"head": _state(routers.head_routers), "neuron": _state(routers.neuron_routers)}
  if jax.tree.leaves(state):
    saver = checkpoint.Checkpointer(params_dir, max_to_keep=1)
    try:
      saver.save(0, state, {"format_version": FORMAT_VERSION})
    finally:
      saver.close()
  path = os.path.join(directory, META_FILE)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def load_routers(directory: str) -> RouterSet:
  """Reads a RouterSet written by `save_routers`.

  Args:
    directory: the directory given to save_routers.

  Returns:
    RouterSet with routers rebuilt in float32 and their saved parameters.
  """
  path = os.path.join(directory, META_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{directory=} holds no {META_FILE} (no saved routers)")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"routers in {directory=} have format {meta.get('format_version')}, "
                     f"expected {FORMAT_VERSION}")
  rngs = nnx.Rngs(0)
  heads = _build(meta["head"], lambda s: HeadRouter(s["d_model"], s["num_groups"],
                                                    hidden=s["hidden"], rngs=rngs))
  neurons = _build(meta["neuron"], lambda s: NeuronRouter(s["d_model"], s["d_ff"],
                                                          rank=s["rank"], rngs=rngs))
  state = {"head": _state(heads), "neuron": _state(neurons)}
  if jax.tree.leaves(state):
    loader = checkpoint.Checkpointer(os.path.join(directory, PARAMS_DIR), max_to_keep=1)
    try:
      step = loader.latest_step()
      if step is None:
        raise ValueError(f"{directory=} holds no saved router parameters")
      state, _ = loader.restore(step, state)
    finally:
      loader.close()
  for routers, saved in ((heads, state["head"]), (neurons, state["neuron"])):
    for layer, params in saved.items():
      nnx.update(routers[int(layer)], params)
  neuron_k = {int(b): tuple(ks) for b, ks in meta["neuron_k"].items()}
  return RouterSet(head_routers=heads, neuron_routers=neurons,
                   head_densities=list(meta["head_densities"]), neuron_k=neuron_k,
                   meta=meta["meta"])
