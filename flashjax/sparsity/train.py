"""Training the routers of Polar Sparsity on collected data (flashjax.sparsity.collect).

Head routers (one per layer, layer 0 dense): input the layer's post-norm attention input,
labels the top-k KV groups of each row by output norm (k = ceil(density * G)), loss a
weighted binary cross-entropy, optimizer optax AdamW, a fixed number of epochs with early
stop on the validation top-k recall; the parameters of the best-recall epoch are kept.

Neuron routers (ReLU MLPs): input the post-norm MLP input, labels whether each fc1 unit
fired, the same weighted loss; early stop on the recall at the oracle budget (module
functions below).

Weighted BCE (Polar Sparsity's): with w = mean(y) over the training labels (the positive
rate), every element is weighted y * (1 - w) + w: positives 1, negatives w, so the many
negatives of a sparse label count less.

Layer importance (for per-layer head densities): at the target density with
k = ceil(target * G), importance_l = 1 - mean over rows of (sum of the row's k largest group
scores / sum of all its group scores), the share of the layer's head-output norm mass that
keeping only its top-k groups would drop. A layer whose mass is concentrated in a few
groups loses little and gets a lower density; `densities_from_importance` maps importances
to densities proportional to them, clamped to [0.2, 1.0], with the mean over the routed
layers equal to the target.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flashjax.sparsity import collect
from flashjax.sparsity.routers import HeadRouter
from flashjax.sparsity.routers import NeuronRouter


@dataclasses.dataclass(frozen=True)
class RouterTrainConfig:
  """Optimisation settings of router training.

  Attributes:
    epochs: maximum passes over the training rows.
    batch_size: rows per AdamW step.
    learning_rate: AdamW learning rate (constant).
    weight_decay: AdamW weight decay.
    patience: stop after this many epochs without a better validation recall; None: run
      all epochs.
    seed: router initialisation and shuffling seed.
    eval_batch_size: rows per evaluation call.
  """

  epochs: int = 20
  batch_size: int = 256
  learning_rate: float = 1e-3
  weight_decay: float = 1e-2
  patience: int | None = 3
  seed: int = 0
  eval_batch_size: int = 4096

  def __post_init__(self):
    for name in ("epochs", "batch_size", "eval_batch_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
      raise ValueError(f"patience={self.patience!r} must be None or a positive int")
    if not self.learning_rate > 0 or self.weight_decay < 0:
      raise ValueError(f"learning_rate={self.learning_rate} must be > 0 and "
                       f"weight_decay={self.weight_decay} >= 0")


def num_selected(density: float, n: int) -> int:
  """k = ceil(density * n), clamped to [1, n] (rounding noise of density * n ignored)."""
  if not 0 < density <= 1:
    raise ValueError(f"{density=} must lie in (0, 1]")
  return min(n, max(1, math.ceil(round(density * n, 6))))


def topk_labels(scores: np.ndarray, k: int) -> np.ndarray:
  """Labels of the k highest scores of each row.

  Args:
    scores: [N, G] group scores.
    k: groups per row, 1 <= k <= G (ties broken towards the lower index).

  Returns:
    bool [N, G] with exactly k True per row.
  """
  scores = np.asarray(scores)
  if not 1 <= k <= scores.shape[-1]:
    raise ValueError(f"{k=} must lie in [1, G={scores.shape[-1]}]")
  top = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
  labels = np.zeros(scores.shape, bool)
  np.put_along_axis(labels, top, True, axis=-1)
  return labels


def bce_weights(labels: jax.Array, w: float | jax.Array) -> jax.Array:
  """Per-element weights y * (1 - w) + w of the weighted BCE (Polar Sparsity's).

  Args:
    labels: [..., C] 0/1 labels y.
    w: positive rate mean(y) of the training labels.

  Returns:
    float32 weights of labels' shape: positives 1, negatives w (the rarer the positives,
    the less the many negatives count).
  """
  y = jnp.asarray(labels, jnp.float32)
  return y * (1.0 - w) + w


def weighted_bce(logits: jax.Array, labels: jax.Array, w: float | jax.Array) -> jax.Array:
  """Mean over elements of bce_weights(labels, w) * BCE(sigmoid(logits), labels).

  Args:
    logits: [..., C] router logits.
    labels: [..., C] 0/1 labels.
    w: positive rate of the training labels.

  Returns:
    float32 scalar loss.
  """
  y = jnp.asarray(labels, jnp.float32)
  losses = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), y)
  return jnp.mean(bce_weights(y, w) * losses)


def _topk_counts(logits: jax.Array, labels: jax.Array, k: int) -> dict[str, jax.Array]:
  top = jax.lax.top_k(logits, k)[1]
  hits = jnp.take_along_axis(jnp.asarray(labels, jnp.float32), top, axis=-1)
  return {"hits": jnp.sum(hits) / k, "total": jnp.float32(logits.shape[0])}


def _oracle_counts(logits: jax.Array, fired: jax.Array) -> dict[str, jax.Array]:
  fired = jnp.asarray(fired, bool)
  counts = jnp.sum(fired, axis=-1, keepdims=True)
  ranks = jnp.argsort(jnp.argsort(-logits, axis=-1), axis=-1)
  predicted = logits > 0
  return {"hits": jnp.sum((ranks < counts) & fired).astype(jnp.float32),
          "total": jnp.sum(counts).astype(jnp.float32),
          "threshold_hits": jnp.sum(predicted & fired).astype(jnp.float32),
          "predicted": jnp.sum(predicted).astype(jnp.float32),
          "elements": jnp.float32(logits.size)}


def _ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  return jnp.where(denominator > 0, numerator / jnp.maximum(denominator, 1), 1.0)


def topk_recall(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Mean over rows of |top-k(logits) & labels| / k (head routers; labels hold k per row).

  Args:
    logits: [N, G].
    labels: [N, G] bool, k True per row.
    k: groups selected per row.

  Returns:
    float32 scalar in [0, 1].
  """
  counts = _topk_counts(logits, labels, k)
  return _ratio(counts["hits"], counts["total"]).astype(jnp.float32)


