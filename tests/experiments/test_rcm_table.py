"""experiments/rcm_table.py: the reproduction's masks through rcm_report, on the host."""

import json
import pathlib
import tempfile

from absl.testing import absltest

from experiments import rcm_table


class RcmTableTest(absltest.TestCase):

  def test_cases_are_the_single_pattern_masks(self):
    names = [name for name, _ in rcm_table.cases()]
    self.assertIn("permuted_band", names)
    self.assertIn("random_banded", names)
    for skipped in ("dense", "causal", "alpaca_full", "alpaca_prefix", "rcm",
                    "permuted_band_rcm"):
      self.assertNotIn(skipped, names)

  def test_rows_resume_and_rcm_recovers_the_permuted_band(self):
    out = pathlib.Path(tempfile.mkdtemp())
    rows = rcm_table.write_table(out, 512, (128, 64))
    self.assertLen(rows, 2 * len(rcm_table.cases()))
    band = {r["n"]: r for r in rows if r["case"] == "permuted_band"}
    for n, r in band.items():
      self.assertEqual(r["rcm_status"], "ok")
      # A band of half width 4 scrambled by a permutation: RCM orders it back to width 4,
      # and the tiles it touches shrink to the diagonal ones and their neighbours.
      self.assertEqual(r["rcm_bandwidth_after"], 4, msg=n)
      self.assertGreater(r["rcm_bandwidth_before"], n // 2, msg=n)
      self.assertLess(r["rcm_block_density_after"], r["rcm_block_density_before"], msg=n)
    window = [r for r in rows if r["case"] == "longformer_window"]
    for r in window:  # already a band: nothing to gain
      self.assertEqual(r["rcm_bandwidth_before"], r["rcm_bandwidth_after"])
    lines = (out / "rcm_table.jsonl").read_text().splitlines()
    again = rcm_table.write_table(out, 512, (128, 64))  # nothing left to compute
    self.assertEqual((out / "rcm_table.jsonl").read_text().splitlines(), lines)
    self.assertLen(again, len(rows))
    table = (out / "rcm_table.md").read_text()
    self.assertIn("| permuted_band | 512 |", table)
    self.assertEqual(json.loads(lines[0])["tiles"], "128x64")


if __name__ == "__main__":
  absltest.main()
