"""pallas_triton's forward dispatch ablation: the flag loop vs the compacted lists.

`BlockSizes(dispatch="flags")` makes the forward kernel visit every kv tile of a query block
and skip EMPTY ones by their kind (the binary block masking paper's form); the default
("lists", or None) walks the BlockMask's compacted lists of non-empty tiles. Both must give
the float32 reference's output; the backward keeps the lists, so gradients through a flags
forward must still be the reference's. CPU cases run in Pallas interpret mode; the GPU class
compiles both forms (skipped unless JAX runs on a GPU).
"""

import functools
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest
from absl.testing import parameterized

import flashjax
from flashjax import masks
from flashjax.masks import builders
from flashjax.ops.attention import pallas_gpu_common
from flashjax.ops.attention import pallas_triton
from flashjax.ops.attention import reference
from flashjax.ops.attention.block_sizes import BlockSizes

_ON_GPU = jax.default_backend() == "gpu"


@functools.partial(jax.jit, static_argnames=("is_causal", "block_sizes", "interpret"))
def _forward(q, k, v, mask, segment_ids, *, is_causal, block_sizes, interpret=True):
  return flashjax.dot_product_attention(
      q, k, v, mask=mask, segment_ids=segment_ids, is_causal=is_causal,
      block_sizes=block_sizes, implementation="pallas_triton", interpret=interpret)


@functools.partial(jax.jit, static_argnames=("is_causal", "block_sizes", "interpret"))
def _forward_and_grads(q, k, v, do, mask, segment_ids, *, is_causal, block_sizes,
                       interpret=True):
  out, vjp = jax.vjp(lambda q, k, v: _forward(q, k, v, mask, segment_ids, is_causal=is_causal,
                                              block_sizes=block_sizes, interpret=interpret),
                     q, k, v)
  return out, vjp(do)


def _reference(q, k, v, do, *, mask, segment_ids, is_causal):
  """float32 reference output and q/k/v gradients."""
  kwargs = dict(is_causal=is_causal)
  if segment_ids is not None:
    kwargs.update(q_segment_ids=segment_ids[0], kv_segment_ids=segment_ids[1])
  if isinstance(mask, (np.ndarray, jax.Array)):
    mask = jnp.asarray(mask).reshape((1,) * (4 - mask.ndim) + mask.shape)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  out, vjp = jax.vjp(lambda q, k, v: reference.mha_reference(q, k, v, mask=mask, **kwargs),
                     f32(q), f32(k), f32(v))
  return out, vjp(f32(do))


def _jaxpr_text(q, k, v, dispatch):
  """The printed jaxpr of a causal call at 32 x 32 tiles under `dispatch` (it prints the
  kernels' jaxprs too: the wrappers hold no cond of their own)."""
  fn = lambda q, k, v: pallas_triton.dot_product_attention(
      q, k, v, is_causal=True, block_sizes=BlockSizes(32, 32, dispatch=dispatch),
      interpret=True)
  text = str(jax.make_jaxpr(fn)(q, k, v))
  assert text.count("pallas_call") == 1, text  # the forward kernel only
  return text