def oracle_budget_recall(logits: jax.Array, fired: jax.Array) -> jax.Array:
  """Recall of fired units when each row keeps as many top-scoring units as actually fired.

  Pooled over rows: sum_r |top-n_r(logits_r) & fired_r| / sum_r n_r, n_r = fired units of
  row r (threshold-free, and selecting all units scores no better than chance).

  Args:
    logits: [N, F] neuron-router logits.
    fired: [N, F] bool.

  Returns:
    float32 scalar in [0, 1] (1 when nothing fired).
  """
  counts = _oracle_counts(logits, fired)
  return _ratio(counts["hits"], counts["total"]).astype(jnp.float32)


def threshold_metrics(logits: jax.Array, fired: jax.Array) -> dict[str, jax.Array]:
  """Recall of fired units among logits > 0 and the share of units predicted (> 0)."""
  counts = _oracle_counts(logits, fired)
  return {"recall": _ratio(counts["threshold_hits"], counts["total"]),
          "predicted_density": counts["predicted"] / counts["elements"]}


@functools.lru_cache(maxsize=None)
def _adamw(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
  """One optimizer object per setting, so the jitted step is compiled once per router shape."""
  return optax.adamw(learning_rate, weight_decay=weight_decay)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_step(graphdef, tx, params, opt_state, x, y, w):
  def loss_fn(p):
    return weighted_bce(nnx.merge(graphdef, p)(x), y, w)
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnums=(0, 1))
def _chunk_counts(graphdef, k, params, x, y):
  logits = nnx.merge(graphdef, params)(x)
  return _oracle_counts(logits, y) if k is None else _topk_counts(logits, y, k)


def _evaluate(graphdef, params, x: np.ndarray, y: np.ndarray, k: int | None,
              batch_size: int) -> dict[str, float]:
  """Counts of `_topk_counts` (k given) or `_oracle_counts` (k None), summed over chunks."""
  totals: dict[str, float] = {}
  for i in range(0, x.shape[0], batch_size):
    counts = _chunk_counts(graphdef, k, params, jnp.asarray(x[i:i + batch_size]),
                           jnp.asarray(y[i:i + batch_size]))
    for name, value in counts.items():
      totals[name] = totals.get(name, 0.0) + float(value)
  return totals


