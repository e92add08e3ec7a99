"""Batch-size calibration of the MLP neuron union of Polar Sparsity.

At decode time a ReLU layer computes one set of fc1 units for the whole batch: the k units
with the largest batch sum of relu(router logits) (`routers.select_neurons`). The union of
units that truly fire grows with the batch size B, so k is calibrated per layer and per B:

  k_l(B) = the smallest multiple of `multiple` (128; capped at F) whose union recall,
           averaged over `num_batches` batches of B rows drawn from the collected data, is
           >= `target` (0.99).

Union recall of a batch = |fired union & selected| / |fired union|, where the fired union is
the set of units fired by at least one of the B rows (1 when nothing fired). The search
ranks units once per batch (stable descending sort of the batch score, ties to the lower
index, as `jax.lax.top_k` in select_neurons) and reads the recall of every candidate k from
the cumulative hits of that ranking.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashjax.sparsity import collect
from flashjax.sparsity.routers import NeuronRouter
from flashjax.sparsity.routers import select_neurons


def sample_batches(num_rows: int, batch_size: int, num_batches: int, seed: int) -> np.ndarray:
  """The row ids of the batches drawn for one batch size.

  Args:
    num_rows: rows N to draw from.
    batch_size: rows per batch B (distinct within a batch when B <= N).
    num_batches: batches drawn.
    seed: with B, seeds the generator (numpy default_rng((seed, B))).

  Returns:
    int [num_batches, B].
  """
  rng = np.random.default_rng((seed, batch_size))
  replace = batch_size > num_rows
  return np.stack([rng.choice(num_rows, batch_size, replace=replace)
                   for _ in range(num_batches)])


def union_recall(logits: jax.Array, fired: jax.Array, k: int) -> float:
  """Share of the batch's fired union inside select_neurons(logits, k).

  Args:
    logits: [B, F] neuron-router logits of a batch.
    fired: bool [B, F] whether each unit fired for each row.
    k: units selected for the batch.

  Returns:
    Recall in [0, 1] (1.0 when no unit fired).
  """
  union = np.asarray(fired, bool).any(axis=0)
  if not union.any():
    return 1.0
  selected = np.asarray(select_neurons(jnp.asarray(logits), k))
  return float(union[selected].sum() / union.sum())


def union_recall_curve(logits: np.ndarray, fired: np.ndarray) -> np.ndarray:
  """Union recall of one batch for every k = 1..F.

  Args:
    logits: [B, F] router logits.
    fired: bool [B, F].

  Returns:
    float64 [F]: entry k - 1 is the union recall of the top-k units.
  """
  union = np.asarray(fired, bool).any(axis=0)
  if not union.any():
    return np.ones(union.shape[0])
  scores = np.maximum(np.asarray(logits, np.float32), 0).sum(axis=0, dtype=np.float32)
  order = np.argsort(-scores, kind="stable")
  return np.cumsum(union[order]) / union.sum()


def round_up(k: int, multiple: int, limit: int) -> int:
  """k rounded up to a multiple of `multiple`, at most `limit`."""
  return min(limit, -(-k // multiple) * multiple)


def calibrate_layer(logits: np.ndarray, fired: np.ndarray, batch_sizes: Sequence[int], *,
                    target: float = 0.99, multiple: int = 128, num_batches: int = 32,
                    seed: int = 0) -> dict[int, int]:
  """k(B) of one layer from its rows' router logits and fired units.

  Args:
    logits: [N, F] router logits of the rows.
    fired: bool [N, F].
    batch_sizes: batch sizes B to calibrate.
    target: wanted mean union recall.
    multiple: k is a multiple of this (or F).
    num_batches: batches of B rows sampled per batch size.
    seed: sampling seed (batches of size B from `sample_batches(N, B, num_batches, seed)`).

  Returns:
    {B: k}, each k the smallest candidate (multiples of `multiple`, capped at F) whose
    recall averaged over the sampled batches is >= target (F always qualifies).
  """
  logits, fired = np.asarray(logits, np.float32), np.asarray(fired, bool)
  if logits.shape != fired.shape or logits.ndim != 2:
    raise ValueError(f"{logits.shape=} and {fired.shape=} must be equal [N, F]")
  if not 0 < target <= 1:
    raise ValueError(f"{target=} must lie in (0, 1]")
  num_rows, width = logits.shape
  candidates = sorted({round_up(k, multiple, width) for k in range(multiple, width + multiple,
                                                                     multiple)})
  out = {}
  for batch_size in batch_sizes:
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"{batch_size=} must be a positive int")
    rows = sample_batches(num_rows, batch_size, num_batches, seed)
    curve = np.mean([union_recall_curve(logits[r], fired[r]) for r in rows], axis=0)
    out[batch_size] = next(k for k in candidates if curve[k - 1] >= target - 1e-12 or
                           k == width)
  return out


def union_density(fired: np.ndarray, batch_size: int, *, num_batches: int = 32,
                  seed: int = 0) -> float:
  """Mean share of the F units fired by at least one of batch_size random rows.

  Args:
    fired: bool [N, F] of collected rows.
    batch_size: rows per batch B.
    num_batches: batches sampled.
    seed: sampling seed.

  Returns:
    |fired union| / F averaged over the batches.
  """
  fired = np.asarray(fired, bool)
  rows = sample_batches(fired.shape[0], batch_size, num_batches, seed)
  return float(np.mean([fired[r].any(axis=0).mean() for r in rows]))


@jax.jit
def _apply(graphdef, params, x):
  return nnx.merge(graphdef, params)(x)


def router_logits(router: NeuronRouter, x: np.ndarray, *, batch_size: int = 4096
                  ) -> np.ndarray:
  """float32 [N, F] logits of a router over rows x [N, d], in chunks of batch_size rows."""
  graphdef, params = nnx.split(router)
  return np.concatenate([np.asarray(_apply(graphdef, params, jnp.asarray(x[i:i + batch_size])))
                         for i in range(0, x.shape[0], batch_size)])


def calibrate_neuron_k(routers: Sequence[NeuronRouter | None], directory: str,
                       batch_sizes: Sequence[int], *, split: str = "val",
                       val_fraction: float = 0.1, target: float = 0.99, multiple: int = 128,
                       num_batches: int = 32, seed: int = 0
                       ) -> dict[int, tuple[int | None, ...]]:
  """k_l(B) for every layer with a neuron router, on a collection's rows.

  Args:
    routers: per layer a NeuronRouter or None.
    directory: a collection directory (flashjax.sparsity.collect) of the same model.
    batch_sizes: batch sizes B.
    split: rows used ("val" by default: not the routers' training rows).
    val_fraction: validation share of shards.
    target: wanted mean union recall.
    multiple: k rounding.
    num_batches: batches sampled per (layer, B).
    seed: sampling seed (layer l uses seed + l).

  Returns:
    {B: tuple with k per layer (None for layers without a router)}.
  """
  per_layer: list[dict[int, int] | None] = []
  for layer, router in enumerate(routers):
    if router is None:
      per_layer.append(None)
      continue
    data = collect.load_layer(directory, layer, split=split, val_fraction=val_fraction)
    if "fired" not in data:
      raise ValueError(f"layer {layer} of {directory=} has no ReLU MLP records")
    logits = router_logits(router, data["mlp_x"])
    per_layer.append(calibrate_layer(logits, data["fired"], batch_sizes, target=target,
                                     multiple=multiple, num_batches=num_batches,
                                     seed=seed + layer))
  return {b: tuple(None if ks is None else ks[b] for ks in per_layer) for b in batch_sizes}
