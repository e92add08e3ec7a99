"""experiments/causal_schedule_bench.py on CPU: its masks (the timing needs a GPU)."""

from unittest import mock

import numpy as np
import pytest

import flashjax
from experiments import causal_schedule_bench
from flashjax.ops.attention import pallas_mosaic_gpu_common


def test_block_causal_has_causal_work_lists_without_partial_tiles():
  length = 512
  cases = causal_schedule_bench.masks(length)
  assert {name: pairs for name, (_, pairs) in cases.items()} == {
      "dense": length * length, "causal": length * (length + 1) // 2,
      "block_causal": 10 * 128 * 128}  # 4 + 3 + 2 + 1 tiles of 128 x 128

  def block_mask(kwargs):
    return flashjax.masks.block_mask_for(q_len=length, kv_len=length, block_q=128,
                                         block_kv=128, **kwargs)

  causal, staircase = block_mask(cases["causal"][0]), block_mask(cases["block_causal"][0])
  np.testing.assert_array_equal(staircase.fwd_count, causal.fwd_count)  # same item lengths
  kinds = np.asarray(staircase.kinds)
  assert (kinds != flashjax.masks.PARTIAL).all() and (np.asarray(causal.kinds)
                                                      == flashjax.masks.PARTIAL).sum() == 4


def test_a_register_split_setmaxnreg_cannot_take_is_refused_before_any_run(tmp_path):
  out = tmp_path / "rows.json"
  with mock.patch.object(pallas_mosaic_gpu_common, "REGISTERS_TWO_CONSUMERS", (40, 232)):
    with pytest.raises(ValueError, match="register split"):
      causal_schedule_bench.main(["causal_schedule_bench", str(out), "40,240"])
  assert not out.exists()
