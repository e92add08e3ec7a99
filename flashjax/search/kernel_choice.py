"""The search machinery for kernel configurations: predict Pallas attention latency from
(shape, mask density, block sizes, stages, persistent) and pick block sizes without a tuning
table.

  rows = [KernelSample(shape, density, config, latency_ms), ...]   # measured (GPU) or synthetic
  pred = fit_kernel_predictor(rows)          # ranks the configurations of a problem
  best = choose_candidate(pred, shape, density, candidates)           # a KernelCandidate
  evaluate_choices(pred, rows)   # per held-out (shape, density): pick vs measured best
  ranking = fit_ranking(rows)    # the baseline: one order of configurations for every problem
  evaluate_picks(ranking_picker(ranking), rows)
  evaluate_picks(head_dim_ranking_picker(rows), rows)   # one order per head dim
  leave_one_problem_out(rows)    # the same, each problem picked by a fit without it
  samples_from_tuning_rows(results_rows, num_heads)   # configs/tune_attention.py's rows

Features (`kernel_features`): log2 of B, T, S, heads, head dim, block_q, block_kv and of
the number of tiles (T / block_q) * (S / block_kv) * density, the density itself,
log2 of the padded waste (ceil(T / bq) bq / T and the same for S), num_stages (0 = default),
persistent (0 / 1), and log2 of three products that set the cost of a tiled kernel: visited
tiles over batch and heads, programs (row blocks x batch x heads; occupancy) and the tile's
work block_q x block_kv x head dim (registers). The predictor is flashjax.search.predictor's
MLP (log latency).
`measure_kernel` times `flashjax.dot_product_attention` with a BlockSizes on the device
(`make_problem` draws one problem's mask and inputs, shared by all its configurations;
`compile_kernel` compiles one configuration ahead of time, so many can compile at once in
threads).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from flashjax import benchmarking
from flashjax import masks
from flashjax.ops.attention.api import dot_product_attention
from flashjax.ops.attention.block_sizes import BlockSizes
from flashjax.search import latency
from flashjax.search import predictor as predictor_lib


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  """batch, q_len, kv_len, num_heads, head_dim of an attention call."""
  batch: int
  q_len: int
  kv_len: int
  num_heads: int
  head_dim: int

  def __post_init__(self):
    for name, value in dataclasses.asdict(self).items():
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")


@dataclasses.dataclass(frozen=True)
class KernelCandidate:
  """A kernel configuration: tiles, pipelining stages (0: the backend default), persistent."""
  block_q: int
  block_kv: int
  num_stages: int = 0
  persistent: bool = False

  def __post_init__(self):
    for name in ("block_q", "block_kv"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{name}={value!r} must be a positive power of two")
    if not isinstance(self.num_stages, int) or self.num_stages < 0:
      raise ValueError(f"num_stages={self.num_stages!r} must be an int >= 0")
    if not isinstance(self.persistent, bool):
      raise ValueError(f"persistent={self.persistent!r} must be a bool")

  def block_sizes(self) -> Any:
    """The flashjax BlockSizes of this configuration."""
    return BlockSizes(block_q=self.block_q, block_kv=self.block_kv,
                      num_stages=self.num_stages or None,
                      persistent=self.persistent or None)


@dataclasses.dataclass(frozen=True)
class KernelSample:
  """One measured (or synthetic) latency."""
  shape: AttentionShape
  density: float
  config: KernelCandidate
  latency_ms: float


def kernel_features(shape: AttentionShape, density: float, config: KernelCandidate) -> np.ndarray:
  """float32 feature vector of one (shape, density, config) (module docstring)."""
  if not 0 < density <= 1:
    raise ValueError(f"{density=} must lie in (0, 1]")
  s, c = shape, config
  tiles_q, tiles_kv = math.ceil(s.q_len / c.block_q), math.ceil(s.kv_len / c.block_kv)
  return np.asarray([
      math.log2(s.batch), math.log2(s.q_len), math.log2(s.kv_len), math.log2(s.num_heads),
      math.log2(s.head_dim), math.log2(c.block_q), math.log2(c.block_kv),
      math.log2(max(tiles_q * tiles_kv * density, 1e-3)), density,
      math.log2(tiles_q * c.block_q / s.q_len), math.log2(tiles_kv * c.block_kv / s.kv_len),
      float(c.num_stages), float(c.persistent),
      math.log2(max(tiles_q * tiles_kv * density * s.batch * s.num_heads, 1e-3)),
      math.log2(tiles_q * s.batch * s.num_heads), math.log2(c.block_q * c.block_kv * s.head_dim)
  ], np.float32)


def relative_latencies(samples: Sequence[KernelSample]) -> list[KernelSample]:
  """The samples with each latency divided by the geometric mean of its (shape, density)
  group: what differs between configurations of one problem, without the problem's scale."""
  out = []
  for group in group_by_problem(samples).values():
    scale = float(np.exp(np.mean(np.log([r.latency_ms for r in group]))))
    out += [dataclasses.replace(r, latency_ms=r.latency_ms / scale) for r in group]
  return out


