"""The routed-MLP-layer micro-benchmark runs and its selection variants agree."""

import functools
import json

from experiments import router_select_bench


def test_one_point_runs_and_variants_pick_the_same_units(tmp_path, capsys, monkeypatch):
  out = tmp_path / "rows.json"
  # A few timed calls each on CPU (the defaults, 5 x 200, are for the GPU).
  monkeypatch.setattr(router_select_bench, "bench",
                      functools.partial(router_select_bench.bench, iters=3, repeats=2))
  router_select_bench.main(["prog", str(out), "2", "384"])
  (row,) = json.loads(out.read_text())
  assert (row["batch"], row["k"]) == (2, 384)
  for name in router_select_bench.SELECTIONS:
    assert row[f"{name}_same_set"], name
    assert row[f"select_{name}_us"] > 0
  assert row["router_us"] > 0 and row["sparse_mlp_us"] > 0 and row["dense_mlp_us"] > 0
  assert "| 2 | 384 |" in capsys.readouterr().out
