r"""Registers, spills and stack frames of the compiled Mosaic GPU attention kernels.

  python -m experiments.kernel_resources OUT_DIR            # on a Hopper GPU
  python -m experiments.kernel_resources --ptx OUT_DIR      # anywhere with ptxas (CUDA >= 12)

The first form compiles (never runs) each variant below with Mosaic GPU's dump switches
(`MOSAIC_GPU_DUMP_PTX`, `MOSAIC_GPU_DUMP_PTXAS`, `MOSAIC_GPU_DUMP_TO=OUT_DIR/<variant>`),
reads every ptxas report in the dumped files and writes `OUT_DIR/resources.json`: one row per
(variant, kernel) with the registers per thread, stack frame, spill stores and spill loads.
The dumped `.ptx` files stay in OUT_DIR, so the second form can re-assemble them later with
the local `ptxas -v` on a machine without a GPU (a device call brings back only a few files:
tar OUT_DIR). Spill bytes are what this is for: a kernel whose consumer warpgroups run out of
registers spills accumulator fragments to local memory, which a timing alone cannot tell
apart from a slow schedule (the intra-warpgroup overlap's loss in docs/performance.md).

Variants: the forward at D = 128 with 128 x 128 tiles and 2 stages, per-item and persistent
grids, each without and with `pallas_mosaic_gpu.INTRA_WG_OVERLAP`, the persistent pair again
with FlashAttention-3's register split (`pallas_mosaic_gpu_common.REGISTERS_TWO_CONSUMERS` =
(24, 240) instead of (40, 232)), and causal (persistent);
the forward at D = 64; the two-kernel backward (dQ, dK/dV) and the fused one at D = 128, with
and without the split dQ (`pallas_mosaic_gpu_vjp.SPLIT_DQ`). The fused backward holds dK, dV,
S^T, dP^T and a dQ partial at once, so spills are a candidate cause of its measured loss too.
Shapes are small (the resources do not depend on T or B, only on tiles, head dim and the
kernel's code path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import flashjax
from experiments import common
from flashjax.ops.attention import (pallas_mosaic_gpu, pallas_mosaic_gpu_common,
                                     pallas_mosaic_gpu_vjp)
from flashjax.ops.attention.block_sizes import BlockSizes

DUMP_ENV = ("MOSAIC_GPU_DUMP_TO", "MOSAIC_GPU_DUMP_PTX", "MOSAIC_GPU_DUMP_PTXAS")

# ptxas -v prints, per entry function: "Compiling entry function 'NAME' for 'sm_90a'", then
# "N bytes stack frame, N bytes spill stores, N bytes spill loads", then "Used N registers".
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


@dataclasses.dataclass
class KernelResources:
  """What ptxas reported for one entry function."""
  kernel: str
  registers: int | None = None
  stack_frame_bytes: int | None = None
  spill_store_bytes: int | None = None
  spill_load_bytes: int | None = None


def parse_ptxas_report(text: str) -> list[KernelResources]:
  """Per-entry resources from `ptxas -v` output (in order; other lines ignored).

  Raises:
    ValueError: a resource line comes before any entry-function line (not a ptxas -v report).
  """
  kernels: list[KernelResources] = []
  for line in text.splitlines():
    if m := _ENTRY.search(line):
      kernels.append(KernelResources(m.group(1)))
      continue
    frame, used = _FRAME.search(line), _USED.search(line)
    if (frame or used) and not kernels:
      raise ValueError(f"ptxas resource line before any entry function: {line.strip()!r}")
    if frame:
      k = kernels[-1]
      k.stack_frame_bytes, k.spill_store_bytes, k.spill_load_bytes = map(int, frame.groups())
    if used:
      kernels[-1].registers = int(used.group(1))
  return kernels


def ptx_target(ptx: str) -> str:
  """The `.target` of a PTX text (e.g. "sm_90a"), which ptxas's -arch must match."""
  m = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.MULTILINE)
  if m is None:
    raise ValueError("no .target line in the PTX")
  return m.group(1)


def find_ptxas() -> str | None:
  """ptxas on PATH, else under $MOSAIC_GPU_CUDA_ROOT/bin or $CUDA_HOME/bin; None if absent."""
  if found := shutil.which("ptxas"):
    return found
  for var in ("MOSAIC_GPU_CUDA_ROOT", "CUDA_HOME"):
    root = os.environ.get(var)
    if root and (path := pathlib.Path(root, "bin", "ptxas")).is_file():
      return str(path)
  return None


def assemble(ptx_path: pathlib.Path, ptxas: str) -> list[KernelResources]:
  """Runs `ptxas -v` on one PTX file (output discarded) and parses its report."""
  target = ptx_target(ptx_path.read_text())
  done = subprocess.run([ptxas, "-v", f"-arch={target}", str(ptx_path), "-o", os.devnull],
                        capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"ptxas failed on {ptx_path} ({done.returncode}): {done.stderr[-2000:]}")
  return parse_ptxas_report(done.stdout + done.stderr)


def rows_from_dump(variant: str, directory: pathlib.Path) -> list[dict[str, Any]]:
  """Rows for every ptxas report among the files a Mosaic GPU compile dumped in `directory`."""
  rows = []
  for path in sorted(p for p in directory.rglob("*") if p.is_file()):
    if path.suffix == ".ptx":
      continue
    text = path.read_text(errors="replace")
    if "Compiling entry function" in text:
      rows += [dict(variant=variant, source=path.name, **dataclasses.asdict(k))
               for k in parse_ptxas_report(text)]
  return rows