def fit_kernel_predictor(samples: Sequence[KernelSample], *, relative: bool = True,
                         **mlp_kwargs: Any) -> predictor_lib.MLPPredictor:
  """An MLP predictor of kernel latency (mlp_kwargs go to predictor.fit_mlp).

  Args:
    samples: measured latencies, several configurations per (shape, density).
    relative: fit `relative_latencies` (default): the predictor then ranks the
      configurations of a problem (all `choose_candidate` needs) instead of spending its
      capacity on the problems' scale, which spans orders of magnitude. On synthetic
      latencies this took held-out picks within 5 % of the best from 35 % of the problems
      (absolute log latency, 9 % MAPE) to all of them.
    **mlp_kwargs: passed to predictor.fit_mlp.
  """
  if len(samples) < 2:
    raise ValueError(f"need at least 2 samples, got {len(samples)}")
  if relative:
    samples = relative_latencies(samples)
  x = np.stack([kernel_features(r.shape, r.density, r.config) for r in samples])
  y = np.asarray([r.latency_ms for r in samples])
  return predictor_lib.fit_mlp(x, y, **mlp_kwargs)


def choose_candidate(pred: Any, shape: AttentionShape, density: float,
                  candidates: Sequence[KernelCandidate]) -> KernelCandidate:
  """The candidate with the lowest predicted latency."""
  if not candidates:
    raise ValueError("candidates must not be empty")
  x = np.stack([kernel_features(shape, density, c) for c in candidates])
  return candidates[int(np.argmin(pred.predict(x)))]


def group_by_problem(samples: Sequence[KernelSample]
                     ) -> dict[tuple[AttentionShape, float], list[KernelSample]]:
  """Samples grouped by (shape, density)."""
  groups: dict[tuple[AttentionShape, float], list[KernelSample]] = {}
  for r in samples:
    groups.setdefault((r.shape, float(r.density)), []).append(r)
  return groups


Picker = Callable[[AttentionShape, float, Sequence[KernelCandidate]], KernelCandidate]


def predictor_picker(pred: Any) -> Picker:
  """Picks the candidate `pred` predicts fastest (`choose_candidate`)."""
  return lambda shape, density, candidates: choose_candidate(pred, shape, density, candidates)


def fit_ranking(samples: Sequence[KernelSample]) -> list[KernelCandidate]:
  """The configurations ordered by their mean log relative latency over the problems of
  `samples` (a configuration that did not run on a problem, e.g. out of shared memory,
  counts as that problem's slowest): the one-size-fits-all baseline of the predictor."""
  groups = group_by_problem(relative_latencies(samples))
  configs = sorted({r.config for r in samples}, key=lambda c: dataclasses.astuple(c))
  if not configs:
    raise ValueError("samples is empty")
  score = dict.fromkeys(configs, 0.0)
  for group in groups.values():
    measured = {r.config: math.log(r.latency_ms) for r in group}
    worst = max(measured.values())
    for c in configs:
      score[c] += measured.get(c, worst)
  return sorted(configs, key=lambda c: score[c])


def ranking_picker(ranking: Sequence[KernelCandidate]) -> Picker:
  """Picks the first configuration of `ranking` among a problem's candidates."""
  def pick(shape, density, candidates):
    del shape, density
    for c in ranking:
      if c in candidates:
        return c
    raise ValueError(f"none of the {len(candidates)} candidates is in the ranking")
  return pick


