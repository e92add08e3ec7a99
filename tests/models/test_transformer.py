"""Tests of flashjax.models.Transformer: config checks, cached decoding, packed rows,
Pallas backends against XLA, gradients, head-sparse decoding and generation.

Tiny models (d_model 64, 2 layers, T <= 64) with init_std 0.2 so logits have unit scale and
attention patterns are far from uniform; every case draws fresh random tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

from flashjax.models import Transformer
from flashjax.models import TransformerConfig
from flashjax.models import generate
from flashjax.models import sample_tokens
from flashjax.models import training

VOCAB = 61
VARIANTS = ("llama", "opt")
PALLAS = ("pallas_triton", "pallas_tpu")
ATOL = 1e-4  # float32 logits of unit scale through two layers


def tiny_config(variant: str = "llama", **overrides) -> TransformerConfig:
  fields = dict(variant=variant, vocab_size=VOCAB, d_model=64, num_layers=2, num_heads=4,
                num_kv_heads=2, max_len=64, init_std=0.2)
  fields.update(overrides)
  return TransformerConfig(**fields)


def tiny_model(variant: str = "llama", seed: int = 0, **overrides) -> Transformer:
  return Transformer(tiny_config(variant, **overrides), rngs=nnx.Rngs(seed))


def with_impl(model: Transformer, implementation: str) -> Transformer:
  """The same weights with another attention implementation (Pallas in interpret mode)."""
  config = dataclasses.replace(model.config, attention_impl=implementation, decode_impl=None,
                               interpret=implementation.startswith("pallas"))
  other = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(other)
  return nnx.merge(graphdef, nnx.state(model))


def jit_method(model: Transformer, method: str):
  """model.method as a jitted function of its arguments (weights closed over)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def call(state, *args):
    return getattr(nnx.merge(graphdef, state), method)(*args)

  return functools.partial(call, state)


def random_tokens(seed: int, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB, jnp.int32)


def packed_segments(lengths: list[list[int]]) -> np.ndarray:
  """int32 [B, T] segment ids, row b made of documents of the given lengths."""
  rows = [np.repeat(np.arange(1, len(row) + 1), row) for row in lengths]
  return np.stack(rows).astype(np.int32)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("heads_do_not_divide_width", dict(d_model=64, num_heads=6), ("d_model", "num_heads")),
      ("kv_heads_do_not_divide_heads", dict(num_heads=4, num_kv_heads=3),
       ("num_heads", "num_kv_heads")),
      ("unknown_variant", dict(variant="gpt"), ("variant",)),
      ("odd_rope_head_dim", dict(d_model=60, num_heads=4), ("head_dim",)),
      ("bad_dtype", dict(dtype="float64"), ("dtype",)),
      ("unknown_attention_impl", dict(attention_impl="flash"), ("attention_impl",)),
      ("jax_nn_in_sequence", dict(attention_impl=("xla", "jax_nn_cudnn")),
       ("attention_impl",)),
      ("unknown_decode_impl", dict(decode_impl="xla_chunked"), ("decode_impl",)),
      ("half_block_sizes", dict(block_q=32), ("block_q", "block_kv")),
      ("block_not_pow2", dict(block_q=48, block_kv=32), ("block_q",)),
      ("zero_layers", dict(num_layers=0), ("num_layers",)),
  )
  def test_bad_config_raises_naming_fields(self, overrides, names):
    fields = dict(variant="llama", vocab_size=VOCAB, d_model=64, num_layers=2, num_heads=4)
    fields.update(overrides)
    with self.assertRaises(ValueError) as ctx:
      TransformerConfig(**fields)
    for name in names:
      self.assertIn(name, str(ctx.exception))

  @parameterized.named_parameters(
      (f"{variant=}_{tie=}_{bias=}", variant, tie, bias)
      for variant in VARIANTS for tie in (False, True) for bias in (False, True))
  def test_num_params_counts_the_model(self, variant, tie, bias):
    config = tiny_config(variant, tie_embeddings=tie, use_bias=bias, d_ff=96)
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
    self.assertEqual(config.num_params(), count)

  def test_defaults_follow_the_variant(self):
    llama, opt = tiny_config("llama"), tiny_config("opt")
    self.assertEqual((llama.tie_embeddings, llama.use_bias, llama.d_ff), (False, False, 192))
    self.assertEqual((opt.tie_embeddings, opt.use_bias, opt.d_ff), (True, True, 256))
    self.assertEqual(tiny_config(attention_impl="xla_chunked").decode_impl, "xla")
    self.assertEqual(tiny_config(attention_impl="jax_nn_cudnn").decode_impl, "jax_nn_cudnn")

  def test_too_long_sequence_raises(self):
    model = nnx.eval_shape(lambda: tiny_model("opt"))
    with self.assertRaisesRegex(ValueError, "max_len=64"):
      model(random_tokens(0, (1, 65)))


class CachedDecodeTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{variant=}_{impl=}", variant, impl)
      for variant, impl in (("llama", "xla"), ("opt", "xla"), ("llama", "pallas_triton"),
                            ("opt", "pallas_tpu")))
  def test_prefill_and_decode_equal_full_forward(self, variant, impl):
    seed = sum(map(ord, variant + impl))
    model = with_impl(tiny_model(variant, seed=seed), impl)
    tokens = random_tokens(seed, (3, 24))
    full = jax.jit(lambda t: with_impl(model, "xla")(t))(tokens)
    width, lengths = 12, np.array([5, 12, 9], np.int32)
    prompts = jnp.where(jnp.arange(width) < lengths[:, None], tokens[:, :width], 0)
    logits, cache = jit_method(model, "prefill")(prompts, model.init_cache(3, 24),
                                                 jnp.asarray(lengths))
    for b in range(3):
      chex.assert_trees_all_close(logits[b, :lengths[b]], full[b, :lengths[b]], atol=ATOL)
    step = jit_method(model, "decode_step")
    rows = np.arange(3)
    steps = 24 - width if impl == "xla" else 4  # interpret-mode decode is slow
    for s in range(steps):
      logits, cache = step(tokens[rows, lengths + s], cache)
      chex.assert_trees_all_close(logits, full[rows, lengths + s], atol=ATOL)
    np.testing.assert_array_equal(cache.lengths, lengths + steps)


class PackedRowsTest(parameterized.TestCase):
  """Packed rows: a document's logits are those of the document alone."""

  @parameterized.named_parameters(
      (f"{variant=}_{impl=}", variant, impl)
      for variant, impl in (("llama", "xla"), ("opt", "xla"), ("opt", "pallas_triton"),
                            ("llama", "pallas_tpu")))
  def test_documents_do_not_attend_across(self, variant, impl):
    seed = sum(map(ord, variant + impl)) + 1
    model = with_impl(tiny_model(variant, seed=seed), impl)
    forward = jax.jit(lambda t, s: model(t, segment_ids=s))
    segments = packed_segments([[20, 30, 14], [64]])
    tokens = random_tokens(seed, (2, 64))
    packed = forward(tokens, segments)
    alone = jax.jit(lambda t: model(t))(tokens[:1, 20:50])
    chex.assert_trees_all_close(packed[0, 20:50], alone[0], atol=ATOL)
    # Changing the neighbouring documents leaves the middle one unchanged ...
    changed = tokens.at[0, :20].set((tokens[0, :20] + 1) % VOCAB)
    changed = changed.at[0, 50:].set((tokens[0, 50:] + 7) % VOCAB)
    chex.assert_trees_all_close(forward(changed, segments)[0, 20:50], packed[0, 20:50],
                                atol=ATOL)
    # ... which does change it without segment ids (the check above can fail).
    no_segments = jax.jit(lambda t: model(t))
    diff = jnp.abs(no_segments(changed)[0, 20:50] - no_segments(tokens)[0, 20:50]).max()
    self.assertGreater(float(diff), 1e-2)


