r"""Side-by-side table: one row per case, one column per implementation, from results.jsonl files.

  python -m experiments.side_by_side --results=DIR1/results.jsonl,DIR2/results.jsonl \
      --metric=median_ms --columns=pallas_triton,peer:jax_nn_cudnn,peer:torch_flex

Rows are the points' fields other than `implementation`; cells are the metric of the latest
"ok" row, "-" for unsupported points and "err" for failed ones. A cell whose output failed the
error check (`within_tol` false) ends in "!" and one whose check was skipped in "?", with a
footnote under the table: a wrong result never reads as a plain number. Points measured in different
runs should only be put side by side when they come from the same session on the same device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags

from experiments import report

_RESULTS = flags.DEFINE_list("results", None, "results.jsonl files to merge.")
_METRIC = flags.DEFINE_string("metric", "median_ms", "metric shown in the cells.")
_COLUMNS = flags.DEFINE_list("columns", None, "implementations, in column order (default: all).")
_ROW_FIELDS = flags.DEFINE_list("row_fields", None, "point fields naming a row (default: all "
                                "but implementation).")


def load_rows(paths: Sequence[str]) -> list[dict[str, Any]]:
  """Latest row per point key over the files (later files win); torn lines skipped."""
  rows = [row for path in paths for row in report.read_results_file(path)]
  return report.latest_rows(rows)


def _cell(row: dict[str, Any] | None, metric: str) -> str:
  if row is None:
    return ""
  if row["status"] == "unsupported":
    return "-"
  if row["status"] != "ok":
    return "err"
  value = row["metrics"].get(metric)
  text = f"{value:.4g}" if isinstance(value, float) else str(value)
  return text + report.check_flag(row["metrics"])


def pivot(rows: list[dict[str, Any]], metric: str, columns: Sequence[str] | None = None,
          row_fields: Sequence[str] | None = None) -> str:
  """Markdown table of `metric` with one column per implementation.

  A cell of a row whose output check failed ends in "!", of one whose check was skipped in
  "?" (report.check_flag); footnotes under the table say what the marks mean.
  """
  columns = list(columns or dict.fromkeys(r["point"]["implementation"] for r in rows))
  if row_fields is None:
    row_fields = [f for f in rows[0]["point"] if f != "implementation"] if rows else []
  table: dict[tuple, dict[str, dict]] = {}
  for r in rows:
    key = tuple(r["point"].get(f) for f in row_fields)
    table.setdefault(key, {})[r["point"]["implementation"]] = r
  lines = ["| " + " | ".join(list(row_fields) + columns) + " |",
           "|" + "---|" * (len(row_fields) + len(columns))]
  for key, by_impl in table.items():
    cells = [str(k) for k in key] + [_cell(by_impl.get(c), metric) for c in columns]
    lines.append("| " + " | ".join(cells) + " |")
  flags = [report.check_flag(r["metrics"]) for r in rows
           if r["status"] == "ok" and r["point"]["implementation"] in columns]
  notes = report.flag_notes(flags)
  if notes:
    lines += [""] + notes
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  print(pivot(load_rows(_RESULTS.value), _METRIC.value, _COLUMNS.value, _ROW_FIELDS.value))


if __name__ == "__main__":
  flags.mark_flag_as_required("results")
  app.run(main)