def _fit(router: nnx.Module, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
         y_val: np.ndarray, k: int | None, config: RouterTrainConfig
         ) -> tuple[nnx.Module, dict[str, Any]]:
  """AdamW on the weighted BCE with early stop on the validation recall (top-k recall with
  k given, else the oracle-budget recall)."""
  if x_train.shape[0] != y_train.shape[0] or x_val.shape[0] != y_val.shape[0]:
    raise ValueError(f"rows differ: {x_train.shape=} {y_train.shape=} {x_val.shape=} "
                     f"{y_val.shape=}")
  if x_train.shape[0] == 0 or x_val.shape[0] == 0:
    raise ValueError("router training needs training and validation rows")
  w = float(np.mean(y_train))
  graphdef, params = nnx.split(router, nnx.Param)
  tx = _adamw(config.learning_rate, config.weight_decay)
  opt_state = tx.init(params)
  rng = np.random.default_rng(config.seed)
  n = x_train.shape[0]
  batch = min(config.batch_size, n)
  metrics = {"train_loss": [], "val_recall": [], "positive_rate": w}
  best_recall, best_epoch, best_params, stale = -1.0, -1, params, 0
  for epoch in range(config.epochs):
    order = rng.permutation(n)
    losses = []
    for start in range(0, n - batch + 1, batch):  # full batches only: one compilation
      rows = order[start:start + batch]
      params, opt_state, loss = _train_step(graphdef, tx, params, opt_state,
                                            jnp.asarray(x_train[rows]),
                                            jnp.asarray(y_train[rows]), w)
      losses.append(loss)
    metrics["train_loss"].append(float(jnp.mean(jnp.stack(losses))))
    counts = _evaluate(graphdef, params, x_val, y_val, k, config.eval_batch_size)
    recall = float(_ratio(counts["hits"], counts["total"]))
    metrics["val_recall"].append(recall)
    if recall > best_recall:
      best_recall, best_epoch, best_params, stale = recall, epoch, params, 0
    else:
      stale += 1
      if config.patience is not None and stale >= config.patience:
        break
  metrics.update(best_recall=best_recall, best_epoch=best_epoch,
                 epochs_run=len(metrics["val_recall"]))
  if k is None:
    counts = _evaluate(graphdef, best_params, x_val, y_val, None, config.eval_batch_size)
    metrics["threshold_recall"] = float(_ratio(counts["threshold_hits"], counts["total"]))
    metrics["predicted_density"] = counts["predicted"] / counts["elements"]
  return nnx.merge(graphdef, best_params), metrics


def _check_rows(name: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x, np.float32), np.asarray(y)
  if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
    raise ValueError(f"{name}: x [N, d] and labels [N, C] expected, got {x.shape=} "
                     f"{y.shape=}")
  return x, y


def train_head_router(x_train: np.ndarray, scores_train: np.ndarray, x_val: np.ndarray,
                      scores_val: np.ndarray, *, density: float, hidden: int | None = None,
                      config: RouterTrainConfig = RouterTrainConfig()
                      ) -> tuple[HeadRouter, dict[str, Any]]:
  """Trains one layer's head router on its collected rows.

  Args:
    x_train: [N, d] post-norm attention inputs.
    scores_train: [N, G] group scores (output norms); labels are each row's top-k groups,
      k = ceil(density * G).
    x_val: [M, d] validation inputs.
    scores_val: [M, G] validation group scores.
    density: share of groups kept, in (0, 1].
    hidden: None for Linear(d, G), else the hidden width of d -> hidden -> G.
    config: optimisation settings.

  Returns:
    (the HeadRouter of the best validation epoch, metrics {"train_loss": [per epoch],
    "val_recall": [per epoch], "best_recall", "best_epoch", "epochs_run", "positive_rate",
    "k"}); val recall = mean |top-k(router) & top-k(scores)| / k.
  """
  x_train, scores_train = _check_rows("train", x_train, scores_train)
  x_val, scores_val = _check_rows("val", x_val, scores_val)
  groups = scores_train.shape[1]
  k = num_selected(density, groups)
  router = HeadRouter(x_train.shape[1], groups, hidden=hidden, rngs=nnx.Rngs(config.seed))
  router, metrics = _fit(router, x_train, topk_labels(scores_train, k), x_val,
                         topk_labels(scores_val, k), k, config)
  metrics["k"] = k
  return router, metrics


