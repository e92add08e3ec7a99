"""experiments/report.py: spreads beside medians, shapes, distinct series, legend outside."""

import json
import os
import shutil
import tempfile

from absl.testing import absltest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from experiments import report

_CONFIG = {"experiment": "attention_bench", "batch": 2, "q_len": 64, "kv_len": 64,
           "num_heads": 4, "num_kv_heads": 2, "head_dim": 32, "dtype": "bfloat16",
           "report": {"columns": ["median_ms", "us_per_step", "max_abs_err"]}}


def _row(impl, x, ms, status="ok"):
  point = {"implementation": impl, "q_len": x}
  metrics = {"median_ms": ms, "p10_ms": ms * 0.9, "p90_ms": ms * 1.5, "max_abs_err": 1e-6,
             "us_per_step": ms * 1e3, "step_timing": "loop", "p10_us_loop": ms * 800.0,
             "p90_us_loop": ms * 1200.0}
  return {"key": f"{impl}-{x}", "point": point, "status": status, "metrics": metrics}


class ReportTest(absltest.TestCase):

  def test_spread_beside_median_and_shape(self):
    rows = [_row("xla", 64, 2.0), _row("pallas_triton", 128, 1.0)]
    columns = report.table_columns(_CONFIG, rows)
    self.assertEqual(columns, ["implementation", "q_len", "shape", "status", "median_ms",
                               "median_ms [p10, p90]", "us_per_step",
                               "us_per_step [p10, p90]", "max_abs_err"])
    table = report.format_table(rows, columns, _CONFIG)
    self.assertIn("| xla | 64 | B=2 T=64 S=64 Nq=4 Nkv=2 D=32 bf16 | ok | 2 | [1.8, 3] | 2000 "
                  "| [1600, 2400] |", table)
    self.assertIn("B=2 T=128 S=64", table)  # the point's q_len overrides the config's
    # Without the config (old call sites): the columns as before.
    self.assertEqual(report.table_columns(None, rows),
                     ["implementation", "q_len", "status", "median_ms", "p10_ms", "p90_ms",
                      "max_abs_err", "us_per_step", "step_timing", "p10_us_loop",
                      "p90_us_loop"])

  def test_rendered_report_has_spreads_and_shapes(self):
    workdir = tempfile.mkdtemp(prefix="fj_report_test_")
    self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
    with open(os.path.join(workdir, report.RESULTS_FILE), "w") as f:
      for row in [_row("xla", 64, 2.0), _row("xla", 128, 3.0)]:
        f.write(json.dumps(row) + "\n")
    with open(report.render(workdir, _CONFIG)) as f:
      text = f.read()
    self.assertIn("| shape |", text)
    self.assertIn("median_ms [p10, p90]", text)

  def test_rows_failing_tolerance_are_flagged(self):
    good, bad = _row("xla", 64, 2.0), _row("peer:x", 64, 1.5)
    good["metrics"]["within_tol"] = True
    bad["metrics"].update(max_abs_err=0.25, within_tol=False)
    columns = ["implementation", "status", "median_ms", "median_ms [p10, p90]",
               "max_abs_err", "within_tol"]
    table = report.format_table([good, bad], columns, _CONFIG)
    lines = table.splitlines()
    self.assertEqual(lines[2], "| xla | ok | 2 | [1.8, 3] | 1e-06 | True |")
    self.assertEqual(lines[3], "| peer:x | ok | 1.5! | [1.35, 2.25]! | 0.25! | False |")
    self.assertIn("`!` fails tolerance", table)
    self.assertNotIn("`?`", table)
    self.assertEqual(report.check_flag({"max_abs_err": float("nan")}), report.FAILS_TOL)
    self.assertEqual(report.check_flag({"check": "skipped: too big"}), report.NOT_CHECKED)
    self.assertEqual(report.check_flag({"max_abs_err": 0.0, "within_tol": True}), "")
    self.assertEqual(report.check_flag(None), "")
    clean = report.format_table([good], columns, _CONFIG)
    self.assertNotIn("fails tolerance", clean)

  def test_series_styles_are_distinct(self):
    styles = [report.series_style(i) for i in range(90)]
    self.assertLen({(s["color"], s["marker"]) for s in styles}, 90)
    for a, b in zip(styles, styles[1:]):
      self.assertNotEqual(a["color"], b["color"])
      self.assertNotEqual(a["marker"], b["marker"])

  def _check_figure(self, rows, spec, expected_series):
    fig = report.figure(rows, spec)
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    legend = ax.get_legend()
    self.assertLen(legend.get_texts(), expected_series)
    renderer = fig.canvas.get_renderer()
    # The legend starts right of the axes: it never covers the data.
    self.assertGreater(legend.get_window_extent(renderer).x0,
                       ax.get_window_extent(renderer).x1)
    return ax

  def test_lines_have_distinct_colour_and_marker(self):
    impls = [f"impl{i}" for i in range(12)]  # more series than the 10 default colours
    rows = [_row(impl, x, 1.0 + i + x / 64) for i, impl in enumerate(impls) for x in (64, 128)]
    ax = self._check_figure(rows, {"x": "q_len", "y": "median_ms"}, 12)
    pairs = {(line.get_color(), line.get_marker()) for line in ax.get_lines()}
    self.assertLen(pairs, 12)

  def test_bars_have_distinct_colour_and_hatch(self):
    rows = [_row(impl, x, 1.0 + i) for i, impl in enumerate(("a", "b", "c"))
            for x in ("dense", "causal")]
    for r in rows:
      r["point"]["mask"] = r["point"].pop("q_len")
    ax = self._check_figure(rows, {"x": "mask", "y": "median_ms"}, 3)
    styles = {(p.get_facecolor(), p.get_hatch()) for p in ax.patches}
    self.assertLen(styles, 3)


if __name__ == "__main__":
  absltest.main()
