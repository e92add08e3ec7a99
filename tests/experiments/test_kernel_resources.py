"""experiments/kernel_resources.py on CPU: the ptxas report parser, the dump reading, and the
re-assembly of PTX with a local ptxas where one is installed (the compile needs a GPU)."""

import json
import os

import pytest

from experiments import common
from experiments import kernel_resources

# Two entries as `ptxas -v -arch=sm_90a` (CUDA 13.0) prints them: one without spills, one
# assembled under a register cap of 24, with spills.
REPORT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'fits' for 'sm_90a'
ptxas info    : Function properties for fits
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 48 registers, used 0 barriers
ptxas info    : Compiling entry function 'spills' for 'sm_90a'
ptxas info    : Function properties for spills
    136 bytes stack frame, 168 bytes spill stores, 160 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 136 bytes cumulative stack size
ptxas info    : Compile time = 17.284 ms
"""

TINY_PTX = """\
.version 8.0
.target sm_90a
.address_size 64

.visible .entry tiny(.param .u64 p)
{
  .reg .b64 %rd<3>;
  .reg .f32 %f<3>;
  ld.param.u64 %rd1, [p];
  cvta.to.global.u64 %rd2, %rd1;
  ld.global.f32 %f1, [%rd2];
  add.f32 %f2, %f1, %f1;
  st.global.f32 [%rd2], %f2;
  ret;
}
"""


def test_parse_reads_each_entry_in_order():
  fits, spills = kernel_resources.parse_ptxas_report(REPORT)
  assert (fits.kernel, fits.registers, fits.spill_store_bytes, fits.spill_load_bytes,
          fits.stack_frame_bytes) == ("fits", 48, 0, 0, 0)
  assert (spills.kernel, spills.registers, spills.spill_store_bytes, spills.spill_load_bytes,
          spills.stack_frame_bytes) == ("spills", 24, 168, 160, 136)


def test_parse_refuses_resource_lines_without_an_entry():
  with pytest.raises(ValueError, match="before any entry function"):
    kernel_resources.parse_ptxas_report("ptxas info    : Used 48 registers, used 0 barriers")
  assert kernel_resources.parse_ptxas_report("nothing from ptxas here") == []


def test_ptx_target():
  assert kernel_resources.ptx_target(TINY_PTX) == "sm_90a"
  with pytest.raises(ValueError, match=".target"):
    kernel_resources.ptx_target(".version 8.0\n")


def test_rows_from_dump_reads_reports_and_skips_ptx(tmp_path):
  (tmp_path / "mosaic_gpu_module_0.ptxas").write_text(REPORT)
  (tmp_path / "mosaic_gpu_module_0.ptx").write_text(TINY_PTX + "// Compiling entry function")
  rows = kernel_resources.rows_from_dump("v", tmp_path)
  assert [(r["variant"], r["kernel"], r["spill_store_bytes"]) for r in rows] == [
      ("v", "fits", 0), ("v", "spills", 168)]
  assert {r["source"] for r in rows} == {"mosaic_gpu_module_0.ptxas"}


def test_dumping_to_sets_and_restores_the_switches(tmp_path, monkeypatch):
  monkeypatch.setenv("MOSAIC_GPU_DUMP_PTX", "keep")
  monkeypatch.delenv("MOSAIC_GPU_DUMP_TO", raising=False)
  with kernel_resources.dumping_to(tmp_path / "d"):
    assert os.environ["MOSAIC_GPU_DUMP_TO"] == str(tmp_path / "d")
    assert os.environ["MOSAIC_GPU_DUMP_PTXAS"] == os.environ["MOSAIC_GPU_DUMP_PTX"] == "1"
  assert (tmp_path / "d").is_dir()
  assert os.environ["MOSAIC_GPU_DUMP_PTX"] == "keep"
  assert "MOSAIC_GPU_DUMP_TO" not in os.environ


def test_variant_names():
  assert sorted(kernel_resources.variants()) == sorted([
      "fwd_d128_per_item", "fwd_d128_per_item_overlap", "fwd_d128_persistent",
      "fwd_d128_persistent_overlap", "fwd_d128_persistent_regs_24_240",
      "fwd_d128_persistent_overlap_regs_24_240", "fwd_d128_persistent_causal",
      "fwd_d64_persistent",
      "bwd_d128_two_kernels", "bwd_d128_fused", "bwd_d128_fused_unsplit_dq"])


def test_switched_restores_the_module_switch():
  class Module:
    FLAG = False
  with common.switched(Module, "FLAG", True):
    assert Module.FLAG is True
  assert Module.FLAG is False


@pytest.mark.skipif(kernel_resources.find_ptxas() is None, reason="no ptxas on this machine")
def test_local_ptxas_reassembles_dumped_ptx(tmp_path):
  (tmp_path / "fwd").mkdir()
  (tmp_path / "fwd" / "m.ptx").write_text(TINY_PTX)
  kernel_resources.main(["kernel_resources", "--ptx", str(tmp_path)])
  rows = json.loads((tmp_path / "resources_local_ptxas.json").read_text())
  assert len(rows) == 1 and rows[0]["variant"] == "fwd" and rows[0]["kernel"] == "tiny"
  assert rows[0]["registers"] > 0 and rows[0]["spill_store_bytes"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(kernel_resources.variants()))
def test_every_variant_lowers_for_cuda(name):
  from tests import gpu_lowering  # pylint: disable=import-outside-toplevel
  variant = kernel_resources.variants()[name]
  with variant.switched():
    text = gpu_lowering.export_for_cuda(variant.fn, *variant.args)
  assert gpu_lowering.kernel_names(text)
