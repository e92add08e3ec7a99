r"""Micro-benchmark: what one routed ReLU-MLP layer of the Polar Sparsity decode step costs.

At the polar_sparsity study's opt shape (d_model 1024, F = 4096 fc1 units, neuron-router
rank 128, bf16 weights) and per batch size B and union size k, it times one layer's pieces
separately, each in a jitted device loop (`benchmarking.time_in_loop`):

  router      the neuron router alone (Linear(d, r) -> Linear(r, F), float32)
  select_*    router + batch-union selection, per selection variant (`SELECTIONS`)
  sparse_mlp  `flashjax.sparse_mlp` over k given (sorted) units
  dense_mlp   the dense ReLU MLP (x @ w1 -> relu -> @ w2) the routed layer replaces

so a routed layer's overhead (router + selection) can be put beside the MLP time it saves.
Every selection variant is checked to pick the same set of units as the current one
(`routers.select_neurons`) before it is timed.

  python -m experiments.router_select_bench OUT.json [B,... [k,...]]

writes one JSON row per (B, k) and prints a markdown table (us per call).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flashjax
from flashjax import benchmarking
from flashjax.sparsity import routers

D_MODEL, D_FF, RANK = 1024, 4096, 128


def _select_threshold(logits: jax.Array, k: int) -> jax.Array:
  """The k-th largest batch score as a threshold, then the ids at or above it in index
  order (one sort for the threshold, a compaction instead of the second sort)."""
  scores = routers.union_scores(logits)
  kth = jax.lax.top_k(scores, k)[0][k - 1]
  return jnp.nonzero(scores >= kth, size=k)[0].astype(jnp.int32)


def _select_top_k_unsorted(logits: jax.Array, k: int) -> jax.Array:
  """top_k without the index sort (what the sort alone costs)."""
  scores = routers.union_scores(logits)
  return jax.lax.top_k(scores, k)[1].astype(jnp.int32)


SELECTIONS = {"top_k_sort": routers.select_neurons, "threshold": _select_threshold,
              "top_k_unsorted": _select_top_k_unsorted}


def bench(batch: int, k: int, iters: int = 200, repeats: int = 5) -> dict:
  """Times the pieces of one routed MLP layer at batch `batch` and union size `k`."""
  keys = jax.random.split(jax.random.key(batch * 7919 + k), 4)
  router = routers.NeuronRouter(D_MODEL, D_FF, rank=RANK, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(router)
  x = jax.random.normal(keys[0], (batch, D_MODEL), jnp.bfloat16)
  w1 = (jax.random.normal(keys[1], (D_FF, D_MODEL)) / 32).astype(jnp.bfloat16)  # [F, d]
  w2 = (jax.random.normal(keys[2], (D_FF, D_MODEL)) / 64).astype(jnp.bfloat16)
  row = {"batch": batch, "k": k, "d_model": D_MODEL, "d_ff": D_FF, "rank": RANK,
         "device": jax.devices()[0].device_kind, "jax": jax.__version__}

  def us(fn, *args):
    timing = benchmarking.time_in_loop(fn, *args, iters=iters, repeats=repeats)
    return round(float(np.median(timing.times_s)) * 1e6, 2)

  def logits_of(state, x):
    return nnx.merge(graphdef, state)(x)

  row["router_us"] = us(logits_of, state, x)
  reference = np.asarray(routers.select_neurons(logits_of(state, x), k))
  for name, select in SELECTIONS.items():
    picked = np.sort(np.asarray(select(logits_of(state, x), k)))
    row[f"{name}_same_set"] = bool(np.array_equal(picked, reference))
    row[f"select_{name}_us"] = us(lambda s, x, select=select: select(logits_of(s, x), k),
                                  state, x)
  ids = jnp.asarray(reference)
  row["sparse_mlp_us"] = us(
      lambda x, w1, w2, ids: flashjax.sparse_mlp(x, w1, w2, ids, w1_layout="FD"),
      x, w1, w2, ids)
  row["dense_mlp_us"] = us(
      lambda x, w1, w2: jax.nn.relu(x @ w1.T) @ w2, x, w1, w2)
  return row


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise SystemExit(__doc__)
  out = argv[1]
  batches = [int(b) for b in argv[2].split(",")] if len(argv) > 2 else [1, 8, 64]
  ks = [int(k) for k in argv[3].split(",")] if len(argv) > 3 else [1024, 2048]
  rows = []
  for batch in batches:
    for k in ks:
      rows.append(bench(batch, k))
      with open(out, "w") as f:  # rewritten after every point: a cut run keeps its rows
        json.dump(rows, f, indent=1)
  names = ["router"] + [f"select_{n}" for n in SELECTIONS] + ["sparse_mlp", "dense_mlp"]
  print("| B | k | " + " | ".join(names) + " | same set |")
  print("|---" * (len(names) + 3) + "|")
  for r in rows:
    same = all(r[f"{n}_same_set"] for n in SELECTIONS)
    print(f"| {r['batch']} | {r['k']} | " + " | ".join(f"{r[n + '_us']}" for n in names)
          + f" | {same} |")


if __name__ == "__main__":
  main(sys.argv)
