"""Reads DIR/results.jsonl and renders DIR/report.md (a markdown table) and PNG plots.

  python -m experiments.report --workdir=DIR

The launcher calls `render` at the end of every run. What to show comes from the config's
optional `report` field (read from DIR/config.json when run standalone):

  report.columns  metric names for the table (default: every metric, in first-seen order)
  report.plots    list of {"x": point field, "y": metric, "logy": bool, "logx": bool};
                  one PNG per entry, one series per combination of the other point fields
                  that vary. Default: the first table metric against the first sweep field.

The table shows each point's `shape` (batch, lengths, heads, head dim, dtype from the config
with the point's fields applied) and, beside every median timing column that has a spread in
the rows (`median_ms` with `p10_ms` / `p90_ms`, `us_per_step` with the p10 / p90 of its
`step_timing`), a `[p10, p90]` column, so that load noise is not read as a gap. Plots give
every series its own colour and marker and put the legend to the right of the axes.

A row whose output check failed (`within_tol` false or a NaN `max_abs_err`) has its numbers
marked "!" and one whose check was skipped (`check` "skipped: ...") "?", with a footnote
under the table (`check_flag`): a wrong or unchecked result never reads as a plain number.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging
from matplotlib.figure import Figure

RESULTS_FILE = "results.jsonl"
REPORT_FILE = "report.md"
CONFIG_FILE = "config.json"


def read_rows(workdir: str) -> list[dict[str, Any]]:
  """Every complete row of DIR/results.jsonl in file order; a torn line is skipped."""
  return read_results_file(os.path.join(workdir, RESULTS_FILE))


def read_results_file(path: str) -> list[dict[str, Any]]:
  """Every complete row of a results.jsonl file in file order; a torn line is skipped."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        logging.warning("%s:%d is not valid JSON (torn write?); skipped", path, number)
        continue
      if isinstance(row, dict) and "key" in row and "status" in row:
        rows.append(row)
  return rows


def latest_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The last row of each point key, in the order the keys first appear."""
  latest: dict[str, dict[str, Any]] = {}
  for row in rows:
    latest[row["key"]] = dict(row)
  return list(latest.values())


def latest_ok_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The last row of each point key when that row finished ok (a point whose last try
  failed is left out)."""
  return [row for row in latest_rows(rows) if row["status"] == "ok"]


# Config fields that make up a point's shape, with their labels in the `shape` column.
SHAPE_FIELDS = (("batch", "B"), ("q_len", "T"), ("seq_len", "T"), ("kv_len", "S"),
                ("num_heads", "Nq"), ("num_kv_heads", "Nkv"), ("head_dim", "D"), ("dtype", ""))
SHAPE_COLUMN = "shape"
SPREAD_SUFFIX = " [p10, p90]"
_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def shape_of(config: Mapping[str, Any] | None, point: Mapping[str, Any]) -> str:
  """The shape a point ran at, e.g. "B=2 T=4096 S=4096 Nq=16 Nkv=16 D=128 bf16"."""
  values = {**{name: (config or {}).get(name) for name, _ in SHAPE_FIELDS}, **point}
  parts = []
  for name, label in SHAPE_FIELDS:
    value = values.get(name)
    if value is None or isinstance(value, (list, dict)):
      continue
    parts.append(f"{label}={value}" if label else _DTYPES.get(str(value), str(value)))
  return " ".join(parts)


def spread_of(metric: str, flat: Mapping[str, Any]) -> tuple[Any, Any] | None:
  """(p10, p90) of a median timing metric in a flat row, or None when it has none."""
  if metric.startswith("median"):
    names = metric.replace("median", "p10", 1), metric.replace("median", "p90", 1)
  elif metric == "us_per_step" and flat.get("step_timing"):
    names = f"p10_us_{flat['step_timing']}", f"p90_us_{flat['step_timing']}"
  else:
    return None
  low, high = (flat.get(n) for n in names)
  return (low, high) if _is_number(low) and _is_number(high) else None


def flatten(row: Mapping[str, Any], config: Mapping[str, Any] | None = None
            ) -> dict[str, Any]:
  """Point fields, status, error and metrics of a row in one flat dict.

  With `config`, also the row's `shape` (shape_of) when it has one, and `<metric> [p10,
  p90]` for every median timing metric with a spread (spread_of).
  """
  flat = dict(row.get("metrics") or {})
  flat.update(row["point"])
  flat["status"] = row["status"]
  if row.get("error"):
    flat["error"] = row["error"]
  if config is not None:
    shape = shape_of(config, row["point"])
    if shape:
      flat[SHAPE_COLUMN] = shape
    for metric in list(row.get("metrics") or {}):
      spread = spread_of(metric, flat)
      if spread:
        flat[metric + SPREAD_SUFFIX] = f"[{_cell(spread[0], 12)}, {_cell(spread[1], 12)}]"
  return flat


def _first_seen(dicts: Iterable[Mapping[str, Any]]) -> list[str]:
  names: dict[str, None] = {}
  for d in dicts:
    names.update(dict.fromkeys(d))
  return list(names)


