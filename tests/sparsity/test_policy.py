"""Routers' selections, SparsityPolicy checks, and routed decoding in the NNX models."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from flashjax.models import Transformer, TransformerConfig
from flashjax.sparsity import (HeadRouter, NeuronRouter, SparsityPolicy, select_heads,
                               select_neurons)

VOCAB = 61


def tiny_model(variant, seed=0, **overrides):
  fields = dict(variant=variant, vocab_size=VOCAB, d_model=32, num_layers=3, num_heads=4,
                num_kv_heads=2, d_ff=256, max_len=32, init_std=0.2)
  fields.update(overrides)
  return Transformer(TransformerConfig(**fields), rngs=nnx.Rngs(seed))


def planted_head_router(d, groups, favoured, seed=0):
  """A router whose scores ignore x and rank `favoured` groups first."""
  router = HeadRouter(d, groups, rngs=nnx.Rngs(seed))
  router.out.kernel[...] = jnp.zeros_like(router.out.kernel[...])
  bias = np.zeros(groups, np.float32)
  bias[list(favoured)] = 10.0 + np.arange(len(favoured))[::-1]
  router.out.bias[...] = jnp.asarray(bias)
  return router


def planted_neuron_router(d, f, favoured, seed=0):
  router = NeuronRouter(d, f, rank=8, rngs=nnx.Rngs(seed))
  router.up.kernel[...] = jnp.zeros_like(router.up.kernel[...])
  bias = np.full(f, -1.0, np.float32)
  bias[favoured] = 1.0 + np.arange(len(favoured), dtype=np.float32)
  router.up.bias[...] = jnp.asarray(bias)
  return router


def decode_after_prefill(model, prompts, steps=2, **kwargs):
  cache = model.init_cache(prompts.shape[0], 32)
  logits, cache = model.prefill(prompts, cache)
  tokens = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
  out = []
  for _ in range(steps):
    logits, cache = model.decode_step(tokens, cache, **kwargs)
    out.append(logits)
    tokens = jnp.argmax(logits, -1).astype(jnp.int32)
  return jnp.stack(out)


class SelectionTest(absltest.TestCase):

  def test_select_heads_takes_the_top_k_per_row(self):
    logits = jnp.asarray([[0.1, 3.0, -1.0, 2.0], [5.0, 0.0, 1.0, 4.0]])
    np.testing.assert_array_equal(select_heads(logits, 2), [[1, 3], [0, 3]])
    self.assertEqual(select_heads(logits, 2).dtype, jnp.int32)
    with self.assertRaisesRegex(ValueError, "k=5"):
      select_heads(logits, 5)

  def test_select_neurons_is_the_sorted_batch_union(self):
    logits = jnp.asarray([[3.0, -1.0, 0.5, -2.0, 0.0],
                          [-4.0, 2.0, 0.4, -1.0, 0.2]])
    # relu-summed scores: [3, 2, 0.9, 0, 0.2] -> top 3 = {0, 1, 2}
    np.testing.assert_array_equal(select_neurons(logits, 3), [0, 1, 2])
    union = np.asarray(select_neurons(jax.random.normal(jax.random.key(0), (8, 300)), 100))
    self.assertLen(np.unique(union), 100)
    self.assertTrue(np.all(np.diff(union) > 0))
    with self.assertRaisesRegex(ValueError, "k=0"):
      select_neurons(logits, 0)


class PolicyValidationTest(absltest.TestCase):

  def test_mismatches_raise(self):
    router = HeadRouter(8, 4, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "len\\(head_k\\)=1"):
      SparsityPolicy([None, router], [None])
    with self.assertRaisesRegex(ValueError, "layer 0: head router False but head_k=2"):
      SparsityPolicy([None, router], [2, 2])
    with self.assertRaisesRegex(ValueError, "head_k=5 must be in \\[1, 4\\]"):
      SparsityPolicy([None, router], [None, 5])
    neurons = NeuronRouter(8, 32, rank=4, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "go together"):
      SparsityPolicy([None, router], [None, 2], neuron_routers=[None, neurons])
    with self.assertRaisesRegex(ValueError, "neuron_k\\[8\\]=40"):
      SparsityPolicy([None, router], [None, 2], neuron_routers=[None, neurons],
                     neuron_k={8: (None, 40)})

  def test_neuron_budget_uses_the_next_calibrated_batch(self):
    neurons = NeuronRouter(8, 512, rank=4, rngs=nnx.Rngs(0))
    policy = SparsityPolicy([None, None], [None, None], neuron_routers=[None, neurons],
                            neuron_k={1: (None, 128), 8: (None, 256), 64: (None, 384)})
    self.assertEqual([policy.neuron_budget(1, b) for b in (1, 2, 8, 9, 64, 256)],
                     [128, 256, 256, 384, 384, 384])
    self.assertIsNone(policy.neuron_budget(0, 4))


class RoutedDecodeTest(parameterized.TestCase):

  @parameterized.named_parameters(("llama", "llama"), ("opt", "opt"))
  def test_full_density_equals_dense(self, variant):
    model = tiny_model(variant)
    c = model.config
    heads = [None] + [HeadRouter(c.d_model, c.num_kv_heads, rngs=nnx.Rngs(i))
                      for i in range(1, c.num_layers)]
    neurons = [None] + [NeuronRouter(c.d_model, c.d_ff, rank=8, rngs=nnx.Rngs(i))
                        for i in range(1, c.num_layers)]
    policy = SparsityPolicy(heads, [None] + [c.num_kv_heads] * (c.num_layers - 1),
                            neuron_routers=neurons,
                            neuron_k={4: (None,) + (c.d_ff,) * (c.num_layers - 1)})
    prompts = jax.random.randint(jax.random.key(1), (3, 5), 0, VOCAB)
    dense = decode_after_prefill(model, prompts)
    routed = decode_after_prefill(model, prompts, sparsity=policy)
    # Every head and unit kept: the same float32 logits, bit for bit.
    np.testing.assert_array_equal(np.asarray(routed), np.asarray(dense))

  def test_routed_heads_equal_explicit_head_indices(self):
    model = tiny_model("llama", num_kv_heads=4)
    c = model.config
    policy = SparsityPolicy(
        [None, planted_head_router(c.d_model, 4, [2]), planted_head_router(c.d_model, 4,
                                                                           [3, 0])],
        [None, 1, 2])
    prompts = jax.random.randint(jax.random.key(2), (2, 6), 0, VOCAB)
    routed = decode_after_prefill(model, prompts, sparsity=policy)
    explicit = [None, jnp.full((2, 1), 2, jnp.int32), jnp.tile(jnp.asarray([[3, 0]]), (2, 1))]
    expected = decode_after_prefill(model, prompts, head_indices=explicit)
    chex.assert_trees_all_close(routed, expected, atol=1e-6, rtol=1e-6)
    dense = decode_after_prefill(model, prompts)
    self.assertGreater(float(jnp.abs(routed - dense).max()), 1e-3)  # the routing matters

  def test_routed_neurons_equal_a_model_without_the_other_units(self):
    model = tiny_model("opt", use_bias=True)
    c = model.config
    rng = np.random.default_rng(3)
    keep = np.sort(rng.choice(c.d_ff, 48, replace=False))
    policy = SparsityPolicy([None] * c.num_layers, [None] * c.num_layers,
                            neuron_routers=[None, planted_neuron_router(c.d_model, c.d_ff,
                                                                        keep), None],
                            neuron_k={8: (None, 48, None)})
    prompts = jax.random.randint(jax.random.key(4), (2, 6), 0, VOCAB)
    pruned = tiny_model("opt", use_bias=True)
    mlp = pruned.layers[1].mlp
    drop = np.setdiff1d(np.arange(c.d_ff), keep)
    mlp.fc2[...] = mlp.fc2[...].at[drop].set(0.0)  # unselected units contribute nothing
    cache = pruned.init_cache(2, 32)
    # The prefill stays dense: run it on the original model, then decode on both.
    logits, cache = model.prefill(prompts, cache)
    tokens = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    routed, _ = model.decode_step(tokens, cache, sparsity=policy)
    expected, _ = pruned.decode_step(tokens, cache)
    chex.assert_trees_all_close(routed, expected, atol=1e-5, rtol=1e-5)

  def test_generate_with_a_policy_runs_jitted(self):
    model = tiny_model("llama")
    c = model.config
    policy = SparsityPolicy([None] + [planted_head_router(c.d_model, 2, [1])] * 2,
                            [None, 1, 1])
    prompts = jax.random.randint(jax.random.key(5), (2, 4), 0, VOCAB)
    out = model.generate(prompts, max_new_tokens=4, sparsity=policy)
    chex.assert_shape(out.tokens, (2, 4))
    dense = model.generate(prompts, max_new_tokens=4)
    chex.assert_shape(dense.tokens, (2, 4))
    with self.assertRaisesRegex(ValueError, "not both"):
      model.decode_step(prompts[:, 0], model.init_cache(2, 8), head_indices=[None] * 3,
                        sparsity=policy)


if __name__ == "__main__":
  absltest.main()