def train_neuron_router(x_train: np.ndarray, fired_train: np.ndarray, x_val: np.ndarray,
                        fired_val: np.ndarray, *, rank: int = 128,
                        config: RouterTrainConfig = RouterTrainConfig()
                        ) -> tuple[NeuronRouter, dict[str, Any]]:
  """Trains one ReLU layer's neuron router on "fired" labels.

  Args:
    x_train: [N, d] post-norm MLP inputs.
    fired_train: bool [N, F] whether each fc1 unit fired.
    x_val: [M, d].
    fired_val: bool [M, F].
    rank: low-rank width r of the router.
    config: optimisation settings.

  Returns:
    (the NeuronRouter of the best validation epoch, metrics as in `train_head_router`, with
    val recall = `oracle_budget_recall`, plus "threshold_recall" and "predicted_density" of
    logits > 0 for the kept parameters).
  """
  x_train, fired_train = _check_rows("train", x_train, fired_train)
  x_val, fired_val = _check_rows("val", x_val, fired_val)
  router = NeuronRouter(x_train.shape[1], fired_train.shape[1], rank=rank,
                        rngs=nnx.Rngs(config.seed))
  return _fit(router, x_train, fired_train.astype(bool), x_val, fired_val.astype(bool), None,
              config)


def layer_importance(group_scores: np.ndarray, density: float) -> float:
  """1 - the mean share of a row's group-score mass in its top-k groups (module docstring).

  Args:
    group_scores: [N, G] nonnegative group scores (output norms) of one layer.
    density: target density; k = ceil(density * G).

  Returns:
    Importance in [0, 1): 0 when the top-k groups hold all the mass of every row.
  """
  scores = np.asarray(group_scores, np.float64)
  k = num_selected(density, scores.shape[-1])
  top = -np.sort(-scores, axis=-1)[:, :k].sum(-1)
  total = scores.sum(-1)
  captured = np.where(total > 0, top / np.where(total > 0, total, 1.0), 1.0)
  return float(1.0 - captured.mean())


def densities_from_importance(importance: Sequence[float], target: float, *,
                              lo: float = 0.2, hi: float = 1.0) -> np.ndarray:
  """Per-layer densities clip(s * importance, lo, hi) with mean equal to target.

  The scale s is found by bisection (the clipped mean grows with s); importances are
  floored at 1e-6 of the largest so every layer can reach `hi`. All-zero importances give
  every layer the target.

  Args:
    importance: [L] nonnegative importances of the routed layers.
    target: wanted mean density, in [lo, hi].
    lo: smallest density.
    hi: largest density.

  Returns:
    float64 [L] densities in [lo, hi], mean = target (to ~1e-9), ordered like importance.
  """
  imp = np.asarray(importance, np.float64)
  if imp.ndim != 1 or imp.size == 0 or np.any(imp < 0) or not np.all(np.isfinite(imp)):
    raise ValueError(f"importance={imp} must be a non-empty 1-d array of finite values >= 0")
  if not 0 < lo <= target <= hi <= 1:
    raise ValueError(f"need 0 < {lo=} <= {target=} <= {hi=} <= 1")
  if imp.max() == 0 or target == lo or target == hi:
    return np.full(imp.shape, float(target))
  imp = np.maximum(imp, 1e-6 * imp.max())

  def mean_density(scale: float) -> float:
    return float(np.clip(scale * imp, lo, hi).mean())

  low, high = 0.0, hi / imp.min()  # mean_density(high) = hi >= target
  for _ in range(200):
    mid = 0.5 * (low + high)
    if mean_density(mid) < target:
      low = mid
    else:
      high = mid
  return np.clip(high * imp, lo, hi)