def table_columns(config: Mapping[str, Any] | None, rows: Sequence[Mapping[str, Any]]
                  ) -> list[str]:
  """Point fields, shape, status, the configured (or all) metrics, and error when any failed.

  The shape column and the `[p10, p90]` column beside each median timing metric need the
  config (None leaves them out; {} gives the spreads and the shapes the points carry).
  """
  point_fields = _first_seen(r["point"] for r in rows)
  metrics = ((config or {}).get("report") or {}).get("columns")
  if metrics is None:
    metrics = _first_seen(r.get("metrics") or {} for r in rows)
  columns = list(point_fields)
  if config is not None and any(shape_of(config, r["point"]) for r in rows):
    columns.append(SHAPE_COLUMN)
  columns.append("status")
  flat = [flatten(r, config or {}) for r in rows] if config is not None else []
  for metric in metrics:
    if metric in point_fields or metric in columns:
      continue
    columns.append(metric)
    spread = metric + SPREAD_SUFFIX
    if spread not in metrics and any(spread in f for f in flat):
      columns.append(spread)  # beside its median
  if any(r.get("error") for r in rows):
    columns.append("error")
  return columns


def _cell(value: Any, width: int = 80) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    text = f"{value:.4g}"
  elif isinstance(value, (list, dict)):
    text = json.dumps(value)
  else:
    text = str(value)
  text = text.replace("|", "\\|").replace("\n", " ")
  return text if len(text) <= width else text[:width - 3] + "..."


# Marks of a row's numbers whose output check failed or did not run (check_flag).
FAILS_TOL = "!"
NOT_CHECKED = "?"
FLAG_NOTES = {
    FAILS_TOL: "fails tolerance: the output's max_abs_err against the float32 reference is "
               "above the dtype's tolerance (within_tol false), so these numbers time a "
               "wrong result",
    NOT_CHECKED: "not checked: the reference check was skipped (the row's `check` says why)",
}


def check_flag(metrics: Mapping[str, Any] | None) -> str:
  """FAILS_TOL, NOT_CHECKED or "" for a row's metrics.

  FAILS_TOL when `within_tol` is false or `max_abs_err` is NaN; NOT_CHECKED when `check`
  starts with "skipped"; "" otherwise (checked and within tolerance, or a kind without a
  check).
  """
  metrics = metrics or {}
  err = metrics.get("max_abs_err")
  if metrics.get("within_tol") is False or (isinstance(err, float) and err != err):
    return FAILS_TOL
  if str(metrics.get("check", "")).startswith("skipped"):
    return NOT_CHECKED
  return ""


def flag_notes(flags: Iterable[str]) -> list[str]:
  """Footnote lines for the flags that occur (in FLAG_NOTES order)."""
  used = set(flags)
  return [f"`{flag}` {note}" for flag, note in FLAG_NOTES.items() if flag in used]


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 config: Mapping[str, Any] | None = None) -> str:
  """Markdown table of rows (results.jsonl rows).

  The numbers of a row whose output check failed get check_flag's mark (e.g. "1.23!"), so
  they never read as plain numbers, and the table is followed by a footnote per mark used.

  Args:
    rows: results rows.
    columns: the columns; default `table_columns(config, rows)`.
    config: the study config (for the shape and spread columns); None: the rows only.

  Returns:
    The table's markdown.
  """
  if not rows:
    return "(no results)"
  columns = list(columns or table_columns(config, rows))
  point_fields = set(_first_seen(r["point"] for r in rows)) | {SHAPE_COLUMN, "status"}
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  used = []
  for row in rows:
    f = flatten(row, config if config is not None else {})
    flag = check_flag(row.get("metrics")) if row["status"] == "ok" else ""
    cells = []
    for c in columns:
      text = _cell(f.get(c))
      numeric = _is_number(f.get(c)) or c.endswith(SPREAD_SUFFIX)
      if flag and text and numeric and c not in point_fields:
        text += flag
        used.append(flag)
      cells.append(text)
    lines.append("| " + " | ".join(cells) + " |")
  notes = flag_notes(used)
  if notes:
    lines += [""] + notes
  return "\n".join(lines)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def default_plots(config: Mapping[str, Any] | None, rows: Sequence[Mapping[str, Any]]
                  ) -> list[dict[str, Any]]:
  """The first numeric table metric against the first sweep field."""
  point_fields = _first_seen(r["point"] for r in rows)
  ok = [flatten(r) for r in rows if r["status"] == "ok"]
  numeric = [c for c in table_columns(config, rows)
             if c not in point_fields and any(_is_number(f.get(c)) for f in ok)]
  if not point_fields or not numeric:
    return []
  return [{"x": point_fields[0], "y": numeric[0]}]


# Series styles: colour i % 10 and marker i % 9 (coprime counts), so the first 90 series
# all differ in their (colour, marker) pair and neighbours differ in both.
_COLORS = tuple(f"C{i}" for i in range(10))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")
_HATCHES = ("", "//", "..", "xx", "\\\\", "++", "oo", "--", "**")


