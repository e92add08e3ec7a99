"""experiments.side_by_side: merging results files into one table per implementation."""

import json
import os
import tempfile

from absl.testing import absltest

from experiments import side_by_side


def _row(case, impl, status="ok", ms=1.0):
  point = {"case": case, "implementation": impl}
  return {"key": json.dumps(point, sort_keys=True), "point": point, "status": status,
          "metrics": {"median_ms": ms} if status == "ok" else {}}


class SideBySideTest(absltest.TestCase):

  def test_pivot_merges_files_latest_row_wins(self):
    tmp = tempfile.mkdtemp()
    first, second = os.path.join(tmp, "a.jsonl"), os.path.join(tmp, "b.jsonl")
    with open(first, "w") as f:
      f.write("\n".join(json.dumps(r) for r in [
          _row("c1", "ours", ms=2.25), _row("c1", "peer", status="error"),
          _row("c2", "ours", status="unsupported")]) + "\n{torn")
    with open(second, "w") as f:
      f.write(json.dumps(_row("c1", "peer", ms=3.5)) + "\n")
    rows = side_by_side.load_rows([first, second])
    table = side_by_side.pivot(rows, "median_ms", columns=["ours", "peer"])
    lines = table.splitlines()
    self.assertEqual(lines[0], "| case | ours | peer |")
    self.assertEqual(lines[2], "| c1 | 2.25 | 3.5 |")
    self.assertEqual(lines[3], "| c2 | - |  |")

  def test_cells_failing_tolerance_are_flagged(self):
    bad = _row("c1", "peer", ms=0.5)
    bad["metrics"].update(max_abs_err=0.3, within_tol=False)
    good = _row("c1", "ours", ms=1.25)
    good["metrics"].update(max_abs_err=1e-3, within_tol=True)
    nan = _row("c2", "peer", ms=0.75)
    nan["metrics"].update(max_abs_err=float("nan"))
    skipped = _row("c2", "ours", ms=2.0)
    skipped["metrics"].update(check="skipped: needs 3 GB > budget 1 GB")
    table = side_by_side.pivot([good, bad, skipped, nan], "median_ms",
                               columns=["ours", "peer"])
    lines = table.splitlines()
    self.assertEqual(lines[2], "| c1 | 1.25 | 0.5! |")
    self.assertEqual(lines[3], "| c2 | 2? | 0.75! |")
    self.assertTrue(any(line.startswith("`!` fails tolerance") for line in lines), table)
    self.assertTrue(any(line.startswith("`?` not checked") for line in lines), table)
    # Without a failing or skipped row: no marks, no footnotes.
    clean = side_by_side.pivot([good], "median_ms", columns=["ours"])
    self.assertEqual(clean.splitlines()[2:], ["| c1 | 1.25 |"])


if __name__ == "__main__":
  absltest.main()
