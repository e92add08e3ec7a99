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


if __name__ == "__main__":
  absltest.main()
