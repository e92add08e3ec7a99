"""Experiment kind "attention_tune": searches the block sizes of one attention point.

For one (implementation, mask, shape) point: builds the mask and inputs as attention_bench
does (its input, timing and check helpers: the same protocol and tolerances as the
benchmark rows), times the backend's heuristic (`block_sizes=None`) and every candidate of
its search space (`search_space` in the backend module, via
`flashjax.ops.attention.tuning.search.candidates`; or `config.candidates`) with
attention_bench's timing (flashjax.benchmarking), checks the winner against the float32
reference, and records it in a tuning file under the point's tuning key (docs/autotune.md).
When the heuristic is faster than every candidate, its resolved BlockSizes are recorded, so
a recorded entry is never slower than the default it replaces. Tuning lookup is off while
timing (the heuristic is the backend's own, not an earlier tuning).

Config fields: those of attention_bench (configs/common.attention_base sets them
all; `block_q` / `block_kv` stay None, they only set the random_blocks pattern tiles), plus

  implementation  one of tuning.search.TUNABLE ("pallas_mosaic_gpu", "pallas_triton")
  candidates      None: the backend's search space; or a list of BlockSizes field dicts
  tuning_file     JSON file to record into; None: the user cache file of the device kind
                  ($FLASHJAX_TUNING_DIR or ~/.cache/flashjax/tuning, tuning.store.user_file)
  record          False: search and report only

Metrics: `tuning_key` (JSON), `causal`, `density_bucket`, `winner` ("candidate" or
"heuristic"), `best` (label) and `best_block_sizes` (JSON), `best_ms`, `heuristic_ms`,
`speedup` (heuristic_ms / best_ms), `candidates_ok`, `candidates_failed`, `candidates` (JSON
list of {label, ms} or {label, error} in search order), `compile_s_total`, `max_abs_err`,
`within_tol` (of the winner), `recorded` and `tuning_file`. An entry is recorded only when
the winner passed the check (or `check` is off).
"""

from __future__ import annotations

import functools
import importlib
import json
from typing import Any

import jax
import ml_collections
import numpy as np

import flashjax
from experiments import attention_bench
from flashjax.ops.attention.block_sizes import BlockSizes
from flashjax.ops.attention.tuning import keys as tuning_keys
from flashjax.ops.attention.tuning import search as tuning_search
from flashjax.ops.attention.tuning import store as tuning_store

def _candidates(config: ml_collections.ConfigDict) -> list[BlockSizes]:
  if config.candidates is None:
    return tuning_search.candidates(config.implementation, config.head_dim)
  return [tuning_store.block_sizes_from_dict(dict(c)) for c in config.candidates]


def _heuristic_sizes(config: ml_collections.ConfigDict, interpret: bool,
                     kernel_mask: Any) -> BlockSizes:
  """The backend's default BlockSizes at this shape and mask (what block_sizes=None resolves
  to; the mask families pass no is_causal or segment ids, so a full mask is mask None)."""
  backend = importlib.import_module(f"flashjax.ops.attention.{config.implementation}")
  with tuning_store.disabled():
    return backend.default_block_sizes(config.head_dim, config.q_len, config.kv_len,
                                       interpret=interpret, full_mask=kernel_mask is None)


def run_point(config: ml_collections.ConfigDict, point: dict[str, Any]) -> dict[str, Any]:
  """Tunes one point; see the module docstring.

  Args:
    config: the study config with the point's fields already set.
    point: the sweep point (unused beyond config; recorded by the launcher).

  Returns:
    Metrics (module docstring).
  """
  del point
  implementation = config.implementation
  if implementation not in tuning_search.TUNABLE:
    raise ValueError(f"{implementation=} is not tunable; one of {tuning_search.TUNABLE}")
  if config.mode not in ("fwd", "fwd_bwd"):
    raise ValueError(f"{config.mode=} must be 'fwd' or 'fwd_bwd'")
  rng = np.random.default_rng(config.seed)
  mask = attention_bench.build_mask(config, rng)
  kernel_mask = attention_bench.kernel_mask(config, mask)
  sets = attention_bench.input_sets(config)
  interpret = attention_bench.interpret_mode(config)
  device_kind = jax.devices()[0].device_kind
  causal, density = tuning_keys.mask_features(kernel_mask, config.q_len, config.kv_len)
  key = tuning_keys.make_key(
      implementation, device_kind=device_kind, dtype=config.dtype, head_dim=config.head_dim,
      q_len=config.q_len, kv_len=config.kv_len, causal=causal, density=density,
      group=config.num_heads // config.num_kv_heads)

  fns, compile_s = {}, []

  def timed(sizes: BlockSizes | None) -> float:
    attend = jax.jit(functools.partial(
        flashjax.dot_product_attention, mask=kernel_mask, implementation=implementation,
        block_sizes=sizes, interpret=interpret))
    fn = attend if config.mode == "fwd" else attention_bench.with_grads(attend)
    timing = attention_bench.time_point(config, fn, sets)
    fns[sizes] = fn
    compile_s.append(timing["compile_s"])
    return timing["median_ms"]

  with tuning_store.disabled():
    heuristic_ms, heuristic_error = None, None
    try:
      heuristic_ms = timed(None)
    except Exception as e:  # reported; the candidates still run
      heuristic_error = f"{type(e).__name__}: {e}"[:400]
    best, rows = tuning_search.search(_candidates(config), timed, key=key)
  best_ms = next(row["ms"] for row in rows
                 if row["block_sizes"] == tuning_store.block_sizes_to_dict(best))
  winner, winner_sizes, winner_ms = "candidate", best, best_ms
  if heuristic_ms is not None and heuristic_ms <= best_ms:
    winner, winner_ms = "heuristic", heuristic_ms
    winner_sizes = _heuristic_sizes(config, interpret, kernel_mask)

  metrics = {"tuning_key": tuning_keys.key_string(key), "causal": causal,
             "density_bucket": key["density"], "winner": winner,
             "best": tuning_search.describe(winner_sizes),
             "best_block_sizes": json.dumps(tuning_store.block_sizes_to_dict(winner_sizes)),
             "best_ms": winner_ms, "heuristic_ms": heuristic_ms,
             "speedup": None if heuristic_ms is None else heuristic_ms / best_ms,
             "candidates_ok": sum(row["ms"] is not None for row in rows),
             "candidates_failed": sum(row["ms"] is None for row in rows),
             "candidates": json.dumps([
                 {"label": row["label"], **({"ms": round(row["ms"], 5)} if row["error"] is None
                                            else {"error": row["error"]})} for row in rows]),
             "compile_s_total": sum(compile_s)}
  if heuristic_error is not None:
    metrics["heuristic_error"] = heuristic_error
  if config.check:
    with tuning_store.disabled():
      winner_fn = fns[None if winner == "heuristic" else best]
      metrics.update(attention_bench.check_errors(config, winner_fn, sets, mask))
  passed = not config.check or metrics["within_tol"]
  path = config.tuning_file or str(tuning_store.user_file(device_kind))
  metrics.update(recorded=bool(config.record and passed), tuning_file=path)
  if metrics["recorded"]:
    tuning_store.record(tuning_store.make_entry(
        key, winner_sizes, winner_ms, heuristic_ms=heuristic_ms, winner=winner,
        mode=config.mode, jax_version=jax.__version__,
        shape=[config.batch, config.q_len, config.kv_len, config.num_heads,
               config.num_kv_heads, config.head_dim], mask=config.mask), path)
  return metrics