class BackendTest(parameterized.TestCase):

  @parameterized.named_parameters((f"{variant=}_{impl=}", variant, impl)
                                  for variant, impl in (("llama", "pallas_triton"),
                                                        ("opt", "pallas_tpu")))
  def test_pallas_logits_equal_xla(self, variant, impl):
    seed = sum(map(ord, variant + impl)) + 2
    model = tiny_model(variant, seed=seed)
    tokens = random_tokens(seed, (2, 64))
    segments = packed_segments([[40, 24], [10, 54]])
    run = lambda m: jax.jit(lambda t, s: m(t, segment_ids=s))(tokens, segments)
    chex.assert_trees_all_close(run(with_impl(model, impl)), run(model), atol=ATOL)

  @parameterized.named_parameters((f"{variant=}_{impl=}", variant, impl)
                                  for variant, impl in (("llama", "xla"), ("opt", "xla"),
                                                        ("llama", "pallas_triton")))
  def test_gradients_finite_and_equal_xla(self, variant, impl):
    seed = sum(map(ord, variant + impl)) + 3
    model = tiny_model(variant, seed=seed)
    tokens = random_tokens(seed, (2, 65))
    segments = packed_segments([[30, 35], [65]])

    def grads(m):
      graphdef, params = nnx.split(m)

      def loss(p):
        total, count = training.next_token_loss(nnx.merge(graphdef, p), tokens, segments)
        return total / count

      return jax.jit(jax.grad(loss))(params)

    reference = grads(model)
    chex.assert_tree_all_finite(reference)
    norm = float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(reference))))
    self.assertGreater(norm, 1e-3)
    if impl != "xla":
      got = grads(with_impl(model, impl))
      chex.assert_tree_all_finite(got)
      chex.assert_trees_all_close(got, reference, atol=1e-4)

  def test_jax_nn_xla_adapter_equals_flashjax(self):
    model = tiny_model("llama", seed=11)
    tokens = random_tokens(11, (2, 32))
    segments = packed_segments([[12, 20], [32]])
    run = lambda m: jax.jit(lambda t, s: m(t, segment_ids=s))(tokens, segments)
    chex.assert_trees_all_close(run(with_impl(model, "jax_nn_xla")), run(model), atol=ATOL)


class HeadSparseDecodeTest(parameterized.TestCase):

  def test_head_indices_per_layer(self):
    model = tiny_model("llama", seed=12)
    tokens = random_tokens(12, (2, 9))
    _, cache = jit_method(model, "prefill")(tokens[:, :8], model.init_cache(2, 16))
    decode = lambda m, h: jax.jit(lambda c, h: m.decode_step(tokens[:, 8], c, h)[0])(cache, h)
    dense = decode(model, None)
    everything = [jnp.array([[0, 1], [1, 0]], jnp.int32)] * 2
    chex.assert_trees_all_close(decode(model, everything), dense, atol=ATOL)
    # Layer 0 dense, layer 1 one KV group per sequence: flashjax's head-sparse decode equals
    # computing every head and zeroing the unselected ones (the jax.nn adapter) ...
    sparse = [None, jnp.array([[1], [0]], jnp.int32)]
    got = decode(model, sparse)
    chex.assert_trees_all_close(decode(with_impl(model, "jax_nn_xla"), sparse), got, atol=ATOL)
    # ... and differs from dense decoding.
    self.assertGreater(float(jnp.abs(got - dense).max()), 1e-3)
    chex.assert_trees_all_close(decode(model, jnp.stack(everything)), dense, atol=ATOL)

  def test_wrong_number_of_layers_raises(self):
    model = tiny_model("llama")
    cache = model.init_cache(1, 8)
    with self.assertRaisesRegex(ValueError, "num_layers=2"):
      model.decode_step(jnp.zeros((1,), jnp.int32), cache, [None])