def head_dim_ranking_picker(samples: Sequence[KernelSample]) -> Picker:
  """One `fit_ranking` per head dim of `samples`; a problem gets its head dim's ranking (the
  overall one for a head dim `samples` lacks). The head dim sets a tile's register and
  shared-memory footprint, which is what splits the winners: on the H100's 60 measured
  problems 128 x 64 tiles won at D 128 and 64 x 128 at D 64 (docs/search.md)."""
  overall = fit_ranking(samples)
  by_head_dim = {d: fit_ranking([r for r in samples if r.shape.head_dim == d])
                 for d in {r.shape.head_dim for r in samples}}

  def pick(shape, density, candidates):
    return ranking_picker(by_head_dim.get(shape.head_dim, overall))(shape, density, candidates)
  return pick


def evaluate_choices(pred: Any, samples: Sequence[KernelSample], tolerance: float = 0.05
                     ) -> dict[str, Any]:
  """`evaluate_picks` of the predictor's picks (`predictor_picker`)."""
  return evaluate_picks(predictor_picker(pred), samples, tolerance)


def evaluate_picks(pick: Picker, samples: Sequence[KernelSample], tolerance: float = 0.05
                   ) -> dict[str, Any]:
  """For every (shape, density) of `samples` (measured at several configs): the pick's
  measured latency against the measured best.

  Returns:
    {"problems": count, "within_tolerance": fraction whose pick is within `tolerance` of the
     best, "mean_slowdown": mean (pick / best - 1), "rows": per problem details}.
  """
  rows = []
  for (shape, density), group in group_by_problem(samples).items():
    measured = {r.config: r.latency_ms for r in group}
    pick_ = pick(shape, density, list(measured))
    best = min(measured.values())
    rows.append({"shape": dataclasses.asdict(shape), "density": density,
                 "pick": dataclasses.asdict(pick_), "pick_ms": measured[pick_],
                 "best_ms": best, "slowdown": measured[pick_] / best - 1})
  if not rows:
    raise ValueError("samples is empty")
  slow = np.asarray([r["slowdown"] for r in rows])
  return {"problems": len(rows), "within_tolerance": float(np.mean(slow <= tolerance)),
          "mean_slowdown": float(slow.mean()), "rows": rows}


def candidate_from_label(label: str) -> KernelCandidate:
  """The KernelCandidate of a tuning-study candidate label: "BQxBK[ sN][ persistent|grid]"
  (flashjax.ops.attention.tuning.search.describe; "grid" is the per-item grid)."""
  parts = label.split()
  try:
    block_q, block_kv = (int(x) for x in parts[0].split("x"))
    stages, persistent = 0, False
    for part in parts[1:]:
      if part in ("persistent", "grid"):
        persistent = part == "persistent"
      elif part.startswith("s"):
        stages = int(part[1:])
      else:
        raise ValueError(part)
  except (ValueError, IndexError) as error:
    raise ValueError(f"{label=} is not a candidate label like '128x64 s2 persistent'"
                     ) from error
  return KernelCandidate(block_q, block_kv, stages, persistent)


def samples_from_tuning_rows(rows: Sequence[dict[str, Any]], num_heads: int
                             ) -> list[KernelSample]:
  """KernelSamples of configs/tune_attention.py results rows (status ok; the candidates
  that failed, e.g. by shared memory, are left out): one problem per row, at the row's
  density bucket, one sample per timed candidate.

  Args:
    rows: results.jsonl rows of the tuning study.
    num_heads: the study's query heads (its config's num_heads; not in the rows).
  """
  samples = []
  for row in rows:
    if row.get("status") != "ok":
      continue
    point, metrics = row["point"], row["metrics"]
    shape = AttentionShape(int(point["batch"]), int(point["q_len"]), int(point["kv_len"]),
                           num_heads, int(point["head_dim"]))
    density = float(metrics["density_bucket"])
    for candidate in json.loads(metrics["candidates"]):
      if candidate.get("ms") is not None:
        samples.append(KernelSample(shape, density, candidate_from_label(candidate["label"]),
                                    float(candidate["ms"])))
  return samples


