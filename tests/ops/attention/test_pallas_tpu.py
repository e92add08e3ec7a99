"""The "pallas_tpu" backend on CPU (interpret mode): the shared suite plus kernel checks.

Kernel checks: gradients with a separate backward tiling, block shapes that select int32 /
int8 stored tiles, block-size validation, the TPU interpreter (uninitialised memory = NaN),
the Mosaic TPU lowering traced on CPU, and the block-sparse dispatch itself: every executed
grid step is a non-empty block (counted by instrumenting the kernels), padding slots do no
work even when their list entries are corrupted, and the index_maps fetch each non-empty
block once per list row and never an empty one.
"""

from __future__ import annotations

import dataclasses
import functools
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.experimental.pallas import tpu as pltpu

from flashjax import masks
from flashjax.masks import block_mask as block_mask_lib
from flashjax.masks import builders
from flashjax.ops.attention import pallas_tpu, pallas_tpu_common, pallas_tpu_vjp, reference
from flashjax.ops.attention.block_sizes import BlockSizes
from tests.ops.attention import attention_suite
from tests.ops.attention import random_inputs


class TestPallasTpu(attention_suite.AttentionSuite):
  IMPLEMENTATION = "pallas_tpu"
  INTERPRET = True
  SUPPORTS_BIAS = False
  # D is padded to 128 lanes inside, so one head dim exercises the padding; smaller query
  # blocks than the 128 default give the masks more blocks to skip.
  HEAD_DIMS = (64,)
  BLOCK_SIZES = BlockSizes(block_q=64, block_kv=128)
  SKIP_CASES = {"test_grad_low_precision_dtype='float16'":
                    "CPU time: the bfloat16 gradient case covers the 16-bit backward"}


def _backend_kwargs(**kwargs):
  """Backend-protocol keyword arguments with defaults."""
  out = dict(bias=None, mask=None, q_segment_ids=None, kv_segment_ids=None, is_causal=False,
             scale=None, logits_soft_cap=None, block_sizes=None, interpret=True)
  out.update(kwargs)
  return out