class DispatchTest(parameterized.TestCase):
  """Interpret mode, float32, fresh random inputs per case."""

  def setUp(self):
    super().setUp()
    self.rng = np.random.default_rng(zlib.crc32(self.id().encode()))

  def _qkv(self, batch, q_len, kv_len, q_heads, kv_heads, head_dim):
    normal = lambda shape: jnp.asarray(self.rng.standard_normal(shape), jnp.float32)
    return (normal((batch, q_len, q_heads, head_dim)), normal((batch, kv_len, kv_heads, head_dim)),
            normal((batch, kv_len, kv_heads, head_dim)), normal((batch, q_len, q_heads, head_dim)))

  def _check(self, q, k, v, do, *, mask=None, segment_ids=None, is_causal=False,
             tiles=(32, 32), ref_mask=None):
    """flags == lists == reference (outputs), and the flags forward's gradients (lists
    backward) == the reference's. ref_mask: the reference's mask when `mask` is a
    BlockMask."""
    sizes = {d: BlockSizes(*tiles, dispatch=d) for d in (None, "lists", "flags")}
    call = dict(mask=mask, segment_ids=segment_ids, is_causal=is_causal)
    flags_out, flags_grads = _forward_and_grads(q, k, v, do, **call,
                                                block_sizes=sizes["flags"])
    lists_out = _forward(q, k, v, **call, block_sizes=sizes["lists"])
    default_out = _forward(q, k, v, **call, block_sizes=sizes[None])
    ref_out, ref_grads = _reference(q, k, v, do, **dict(call, mask=(
        mask if ref_mask is None else ref_mask)))
    chex.assert_tree_all_finite((flags_out, flags_grads))
    chex.assert_trees_all_equal(lists_out, default_out)  # None is the lists form
    # The two forms visit the same tiles in different orders (lists: FULL first).
    chex.assert_trees_all_close(flags_out, lists_out, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(flags_out, ref_out, atol=2e-5, rtol=2e-5)
    for name, g, rg in zip("qkv", flags_grads, ref_grads):
      chex.assert_trees_all_close(g, rg, atol=1e-4, rtol=1e-4, custom_message=f"d{name}")
    return flags_out

  def test_causal(self):
    q, k, v, do = self._qkv(2, 96, 96, 2, 2, 32)
    self._check(q, k, v, do, is_causal=True)

  def test_document_partial_before_full(self):
    """Causal documents at block_q > block_kv: rows where a PARTIAL tile precedes a FULL
    one, which the flag loop visits in that order (no FULL-first reordering)."""
    q, k, v, do = self._qkv(2, 192, 192, 2, 1, 32)
    pos = np.arange(192)
    ids = np.stack([np.searchsorted(s, pos, side="right")
                    for s in ([40, 150], [70, 100])]).astype(np.int32)
    tiles = (64, 16)
    bm = builders.block_mask_for(q_len=192, kv_len=192, block_q=tiles[0], block_kv=tiles[1],
                                 is_causal=True, q_segment_ids=ids, kv_segment_ids=ids)
    kinds = np.asarray(bm.kinds)
    self.assertTrue(np.any((kinds[..., :-1] == 1) & (kinds[..., 1:] == 2)))
    ids = jnp.asarray(ids)
    self._check(q, k, v, do, segment_ids=(ids, ids), is_causal=True, tiles=tiles)

  def test_sliding_window_odd_lengths(self):
    """Band rule, kv tiles past the window EMPTY, ragged last tiles (bounds masking); the
    caller's BlockMask fixes the tiles, block_sizes only picks the dispatch."""
    q, k, v, do = self._qkv(1, 75, 93, 2, 2, 16)
    window = masks.sliding_window(75, 93, 20, 6)
    self._check(q, k, v, do, mask=masks.BlockMask.from_mask(window, 16, 16), tiles=(16, 16),
                ref_mask=jnp.asarray(window.to_dense()))

  def test_random_blocks_gqa(self):
    """Stored tiles (a dense mask), per-head block patterns under GQA, rows with no allowed
    key (output 0 in both forms)."""
    q, k, v, do = self._qkv(2, 64, 96, 4, 2, 32)
    blocks = self.rng.random((2, 4, 4, 6)) < 0.4
    blocks[0, 1, 2] = False  # query block 2 of head 1 attends to nothing
    mask = np.repeat(np.repeat(blocks, 16, axis=2), 16, axis=3)
    mask &= self.rng.random(mask.shape) < 0.7
    out = self._check(q, k, v, do, mask=jnp.asarray(mask), tiles=(16, 16))
    chex.assert_trees_all_equal(out[0, 32:48, 1], jnp.zeros_like(out[0, 32:48, 1]))

  def test_empty_tiles_are_skipped(self):
    """Keys of EMPTY tiles are NaN: the flag loop's branch never reads them."""
    q, k, v, _ = self._qkv(2, 128, 128, 2, 2, 32)
    kv_ids = np.zeros((2, 128), np.int32)
    kv_ids[:, 64:96] = 9  # a segment no query belongs to: EMPTY tiles only
    ids = (jnp.zeros((2, 128), jnp.int32), jnp.asarray(kv_ids))
    nan_rows = lambda x: x.at[:, 64:96].set(jnp.nan)
    out = _forward(q, nan_rows(k), nan_rows(v), None, ids, is_causal=True,
                   block_sizes=BlockSizes(32, 32, dispatch="flags"))
    expected = reference.mha_reference(q, k, v, q_segment_ids=ids[0], kv_segment_ids=ids[1],
                                       is_causal=True)
    chex.assert_trees_all_close(out, expected, atol=2e-5, rtol=2e-5)

  def test_flags_kernel_branches_lists_kernel_does_not(self):
    q, k, v, _ = self._qkv(1, 64, 64, 1, 1, 16)
    self.assertIn("cond[", _jaxpr_text(q, k, v, "flags"))
    self.assertNotIn("cond[", _jaxpr_text(q, k, v, "lists"))

  def test_plan_params(self):
    q, k, v, _ = self._qkv(1, 64, 64, 1, 1, 16)
    for dispatch, want in ((None, "lists"), ("lists", "lists"), ("flags", "flags")):
      args = pallas_triton.base.AttentionArgs.bind(
          q, k, v, is_causal=True, block_sizes=BlockSizes(32, 32, dispatch=dispatch),
          interpret=True)
      self.assertEqual(pallas_triton.dot_product_attention.plan(args).params.fwd_dispatch,
                       want)

  def test_invalid_dispatch(self):
    with self.assertRaisesRegex(ValueError, "'flag'"):
      BlockSizes(32, 32, dispatch="flag")
    with self.assertRaisesRegex(ValueError, "'tiles'"):
      pallas_gpu_common.TritonParams(scale=1.0, soft_cap=None, interpret=True,
                                     fwd_dispatch="tiles")


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs a GPU")
class DispatchGpuTest(absltest.TestCase):
  """Both forms compiled by Triton at one shape (bf16, causal documents, GQA)."""

  def test_flags_and_lists_compile_and_agree(self):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    shape_q, shape_kv = (2, 1000, 8, 64), (2, 1000, 2, 64)
    q = jax.random.normal(keys[0], shape_q, jnp.bfloat16)
    k = jax.random.normal(keys[1], shape_kv, jnp.bfloat16)
    v = jax.random.normal(keys[2], shape_kv, jnp.bfloat16)
    do = jax.random.normal(keys[3], shape_q, jnp.bfloat16)
    ids = jnp.asarray(np.arange(1000)[None].repeat(2, 0) // 300, jnp.int32)
    call = dict(mask=None, segment_ids=(ids, ids), is_causal=True, interpret=False)
    outs = {}
    for dispatch in ("lists", "flags"):
      sizes = BlockSizes(128, 64, dispatch=dispatch)
      outs[dispatch] = _forward_and_grads(q, k, v, do, **call, block_sizes=sizes)
    ref_out, ref_grads = _reference(q, k, v, do, mask=None, segment_ids=(ids, ids),
                                    is_causal=True)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    for dispatch, (out, grads) in outs.items():
      chex.assert_tree_all_finite((out, grads))
      chex.assert_trees_all_close(f32(out), ref_out, atol=2e-2, rtol=2e-2,
                                  custom_message=dispatch)
      for name, g, rg in zip("qkv", grads, ref_grads):
        chex.assert_trees_all_close(f32(g), rg, atol=5e-2, rtol=5e-2,
                                    custom_message=f"{dispatch} d{name}")
    chex.assert_trees_all_close(f32(outs["flags"][0]), f32(outs["lists"][0]), atol=1e-2,
                                rtol=1e-2)


if __name__ == "__main__":
  absltest.main()