def samples_from_kernel_rows(rows: Sequence[dict[str, Any]]) -> list[KernelSample]:
  """KernelSamples of the rows of a hat_search kernel stage (kernel.jsonl: one row per problem
  and configuration, with "shape", "density", "config", "latency_ms"); untimed rows
  (latency_ms None) are left out."""
  return [KernelSample(AttentionShape(**r["shape"]), r["density"],
                       KernelCandidate(**r["config"]), r["latency_ms"])
          for r in rows if r["latency_ms"] is not None]


def leave_one_problem_out(samples: Sequence[KernelSample], tolerance: float = 0.05,
                          method: str = "mlp", **mlp_kwargs: Any) -> dict[str, Any]:
  """evaluate_picks with every (shape, density) held out in turn: what picks for a problem
  was fitted on the other problems only: method "mlp" (fit_kernel_predictor, mlp_kwargs to
  it), "ranking" (fit_ranking) or "head_dim_ranking" (head_dim_ranking_picker). Same return
  value as evaluate_picks."""
  pickers = {"mlp": lambda train: predictor_picker(fit_kernel_predictor(train, **mlp_kwargs)),
             "ranking": lambda train: ranking_picker(fit_ranking(train)),
             "head_dim_ranking": head_dim_ranking_picker}
  if method not in pickers:
    raise ValueError(f"{method=} must be one of {sorted(pickers)}")
  groups = group_by_problem(samples)
  if len(groups) < 2:
    raise ValueError(f"need at least 2 problems, got {len(groups)}")
  rows = []
  for problem, held in groups.items():
    train = [r for key, group in groups.items() if key != problem for r in group]
    rows += evaluate_picks(pickers[method](train), held, tolerance)["rows"]
  slow = np.asarray([r["slowdown"] for r in rows])
  return {"problems": len(rows), "within_tolerance": float(np.mean(slow <= tolerance)),
          "mean_slowdown": float(slow.mean()), "rows": rows}


def synthetic_latency(shape: AttentionShape, density: float, config: KernelCandidate) -> float:
  """A made-up but structured latency (ms) for tests and the CPU study: work over the
  visited tiles with padding waste, a per-tile overhead that favours large tiles, an
  occupancy penalty when there are fewer row-blocks than 132 SMs, and small effects of
  stages and persistence."""
  s, c = shape, config
  tiles_q, tiles_kv = math.ceil(s.q_len / c.block_q), math.ceil(s.kv_len / c.block_kv)
  tiles = tiles_q * tiles_kv * density * s.batch * s.num_heads
  work = tiles * c.block_q * c.block_kv * s.head_dim * 4e-9
  overhead = tiles * 2e-4
  programs = tiles_q * s.batch * s.num_heads
  occupancy = max(1.0, 132 / programs) ** 0.5
  register = 1.0 + 0.4 * (c.block_q * c.block_kv * s.head_dim > 128 * 128 * 128)
  stages = {0: 1.0, 1: 1.15, 2: 1.0, 3: 0.95, 4: 0.97}.get(c.num_stages, 1.0)
  persistent = 0.93 if c.persistent and programs > 132 else 1.0
  return (work + overhead) * occupancy * register * stages * persistent + 5e-3


@dataclasses.dataclass(frozen=True)
class KernelProblem:
  """One attention problem, the same for every configuration timed on it (`make_problem`):
  a random mask of `mask_block` x `mask_block` tiles at the given density and the inputs."""
  shape: AttentionShape
  density: float
  mask_block: int
  mask: Any              # flashjax element mask (masks.from_dense)
  args: tuple[Any, ...]  # q, k, v