class PallasTpuKernelTest(random_inputs.RandomInputs, parameterized.TestCase):

  def check_fwd_and_grads(self, q, k, v, atol=5e-5, grad_atol=2e-4, **kwargs):
    kwargs = _backend_kwargs(**kwargs)
    ref_kwargs = {n: x for n, x in kwargs.items() if n not in ("block_sizes", "interpret")}
    cotangent = jnp.asarray(self.rng().standard_normal(q.shape), jnp.float32)

    def loss(fn, *args, **kw):
      out = fn(*args, **kw)
      return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), grads = jax.value_and_grad(
        lambda *a: loss(pallas_tpu.dot_product_attention, *a, **kwargs), argnums=(0, 1, 2),
        has_aux=True)(q, k, v)
    (_, ref), ref_grads = jax.value_and_grad(
        lambda *a: loss(reference.mha_reference, *a, **ref_kwargs), argnums=(0, 1, 2),
        has_aux=True)(q, k, v)
    chex.assert_type(out, q.dtype)
    chex.assert_tree_all_finite((out, grads))
    chex.assert_trees_all_close(out.astype(jnp.float32), ref.astype(jnp.float32), atol=atol,
                                rtol=1e-5)
    for name, g, e in zip("qkv", grads, ref_grads):
      chex.assert_trees_all_close(g.astype(jnp.float32), e.astype(jnp.float32), atol=grad_atol,
                                  rtol=1e-4, custom_message=f"d{name}")

  @parameterized.named_parameters(
      {"testcase_name": f"{block_q=}_{block_kv=}_{block_q_bwd=}_{block_kv_bwd=}",
       "block_q": block_q, "block_kv": block_kv, "block_q_bwd": block_q_bwd,
       "block_kv_bwd": block_kv_bwd}
      for block_q, block_kv, block_q_bwd, block_kv_bwd in (
          (16, 128, None, None), (32, 128, 64, 256), (128, 256, 32, 128)))
  def test_tilings_with_stored_tiles(self, block_q, block_kv, block_q_bwd, block_kv_bwd):
    # A random mask (stored tiles: int32 at block_q 16, else int8) with an empty kv range.
    q, k, v = self.qkv(1, 200, 300, 4, 2, 64)
    mask = self.rng().random((1, 4, 200, 300)) < 0.2
    mask[..., 128:256] = False
    sizes = BlockSizes(block_q=block_q, block_kv=block_kv, block_q_bwd=block_q_bwd,
                       block_kv_bwd=block_kv_bwd)
    self.check_fwd_and_grads(q, k, v, mask=jnp.asarray(mask), block_sizes=sizes,
                             logits_soft_cap=4.0, scale=0.2)

  @parameterized.named_parameters(
      {"testcase_name": f"{family=}", "family": family}
      for family in ("prefix_lm", "global_tokens_and_causal"))
  def test_grad_mask_objects(self, family):
    # Gradients the suite does not take: prefix flags per batch row; stored tiles AND a band.
    length = 256
    q, k, v = self.qkv(2, length, length, 4, 2, 64)
    if family == "prefix_lm":
      ids = np.repeat(np.arange(3), [100, 60, 96])[None].repeat(2, axis=0)
      mask = masks.prefix_lm(ids, np.array([[30, 0, 50], [5, 60, 70]]))
    else:
      mask = masks.global_tokens(length, length, 16, [0, 150]) & masks.causal(length, length)
    self.check_fwd_and_grads(q, k, v, mask=mask, block_sizes=BlockSizes(64, 128))

  def test_bf16_block_q_16(self):
    q, k, v = self.qkv(2, 96, 160, 2, 1, 32, "bfloat16")
    ids = jnp.asarray(np.repeat(np.arange(2)[None], 2, 0).repeat([40, 56], axis=1), jnp.int32)
    kv_ids = jnp.asarray(np.repeat(np.arange(2)[None], 2, 0).repeat([70, 90], axis=1),
                         jnp.int32)
    out = pallas_tpu.dot_product_attention(q, k, v, **_backend_kwargs(
        q_segment_ids=ids, kv_segment_ids=kv_ids, block_sizes=BlockSizes(16, 128)))
    expected = reference.mha_reference(q, k, v, q_segment_ids=ids, kv_segment_ids=kv_ids)
    chex.assert_type(out, jnp.bfloat16)
    chex.assert_trees_all_close(out.astype(jnp.float32), expected.astype(jnp.float32),
                                atol=2e-2)

  def test_interpret_params(self):
    # The TPU interpreter fills uninitialised buffers with NaN: any read before write shows.
    q, k, v = self.qkv(1, 136, 136, 2, 2, 64)
    self.check_fwd_and_grads(q, k, v, is_causal=True, interpret=pltpu.InterpretParams(),
                             block_sizes=BlockSizes(block_q=64, block_kv=128))

  def test_jit_traced_mask(self):
    q, k, v = self.qkv(1, 128, 256, 2, 2, 32)
    mask = jnp.asarray(self.rng().random((1, 2, 128, 256)) < 0.1)
    sizes = BlockSizes(block_q=32, block_kv=128)
    fn = jax.jit(lambda q, k, v, m: pallas_tpu.dot_product_attention(
        q, k, v, **_backend_kwargs(mask=m, block_sizes=sizes)))
    expected = reference.mha_reference(q, k, v, mask=mask)
    chex.assert_trees_all_close(fn(q, k, v, mask), expected, atol=5e-5, rtol=1e-5)

  def test_vmap_segment_ids(self):
    # Batched segment ids make the scalar-prefetched lists batched too.
    q, k, v = self.qkv(3, 160, 160, 2, 1, 32)
    q, k, v = (x[:, None] for x in (q, k, v))
    ids = jnp.asarray(np.sort(self.rng().integers(0, 3, (3, 1, 160)), axis=-1), jnp.int32)
    fn = lambda fn_, q, k, v, i, **kw: fn_(q, k, v, q_segment_ids=i, kv_segment_ids=i, **kw)
    out = jax.vmap(functools.partial(fn, pallas_tpu.dot_product_attention, interpret=True))(
        q, k, v, ids)
    expected = jax.vmap(functools.partial(fn, reference.mha_reference))(q, k, v, ids)
    chex.assert_trees_all_close(out, expected, atol=5e-5, rtol=1e-5)

  # Validation.

  def test_rcm_block_mask_with_causal_not_implemented(self):
    q, k, v = self.qkv(1, 128, 128, 1, 1, 32)
    bm = masks.BlockMask.from_mask(masks.sliding_window(128, 128, 4, 4), 32, 128,
                                   reorder="rcm")
    with self.assertRaisesRegex(NotImplementedError, "RCM"):
      pallas_tpu.dot_product_attention(q, k, v, **_backend_kwargs(mask=bm, is_causal=True))

  @parameterized.named_parameters(
      {"testcase_name": f"{block_kv=}_{block_kv_bwd=}", "block_kv": block_kv,
       "block_kv_bwd": block_kv_bwd} for block_kv, block_kv_bwd in ((64, None), (128, 64)))
  def test_block_kv_not_lane_multiple(self, block_kv, block_kv_bwd):
    q, k, v = self.qkv(1, 128, 128, 1, 1, 32)
    sizes = BlockSizes(block_q=32, block_kv=block_kv, block_kv_bwd=block_kv_bwd)
    with self.assertRaisesRegex(NotImplementedError, "block_kv=64 must be a multiple of 128"):
      pallas_tpu.dot_product_attention(q, k, v, **_backend_kwargs(block_sizes=sizes))

  def test_block_mask_disagrees_with_block_sizes(self):
    q, k, v = self.qkv(1, 128, 256, 1, 1, 32)
    bm = builders.block_mask_for(q_len=128, kv_len=256, block_q=32, block_kv=128,
                                 is_causal=True)
    with self.assertRaisesRegex(ValueError, "block_sizes=.*block_q=32"):
      pallas_tpu.dot_product_attention(
          q, k, v, **_backend_kwargs(mask=bm, block_sizes=BlockSizes(64, 128)))

  def test_bias_not_implemented(self):
    q, k, v = self.qkv(1, 128, 128, 1, 1, 32)
    with self.assertRaisesRegex(NotImplementedError, "pallas_tpu: additive bias"):
      pallas_tpu.dot_product_attention(
          q, k, v, **_backend_kwargs(bias=jnp.ones((1, 1, 128, 128))))

  def test_min_block_q(self):
    self.assertEqual(pallas_tpu.min_block_q(jnp.float32), 8)
    self.assertEqual(pallas_tpu.min_block_q(jnp.bfloat16), 16)
    with self.assertRaisesRegex(NotImplementedError, "block_q=8 must be a multiple of 16"):
      pallas_tpu.validate_block_shape(8, 128, jnp.float16)

  # Block-sparse dispatch.

  def _causal_block_mask(self, batch=1, heads=1, length=256, block_q=64, block_kv=128):
    """Causal block mask with per-row counts 1, 1, 2, 2 (list length 2: padding slots)."""
    bm = builders.block_mask_for(q_len=length, kv_len=length, block_q=block_q,
                                 block_kv=block_kv, is_causal=True)
    kinds = np.asarray(bm.kinds)
    self.assertGreater(np.asarray(bm.fwd_block).shape[-1], int(np.asarray(bm.fwd_count).min()))
    return bm, kinds

  def _record_steps(self, fn):
    """Runs fn() with every executed kernel step recorded as (b, h, qi, kj, masked)."""
    steps = []
    run_steps = pallas_tpu_common.run_steps

    def recording(step_fn, st, count_ref, kind_ref):
      def step(masked):
        jax.debug.callback(lambda *ids: steps.append((*map(int, ids), masked)), st.batch,
                           st.q_head, st.q_block, st.kv_block)
        step_fn(masked)
      run_steps(step, st, count_ref, kind_ref)

    with mock.patch.object(pallas_tpu_common, "run_steps", recording):
      jax.block_until_ready(fn())
    return steps

  def test_executed_steps_are_the_nonempty_blocks(self):
    batch, heads = 2, 4
    bm, kinds = self._causal_block_mask()
    q, k, v = self.qkv(batch, 256, 256, heads, 2, 32)
    expected = sorted(
        (b, h, i, j, bool(kinds[0, 0, i, j] == block_mask_lib.PARTIAL))
        for b in range(batch) for h in range(heads) for i, j in zip(*np.nonzero(kinds[0, 0])))
    kwargs = _backend_kwargs(mask=bm)
    fwd = self._record_steps(lambda: pallas_tpu.dot_product_attention(q, k, v, **kwargs))
    self.assertEqual(sorted(fwd), expected)
    # Forward + dK/dV + dQ: each non-empty block exactly three times.
    grad = self._record_steps(lambda: jax.grad(
        lambda q, k, v: pallas_tpu.dot_product_attention(q, k, v, **kwargs).sum(),
        argnums=(0, 1, 2))(q, k, v))
    self.assertEqual(sorted(grad), sorted(expected * 3))

  def test_padding_slots_do_no_work(self):
    # Point every padding slot at a real block marked FULL: results must not change.
    bm, _ = self._causal_block_mask()
    corrupted = {}
    for direction in ("fwd", "bwd"):
      count = np.asarray(getattr(bm, f"{direction}_count"))
      block = np.asarray(getattr(bm, f"{direction}_block")).copy()
      kind = np.asarray(getattr(bm, f"{direction}_kind")).copy()
      padding = np.arange(block.shape[-1]) >= count[..., None]
      self.assertTrue(padding.any())
      block[padding] = (block[padding] + 1) % block.max()
      kind[padding] = block_mask_lib.FULL
      corrupted.update({f"{direction}_block": block, f"{direction}_kind": kind})
    q, k, v = self.qkv(1, 256, 256, 2, 1, 32)
    reference_out = reference.mha_reference(q, k, v, is_causal=True)
    fn = lambda q, k, v, bm: pallas_tpu.dot_product_attention(
        q, k, v, **_backend_kwargs(mask=bm))
    out = fn(q, k, v, dataclasses.replace(bm, **corrupted))
    chex.assert_trees_all_close(out, reference_out, atol=5e-5, rtol=1e-5)
    grads = jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2))(
        q, k, v, dataclasses.replace(bm, **corrupted))
    expected = jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2))(q, k, v, bm)
    chex.assert_trees_all_close(grads, expected, atol=1e-6, rtol=1e-6)

  @parameterized.named_parameters(
      {"testcase_name": f"{direction=}", "direction": direction} for direction in ("fwd", "bwd"))
  def test_index_maps_fetch_each_nonempty_block_once(self, direction):
    # Random per-head mask: rows with 0..nk blocks, partial and full ones, stored tiles.
    heads, group, block_q, block_kv, length = 2, 2, 32, 128, 512
    mask = self.rng().random((1, heads * group, length // block_q, length // block_kv)) < 0.4
    mask = np.repeat(np.repeat(mask, block_q, axis=2), block_kv, axis=3)
    mask[..., ::3, :] &= self.rng().random((length, length))[::3] < 0.5
    bm = builders.block_mask_for(q_len=length, kv_len=length, block_q=block_q,
                                 block_kv=block_kv, mask=mask)
    kinds = np.asarray(bm.kinds)
    ops = pallas_tpu_common.mask_operands(bm, direction, length, length)
    steps = (pallas_tpu_common.fwd_steps if direction == "fwd" else pallas_tpu_vjp.dkv_steps)(
        ops.indexer, group)
    specs, _, mask_specs, flags = pallas_tpu_common.block_specs(steps, ops, block_q, block_kv, 128)
    self.assertEqual(flags, (False, False, False, True))
    prefetch = [np.asarray(p) for p in ops.prefetch]
    for h in range(heads * group):
      for r in range(kinds.shape[2] if direction == "fwd" else kinds.shape[3]):
        if direction == "fwd":
          ids = [(0, h, r, s) for s in range(ops.indexer.length)]
          fetched_spec, row_kinds = specs["kv"], kinds[0, h, r]
        else:
          ids = [(0, h // group, r, h % group, s) for s in range(ops.indexer.length)]
          fetched_spec, row_kinds = specs["q"], kinds[0, h, :, r]
        fetched = [int(fetched_spec.index_map(*i, *prefetch)[2]) for i in ids]
        tile_ids = [int(mask_specs[-1].index_map(*i, *prefetch)[0]) for i in ids]
        nonempty = list(np.nonzero(row_kinds)[0])
        # One fetch per non-empty block, in order; padding slots repeat the last one.
        changes = [fetched[0]] + [b for a, b in zip(fetched, fetched[1:]) if a != b]
        self.assertEqual(changes, nonempty or [0])
        self.assertEqual(fetched[len(nonempty):], [fetched[max(len(nonempty) - 1, 0)]] *
                         (len(fetched) - len(nonempty)))
        # The tile index moves only to serve a partial block.
        partial_slots = [s for s, b in enumerate(fetched[:len(nonempty)])
                         if row_kinds[b] == block_mask_lib.PARTIAL]
        moves = [s for s in range(1, len(tile_ids)) if tile_ids[s] != tile_ids[s - 1]]
        self.assertContainsSubset(moves, partial_slots)

  # TPU lowering (traced on CPU; the Mosaic compiler itself needs a TPU).

  @parameterized.named_parameters(
      {"testcase_name": f"{dtype=}_{mask_kind=}", "dtype": dtype, "mask_kind": mask_kind}
      for dtype in ("float32", "bfloat16") for mask_kind in ("causal", "segments", "tiles"))
  def test_lowers_for_tpu(self, dtype, mask_kind):
    # bfloat16 at its smallest block_q (int32 tiles), float32 with int8 tiles.
    q, k, v = self.qkv(2, 200, 300, 4, 2, 64, dtype)
    block_q = 16 if dtype == "bfloat16" else 32
    kwargs = dict(block_sizes=BlockSizes(block_q=block_q, block_kv=128), logits_soft_cap=5.0,
                  interpret=False)
    if mask_kind == "causal":
      kwargs["is_causal"] = True
    elif mask_kind == "segments":
      kwargs["q_segment_ids"] = jnp.asarray(self.rng().integers(0, 3, (2, 200)), jnp.int32)
      kwargs["kv_segment_ids"] = jnp.asarray(self.rng().integers(0, 3, (2, 300)), jnp.int32)
    else:
      kwargs["mask"] = self.rng().random((1, 4, 200, 300)) < 0.3
    grad = jax.grad(lambda q, k, v: pallas_tpu.dot_product_attention(
        q, k, v, **_backend_kwargs(**kwargs)).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    text = jax.jit(grad).trace(q, k, v).lower(lowering_platforms=("tpu",)).as_text()
    self.assertEqual(text.count("tpu_custom_call"), 3)


if __name__ == "__main__":
  absltest.main()