def rows_from_ptx(out_dir: pathlib.Path, ptxas: str) -> list[dict[str, Any]]:
  """Re-assembles every dumped .ptx under out_dir/<variant>/ with the local ptxas."""
  rows = []
  for path in sorted(out_dir.rglob("*.ptx")):
    variant = path.relative_to(out_dir).parts[0]
    rows += [dict(variant=variant, source=path.name, **dataclasses.asdict(k))
             for k in assemble(path, ptxas)]
  return rows


@contextlib.contextmanager
def dumping_to(directory: pathlib.Path) -> Iterator[None]:
  """Mosaic GPU's dump switches on (read by each compile) for the block, then restored."""
  directory.mkdir(parents=True, exist_ok=True)
  previous = {k: os.environ.get(k) for k in DUMP_ENV}
  os.environ.update({"MOSAIC_GPU_DUMP_TO": str(directory), "MOSAIC_GPU_DUMP_PTX": "1",
                     "MOSAIC_GPU_DUMP_PTXAS": "1"})
  try:
    yield
  finally:
    for k, v in previous.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


@dataclasses.dataclass(frozen=True)
class Variant:
  """A function to compile on its inputs, with module switches set while it is traced."""
  fn: Callable[..., Any]
  args: tuple[Any, ...]
  switches: tuple[tuple[Any, str, Any], ...] = ()

  @contextlib.contextmanager
  def switched(self) -> Iterator[None]:
    """The variant's module switches set for the block (trace inside it)."""
    with contextlib.ExitStack() as stack:
      for module, name, value in self.switches:
        stack.enter_context(common.switched(module, name, value))
      yield

  def compile(self) -> Any:
    with self.switched():
      return jax.jit(self.fn).lower(*self.args).compile()


def variants() -> dict[str, Variant]:
  """The variants of the module docstring by name."""

  def inputs(head_dim):
    keys = jax.random.split(jax.random.key(head_dim), 3)
    return tuple(jax.random.normal(k, (1, 1024, 2, head_dim), jnp.bfloat16) for k in keys)

  def forward(head_dim, persistent, overlap, causal=False, registers=None):
    sizes = BlockSizes(128, 128, num_stages=2, persistent=persistent)
    fn = lambda q, k, v: flashjax.dot_product_attention(
        q, k, v, implementation="pallas_mosaic_gpu", block_sizes=sizes, is_causal=causal)
    switches = ((pallas_mosaic_gpu, "INTRA_WG_OVERLAP", overlap),)
    if registers is not None:
      switches += ((pallas_mosaic_gpu_common, "REGISTERS_TWO_CONSUMERS", registers),)
    return Variant(fn, inputs(head_dim), switches)

  def backward(fused, split_dq=True):
    sizes = BlockSizes(128, 128, num_stages=2, fused_backward=fused)

    def loss(q, k, v):
      out = flashjax.dot_product_attention(q, k, v, implementation="pallas_mosaic_gpu",
                                           block_sizes=sizes)
      return jnp.sum(out.astype(jnp.float32))
    return Variant(jax.grad(loss, argnums=(0, 1, 2)), inputs(128),
                   ((pallas_mosaic_gpu_vjp, "SPLIT_DQ", split_dq),))

  table = {}
  for persistent in (False, True):
    grid = "persistent" if persistent else "per_item"
    for overlap in (False, True):
      table[f"fwd_d128_{grid}{'_overlap' if overlap else ''}"] = forward(128, persistent, overlap)
  for overlap in (False, True):
    table[f"fwd_d128_persistent{'_overlap' if overlap else ''}_regs_24_240"] = forward(
        128, True, overlap, registers=(24, 240))
  table["fwd_d128_persistent_causal"] = forward(128, True, False, causal=True)
  table["fwd_d64_persistent"] = forward(64, True, False)
  table["bwd_d128_two_kernels"] = backward(False)
  table["bwd_d128_fused"] = backward(True)
  table["bwd_d128_fused_unsplit_dq"] = backward(True, split_dq=False)
  return table


def run_on_gpu(out_dir: pathlib.Path, names: Sequence[str] | None = None) -> list[dict]:
  """Compiles each variant with the dumps on; rows from the dumped ptxas reports."""
  rows = []
  for name, variant in variants().items():
    if names and name not in names:
      continue
    with dumping_to(out_dir / name):
      try:
        variant.compile()
      except Exception as e:  # pylint: disable=broad-except
        rows.append({"variant": name, "error": f"{type(e).__name__}: {e}"[:2000]})
        continue
    found = rows_from_dump(name, out_dir / name)
    rows += found or [{"variant": name, "error": "no ptxas report among the dumped files"}]
  return rows


def main(argv: Sequence[str]) -> None:
  args = list(argv[1:])
  from_ptx = "--ptx" in args
  args = [a for a in args if a != "--ptx"]
  if not args:
    raise SystemExit(__doc__)
  out_dir, names = pathlib.Path(args[0]), args[1:]
  if from_ptx:
    ptxas = find_ptxas()
    if ptxas is None:
      raise SystemExit("no ptxas found (PATH, $MOSAIC_GPU_CUDA_ROOT/bin, $CUDA_HOME/bin)")
    rows = rows_from_ptx(out_dir, ptxas)
    target = out_dir / "resources_local_ptxas.json"
  else:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = run_on_gpu(out_dir, names)
    target = out_dir / "resources.json"
  target.write_text(json.dumps(rows, indent=1))
  for row in rows:
    print(json.dumps(row))


if __name__ == "__main__":
  main(sys.argv)