def head_densities(directory: str, target: float, *, dense_layers: Sequence[int] = (0,),
                   split: str = "train", val_fraction: float = 0.1, lo: float = 0.2,
                   hi: float = 1.0) -> tuple[list[float], list[float | None]]:
  """Per-layer head densities of a collection from layer importance.

  Args:
    directory: a collection directory (flashjax.sparsity.collect).
    target: mean density of the routed layers.
    dense_layers: layers kept dense (density 1.0, no router, not in the mean).
    split: shards measured ("train", "val" or "all").
    val_fraction: validation share of shards (see collect.split_shards).
    lo: smallest density of a routed layer.
    hi: largest density of a routed layer.

  Returns:
    (densities per layer, importance per layer (None for dense layers)).
  """
  num_layers = collect.read_meta(directory)["num_layers"]
  routed = [l for l in range(num_layers) if l not in set(dense_layers)]
  importance: list[float | None] = [None] * num_layers
  for l in routed:
    scores = collect.load_layer(directory, l, split=split, val_fraction=val_fraction)
    importance[l] = layer_importance(scores["group_scores"], target)
  densities = [1.0] * num_layers
  if routed:
    values = densities_from_importance([importance[l] for l in routed], target, lo=lo, hi=hi)
    for l, d in zip(routed, values):
      densities[l] = float(d)
  return densities, importance


def train_head_routers(directory: str, densities: Sequence[float], *,
                       hidden: int | None = None, dense_layers: Sequence[int] = (0,),
                       config: RouterTrainConfig = RouterTrainConfig(),
                       val_fraction: float = 0.1
                       ) -> tuple[list[HeadRouter | None], list[dict[str, Any] | None]]:
  """A head router per layer of a collection (None for dense layers).

  Args:
    directory: a collection directory.
    densities: [num_layers] head density of each layer (e.g. from `head_densities`).
    hidden: router hidden width (None: linear).
    dense_layers: layers without a router.
    config: optimisation settings.
    val_fraction: validation share of shards.

  Returns:
    (routers per layer, metrics per layer).
  """
  num_layers = collect.read_meta(directory)["num_layers"]
  if len(densities) != num_layers:
    raise ValueError(f"{len(densities)=} must equal num_layers={num_layers}")
  routers: list[HeadRouter | None] = [None] * num_layers
  metrics: list[dict[str, Any] | None] = [None] * num_layers
  for l in range(num_layers):
    if l in set(dense_layers):
      continue
    train = collect.load_layer(directory, l, split="train", val_fraction=val_fraction)
    val = collect.load_layer(directory, l, split="val", val_fraction=val_fraction)
    routers[l], metrics[l] = train_head_router(
        train["attn_x"], train["group_scores"], val["attn_x"], val["group_scores"],
        density=densities[l], hidden=hidden, config=config)
  return routers, metrics


def train_neuron_routers(directory: str, *, rank: int = 128, dense_layers: Sequence[int] = (),
                         config: RouterTrainConfig = RouterTrainConfig(),
                         val_fraction: float = 0.1
                         ) -> tuple[list[NeuronRouter | None], list[dict[str, Any] | None]]:
  """A neuron router per ReLU layer of a collection (None for other and dense layers).

  Args:
    directory: a collection directory.
    rank: low-rank width of the routers.
    dense_layers: layers without a router.
    config: optimisation settings.
    val_fraction: validation share of shards.

  Returns:
    (routers per layer, metrics per layer).
  """
  meta = collect.read_meta(directory)
  routers: list[NeuronRouter | None] = [None] * meta["num_layers"]
  metrics: list[dict[str, Any] | None] = [None] * meta["num_layers"]
  for l in meta["relu_layers"]:
    if l in set(dense_layers):
      continue
    train = collect.load_layer(directory, l, split="train", val_fraction=val_fraction)
    val = collect.load_layer(directory, l, split="val", val_fraction=val_fraction)
    routers[l], metrics[l] = train_neuron_router(train["mlp_x"], train["fired"],
                                                 val["mlp_x"], val["fired"], rank=rank,
                                                 config=config)
  return routers, metrics
