"""Latency predictors: a small MLP (HAT: 3 x 400 hidden, ReLU) and a linear cost baseline.

  pred = fit_mlp(x_train, y_train, hidden=(400, 400, 400), steps=2000)
  pred.predict(x_test); metrics(y_test, pred.predict(x_test))  # rmse, mape, r2
  base = fit_linear(cost_train, y_train)                       # least squares on counts

Inputs of the MLP are standardised with the training mean / std per feature (constant
features pass through), the target is predicted in log space (latencies span orders of
magnitude; exp of the output is the prediction), trained with Adam (optax) on the mean
squared error, full batch. Predictors save to / load from JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
  """RMSE (same unit as y), MAPE (%) and R^2 of predictions."""
  y_true = np.asarray(y_true, np.float64)
  y_pred = np.asarray(y_pred, np.float64)
  if y_true.shape != y_pred.shape or y_true.ndim != 1 or y_true.size < 2:
    raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal 1-d "
                     "shapes with at least 2 values")
  if np.any(y_true <= 0):
    raise ValueError("y_true must be positive (latencies) for the MAPE")
  err = y_pred - y_true
  total = np.sum((y_true - y_true.mean()) ** 2)
  return {"rmse": float(np.sqrt(np.mean(err ** 2))),
          "mape": float(100 * np.mean(np.abs(err) / y_true)),
          "r2": float(1 - np.sum(err ** 2) / total) if total > 0 else float("nan")}


def _check_xy(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.float32)
  if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] < 2:
    raise ValueError(f"x {x.shape} must be [N, F] and y {y.shape} [N], N >= 2")
  if np.any(y <= 0):
    raise ValueError("y must be positive (the MLP predicts log latency)")
  return x, y


def _init(key: jax.Array, sizes: Sequence[int]) -> list[dict[str, jax.Array]]:
  params = []
  for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
    key, sub = jax.random.split(key)
    params.append({"w": jax.random.normal(sub, (fan_in, fan_out)) * np.sqrt(2.0 / fan_in),
                   "b": jnp.zeros((fan_out,))})
  return params


def _forward(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return (x @ params[-1]["w"] + params[-1]["b"])[:, 0]


@dataclasses.dataclass
class MLPPredictor:
  """A trained MLP latency predictor (log-space output)."""

  params: list[dict[str, Any]]
  x_mean: np.ndarray
  x_std: np.ndarray
  y_mean: float
  y_std: float

  def predict(self, x: Any) -> np.ndarray:
    """Latencies of feature rows x [N, F] (or one row [F])."""
    x = np.asarray(x, np.float32)
    single = x.ndim == 1
    x = x[None] if single else x
    if x.ndim != 2 or x.shape[1] != self.x_mean.shape[0]:
      raise ValueError(f"x.shape={x.shape} must be [N, {self.x_mean.shape[0]}]")
    z = _forward(self.params, jnp.asarray((x - self.x_mean) / self.x_std))
    out = np.exp(np.asarray(z) * self.y_std + self.y_mean)
    return out[0] if single else out

  def to_json(self) -> dict[str, Any]:
    return {"params": [{k: np.asarray(v).tolist() for k, v in layer.items()}
                       for layer in self.params],
            "x_mean": self.x_mean.tolist(), "x_std": self.x_std.tolist(),
            "y_mean": self.y_mean, "y_std": self.y_std}

  @classmethod
  def from_json(cls, value: dict[str, Any]) -> "MLPPredictor":
    params = [{k: jnp.asarray(np.asarray(v, np.float32)) for k, v in layer.items()}
              for layer in value["params"]]
    return cls(params, np.asarray(value["x_mean"], np.float32),
               np.asarray(value["x_std"], np.float32), float(value["y_mean"]),
               float(value["y_std"]))

  def save(self, path: str) -> None:
    with open(path + ".tmp", "w") as f:
      json.dump(self.to_json(), f)
    os.replace(path + ".tmp", path)

  @classmethod
  def load(cls, path: str) -> "MLPPredictor":
    with open(path) as f:
      return cls.from_json(json.load(f))


def fit_mlp(x: Any, y: Any, *, hidden: Sequence[int] = (400, 400, 400), steps: int = 2000,
            lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0) -> MLPPredictor:
  """Trains an MLP on (features x [N, F], positive latencies y [N]).

  Args:
    x: features.
    y: latencies (any positive unit; predictions come back in it).
    hidden: hidden widths (HAT: 3 x 400).
    steps: full-batch Adam steps.
    lr: Adam learning rate (cosine-decayed to 0).
    weight_decay: AdamW's decoupled decay (scaled by the learning-rate schedule); on the
      H100 latency rows it is what keeps HAT's 3 x 400 MLP from overfitting
      (docs/search.md).
    seed: initialisation.
  """
  x, y = _check_xy(x, y)
  if not hidden or any(not isinstance(h, int) or h < 1 for h in hidden):
    raise ValueError(f"hidden={hidden!r} must be a non-empty sequence of positive ints")
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"{steps=} must be a positive int")
  if not weight_decay >= 0:
    raise ValueError(f"{weight_decay=} must be >= 0")
  x_mean, x_std = x.mean(0), x.std(0)
  x_std = np.where(x_std > 0, x_std, 1.0).astype(np.float32)
  log_y = np.log(y)
  y_mean, y_std = float(log_y.mean()), float(log_y.std() or 1.0)
  xs = jnp.asarray((x - x_mean) / x_std)
  ys = jnp.asarray((log_y - y_mean) / y_std)
  params = _init(jax.random.key(seed), [x.shape[1], *hidden, 1])
  tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)

  def loss_fn(params):
    return jnp.mean((_forward(params, xs) - ys) ** 2)

  @jax.jit
  def train(params):
    def body(_, carry):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    return jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))[0]

  return MLPPredictor(train(params), x_mean.astype(np.float32), x_std, y_mean, y_std)


@dataclasses.dataclass
class LinearPredictor:
  """Least squares of latency on cost columns (e.g. FLOPs, bytes, layers) plus a constant."""

  coef: np.ndarray

  def predict(self, x: Any) -> np.ndarray:
    x = np.asarray(x, np.float64)
    single = x.ndim == 1
    x = x[None] if single else x
    if x.ndim != 2 or x.shape[1] + 1 != self.coef.shape[0]:
      raise ValueError(f"x.shape={x.shape} must be [N, {self.coef.shape[0] - 1}]")
    out = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1) @ self.coef
    return out[0] if single else out

  def save(self, path: str) -> None:
    with open(path + ".tmp", "w") as f:
      json.dump({"coef": self.coef.tolist()}, f)
    os.replace(path + ".tmp", path)

  @classmethod
  def load(cls, path: str) -> "LinearPredictor":
    with open(path) as f:
      return cls(np.asarray(json.load(f)["coef"], np.float64))


def fit_linear(x: Any, y: Any) -> LinearPredictor:
  """The analytic baseline: latency ~ x @ a + b by least squares (x: cost counts [N, F])."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] < 2:
    raise ValueError(f"x {x.shape} must be [N, F] and y {y.shape} [N], N >= 2")
  design = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
  coef, *_ = np.linalg.lstsq(design, y, rcond=None)
  return LinearPredictor(coef)


def split_indices(n: int, test_fraction: float = 0.2, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
  """A seeded random (train, test) split of range(n), both non-empty."""
  if not isinstance(n, int) or n < 2:
    raise ValueError(f"{n=} must be an int >= 2")
  if not 0 < test_fraction < 1:
    raise ValueError(f"{test_fraction=} must lie in (0, 1)")
  order = np.random.default_rng(seed).permutation(n)
  n_test = min(n - 1, max(1, round(test_fraction * n)))
  return np.sort(order[n_test:]), np.sort(order[:n_test])
