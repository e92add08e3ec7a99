"""Kernel-configuration picks on measured tables: predictor, rankings, heuristic, another
card's table.

  python -m experiments.kernel_choice_eval OUT_DIR NAME=TUNE_RESULTS.jsonl [NAME=...]
  python -m experiments.kernel_choice_eval OUT_DIR NAME=.../stages/kernel/kernel.jsonl

Each NAME=path is either the results.jsonl of one configs/tune_attention.py run on one
device (its config.json beside it gives the head count; every row is a problem (shape, mask
density) with all candidates timed) or the kernel.jsonl of a hat_search kernel stage (a row
per problem and configuration). Per device, ways to pick a candidate are scored against the
measured best of each problem (slowdown = picked ms / best ms - 1; "within 5%" is the share
of problems picked within 5% of the best); a kernel.jsonl gets the four held-out ones:

  predictor, held out   flashjax.search.kernel_choice's MLP fitted on this device's other
                        problems (`leave_one_problem_out`): a new shape on a tuned device
  predictor (decay), held out   the same with AdamW decay 1.0 (the :gpu kernel stage's)
  ranking, held out     one order of the configurations for every problem, fitted on this
                        device's other problems (kernel_choice.fit_ranking): the baseline
                        the predictor must beat
  ranking per head dim, held out   one such order per head dim
                        (kernel_choice.head_dim_ranking_picker)
  predictor, <other>    the MLP fitted on all of another device's problems: a device with
                        no table of its own, with another card's measurements
  table of <other>      the other device's winner for the same problem (what the tuning
                        store's architecture fallback serves)
  heuristic             the backend's default tiles (the row's heuristic_ms)

Writes OUT_DIR/kernel_choice.json (per-problem rows) and OUT_DIR/kernel_choice.md.
Measured tables, not a GPU, are the input: it runs anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Any, Sequence

import numpy as np
from absl import app

from flashjax.search import kernel_choice as kc

# Small and quick: 9 problems x ~14 candidates per table (the hat_search kernel stage's size).
MLP = {"hidden": (64, 64), "steps": 1500, "lr": 3e-3}
TOLERANCE = 0.05


def load_table(path: pathlib.Path) -> tuple[list[dict[str, Any]], int]:
  """The ok rows of a tuning results.jsonl and the head count of its config.json."""
  config_path = path.parent / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} (the tuning run's config, for num_heads) is "
                            "missing")
  num_heads = int(json.loads(config_path.read_text())["num_heads"])
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  rows = [r for r in rows if r.get("status") == "ok"]
  if not rows:
    raise ValueError(f"{path} has no ok rows")
  return rows, num_heads


# A winner is stored as its BlockSizes; num_stages None (the heuristic's) means the
# backend's default depth: pallas_mosaic_gpu runs 2 stages then.
_DEFAULT_STAGES = {"pallas_mosaic_gpu": 2}


def _problem(row: dict[str, Any]) -> str:
  return json.dumps(row["point"], sort_keys=True)


def winner_candidate(row: dict[str, Any]) -> kc.KernelCandidate | None:
  """The winning configuration of a tuning row as a KernelCandidate (None when the heuristic
  won with a default the table cannot name)."""
  sizes = json.loads(row["metrics"]["best_block_sizes"])
  stages = sizes.get("num_stages") or _DEFAULT_STAGES.get(row["point"]["implementation"])
  if stages is None:
    return None
  return kc.KernelCandidate(sizes["block_q"], sizes["block_kv"], stages,
                            bool(sizes.get("persistent")))


def _summary(slowdowns: Sequence[float]) -> dict[str, Any]:
  slow = np.asarray(slowdowns, float)
  return {"problems": int(slow.size), "within_tolerance": float(np.mean(slow <= TOLERANCE)),
          "mean_slowdown": float(slow.mean()), "max_slowdown": float(slow.max())}


def load_kernel_rows(path: pathlib.Path) -> list[kc.KernelSample]:
  """The timed rows of a hat_search kernel stage's kernel.jsonl as KernelSamples."""
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  samples = kc.samples_from_kernel_rows(rows)
  if not samples:
    raise ValueError(f"{path} has no timed rows")
  return samples


