"""Sharded training, decode and checkpoints of the Transformer on fake CPU devices.

tests/conftest.py gives 8 host devices; everything is float32 and compared with the same
computation on one device.
"""

import dataclasses
import os
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx
from jax.sharding import PartitionSpec

from flashjax import distributed
from flashjax.distributed import sharding
from flashjax.layers import attention as attention_layer
from flashjax.models import Transformer, TransformerConfig, checkpoint, training

CONFIG = TransformerConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4,
                           num_kv_heads=2, d_ff=64, max_len=32)
OPT = training.OptimizerConfig(peak_lr=1e-2, warmup_steps=1)
LR = 1e-2


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CONFIG.vocab_size, (8, 17)).astype(np.int32)
  segments = np.ones((8, 17), np.int32)
  segments[:, 10:] = 2
  return tokens, segments


def _mesh(spec):
  sizes = [int(entry.split(":")[1]) for entry in spec.split(",")]
  return distributed.make_mesh(spec, jax.devices()[:int(np.prod(sizes))])


def _max_diff(a, b):
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _needs_8_devices(test):
  if jax.device_count() < 8:
    test.skipTest(f"needs 8 devices, has {jax.device_count()}")


class MeshSpecTest(parameterized.TestCase):

  def test_parse_and_make(self):
    self.assertEqual(distributed.parse_mesh_spec("data:2, model:4"),
                     (("data", 2), ("model", 4)))
    mesh = distributed.make_mesh("data:2,model:2", jax.devices()[:4])
    self.assertEqual(dict(mesh.shape), {"data": 2, "model": 2})
    self.assertEqual(mesh.axis_names, ("data", "model"))

  @parameterized.named_parameters(
      ("product", "data:3", "'data:3' has 3 devices"),
      ("unknown_axis", "data:2,tensor:2", "unknown axis 'tensor'"),
      ("no_size", "data", "entry 'data' is not 'axis:size'"),
      ("zero", "data:0,model:4", "axis 'data' has size 0"),
      ("repeated", "data:2,data:2", "axis 'data' appears twice"),
      ("empty", "", "non-empty string"),
  )
  def test_bad_spec(self, spec, message):
    with self.assertRaisesRegex(ValueError, message):
      distributed.make_mesh(spec, jax.devices()[:4])

  def test_unmatched_parameter_and_bad_rules(self):
    mesh = _mesh("data:2")
    with self.assertRaisesRegex(ValueError, "no sharding rule matches parameter 'foo.w'"):
      sharding.param_specs({"foo": {"w": jnp.zeros((4, 4))}}, mesh)
    with self.assertRaisesRegex(ValueError, "unknown mesh axis 'tp'"):
      sharding.param_specs({"lm_head": jnp.zeros((4, 4))}, mesh, rules={"vocab": "tp"})


class ShardedTrainingTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tokens, cls.segments = _batch()
    reference = training.Trainer(Transformer(CONFIG, rngs=nnx.Rngs(0)), OPT)
    cls.losses = [float(reference.train_step(cls.tokens, cls.segments, LR)["loss"])
                  for _ in range(2)]
    cls.params = jax.device_get(reference.params)
    cls.eval_loss = reference.evaluate(cls.tokens, cls.segments, 3)

  @parameterized.named_parameters(
      # (mesh, parameter with its expected spec and local shard shape)
      ("dp_tp_2x2", "data:2,model:2", ("mlp", "gate"), PartitionSpec(None, "model"), (32, 32)),
      ("dp_4", "data:4", ("mlp", "gate"), PartitionSpec(), (32, 64)),
      ("fsdp_4", "fsdp:4", ("mlp", "gate"), PartitionSpec("fsdp"), (8, 64)),
      ("dp_fsdp_tp_2x2x2", "data:2,fsdp:2,model:2", ("attn", "q_proj"),
       PartitionSpec("fsdp", "model"), (16, 2, 8)),
  )
  def test_step_matches_single_device(self, spec, where, want_spec, shard_shape):
    if "fsdp:2" in spec:
      _needs_8_devices(self)
    trainer = training.Trainer(Transformer(CONFIG, rngs=nnx.Rngs(0)), OPT, mesh=_mesh(spec))
    losses = [float(trainer.train_step(self.tokens, self.segments, LR)["loss"])
              for _ in range(2)]
    np.testing.assert_allclose(losses, self.losses, atol=1e-5, rtol=0)
    self.assertLess(_max_diff(trainer.params, self.params), 1e-4)
    weight = trainer.params["layers"][0][where[0]][where[1]][...]
    self.assertEqual(weight.sharding.spec, want_spec)
    self.assertEqual(weight.addressable_shards[0].data.shape, shard_shape)
    # Adam's moments follow their parameter; the step count is replicated.
    mu_leaves = [x for x in jax.tree.leaves(trainer.opt_state)
                 if x.shape == weight.shape and x.sharding.spec == want_spec]
    self.assertGreaterEqual(len(mu_leaves), 2)
    # The batch is split over data / fsdp; evaluation agrees too (odd last batch replicated).
    self.assertAlmostEqual(trainer.evaluate(self.tokens, self.segments, 3), self.eval_loss,
                           places=5)

  def test_bad_batch_and_arguments(self):
    trainer = training.Trainer(Transformer(CONFIG, rngs=nnx.Rngs(0)), OPT,
                               mesh=_mesh("data:4"))
    with self.assertRaisesRegex(ValueError, "batch of 6 rows must be divisible by the 4"):
      trainer.train_step(self.tokens[:6], self.segments[:6], LR)
    with self.assertRaisesRegex(ValueError, "need a mesh"):
      training.Trainer(Transformer(CONFIG, rngs=nnx.Rngs(0)), OPT, rules={"embed": None})
    with self.assertRaisesRegex(ValueError, "mesh must be a jax.sharding.Mesh"):
      training.Trainer(Transformer(CONFIG, rngs=nnx.Rngs(0)), OPT, mesh="data:2")


class ShardedDecodeTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("llama_dp_tp", "llama", "data:2,model:2", PartitionSpec("data", None, "model")),
      ("opt_fsdp_tp", "opt", "fsdp:2,model:2", PartitionSpec("fsdp", None, "model")),
      ("llama_dp_4", "llama", "data:4", PartitionSpec("data", None, None)),
  )
  def test_decode_matches_single_device(self, variant, spec, cache_spec):
    config = TransformerConfig(variant=variant, vocab_size=64, d_model=32, num_layers=2,
                               num_heads=4, num_kv_heads=2, d_ff=64, max_len=32)
    cache, sharded_cache = _decode_both(config, _mesh(spec), steps=3)
    self.assertEqual(sharded_cache.keys[0].sharding.spec, cache_spec)
    np.testing.assert_allclose(sharded_cache.values[1], cache.values[1], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(sharded_cache.lengths, cache.lengths)

  def test_cache_shard_errors(self):
    model = Transformer(CONFIG, rngs=nnx.Rngs(0))
    cache = model.init_cache(4, 8)
    mesh = _mesh("data:2,model:2")
    self.assertEqual(cache.shard(mesh).keys[0].sharding.spec,
                     PartitionSpec("data", None, "model"))
    with self.assertRaisesRegex(ValueError, "Nkv=2 must be divisible by the 4"):
      cache.shard(_mesh("model:4"), batch_axis=None)
    with self.assertRaisesRegex(ValueError, "B=4 must be divisible by the 8"):
      cache.shard(distributed.make_mesh("data:8", jax.devices()[:1] * 8), head_axis=None)
    with self.assertRaisesRegex(ValueError, "head_axis='heads' is not an axis"):
      cache.shard(mesh, head_axis="heads")


class ShardedCheckpointTest(parameterized.TestCase):

  @parameterized.named_parameters(("orbax", "orbax"), ("msgpack", "msgpack"))
  def test_round_trip_same_and_other_mesh(self, backend):
    _needs_8_devices(self)
    tokens, segments = _batch()
    trainer = training.Trainer(Transformer(CONFIG, rngs=nnx.Rngs(0)), OPT,
                               mesh=_mesh("data:2,model:2"))
    trainer.train_step(tokens, segments, LR)
    saved = jax.device_get(trainer.state())
    next_loss = float(_next_loss(saved, tokens, segments))
    with tempfile.TemporaryDirectory() as tmp:
      ckpt = checkpoint.Checkpointer(tmp, backend=backend)
      ckpt.save(1, trainer.state(), {"note": "sharded"})
      if backend == "orbax":
        self.assertEqual(os.listdir(tmp), ["1"])
      for spec, where, want in (("data:2,model:2", "gate", PartitionSpec(None, "model")),
                                ("fsdp:4,model:2", "gate", PartitionSpec("fsdp", "model")),
                                ("data:8", "gate", PartitionSpec())):
        target = training.Trainer(Transformer(CONFIG, rngs=nnx.Rngs(1)), OPT,
                                  mesh=_mesh(spec))
        state, meta = ckpt.restore(1, target.state())
        self.assertEqual(meta, {"note": "sharded"})
        self.assertEqual(_max_diff(state, saved), 0.0)
        weight = state["params"]["layers"][0]["mlp"][where][...]
        self.assertEqual(weight.sharding.mesh.shape, target.mesh.shape)
        self.assertEqual(weight.sharding.spec, want)
        target.load_state(state)
        self.assertEqual(target.step, 1)
        if spec == "fsdp:4,model:2":  # one train-step compile: training continues identically
          self.assertAlmostEqual(float(target.train_step(tokens, segments, LR)["loss"]),
                                 next_loss, delta=1e-5)
      # An explicit sharding tree overrides the (unsharded) template's placement.
      single = training.Trainer(Transformer(CONFIG, rngs=nnx.Rngs(1)), OPT)
      other = training.Trainer(Transformer(CONFIG, rngs=nnx.Rngs(1)), OPT,
                               mesh=_mesh("model:2"))
      state, _ = ckpt.restore(1, single.state(), shardings={"params": other.param_shardings})
      self.assertEqual(state["params"]["lm_head"][...].sharding.spec,
                       PartitionSpec(None, "model"))
      with self.assertRaisesRegex(ValueError, "'params.nope'"):
        ckpt.restore(1, single.state(), shardings={"params": {"nope": None}})
      ckpt.close()


def _decode_both(config, mesh, *, steps):
  """Prefill 4 ragged prompts, then greedy-decode `steps` tokens on one device and with a
  ShardedDecoder on `mesh`, asserting equal logits at every step; (cache, sharded cache)."""
  prompts = jnp.asarray(np.random.default_rng(1).integers(0, 64, (4, 6)), jnp.int32)
  lengths = jnp.array([6, 3, 5, 1], jnp.int32)
  model = Transformer(config, rngs=nnx.Rngs(0))
  logits, cache = model.prefill(prompts, model.init_cache(4, 16), lengths)
  decoder = distributed.ShardedDecoder(Transformer(config, rngs=nnx.Rngs(0)), mesh)
  sharded_logits, sharded_cache = decoder.prefill(prompts, decoder.init_cache(4, 16), lengths)
  np.testing.assert_allclose(sharded_logits, logits, atol=1e-5, rtol=0)
  tokens = jnp.argmax(logits[jnp.arange(4), lengths - 1], axis=-1).astype(jnp.int32)
  for _ in range(steps):
    logits, cache = model.decode_step(tokens, cache)
    sharded_logits, sharded_cache = decoder.decode_step(tokens, sharded_cache)
    np.testing.assert_allclose(sharded_logits, logits, atol=1e-5, rtol=0)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return cache, sharded_cache


def _recording(calls):
  """mock.patch.object targets recording the query shape of the layers' attention ops."""
  def wrap(name):
    original = getattr(attention_layer, name)

    def wrapper(query, *args, **kwargs):
      calls.append((name, tuple(query.shape)))
      return original(query, *args, **kwargs)
    return mock.patch.object(attention_layer, name, wrapper)
  return wrap("causal_self_attention"), wrap("cached_decode_attention")


class ShardedPallasTest(parameterized.TestCase):
  """pallas_triton (interpret mode) inside the models under a mesh: the attention op runs in
  a shard_map per (batch, head) shard and equals the unsharded model."""

  def test_train_step(self):
    config = dataclasses.replace(CONFIG, attention_impl="pallas_triton", interpret=True)
    tokens, segments = _batch()
    reference = training.Trainer(Transformer(config, rngs=nnx.Rngs(0)), OPT)
    want = float(reference.train_step(tokens, segments, LR)["loss"])
    calls = []
    trainer = training.Trainer(Transformer(config, rngs=nnx.Rngs(0)), OPT,
                               mesh=_mesh("data:2,model:2"))
    patches = _recording(calls)
    with patches[0], patches[1]:
      got = float(trainer.train_step(tokens, segments, LR)["loss"])
    self.assertAlmostEqual(got, want, delta=1e-5)
    self.assertLess(_max_diff(trainer.params, jax.device_get(reference.params)), 1e-4)
    # Per shard: B = 8 / 2 rows, Nq = 4 / 2 heads (T = 16, H = 8).
    self.assertIn(("causal_self_attention", (4, 16, 2, 8)), calls)
    self.assertNotIn(("causal_self_attention", (8, 16, 4, 8)), calls)

  def test_decode(self):
    # d_model 64: head dim 16, the smallest the pallas_triton decode kernel takes.
    config = TransformerConfig(vocab_size=64, d_model=64, num_layers=1, num_heads=4,
                               num_kv_heads=2, d_ff=64, max_len=32,
                               attention_impl="pallas_triton", interpret=True)
    calls = []
    patches = _recording(calls)
    with patches[0], patches[1]:
      _, sharded_cache = _decode_both(config, _mesh("data:2,model:2"), steps=2)
    self.assertIn(("causal_self_attention", (2, 6, 2, 16)), calls)
    self.assertIn(("cached_decode_attention", (2, 2, 16)), calls)
    self.assertEqual(sharded_cache.keys[0].sharding.spec, PartitionSpec("data", None, "model"))


def _next_loss(saved, tokens, segments):
  """Loss of the second step from the saved state, on one device."""
  trainer = training.Trainer(Transformer(CONFIG, rngs=nnx.Rngs(1)), OPT)
  trainer.load_state(jax.tree.map(jnp.asarray, saved))
  return trainer.train_step(tokens, segments, LR)["loss"]


if __name__ == "__main__":
  absltest.main()