def make_problem(shape: AttentionShape, density: float, *, mask_block: int = 128,
                 dtype: Any = "bfloat16", seed: int = 0) -> KernelProblem:
  """A random block-sparse problem: each `mask_block` x `mask_block` tile of the mask is on
  with probability `density` (one tile per query row at least) and q, k, v are normal.

  Every configuration of a problem then runs the same mask on the same inputs, so their
  latencies differ only by the configuration (and timing noise). Configurations whose
  tiles divide `mask_block` visit the same tile density (`compile_kernel` checks it), the
  density `kernel_features` is given.
  """
  if not 0 < density <= 1:
    raise ValueError(f"{density=} must lie in (0, 1]")
  if not isinstance(mask_block, int) or mask_block < 1 or mask_block & (mask_block - 1):
    raise ValueError(f"{mask_block=} must be a positive power of two")
  s = shape
  rng = np.random.default_rng(seed)
  tq, tk = math.ceil(s.q_len / mask_block), math.ceil(s.kv_len / mask_block)
  tiles = rng.random((tq, tk)) < density
  tiles[np.arange(tq), rng.integers(0, tk, tq)] = True  # one tile per row at least
  dense = np.repeat(np.repeat(tiles, mask_block, 0), mask_block, 1)
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (s.batch, s.q_len, s.num_heads, s.head_dim), dtype)
  k = jax.random.normal(keys[1], (s.batch, s.kv_len, s.num_heads, s.head_dim), dtype)
  v = jax.random.normal(keys[2], (s.batch, s.kv_len, s.num_heads, s.head_dim), dtype)
  return KernelProblem(shape, density, mask_block,
                       masks.from_dense(dense[:s.q_len, :s.kv_len]), (q, k, v))


@dataclasses.dataclass
class CompiledKernel:
  """One (problem, configuration) compiled ahead of time (`compile_kernel`): one call of
  `fn(*args)` runs the attention `calls` times."""
  fn: Any               # compiled program
  args: tuple[Any, ...]  # its arguments
  calls: int            # attention calls per run of fn
  compile_s: float      # seconds spent lowering and compiling
  lower_s: float        # of them, tracing and lowering (holds the GIL)


def compile_kernel(problem: KernelProblem, config: KernelCandidate, *,
                   implementation: str = "pallas_triton", interpret: bool = False,
                   loop_calls: int = 0) -> CompiledKernel:
  """Compiles block-sparse attention of `problem` with `config` (thread-safe, so many
  configurations can compile at once).

  loop_calls: 0 compiles one attention call; n >= 1 one program that makes n + 1 (one
  whose output it returns, n in a device loop: `benchmarking.output_and_loop`), so a run
  divided by `calls` is the kernel's time with the per-call dispatch and synchronisation
  amortised, which otherwise weigh on kernels of ~0.1 ms.
  """
  for name in ("block_q", "block_kv"):
    if problem.mask_block % getattr(config, name):
      raise ValueError(f"{name}={getattr(config, name)} must divide the problem's "
                       f"mask_block={problem.mask_block} (else its tile density differs)")
  if isinstance(loop_calls, bool) or not isinstance(loop_calls, int) or loop_calls < 0:
    raise ValueError(f"{loop_calls=} must be an int >= 0")
  start = time.perf_counter()
  attend = lambda q, k, v: dot_product_attention(
      q, k, v, mask=problem.mask, implementation=implementation,
      block_sizes=config.block_sizes(), interpret=interpret)
  if loop_calls:
    # the program takes a tuple of input sets: here one, the problem's (q, k, v)
    fn, args = jax.jit(benchmarking.output_and_loop(attend, loop_calls)), ((problem.args,),)
  else:
    fn, args = jax.jit(attend), problem.args
  lowered = fn.lower(*args)
  lower_s = time.perf_counter() - start
  return CompiledKernel(lowered.compile(), args, loop_calls + 1 if loop_calls else 1,
                        time.perf_counter() - start, lower_s)


def measure_kernel(shape: AttentionShape, density: float, config: KernelCandidate, *,
                   implementation: str = "pallas_triton", dtype: Any = "bfloat16",
                   warmup: int = 3, repeats: int = 20, interpret: bool = False,
                   seed: int = 0, mask_block: int = 128, loop_calls: int = 0) -> float:
  """Trimmed-mean latency (ms a call; flashjax.search.latency.measure) of one configuration
  on `make_problem(shape, density, ...)` (`loop_calls`: `compile_kernel`)."""
  problem = make_problem(shape, density, mask_block=mask_block, dtype=dtype, seed=seed)
  c = compile_kernel(problem, config, implementation=implementation, interpret=interpret,
                     loop_calls=loop_calls)
  return latency.measure(c.fn, *c.args, warmup=warmup, repeats=repeats)["mean_ms"] / c.calls