def held_out(samples: Sequence[kc.KernelSample]) -> dict[str, Any]:
  """The held-out methods (module docstring) on one device's samples."""
  methods = {"predictor, held out": {"method": "mlp", **MLP},
             "predictor (decay), held out": {"method": "mlp", **MLP, "weight_decay": 1.0},
             "ranking, held out": {"method": "ranking"},
             "ranking per head dim, held out": {"method": "head_dim_ranking"}}
  out = {}
  for label, kwargs in methods.items():
    rows = kc.leave_one_problem_out(samples, TOLERANCE, **kwargs)["rows"]
    out[label] = {**_summary([r["slowdown"] for r in rows]), "rows": rows}
  return out


def evaluate(tables: dict[str, tuple[list[dict[str, Any]], int]],
             kernel_rows: dict[str, list[kc.KernelSample]] | None = None) -> dict[str, Any]:
  """{device: {method: summary + per-problem slowdowns}} (module docstring): every method
  for the tuning `tables`, the held-out ones for the `kernel_rows` sets."""
  samples = {name: kc.samples_from_tuning_rows(rows, heads)
             for name, (rows, heads) in tables.items()}
  winners = {name: {_problem(r): winner_candidate(r) for r in rows}
             for name, (rows, _) in tables.items()}
  out: dict[str, Any] = {name: held_out(rows) for name, rows in (kernel_rows or {}).items()}
  for name, (rows, _) in tables.items():
    methods = held_out(samples[name])
    for other in tables:
      if other == name:
        continue
      pred = kc.fit_kernel_predictor(samples[other], **MLP)
      moved = kc.evaluate_choices(pred, samples[name], TOLERANCE)
      methods[f"predictor, {other}"] = {**_summary([r["slowdown"] for r in moved["rows"]]),
                                        "rows": moved["rows"]}
      picks = []
      for row in rows:
        measured = {kc.candidate_from_label(c["label"]): c["ms"]
                    for c in json.loads(row["metrics"]["candidates"]) if c.get("ms") is not None}
        pick = winners[other].get(_problem(row))
        if pick in measured:
          best = min(measured.values())
          picks.append({"point": row["point"], "pick": dataclasses.asdict(pick),
                        "pick_ms": measured[pick], "best_ms": best,
                        "slowdown": measured[pick] / best - 1})
      if picks:
        methods[f"table of {other}"] = {**_summary([p["slowdown"] for p in picks]),
                                        "rows": picks}
    heuristic = [{"point": r["point"], "pick_ms": r["metrics"]["heuristic_ms"],
                  "best_ms": r["metrics"]["best_ms"],
                  "slowdown": r["metrics"]["heuristic_ms"] / r["metrics"]["best_ms"] - 1}
                 for r in rows if r["metrics"].get("heuristic_ms")]
    if heuristic:
      methods["heuristic"] = {**_summary([h["slowdown"] for h in heuristic]),
                              "rows": heuristic}
    out[name] = methods
  return out


def markdown(result: dict[str, Any]) -> str:
  lines = [f"| device | pick | problems | within {TOLERANCE:.0%} of the best | mean slowdown |"
           " worst slowdown |", "|---|---|---|---|---|---|"]
  for device, methods in result.items():
    for method, s in methods.items():
      lines.append(f"| {device} | {method} | {s['problems']} | {s['within_tolerance']:.0%} |"
                   f" {s['mean_slowdown']:.1%} | {s['max_slowdown']:.1%} |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  if len(argv) < 3 or any("=" not in a for a in argv[2:]):
    raise app.UsageError("usage: python -m experiments.kernel_choice_eval OUT_DIR "
                         "NAME=TUNE_RESULTS.jsonl|NAME=.../kernel.jsonl ...")
  out = pathlib.Path(argv[1])
  tables, kernel_rows = {}, {}
  for arg in argv[2:]:
    name, path = arg.split("=", 1)
    if pathlib.Path(path).name == "kernel.jsonl":
      kernel_rows[name] = load_kernel_rows(pathlib.Path(path))
    else:
      tables[name] = load_table(pathlib.Path(path))
  result = evaluate(tables, kernel_rows)
  out.mkdir(parents=True, exist_ok=True)
  (out / "kernel_choice.json").write_text(json.dumps(result, indent=1, default=str))
  (out / "kernel_choice.md").write_text(markdown(result))
  print(markdown(result), file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
