r"""Times chosen points of a study config on another checkout of flashjax (old vs new trees).

A refactor is checked for speed by running the same points of the same study on the tree
before and after it, on one device, in alternating processes (old, new, old, new), and
putting the medians side by side. Each process imports exactly one tree: this script puts
`--tree` first on sys.path and then loads that tree's launcher, config and experiment.

  python experiments/tree_bench.py --tree=/path/to/old --label=old \
      --config=configs/bench_attention_gpu.py:all --out=/tmp/trees.jsonl \
      --where=implementation=pallas_mosaic_gpu,case=B4-T4k --set=check=False,timing=loop

`--where` keeps points whose fields equal the given values (a field may be given several
times: any of them); `--set` overrides config fields before the points are applied (ints,
floats, True/False and None are parsed, anything else is a string). Each point appends one
JSON line {label, tree, point, status, metrics | error} to `--out`; a failed point is
recorded and the rest still run.

  python experiments/tree_bench.py --table=/tmp/trees.jsonl [--metric=median_ms]

prints one markdown row per point: each label's values over its runs (in run order) and the
ratio of each later label's best value to the first label's.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import sys
import time
import traceback


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _pairs(text: str) -> list[tuple[str, object]]:
  pairs = []
  for item in filter(None, text.split(",")):
    if "=" not in item:
      raise ValueError(f"expected FIELD=VALUE, got {item=}")
    name, value = item.split("=", 1)
    pairs.append((name, _parse_value(value)))
  return pairs


def table(path: str, metric: str) -> str:
  """Markdown table of `metric`: one row per point, one column per label (values in run
  order, "err" for failed runs), and each later label's best value / the first label's."""
  by_point: dict[str, dict[str, list]] = {}
  points: dict[str, dict] = {}
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      key = json.dumps(row["point"], sort_keys=True)
      points.setdefault(key, row["point"])
      if row["status"] == "ok" and metric not in row["metrics"]:
        continue  # a point of another study in the same file
      value = row["metrics"][metric] if row["status"] == "ok" else None
      by_point.setdefault(key, {}).setdefault(row["label"], []).append(value)
  labels = list(dict.fromkeys(label for cells in by_point.values() for label in cells))
  if not labels:
    return f"(no rows with {metric=})"
  fields = list(dict.fromkeys(f for p in points.values() for f in p))
  ratios = [f"{label}/{labels[0]}" for label in labels[1:]]
  lines = ["| " + " | ".join(fields + labels + ratios) + " |",
           "|" + "---|" * (len(fields) + len(labels) + len(ratios))]
  for key, cells in by_point.items():
    shown = []
    for label in labels:
      values = cells.get(label, [])
      shown.append(", ".join("err" if v is None else f"{v:.4g}" for v in values))
    best = [min((v for v in cells.get(label, []) if v is not None), default=None)
            for label in labels]
    shown += [f"{b / best[0]:.3f}" if b is not None and best[0] is not None else ""
              for b in best[1:]]
    lines.append("| " + " | ".join([str(points[key].get(f)) for f in fields] + shown) + " |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--table", help="print the table of this JSON lines file and exit")
  parser.add_argument("--metric", default="median_ms", help="metric shown by --table")
  parser.add_argument("--tree", help="repository root of the checkout to time")
  parser.add_argument("--label", help="column name of this tree in the table")
  parser.add_argument("--config", help="config path (relative to the tree)[:arg]")
  parser.add_argument("--out", help="JSON lines file to append to")
  parser.add_argument("--where", default="", help="FIELD=VALUE,... filter on the points")
  parser.add_argument("--set", default="", help="FIELD=VALUE,... config overrides")
  args = parser.parse_args()
  if args.table:
    print(table(args.table, args.metric))
    return
  missing = [n for n in ("tree", "label", "config", "out") if getattr(args, n) is None]
  if missing:
    parser.error(f"missing arguments: {missing}")

  tree = os.path.abspath(args.tree)
  sys.path.insert(0, tree)
  for name in [m for m in sys.modules if m.split(".")[0] in ("flashjax", "configs",
                                                            "experiments", "third_party")]:
    del sys.modules[name]
  os.chdir(tree)
  launch = importlib.import_module("experiments.launch")
  path, _, arg = args.config.partition(":")
  config_module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
  config = config_module.get_config(arg or None)
  for name, value in _pairs(args.set):
    config[name] = value
  experiment = launch.load_experiment(config.experiment)
  where: dict[str, list] = {}
  for name, value in _pairs(args.where):
    where.setdefault(name, []).append(value)
  points = [p for p in launch.expand_sweep(config.get("sweep"))
            if all(p.get(name) in values for name, values in where.items())]
  print(f"{args.label}: {len(points)} points from {tree}", flush=True)
  for point in points:
    row = {"label": args.label, "tree": tree, "point": launch.to_json(point)}
    start = time.time()
    try:
      metrics = experiment.run_point(launch.apply_point(config, point), point)
      row.update(status="ok", metrics=launch.to_json(metrics))
    except Exception as e:  # pylint: disable=broad-except
      row.update(status="error", error=f"{type(e).__name__}: {e}",
                 traceback=traceback.format_exc(limit=3))
    row["wall_s"] = time.time() - start
    with open(args.out, "a") as f:
      f.write(json.dumps(row) + "\n")
    print(args.label, point, row["status"], row.get("metrics", {}).get("median_ms"),
          flush=True)


if __name__ == "__main__":
  main()
