"""Decode kernels compiled for a GPU (no interpret mode), plus a rough bandwidth print.

Skipped unless jax.default_backend() == "gpu". Run on the GPU machine with
  JAX_PLATFORMS=cuda PYTHONPATH=. python -m pytest -q -s -m gpu tests/ops/decode/test_decode_gpu.py
The tile and split sweeps that used to print here are a study: configs/tune_decode_splits.py
(`:gpu` split counts, `:gpu_tiles` block_kv x num_warps x num_stages).
"""

import zlib

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
from jax.experimental.pallas.ops.gpu import decode_attention as upstream_decode
import jax.numpy as jnp
import numpy as np
import pytest

import flashjax
from flashjax import benchmarking
from flashjax.ops.decode import block_sizes
from flashjax.ops.decode import pallas_triton
from flashjax.ops.decode import xla
from tests.ops.decode import test_pallas_triton as cases

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]


def _triton(config=None, kv_layout="BSND"):
  def run(query, key_cache, value_cache, lengths, head_indices=None):
    scale = 1.0 / np.sqrt(query.shape[-1])
    return pallas_triton.decode_attention(
        query, key_cache, value_cache, lengths, head_indices=head_indices, scale=scale,
        logits_soft_cap=None, interpret=False, block_sizes=config, kv_layout=kv_layout)
  return run


def _xla(query, key_cache, value_cache, lengths, head_indices=None):
  return xla.decode_attention(query, key_cache, value_cache, lengths,
                              head_indices=head_indices,
                              scale=1.0 / np.sqrt(query.shape[-1]), logits_soft_cap=None,
                              interpret=False)


def _random_heads(seed, batch, num_kv_heads, num_selected):
  keys = jax.random.split(jax.random.key(seed), batch)
  perms = jax.vmap(lambda k: jax.random.permutation(k, num_kv_heads))(keys)
  return jnp.sort(perms[:, :num_selected], axis=-1).astype(jnp.int32)


def _bandwidth(fn, args, heads, check_rows=4, iters=20, repeats=5, transpose=False):
  """(TB/s of KV bytes actually needed, ms per call); checks the output's first rows."""
  query, key_cache, value_cache, lengths = args
  kv = (key_cache.transpose(0, 2, 1, 3), value_cache.transpose(0, 2, 1, 3)) if transpose \
      else (key_cache, value_cache)
  call = jax.jit(lambda q, k, v, l, h: fn(q, k, v, l, h))
  out = call(query, *kv, lengths, heads)
  rows = slice(0, check_rows)
  expected = cases.oracle(query[rows], key_cache[rows], value_cache[rows], lengths[rows],
                          None if heads is None else heads[rows],
                          1.0 / np.sqrt(query.shape[-1]), None)
  chex.assert_trees_all_close(out[rows].astype(jnp.float32), expected, atol=2e-2, rtol=2e-2)
  timing = benchmarking.time_in_loop(call, query, *kv, lengths, heads, iters=iters,
                                     repeats=repeats)
  nbytes = benchmarking.decode_kv_bytes(np.asarray(lengths), key_cache.shape[2],
                                        key_cache.shape[3], key_cache.dtype,
                                        None if heads is None else np.asarray(heads))
  return nbytes / timing.median_s / 1e12, 1e3 * timing.median_s


