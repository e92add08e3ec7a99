r"""k-fold cross-validation of the HAT study's latency predictors on a latency dataset.

  python -m experiments.hat_predictor_cv LATENCY.jsonl [FOLDS] [VARIANT]

Reads the rows of a latency collection (finished or not, e.g.
docs/results/hat_search_h100_2026-12-07/latency.jsonl), splits them into FOLDS (default 8)
random folds, fits on the other folds and predicts each fold with the predictors of the
study's predictor stage at `configs/hat_search.py:VARIANT` settings (default gpu): the MLP
on HAT's architecture features, the linear least squares on (FLOPs, bytes, layers), and the
MLP given both (features plus log costs). Prints RMSE, MAPE and R^2 of the pooled held-out
predictions per target: on few samples a single random split is one draw of many.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from configs import hat_search as study_config
from experiments import hat_search
from flashjax.search import latency
from flashjax.search import predictor as predictor_lib


def cross_validate(rows, folds: int, config) -> dict[str, dict[str, dict[str, float]]]:
  """{target: {predictor: metrics}} of the pooled out-of-fold predictions."""
  if folds < 2 or folds > len(rows):
    raise ValueError(f"folds={folds} must lie in [2, {len(rows)}] (the rows)")
  order = np.random.default_rng(config.seed).permutation(len(rows))
  x = np.asarray([r["features"] for r in rows], np.float32)
  mlp = hat_search.mlp_settings(config)
  result = {}
  for target in hat_search.TARGETS:
    y = np.asarray([r[target] for r in rows])
    cost = np.asarray([hat_search._cost_columns(r, target) for r in rows])
    both = np.concatenate([x, np.log(cost)], axis=1)
    out = {name: np.zeros(len(rows)) for name in ("mlp", "linear", "mlp_with_costs")}
    for held in np.array_split(order, folds):
      train = np.setdiff1d(order, held)
      out["mlp"][held] = predictor_lib.fit_mlp(x[train], y[train], **mlp).predict(x[held])
      out["linear"][held] = predictor_lib.fit_linear(cost[train], y[train]).predict(cost[held])
      out["mlp_with_costs"][held] = predictor_lib.fit_mlp(both[train], y[train],
                                                          **mlp).predict(both[held])
    result[target] = {name: predictor_lib.metrics(y, pred) for name, pred in out.items()}
  return result


def main(argv):
  if len(argv) < 2:
    raise SystemExit(__doc__)
  rows = latency.read_jsonl(argv[1])
  folds = int(argv[2]) if len(argv) > 2 else 8
  config = study_config.get_config(argv[3] if len(argv) > 3 else "gpu")
  result = cross_validate(rows, folds, config)
  print(f"{len(rows)} rows, {folds} folds\n")
  print("| target | predictor | MAPE % | R^2 | RMSE ms |\n|---|---|---|---|---|")
  for target, per in result.items():
    for name, m in per.items():
      print(f"| {target} | {name} | {m['mape']:.1f} | {m['r2']:.3f} | {m['rmse']:.3f} |")
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv)
