r"""Does compiling in threads shorten the HAT study's measuring stages, and does it change
what they measure?

  python -m experiments.hat_compile_bench OUT.json [SAMPLES] [WORKERS]

On the `configs/hat_search.py:gpu` setup (initial supernet weights: latency does not depend
on them), it measures the same SAMPLES (default 8) SubTransformers twice with
`flashjax.search.latency.collect_dataset`, first compiling one sample at a time, then
WORKERS (default 8) at once in threads, and the first kernel-stage problem's 27
configurations the same two ways (`kernel_choice.compile_kernel`). It records the wall time
of each pass, every sample's compile seconds and latencies, and per sample the relative
difference of the two passes' latencies (threaded compiles could, for instance, disturb
XLA's autotuning). A second serial pass of the kernel configurations gives the run-to-run
noise to compare that difference with.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

from configs import hat_search as study_config
from experiments import hat_search
from flashjax.models import data
from flashjax.search import kernel_choice as kc
from flashjax.search import latency


def _latency_pass(config, path, samples, workers):
  start = time.perf_counter()
  rows = latency.collect_dataset(
      path, hat_search.space(config), hat_search.trainer(config).sub_model,
      num_samples=samples, batch=config.latency_batch, prefill_tokens=config.prefill_tokens,
      decode_tokens=config.decode_tokens, vocab_size=data.VOCAB_SIZE, warmup=config.warmup,
      repeats=config.repeats, trim=config.trim, seed=config.seed, compile_workers=workers)
  return time.perf_counter() - start, rows


def _kernel_pass(config, workers):
  k = config.kernel
  shape, density = hat_search._kernel_problems(config)[0]
  configs = [kc.KernelCandidate(bq, bk, st, ps) for bq in k.block_qs for bk in k.block_kvs
             for st in k.stages for ps in k.persistent]

  problem = kc.make_problem(shape, density, mask_block=k.mask_block, dtype=k.dtype, seed=0)

  def build(cfg):
    try:
      return kc.compile_kernel(problem, cfg, implementation=k.implementation)
    except Exception as e:  # noqa: BLE001 - a refused configuration is a row
      return e

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    built = list(pool.map(build, configs))
  compile_wall = time.perf_counter() - start
  rows = []
  for cfg, kernel in zip(configs, built):
    row = {"config": dataclasses.asdict(cfg)}
    if isinstance(kernel, Exception):
      row["error"] = f"{type(kernel).__name__}: {str(kernel)[:200]}"
    else:
      row["compile_s"], row["lower_s"] = kernel.compile_s, kernel.lower_s
      row["ms"] = latency.measure(kernel.fn, *kernel.args, warmup=config.warmup,
                                  repeats=config.repeats)["mean_ms"]
    rows.append(row)
  return {"shape": dataclasses.asdict(shape), "density": density, "workers": workers,
          "compile_wall_s": compile_wall, "wall_s": time.perf_counter() - start, "rows": rows}


def _relative_differences(a, b):
  return [abs(x - y) / y for x, y in zip(a, b) if x is not None and y is not None]


def main(argv):
  if len(argv) < 2:
    raise SystemExit(__doc__)
  out = argv[1]
  samples = int(argv[2]) if len(argv) > 2 else 8
  workers = int(argv[3]) if len(argv) > 3 else 8
  config = study_config.get_config("gpu")
  config.setup_dir = tempfile.mkdtemp(prefix="fj_hat_compile_")
  result = {"device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
            "samples": samples, "workers": workers}
  for name, w in (("serial", 1), ("threaded", workers)):
    wall, rows = _latency_pass(config, os.path.join(config.setup_dir, f"{name}.jsonl"),
                               samples, w)
    result[f"latency_{name}"] = {
        "wall_s": wall, "compile_s": [r["compile_s"] for r in rows],
        "lower_s": [r["lower_s"] for r in rows],
        "prefill_ms": [r["prefill_ms"] for r in rows],
        "decode_ms": [r["decode_ms"] for r in rows], "names": [r["name"] for r in rows]}
    print(name, "latency pass", round(wall, 1), "s", flush=True)
  for task in ("prefill_ms", "decode_ms"):
    diffs = _relative_differences(result["latency_threaded"][task],
                                  result["latency_serial"][task])
    result[f"latency_{task}_rel_diff_max"] = float(np.max(diffs))
    result[f"latency_{task}_rel_diff_mean"] = float(np.mean(diffs))
  for name, w in (("serial", 1), ("threaded", workers), ("serial_again", 1)):
    result[f"kernel_{name}"] = _kernel_pass(config, w)
    print(name, "kernel pass", round(result[f"kernel_{name}"]["wall_s"], 1), "s", flush=True)
  ms = {name: [r.get("ms") for r in result[f"kernel_{name}"]["rows"]]
        for name in ("serial", "threaded", "serial_again")}
  result["kernel_rel_diff_threaded_max"] = float(np.max(_relative_differences(
      ms["threaded"], ms["serial"])))
  result["kernel_rel_diff_serial_again_max"] = float(np.max(_relative_differences(
      ms["serial_again"], ms["serial"])))
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
  main(sys.argv)