class TritonDecodeGpuTest(parameterized.TestCase):

  def seed(self) -> int:
    return zlib.crc32(self.id().encode())

  @parameterized.named_parameters(
      dict(testcase_name=f"dtype={jnp.dtype(dtype).name}_{num_heads=}_{num_kv_heads=}_"
           f"{num_selected=}_{num_splits=}_{block_kv=}_{xla_merge=}",
           dtype=dtype, num_heads=num_heads, num_kv_heads=num_kv_heads,
           num_selected=num_selected, num_splits=num_splits, block_kv=block_kv,
           xla_merge=xla_merge)
      for dtype, num_heads, num_kv_heads, num_selected, num_splits, block_kv, xla_merge in (
          (jnp.float32, 8, 2, None, None, 128, False),
          (jnp.float32, 8, 8, 3, 5, 64, False),
          (jnp.bfloat16, 32, 8, 4, None, 128, False),
          (jnp.bfloat16, 32, 32, 16, 3, 256, False),
          (jnp.float16, 16, 1, None, 7, 64, False),
          (jnp.float16, 64, 4, 2, None, 128, False),
          # One split (normalised store, no merge), dense and head-sparse.
          (jnp.bfloat16, 32, 8, None, 1, 128, False),
          (jnp.bfloat16, 12, 4, 3, 1, None, False),
          # Heuristic tiles (None) with a forced split count, and the XLA merge path.
          (jnp.bfloat16, 32, 8, 5, 40, None, False),
          (jnp.float32, 8, 2, 1, 4, 64, True),
      )
  )
  def test_matches_oracle(self, dtype, num_heads, num_kv_heads, num_selected, num_splits,
                          block_kv, xla_merge):
    seed = self.seed()
    lengths = [1000, 0, 1, 517, 64, 999]  # S_max = 1000 is not a block multiple
    args = cases.make_inputs(seed, 6, 1000, num_heads, num_kv_heads, 128, dtype, lengths)
    heads = None if num_selected is None else _random_heads(seed, 6, num_kv_heads,
                                                            num_selected)
    config = block_sizes.DecodeBlockSizes(block_kv=block_kv, num_splits=num_splits,
                                  xla_merge=xla_merge)
    for cap in (None, 5.0):
      out = pallas_triton.decode_attention(*args, head_indices=heads, scale=0.09,
                                           logits_soft_cap=cap, interpret=False,
                                           block_sizes=config)
      chex.assert_tree_all_finite(out)
      tol = cases.TOLERANCES[jnp.dtype(dtype).type]
      chex.assert_trees_all_close(out.astype(jnp.float32),
                                  cases.oracle(*args, heads, 0.09, cap), atol=tol, rtol=tol)

  def test_poisoned_tail_bnsd_layout_and_public_api(self):
    query, key_cache, value_cache, lengths = cases.make_inputs(
        self.seed(), 3, 300, 8, 2, 64, jnp.bfloat16, [300, 17, 129])
    heads = jnp.array([[1], [0], [1]], jnp.int32)
    expected = cases.oracle(query, key_cache, value_cache, lengths, heads, 0.125, None)
    tail = (jnp.arange(300)[None, :] >= lengths[:, None])[:, :, None, None]
    poisoned_k = jnp.where(tail, jnp.nan, key_cache)
    poisoned_v = jnp.where(tail, jnp.inf, value_cache)
    outs = {
        "BSND": pallas_triton.decode_attention(
            query, poisoned_k, poisoned_v, lengths, head_indices=heads, scale=0.125,
            logits_soft_cap=None, interpret=False),
        "BNSD": pallas_triton.decode_attention(
            query, poisoned_k.transpose(0, 2, 1, 3), poisoned_v.transpose(0, 2, 1, 3),
            lengths, head_indices=heads, scale=0.125, logits_soft_cap=None, interpret=False,
            kv_layout="BNSD"),
        "api": flashjax.decode_attention(query, key_cache, value_cache, lengths,
                                         head_indices=heads, scale=0.125,
                                         implementation="pallas_triton"),
        # The documented reuse: the same Triton kernel under the Mosaic GPU name.
        "pallas_mosaic_gpu": flashjax.decode_attention(
            query, key_cache, value_cache, lengths, head_indices=heads, scale=0.125,
            implementation="pallas_mosaic_gpu"),
    }
    chex.assert_trees_all_equal(outs["pallas_mosaic_gpu"], outs["api"])
    for name, out in outs.items():
      chex.assert_trees_all_close(out.astype(jnp.float32), expected, atol=2e-2, rtol=2e-2,
                                  custom_message=name)

  def test_bandwidth_b128_s4096(self):
    """Rough KV bandwidth: B=128, S=4096, Nq=32, D=128 bf16 (prints a table)."""
    batch, max_len, num_heads, head_dim = 128, 4096, 32, 128
    lines = [f"\ndecode B={batch} S={max_len} Nq={num_heads} D={head_dim} bf16, "
             f"{jax.devices()[0].device_kind}, jax {jax.__version__}; TB/s of needed KV "
             "bytes (ms)",
             "| Nkv | heads | pallas_triton | xla | jax pallas.ops gqa |", "|---|---|---|---|---|"]
    for num_kv_heads in (8, 32):
      args = cases.make_inputs(self.seed(), batch, max_len, num_heads, num_kv_heads, head_dim,
                               jnp.bfloat16, [max_len] * batch)
      for num_selected in (num_kv_heads, num_kv_heads // 2):
        heads = None if num_selected == num_kv_heads else _random_heads(
            1, batch, num_kv_heads, num_selected)
        cells = [_bandwidth(_triton(), args, heads), _bandwidth(_xla, args, heads)]
        if heads is None:
          cells.append(_bandwidth(_peer_gqa, args, heads))
        text = [f"{tbs:.2f} ({ms:.3f})" for tbs, ms in cells] + [""] * (3 - len(cells))
        lines.append(f"| {num_kv_heads} | {num_selected}/{num_kv_heads} | "
                     + " | ".join(text) + " |")
        self.assertGreater(cells[0][0], 0.5)  # far below this, something is broken
      del args
    print("\n".join(lines))


def _peer_gqa(query, key_cache, value_cache, lengths, head_indices=None):
  """jax.experimental.pallas.ops.gpu.decode_attention.gqa, the upstream split-K kernel."""
  del head_indices
  return upstream_decode.gqa(query, key_cache, value_cache, kv_seq_len=lengths,
                  sm_scale=1.0 / np.sqrt(query.shape[-1]))


if __name__ == "__main__":
  absltest.main()
