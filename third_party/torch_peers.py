"""torch SDPA and FlexAttention peers, run in a process of their own.

JAX preallocates most of the GPU's memory, so torch cannot share the benchmark's process.
`TorchPeer.run(case, arrays)` (called from the JAX side) writes the case to a temporary
directory and runs

  python -m third_party.torch_peers --case DIR/case.json --out DIR/out.json

which builds inputs from the case's seed, times the peer (CUDA events on a GPU, wall clock on
CPU), checks its output against a float32 torch reference computed in the same run, and writes
a JSON result: compile_s, median_ms, p10_ms, p90_ms, mean_ms, min_ms, samples, max_abs_err,
torch_version, torch_device -- or {"error": "..."} when the peer cannot run the case.

`run(..., keep_alive=True)` measures in one long-lived child instead
(`python -m third_party.torch_peers --serve`, one request line per case on its stdin), so a
sweep of many small cases pays torch's import and CUDA start-up (seconds) once;
`close_child()` ends it (also at exit) and frees its GPU memory, which a benchmark does
before JAX needs that memory. The child empties torch's CUDA cache after every case.

case.json keys:
  op            "attention" or "decode"
  peer          "torch_sdpa" or "torch_flex" (attention); "torch_sdpa" (decode)
  batch, num_heads, num_kv_heads, head_dim, dtype ("bfloat16", "float16", "float32")
  q_len, kv_len (attention) / kv_len = S_max (decode)
  scale         float or null (1/sqrt(D))
  mode          "fwd" or "fwd_bwd" (attention)
  warmup, iters, input_sets, seed
  structured, band_lo, band_hi (attention; see third_party.peers.PeerMask)
  check_rows    decode, optional: batch rows compared with the reference (null: all)
case.npz arrays (all optional): dense [B|1, N|1, T, S] bool, q_segment_ids, kv_segment_ids,
  lengths [B], head_indices [B, K].

This module imports torch only inside the child process.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib.util
import json
import math
import os
import select
import subprocess
import sys
import tempfile
import time
from typing import Any, TextIO

import numpy as np

from third_party.peers import Availability

ATTENTION = ("torch_sdpa", "torch_flex")
DECODE = ("torch_sdpa",)

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TorchPeer:
  """A torch peer; `run` measures one case in a child process."""

  def __init__(self, name: str, op: str):
    allowed = ATTENTION if op == "attention" else DECODE if op == "decode" else ()
    if name not in allowed:
      raise ValueError(f"unknown torch peer {name=} for {op=}")
    self.name = name
    self.op = op

  def __repr__(self):
    return f"TorchPeer({self.name!r}, {self.op!r})"

  def available(self) -> Availability:
    if importlib.util.find_spec("torch") is None:
      return Availability(False, "torch is not importable in this environment")
    return Availability(True, "runs in a separate process")

  def run(self, case: dict[str, Any], arrays: dict[str, np.ndarray],
          timeout_s: float = 900, keep_alive: bool = False) -> dict[str, Any]:
    """Measures `case` in a child process.

    Args:
      case: the case.json fields (module docstring); `op` and `peer` are filled in.
      arrays: the case.npz arrays.
      timeout_s: limit for the case.
      keep_alive: measure in the long-lived child (started if needed) instead of a new
        process per case.

    Returns:
      The child's result dict.

    Raises:
      RuntimeError: the child failed or reported an error.
    """
    case = dict(case, op=self.op, peer=self.name)
    with tempfile.TemporaryDirectory(prefix="flashjax_torch_") as tmp:
      case_path = os.path.join(tmp, "case.json")
      out_path = os.path.join(tmp, "out.json")
      with open(case_path, "w") as f:
        json.dump(case, f)
      np.savez_compressed(os.path.join(tmp, "case.npz"), **arrays)
      if keep_alive:
        _persistent_child().measure(case_path, out_path, timeout_s, self.name)
      else:
        proc = subprocess.run(
            [sys.executable, "-m", "third_party.torch_peers", "--case", case_path, "--out",
             out_path], capture_output=True, text=True, timeout=timeout_s, env=_child_env(),
            cwd=_REPO_ROOT, check=False)
        if proc.returncode != 0 or not os.path.exists(out_path):
          raise RuntimeError(f"{self.name} child process failed ({proc.returncode=}): "
                             f"{proc.stderr[-2000:]}")
      with open(out_path) as f:
        result = json.load(f)
    if "error" in result:
      raise RuntimeError(f"{self.name}: {result['error']}")
    return result


def _child_env() -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
  env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return env


class _Child:
  """A `--serve` child: one JSON line [case_path, out_path] in, one "done" line out."""

  def __init__(self):
    self._stderr = tempfile.TemporaryFile(mode="w+")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "third_party.torch_peers", "--serve"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=_child_env(),
        cwd=_REPO_ROOT)

  def measure(self, case_path: str, out_path: str, timeout_s: float, name: str) -> None:
    """Has the child write the result of case_path to out_path (RuntimeError if it dies)."""
    try:
      self.proc.stdin.write(json.dumps([case_path, out_path]) + "\n")
      self.proc.stdin.flush()
      ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
      reply = self.proc.stdout.readline() if ready else ""
    except OSError as e:  # the child is gone: broken pipe
      ready, reply = True, f"{e}"
    if reply.strip() != "done":
      why = f"timed out after {timeout_s} s" if not ready else f"stopped ({reply.strip()!r})"
      self.close()
      self._stderr.seek(0)
      raise RuntimeError(f"{name} child process {why}: {self._stderr.read()[-2000:]}")

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      try:
        self.proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()


_CHILD: _Child | None = None


def _persistent_child() -> _Child:
  global _CHILD
  if _CHILD is None or _CHILD.proc.poll() is not None:
    _CHILD = _Child()
  return _CHILD


def close_child() -> None:
  """Ends the long-lived child of `run(..., keep_alive=True)`, if one is running."""
  global _CHILD
  if _CHILD is not None:
    _CHILD.close()
    _CHILD = None


atexit.register(close_child)


# ---------------------------------------------------------------- child process (torch) ---


def _timed(torch, call, warmup: int, iters: int, n_sets: int) -> dict[str, Any]:
  """Times call(i) for rotating input set i; CUDA events on a GPU, wall clock on CPU."""
  cuda = torch.cuda.is_available()
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  start = time.perf_counter()
  call(0)
  sync()
  compile_s = time.perf_counter() - start
  for i in range(warmup):
    call((i + 1) % n_sets)
  sync()
  times_ms = []
  for i in range(iters):
    idx = (warmup + 1 + i) % n_sets
    if cuda:
      begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      begin.record()
      call(idx)
      end.record()
      end.synchronize()
      times_ms.append(begin.elapsed_time(end))
    else:
      begin = time.perf_counter()
      call(idx)
      times_ms.append(1e3 * (time.perf_counter() - begin))
  t = np.asarray(times_ms)
  return {"compile_s": compile_s, "median_ms": float(np.median(t)),
          "p10_ms": float(np.percentile(t, 10)), "p90_ms": float(np.percentile(t, 90)),
          "mean_ms": float(t.mean()), "min_ms": float(t.min()), "samples": len(t),
          "calls_per_sample": 1, "timing": "cuda_events" if cuda else "wall"}


def _reference(torch, q, k, v, allowed, scale: float):
  """float32 attention, [B, N, T, D] layout; allowed: bool [B|1, N|1, T, S] or None.

  Rows with no allowed key give zeros. Computed per batch row and group of heads to bound
  the memory of the logits.
  """
  group = q.shape[1] // k.shape[1]
  out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
  chunk = 4
  for b in range(q.shape[0]):
    for h in range(0, q.shape[1], chunk):
      hs = slice(h, h + chunk)
      # K/V heads of these query heads, converted per chunk so memory stays bounded.
      kv_heads = torch.arange(h, min(h + chunk, q.shape[1]), device=q.device) // group
      kb, vb = k[b, kv_heads].float(), v[b, kv_heads].float()
      logits = scale * torch.einsum("ntd,nsd->nts", q[b, hs].float(), kb)
      if allowed is not None:
        ok = allowed[b if allowed.shape[0] > 1 else 0]
        ok = ok[hs] if ok.shape[0] > 1 else ok
        logits = logits.masked_fill(~ok, -math.inf)
      m = logits.amax(dim=-1, keepdim=True).clamp_min(-1e30)
      p = torch.exp(logits - m)
      denom = p.sum(dim=-1, keepdim=True)
      out[b, hs] = torch.einsum("nts,nsd->ntd", p, vb) / denom.clamp_min(1e-30)
  return out


def _flex_mask_mod(torch, case, arrays, device):
  """mask_mod for FlexAttention: structured band / segments, or a dense lookup."""
  if case["structured"]:
    lo, hi = case["band_lo"], case["band_hi"]
    q_seg = kv_seg = None
    if "q_segment_ids" in arrays:
      q_seg = torch.as_tensor(arrays["q_segment_ids"], device=device)
      kv_seg = torch.as_tensor(arrays["kv_segment_ids"], device=device)

    def mask_mod(b, h, q_idx, kv_idx):
      del h
      ok = q_idx >= 0
      if lo is not None:
        ok = ok & (kv_idx - q_idx >= lo)
      if hi is not None:
        ok = ok & (kv_idx - q_idx <= hi)
      if q_seg is not None:
        qb = b if q_seg.shape[0] > 1 else 0
        kb = b if kv_seg.shape[0] > 1 else 0
        ok = ok & (q_seg[qb, q_idx] == kv_seg[kb, kv_idx])
      return ok

    return mask_mod
  dense = torch.as_tensor(arrays["dense"], device=device)

  def dense_mod(b, h, q_idx, kv_idx):
    return dense[b if dense.shape[0] > 1 else 0, h if dense.shape[1] > 1 else 0, q_idx, kv_idx]

  return dense_mod


def _attention(torch, case, arrays) -> dict[str, Any]:
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = getattr(torch, case["dtype"])
  b, t, s = case["batch"], case["q_len"], case["kv_len"]
  nq, nkv, d = case["num_heads"], case["num_kv_heads"], case["head_dim"]
  scale = case["scale"] or 1.0 / math.sqrt(d)
  fwd_bwd = case["mode"] == "fwd_bwd"
  gen = torch.Generator(device=device).manual_seed(case["seed"])
  rand = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype,
                                    requires_grad=fwd_bwd)
  sets = [(rand(b, nq, t, d), rand(b, nkv, s, d), rand(b, nkv, s, d))
          for _ in range(case["input_sets"])]
  allowed = torch.as_tensor(arrays["dense"], device=device) if "dense" in arrays else None
  gqa = dict(enable_gqa=True) if nq != nkv else {}
  sdpa = torch.nn.functional.scaled_dot_product_attention
  if case["peer"] == "torch_sdpa":
    causal_only = (case["structured"] and case["band_lo"] is None and case["band_hi"] == 0
                   and "q_segment_ids" not in arrays)
    if allowed is None:
      attend = lambda q, k, v: sdpa(q, k, v, scale=scale, **gqa)
    elif causal_only:
      attend = lambda q, k, v: sdpa(q, k, v, is_causal=True, scale=scale, **gqa)
    else:
      attend = lambda q, k, v: sdpa(q, k, v, attn_mask=allowed, scale=scale, **gqa)
  else:
    from torch.nn.attention import flex_attention as flex
    block_mask = None
    if allowed is not None:
      mask_b = b if allowed.shape[0] > 1 or "q_segment_ids" in arrays else None
      mask_h = nq if allowed.shape[1] > 1 and not case["structured"] else None
      block_mask = flex.create_block_mask(_flex_mask_mod(torch, case, arrays, device),
                                          mask_b, mask_h, t, s, device=device)
    compiled = torch.compile(flex.flex_attention)
    attend = lambda q, k, v: compiled(q, k, v, block_mask=block_mask, scale=scale, **gqa)
  if fwd_bwd:
    grads_out = [torch.randn(q.shape, generator=gen, device=device, dtype=dtype)
                 for q, _, _ in sets]
    call = lambda i: torch.autograd.grad(attend(*sets[i]), sets[i], grads_out[i])
  else:
    call = lambda i: attend(*sets[i])
  result = _timed(torch, call, case["warmup"], case["iters"], len(sets))
  with torch.no_grad():
    out = attend(*sets[0]).float()
    ref = _reference(torch, *sets[0], allowed, scale)
  result["max_abs_err"] = float((out - ref).abs().max())
  return result


def _decode(torch, case, arrays) -> dict[str, Any]:
  if "head_indices" in arrays:
    raise NotImplementedError("torch_sdpa decode computes every head (no head_indices)")
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = getattr(torch, case["dtype"])
  b, s = case["batch"], case["kv_len"]
  nq, nkv, d = case["num_heads"], case["num_kv_heads"], case["head_dim"]
  scale = case["scale"] or 1.0 / math.sqrt(d)
  gen = torch.Generator(device=device).manual_seed(case["seed"])
  rand = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)
  sets = [(rand(b, nq, 1, d), rand(b, nkv, s, d), rand(b, nkv, s, d))
          for _ in range(case["input_sets"])]
  lengths = torch.as_tensor(arrays["lengths"], device=device)
  allowed = (torch.arange(s, device=device)[None, :] < lengths[:, None])[:, None, None, :]
  gqa = dict(enable_gqa=True) if nq != nkv else {}
  sdpa = torch.nn.functional.scaled_dot_product_attention
  attend = lambda q, k, v: sdpa(q, k, v, attn_mask=allowed, scale=scale, **gqa)
  with torch.no_grad():
    result = _timed(torch, lambda i: attend(*sets[i]), case["warmup"], case["iters"],
                    len(sets))
    out = attend(*sets[0]).float()
    query, key, value = sets[0]
    if case.get("check_rows") is not None:  # the reference loops over rows: check a subset
      rows = torch.as_tensor(case["check_rows"], device=device)
      out, query, key, value, allowed = (x[rows] for x in (out, query, key, value, allowed))
    ref = _reference(torch, query, key, value, allowed, scale)
  result["max_abs_err"] = float((out - ref).abs().max())
  return result


def measure(case: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
  """Runs one case with torch (in the current process) and returns its result dict."""
  import torch

  torch.backends.cuda.matmul.allow_tf32 = False
  run = {"attention": _attention, "decode": _decode}[case["op"]]
  result = run(torch, case, arrays)
  result["torch_version"] = torch.__version__
  result["torch_device"] = (torch.cuda.get_device_name() if torch.cuda.is_available()
                            else "cpu")
  return result


def measure_files(case_path: str, out_path: str) -> None:
  """Measures case_path (case.json, case.npz beside it) and writes the result to out_path."""
  with open(case_path) as f:
    case = json.load(f)
  npz = os.path.splitext(case_path)[0] + ".npz"
  arrays = dict(np.load(npz)) if os.path.exists(npz) else {}
  try:
    result = measure(case, arrays)
  except Exception as e:  # any failure is reported to the parent, not raised
    result = {"error": f"{type(e).__name__}: {e}"}
  with open(out_path, "w") as f:
    json.dump(result, f, indent=2)


def serve(requests: TextIO, replies: TextIO) -> None:
  """Measures the cases named on `requests` until it closes, one reply line per case.

  Args:
    requests: lines of JSON [case_path, out_path].
    replies: gets "done" after each result file is written.
  """
  for line in requests:
    measure_files(*json.loads(line))
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
      torch.cuda.empty_cache()  # give the case's memory back to the device
    replies.write("done\n")
    replies.flush()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", help="case.json (case.npz beside it)")
  parser.add_argument("--out", help="where to write the result JSON")
  parser.add_argument("--serve", action="store_true",
                      help="measure the cases named on stdin (see `serve`)")
  args = parser.parse_args(argv)
  if args.serve:
    replies, sys.stdout = sys.stdout, sys.stderr  # stray prints must not reach the parent
    serve(sys.stdin, replies)
  elif args.case and args.out:
    measure_files(args.case, args.out)
  else:
    parser.error("give --case and --out, or --serve")
  return 0


if __name__ == "__main__":
  sys.exit(main())
