"""The block-size search: each tunable backend's candidates, timed by a caller's function.

A tunable backend declares its search space next to its heuristic, as
`search_space(head_dim) -> list[BlockSizes]` in its module (pallas_mosaic_gpu.py,
pallas_triton.py); `candidates` finds it by backend name (imported on first use, as api.py
imports backends). `search` times candidates with a caller's timing function and returns the
fastest with one row per candidate; store.py records the winner. The study that runs it is
`configs/tune_attention.py` (experiment kind `experiments/attention_tune.py`).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flashjax.ops.attention.block_sizes import BlockSizes
from flashjax.ops.attention.tuning import keys
from flashjax.ops.attention.tuning import store

# Backends with a search space: modules flashjax.ops.attention.<name> with `search_space`.
TUNABLE = ("pallas_mosaic_gpu", "pallas_triton")
_MAX_ERROR_CHARS = 400


def candidates(backend: str, head_dim: int) -> list[BlockSizes]:
  """The search space of a backend: its module's `search_space(head_dim)`.

  Args:
    backend: one of TUNABLE.
    head_dim: D.

  Returns:
    The candidate BlockSizes (forward tiles; backward tiles left to the backend).

  Raises:
    ValueError: a bad head_dim, or a backend without a search space.
  """
  keys.padded_head_dim(head_dim)  # validates head_dim
  if backend not in TUNABLE:
    raise ValueError(f"{backend=} has no search space; tunable: {TUNABLE}")
  module = importlib.import_module(f"flashjax.ops.attention.{backend}")
  return module.search_space(head_dim)


def describe(sizes: BlockSizes | None) -> str:
  """Short label, e.g. "128x64 w4 s3 persistent"; "heuristic" for None."""
  if sizes is None:
    return "heuristic"
  parts = [f"{sizes.block_q}x{sizes.block_kv}"]
  if sizes.block_q_bwd is not None or sizes.block_kv_bwd is not None:
    parts.append(f"bwd {sizes.bwd_q}x{sizes.bwd_kv}")
  if sizes.num_warps is not None:
    parts.append(f"w{sizes.num_warps}")
  if sizes.num_stages is not None:
    parts.append(f"s{sizes.num_stages}")
  if sizes.persistent is not None:
    parts.append("persistent" if sizes.persistent else "grid")
  return " ".join(parts)


def _error_text(error: BaseException) -> str:
  text = f"{type(error).__name__}: {error}".strip()
  return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " ..."


def search(candidate_sizes: Sequence[BlockSizes], time_fn: Callable[[BlockSizes], float], *,
           key: Mapping[str, Any] | None = None,
           skip: tuple[type[BaseException], ...] = (Exception,)
           ) -> tuple[BlockSizes, list[dict[str, Any]]]:
  """Times every candidate and returns the fastest.

  Args:
    candidate_sizes: BlockSizes to try, in order (ties keep the first).
    time_fn: fn(block_sizes) -> milliseconds (e.g. a median), raising for a candidate the
      backend cannot run.
    key: the tuning key, named in the error when no candidate runs.
    skip: exception types that mark a candidate as failed (its error text is kept) instead
      of stopping the search; the default skips any Exception (ValueError for tiles the
      backend refuses, NotImplementedError, XlaRuntimeError / JaxRuntimeError for shared
      memory overflows at compile time, Pallas lowering errors).

  Returns:
    (best BlockSizes, rows): one row per candidate, {"block_sizes": dict, "label": str,
    "ms": float or None, "error": str or None}.

  Raises:
    ValueError: no candidates.
    RuntimeError: no candidate ran; the message lists every candidate's error.
  """
  if not candidate_sizes:
    raise ValueError(f"no candidates to search ({key=})")
  rows = []
  for sizes in candidate_sizes:
    row = {"block_sizes": store.block_sizes_to_dict(sizes), "label": describe(sizes),
           "ms": None, "error": None}
    try:
      ms = float(time_fn(sizes))
      if not math.isfinite(ms) or ms <= 0:
        raise ValueError(f"time_fn returned {ms} ms")
      row["ms"] = ms
    except skip as e:
      row["error"] = _error_text(e)
    rows.append(row)
  ok = [(row["ms"], i) for i, row in enumerate(rows) if row["ms"] is not None]
  if not ok:
    errors = "; ".join(f"{row['label']}: {row['error']}" for row in rows)
    name = keys.key_string(key) if key is not None else None
    raise RuntimeError(f"no candidate ran (key {name}): {errors}")
  return candidate_sizes[min(ok)[1]], rows