class GenerateTest(parameterized.TestCase):

  @parameterized.named_parameters((f"{variant=}", variant) for variant in VARIANTS)
  def test_greedy_equals_full_forward_argmax(self, variant):
    seed = sum(map(ord, variant)) + 4
    model = tiny_model(variant, seed=seed)
    prompts = random_tokens(seed, (2, 6))
    lengths = np.array([6, 3], np.int32)
    out = generate(model, prompts, prompt_lengths=lengths, max_new_tokens=8)
    # Causal: tokens after position t do not change its logits, so one padded shape does.
    forward = jax.jit(lambda t: model(t))
    for b in range(2):
      sequence = np.zeros((1, 16), np.int32)
      sequence[0, :lengths[b]] = prompts[b, :lengths[b]]
      for t in range(lengths[b], lengths[b] + 8):
        sequence[0, t] = int(jnp.argmax(forward(jnp.asarray(sequence))[0, t - 1]))
      np.testing.assert_array_equal(out.tokens[b], sequence[0, lengths[b]:lengths[b] + 8])
    np.testing.assert_array_equal(out.lengths, [8, 8])
    np.testing.assert_array_equal(out.stopped, [False, False])
    top1 = generate(model, prompts, prompt_lengths=lengths, max_new_tokens=8,
                    temperature=1.5, top_k=1, rng=jax.random.key(seed))
    np.testing.assert_array_equal(top1.tokens, out.tokens)

  def test_per_sequence_stop_tokens(self):
    model = tiny_model("llama", seed=21)
    prompts = random_tokens(21, (3, 5))
    free = generate(model, prompts, max_new_tokens=10)
    first = int(free.tokens[0, 3])
    stop_at = int(np.argmax(np.asarray(free.tokens[0]) == first))  # first occurrence
    # Row 0 stops at `first`, row 1 on a token it never produces, row 2 has no stop token.
    unused = next(t for t in range(VOCAB) if t not in np.asarray(free.tokens[1]))
    stops = np.array([[first, -1], [unused, -1], [-1, -1]], np.int32)
    out = generate(model, prompts, max_new_tokens=10, stop_tokens=stops, fill_id=VOCAB)
    np.testing.assert_array_equal(out.lengths, [stop_at + 1, 10, 10])
    np.testing.assert_array_equal(out.stopped, [True, False, False])
    np.testing.assert_array_equal(out.tokens[0, :stop_at + 1], free.tokens[0, :stop_at + 1])
    self.assertTrue(np.all(np.asarray(out.tokens[0, stop_at + 1:]) == VOCAB))
    np.testing.assert_array_equal(out.tokens[1:], free.tokens[1:])

  def test_sampling_respects_top_k_and_is_seeded(self):
    logits = jax.random.normal(jax.random.key(5), (4, VOCAB)) * 3
    keys = jax.random.split(jax.random.key(6), 200)
    draws = jax.vmap(lambda k: sample_tokens(logits, k, temperature=2.0, top_k=3))(keys)
    top3 = np.asarray(jax.lax.top_k(logits, 3)[1])
    for b in range(4):
      self.assertSetEqual(set(np.asarray(draws[:, b]).tolist()), set(top3[b].tolist()))
    model = tiny_model("opt", seed=22)
    prompts = random_tokens(22, (2, 4))
    run = lambda seed: generate(model, prompts, max_new_tokens=6, temperature=1.0, top_k=5,
                                rng=jax.random.key(seed)).tokens
    np.testing.assert_array_equal(run(1), run(1))
    self.assertFalse(np.array_equal(run(1), run(2)))

  @parameterized.named_parameters(
      ("too_long", dict(max_new_tokens=61), "max_len"),
      ("zero_new_tokens", dict(max_new_tokens=0), "max_new_tokens"),
      ("bad_top_k", dict(max_new_tokens=2, top_k=0), "top_k"),
      ("bad_lengths", dict(max_new_tokens=2, prompt_lengths=np.array([0, 4])),
       "prompt_lengths"),
      ("bad_stop_shape", dict(max_new_tokens=2, stop_tokens=np.zeros((3,), np.int32)),
       "stop_tokens"),
  )
  def test_bad_arguments_raise(self, kwargs, name):
    model = tiny_model("llama")
    with self.assertRaisesRegex(ValueError, name):
      generate(model, random_tokens(0, (2, 4)), **kwargs)


if __name__ == "__main__":
  absltest.main()