def series_style(i: int) -> dict[str, str]:
  """Colour, marker and bar hatch of the i-th series of a plot."""
  return {"color": _COLORS[i % len(_COLORS)], "marker": _MARKERS[i % len(_MARKERS)],
          "hatch": _HATCHES[i % len(_HATCHES)]}


def figure(rows: Sequence[Mapping[str, Any]], spec: Mapping[str, Any]) -> Figure | None:
  """The figure of metric spec["y"] against point field spec["x"]; None when nothing to draw.

  Numeric x gives lines, other x grouped bars; one series per combination of the other
  point fields that vary among the plotted rows, each with its own colour and marker (bars:
  colour and hatch); the legend sits to the right of the axes, outside the data.
  """
  x, y = spec["x"], spec["y"]
  flat = [flatten(r) for r in rows if r["status"] == "ok"]
  flat = [f for f in flat if x in f and _is_number(f.get(y))]
  if not flat:
    return None
  others = [k for k in _first_seen(r["point"] for r in rows)
            if k != x and len({json.dumps(f.get(k)) for f in flat}) > 1]
  series: dict[str, list[tuple[Any, float]]] = {}
  for f in flat:
    label = ", ".join(f"{k}={_cell(f.get(k), 30)}" for k in others)
    series.setdefault(label, []).append((f[x], f[y]))
  fig = Figure(figsize=(8, 4.5))
  ax = fig.subplots()
  if all(_is_number(f[x]) for f in flat):
    for i, (label, pts) in enumerate(series.items()):
      pts.sort()
      style = series_style(i)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], color=style["color"],
              marker=style["marker"], label=label or None)
  else:
    categories = list(dict.fromkeys(_cell(f[x]) for f in flat))
    width = 0.8 / len(series)
    for i, (label, pts) in enumerate(series.items()):
      pos = [categories.index(_cell(p[0])) + (i - (len(series) - 1) / 2) * width for p in pts]
      style = series_style(i)
      ax.bar(pos, [p[1] for p in pts], width=width, color=style["color"],
             hatch=style["hatch"], edgecolor="black", linewidth=0.3, label=label or None)
    ax.set_xticks(range(len(categories)), categories, rotation=20, ha="right")
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  if spec.get("logy"):
    ax.set_yscale("log")
  if spec.get("logx"):
    ax.set_xscale("log")
  if any(series):
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0.0, ncols=1 if len(series) <= 20 else 2)
  ax.grid(alpha=0.3)
  ax.set_title(f"{y} vs {x}")
  return fig


def plot(rows: Sequence[Mapping[str, Any]], spec: Mapping[str, Any], path: str) -> bool:
  """Writes `figure(rows, spec)` to `path` (PNG); False when nothing to draw."""
  fig = figure(rows, spec)
  if fig is None:
    return False
  fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight" keeps the outside legend
  return True


def _environment_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  lines = []
  for name in ("device_kind", "backend", "jax_version", "git_commit", "git_dirty",
               "source_hash"):
    values = sorted({str((r.get("env") or {}).get(name)) for r in rows})
    lines.append(f"- {name}: {', '.join(values)}")
  return lines


def read_config(workdir: str) -> dict[str, Any]:
  """DIR/config.json as a dict ({} when missing)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def render(workdir: str, config: Mapping[str, Any] | None = None) -> str:
  """Writes DIR/report.md and its PNG plots from DIR/results.jsonl.

  Args:
    workdir: the study's directory.
    config: the study config as a dict; None reads DIR/config.json (if present).

  Returns:
    Path of report.md.
  """
  if config is None:
    config = read_config(workdir)
  rows = latest_rows(read_rows(workdir))
  failed = [r for r in rows if r["status"] != "ok"]
  counts = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}"
                     for s in dict.fromkeys(r["status"] for r in rows))
  lines = [f"# {config.get('experiment', 'study')} report", "",
           f"{len(rows)} points: {counts or 'none'}.", ""]
  lines += _environment_lines(rows) + ["", format_table(rows, table_columns(config, rows),
                                                       config), ""]
  specs = ((config.get("report") or {}).get("plots")) or default_plots(config, rows)
  for spec in specs:
    name = f"{spec['y']}_vs_{spec['x']}.png"
    if plot(rows, spec, os.path.join(workdir, name)):
      lines += [f"![{spec['y']} vs {spec['x']}]({name})", ""]
  if failed:
    lines += ["## Points that did not run", ""]
    lines += [f"- `{r['key']}` ({r['status']}): {_cell(r.get('error'), 300)}"
              for r in failed]
    lines.append("")
  out = os.path.join(workdir, REPORT_FILE)
  with open(out, "w") as f:
    f.write("\n".join(lines))
  return out


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir = flags.FLAGS.workdir
  config = read_config(workdir)
  rows = latest_rows(read_rows(workdir))
  print(format_table(rows, table_columns(config, rows), config))
  print(f"wrote {render(workdir)}")


if __name__ == "__main__":
  # Defined only when run as a script: the launcher imports this module and has its own.
  flags.DEFINE_string("workdir", None, "Study directory holding results.jsonl.")
  flags.mark_flag_as_required("workdir")
  app.run(main)
