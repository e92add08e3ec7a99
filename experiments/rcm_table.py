"""What RCM reordering does to the reproduction's masks, on the host (no kernel, no GPU).

  python -m experiments.rcm_table OUT_DIR [--max_len=16384] [--tiles=128x64]

For every square single-row mask case of configs/reproduce_binblkmsk.py (the baselines and
the batched ALPACA packings excluded) at N = 256 ... max_len (the `:full` grid's lengths),
the mask is built as the study builds it (experiments.attention_bench.build_mask, seed 0)
and `flashjax.masks.rcm.rcm_report` gives its density, bandwidth and tile density before and
after Reverse Cuthill-McKee ordering, and the host time of the ordering. Rows go to
OUT_DIR/rcm_table.jsonl as they finish (a rerun skips the (case, N) rows already there) and
the table to OUT_DIR/rcm_table.md. Whether fewer tiles also means a faster kernel is the
GPU study's question (`configs/reproduce_binblkmsk.py:full`); this answers the structural
half: for which masks and lengths RCM can help at all.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any, Sequence

import numpy as np
from absl import app
from absl import flags

from configs import reproduce_binblkmsk
from experiments import attention_bench

_MAX_LEN = flags.DEFINE_integer("max_len", 16384, "longest N (powers of two from 256)")
_TILES = flags.DEFINE_string("tiles", "128x64", "block_q x block_kv of the tile densities")

# Cases RCM can take: one square (T, T) pattern (the ALPACA packings are per batch row).
SKIPPED = reproduce_binblkmsk.BASELINES + ("alpaca_full", "alpaca_prefix")
# The RCM-ordered cases are their base case after the ordering: the base row says it all.
_ORDERED = ("rcm", "permuted_band_rcm")


def cases() -> list[tuple[str, dict[str, Any]]]:
  """(case name, mask fields) of the reproduction's cases this table covers."""
  fields = reproduce_binblkmsk._CASE_FIELDS  # pylint: disable=protected-access
  out = []
  for row in reproduce_binblkmsk.CASES:
    name = row[0]
    if name in SKIPPED or name in _ORDERED:
      continue
    out.append((name, dict(zip(fields[1:], row[1:]))))
  return out


def row(name: str, mask_fields: dict[str, Any], length: int,
        tiles: tuple[int, int]) -> dict[str, Any]:
  """One table row: the case's mask at N = length through rcm_report."""
  config = reproduce_binblkmsk.get_config("full")
  config.q_len = config.kv_len = length
  config.batch = 1  # one pattern (the study's masks broadcast over the batch)
  for key, value in mask_fields.items():
    config[key] = value
  mask = attention_bench.build_mask(config, np.random.default_rng(0))
  return {"case": name, "n": length, "tiles": f"{tiles[0]}x{tiles[1]}",
          **attention_bench.rcm_fields(mask, tiles)}


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  """The table: one line per (case, N)."""
  lines = ["| case | N | density | bandwidth before -> after | tile density before -> after"
           " | tiles kept | RCM ms |", "|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (r["case"], r["n"])):
    if r.get("rcm_status") != "ok":
      lines.append(f"| {r['case']} | {r['n']} | {r.get('rcm_status')} | | | | |")
      continue
    before, after = r["rcm_block_density_before"], r["rcm_block_density_after"]
    lines.append(
        f"| {r['case']} | {r['n']} | {r['rcm_density']:.4f} | {r['rcm_bandwidth_before']} ->"
        f" {r['rcm_bandwidth_after']} | {before:.3f} -> {after:.3f} | {after / before:.2f} |"
        f" {r['rcm_ms']:.0f} |")
  return "\n".join(lines) + "\n"


def write_table(out: pathlib.Path, max_len: int, tiles: tuple[int, int]) -> list[dict]:
  """Computes the missing rows into out/rcm_table.jsonl (appended as each finishes), writes
  out/rcm_table.md from all rows of these tiles, and returns those rows."""
  out.mkdir(parents=True, exist_ok=True)
  path = out / "rcm_table.jsonl"
  label = f"{tiles[0]}x{tiles[1]}"
  done = []
  if path.exists():
    done = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  done = [r for r in done if r["tiles"] == label]
  seen = {(r["case"], r["n"]) for r in done}
  lengths = [256 * 2**i for i in range(16) if 256 * 2**i <= max_len]
  with path.open("a") as sink:
    for length in lengths:
      for name, fields in cases():
        if (name, length) in seen:
          continue
        result = row(name, fields, length, tiles)
        sink.write(json.dumps(result) + "\n")
        sink.flush()
        done.append(result)
        print(json.dumps(result), file=sys.stderr)
  (out / "rcm_table.md").write_text(markdown(done))
  return done


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError("usage: python -m experiments.rcm_table OUT_DIR")
  try:
    tiles = tuple(int(x) for x in _TILES.value.split("x"))
  except ValueError:
    tiles = ()
  if len(tiles) != 2 or min(tiles) < 1:
    raise app.UsageError(f"--tiles={_TILES.value!r} must be BQxBK, e.g. 128x64")
  if _MAX_LEN.value < 256:
    raise app.UsageError(f"--max_len={_MAX_LEN.value} must be >= 256")
  write_table(pathlib.Path(argv[1]), _MAX_LEN.value, tiles)


if __name__ == "__main__":
  app.run(main)
