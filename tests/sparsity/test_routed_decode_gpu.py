"""Routed decoding through the compiled GPU kernels (no interpret mode).

Skipped unless jax.default_backend() == "gpu". Run on the GPU machine with
  python -m pytest -q -m gpu tests/sparsity/test_routed_decode_gpu.py
The model's default decode backend on a GPU is Pallas (the head-sparse decode kernel and
flashjax.sparse_mlp's Triton kernels); each routed step is checked against the same model
on the xla backends, and against explicit head indices / a pruned model.
"""

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashjax.models import Transformer, TransformerConfig
from flashjax.sparsity import HeadRouter, NeuronRouter, SparsityPolicy
from tests.sparsity.test_policy import (decode_after_prefill, planted_head_router,
                                        planted_neuron_router)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]

VOCAB = 97


def gpu_model(variant, impl=None, **overrides):
  """head_dim 64, float32 (the kernels' checked precision), random weights of seed 0."""
  fields = dict(variant=variant, vocab_size=VOCAB, d_model=256, num_layers=3, num_heads=4,
                num_kv_heads=4 if variant == "opt" else 2, d_ff=512, max_len=64,
                init_std=0.05, attention_impl=impl, decode_impl=impl)
  fields.update(overrides)
  return Transformer(TransformerConfig(**fields), rngs=nnx.Rngs(0))


def random_policy(model, head_k, neuron_k=None):
  c = model.config
  heads = [None] + [HeadRouter(c.d_model, c.num_kv_heads, rngs=nnx.Rngs(i))
                    for i in range(1, c.num_layers)]
  neurons, budgets = None, None
  if neuron_k is not None:
    neurons = [None] + [NeuronRouter(c.d_model, c.d_ff, rank=16, rngs=nnx.Rngs(10 + i))
                        for i in range(1, c.num_layers)]
    budgets = {8: (None,) + (neuron_k,) * (c.num_layers - 1)}
  return SparsityPolicy(heads, [None] + [head_k] * (c.num_layers - 1),
                        neuron_routers=neurons, neuron_k=budgets)


class RoutedDecodeGpuTest(parameterized.TestCase):

  @parameterized.named_parameters(("llama", "llama", None), ("opt", "opt", 256))
  def test_routed_pallas_equals_routed_xla(self, variant, neuron_k):
    pallas, ref = gpu_model(variant), gpu_model(variant, impl="xla")
    prompts = jax.random.randint(jax.random.key(1), (5, 9), 0, VOCAB)
    policy = random_policy(pallas, head_k=1, neuron_k=neuron_k)
    with jax.default_matmul_precision("highest"):
      got = decode_after_prefill(pallas, prompts, steps=3, sparsity=policy)
      want = decode_after_prefill(ref, prompts, steps=3, sparsity=policy)
      dense = decode_after_prefill(ref, prompts, steps=3)
    chex.assert_trees_all_close(got, want, atol=2e-4, rtol=2e-4)
    self.assertGreater(float(jnp.abs(want - dense).max()), 1e-3)  # the routing matters

  @parameterized.named_parameters(("llama", "llama"), ("opt", "opt"))
  def test_full_density_equals_dense(self, variant):
    model = gpu_model(variant)
    c = model.config
    policy = random_policy(model, head_k=c.num_kv_heads,
                           neuron_k=c.d_ff if variant == "opt" else None)
    prompts = jax.random.randint(jax.random.key(2), (3, 7), 0, VOCAB)
    with jax.default_matmul_precision("highest"):
      dense = decode_after_prefill(model, prompts)
      routed = decode_after_prefill(model, prompts, sparsity=policy)
    chex.assert_trees_all_close(routed, dense, atol=1e-4, rtol=1e-4)

  def test_routed_heads_equal_explicit_head_indices(self):
    model = gpu_model("llama", num_kv_heads=4)
    c = model.config
    policy = SparsityPolicy([None, planted_head_router(c.d_model, 4, [2]),
                             planted_head_router(c.d_model, 4, [3, 0])], [None, 1, 2])
    prompts = jax.random.randint(jax.random.key(3), (2, 6), 0, VOCAB)
    routed = decode_after_prefill(model, prompts, sparsity=policy)
    explicit = [None, jnp.full((2, 1), 2, jnp.int32), jnp.tile(jnp.asarray([[3, 0]]), (2, 1))]
    expected = decode_after_prefill(model, prompts, head_indices=explicit)
    chex.assert_trees_all_close(routed, expected, atol=1e-5, rtol=1e-5)

  def test_routed_neurons_equal_a_pruned_model(self):
    model, pruned = gpu_model("opt", use_bias=True), gpu_model("opt", use_bias=True)
    c = model.config
    keep = np.sort(np.random.default_rng(4).choice(c.d_ff, 128, replace=False))
    policy = SparsityPolicy([None] * 3, [None] * 3,
                            neuron_routers=[None, planted_neuron_router(c.d_model, c.d_ff,
                                                                        keep), None],
                            neuron_k={8: (None, 128, None)})
    mlp = pruned.layers[1].mlp
    mlp.fc2[...] = mlp.fc2[...].at[np.setdiff1d(np.arange(c.d_ff), keep)].set(0.0)
    prompts = jax.random.randint(jax.random.key(5), (2, 6), 0, VOCAB)
    with jax.default_matmul_precision("highest"):
      logits, cache = model.prefill(prompts, model.init_cache(2, 32))
      tokens = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
      routed, _ = model.decode_step(tokens, cache, sparsity=policy)
      expected, _ = pruned.decode_step(tokens, cache)
    chex.assert_trees_all_close(routed, expected, atol=2e-4, rtol=2e-4)


if __name__ == "__main__":
  absltest.main()
