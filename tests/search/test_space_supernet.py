"""SearchSpace encoding and the SuperTransformer's weight sharing."""

import dataclasses
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashjax.models import TransformerConfig
from flashjax.models import checkpoint
from flashjax.models import data
from flashjax.models import training
from flashjax.search import supernet as sn
from flashjax.search.space import Arch
from flashjax.search.space import SearchSpace

SPACE = SearchSpace(embed_dims=(16, 32), layer_counts=(1, 2), ffn_dims=(32, 64),
                    head_counts=(1, 2), head_dim=8)
BASE = TransformerConfig(vocab_size=40, max_len=32)
ARCH = Arch(16, (32, 64), (2, 1))


def _batch(seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (2, 17), 0, 40)
  segments = jnp.repeat(jnp.array([[0, 1], [0, 0]]), jnp.array([9, 8]), axis=1,
                        total_repeat_length=17)
  return tokens, segments


def _flat(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


_COMPILE_LISTENERS = []  # callables given the name of every function XLA compiles


def _on_event(event, seconds, **kwargs):
  del seconds
  if event == "/jax/core/compile/backend_compile_duration":
    for listener in _COMPILE_LISTENERS:
      listener(kwargs.get("fun_name", ""))


jax.monitoring.register_event_duration_secs_listener(_on_event)


class SpaceTest(absltest.TestCase):

  def test_encode_decode_features(self):
    rng = np.random.default_rng(0)
    self.assertEqual(SPACE.size(), 2 * (4 + 16))
    for _ in range(20):
      arch = SPACE.sample(rng)
      self.assertEqual(SPACE.decode(SPACE.encode(arch)), arch)
      features = SPACE.features(arch)
      self.assertEqual(features.shape, (6,))
      self.assertTrue(np.all((features >= 0) & (features <= 1)))
    np.testing.assert_allclose(SPACE.features(ARCH), [0.5, 1, 0.5, 1, 1, 0.5])

  def test_bad_values_are_named(self):
    with self.assertRaisesRegex(ValueError, "embed_dim=48"):
      SPACE.check(Arch(48, (32,), (1,)))
    with self.assertRaisesRegex(ValueError, "ffn_dim=33"):
      SPACE.check(Arch(16, (33,), (1,)))
    with self.assertRaisesRegex(ValueError, "head_dim=3"):
      SearchSpace((8,), (1,), (8,), (1,), head_dim=3)
    with self.assertRaisesRegex(ValueError, "layer_counts"):
      SearchSpace((8,), (), (8,), (1,))
    with self.assertRaisesRegex(ValueError, "genes"):
      SPACE.decode((0, 0, 5, 0, 0, 0))


class WeightSharingTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.trainer = sn.SuperTrainer(sn.SuperTransformer(SPACE, BASE, rngs=nnx.Rngs(0)),
                                   training.OptimizerConfig())

  def test_sub_params_are_front_slices(self):
    model = self.trainer.sub_model(ARCH)
    self.assertLen(model.layers, 2)
    self.assertEqual(model.layers[0].mlp.gate.shape, (16, 32))
    self.assertEqual(model.layers[1].attn.q_proj.shape, (16, 1, 8))
    sub = _flat(nnx.state(model, nnx.Param))
    full = _flat(self.trainer.params)
    for name, value in sub.items():
      big = full[name]
      np.testing.assert_array_equal(value, big[tuple(slice(0, s) for s in value.shape)],
                                    err_msg=name)
    self.assertEqual(sn.plan(BASE, SPACE, ARCH, "exact"), sn.plan(BASE, SPACE, ARCH, "exact"))

  def test_gradients_land_in_the_slices_only(self):
    tokens, segments = _batch()
    exact = sn.plan(BASE, SPACE, ARCH, "exact")
    loss, grads = sn.sub_loss_and_grads(exact, self.trainer.params, None, tokens, segments)
    # The same loss and gradient from the SubTransformer's own (copied) parameters.
    model = self.trainer.sub_model(ARCH)
    graphdef, params = nnx.split(model, nnx.Param)
    own_loss, own_grads = jax.value_and_grad(
        lambda p: training._mean_loss(graphdef, p, tokens, segments)[0])(params)
    self.assertAlmostEqual(float(loss), float(own_loss), places=5)
    own = _flat(own_grads)
    used = 0
    for name, grad in _flat(grads).items():
      if name not in own:  # layers the SubTransformer does not have
        np.testing.assert_array_equal(grad, 0, err_msg=name)
        continue
      front = tuple(slice(0, s) for s in own[name].shape)
      np.testing.assert_allclose(grad[front], own[name], atol=1e-6, err_msg=name)
      rest = np.asarray(grad).copy()
      rest[front] = 0
      np.testing.assert_array_equal(rest, 0, err_msg=name)
      used += 1
    self.assertEqual(used, len(own))
    self.assertGreater(float(jnp.abs(own_grads["layers"][1]["mlp"]["down"][...]).max()), 0)

  def test_bucket_plan_equals_exact(self):
    tokens, segments = _batch(1)
    exact = sn.plan(BASE, SPACE, ARCH, "exact")
    bucket = sn.plan(BASE, SPACE, ARCH, "bucket")
    self.assertEqual(bucket.arch, Arch(16, (64, 64), (2, 2)))
    # Another arch of the same width and depth shares the bucket (one compile).
    self.assertIs(sn.plan(BASE, SPACE, Arch(16, (64, 32), (1, 1)), "bucket"), bucket)
    masks = tuple(map(jnp.asarray, sn.masks(SPACE, ARCH)))
    loss_e, grads_e = sn.sub_loss_and_grads(exact, self.trainer.params, None, tokens, segments)
    loss_b, grads_b = sn.sub_loss_and_grads(bucket, self.trainer.params, masks, tokens,
                                            segments)
    self.assertAlmostEqual(float(loss_e), float(loss_b), places=5)
    for (name, a), b in zip(_flat(grads_e).items(), _flat(grads_b).values()):
      np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)

  def test_opt_variant_bucket_equals_exact(self):
    # LayerNorm, learned positions, ReLU MLP with biases, tied embeddings.
    base = TransformerConfig(variant="opt", vocab_size=40, max_len=32)
    trainer = sn.SuperTrainer(sn.SuperTransformer(SPACE, base, rngs=nnx.Rngs(2)),
                              training.OptimizerConfig())
    trainer.params = jax.tree.map(lambda x: x + 0.01, trainer.params)  # non-zero biases
    tokens, segments = _batch(3)
    masks = tuple(map(jnp.asarray, sn.masks(SPACE, ARCH)))
    loss_e, _ = sn.sub_loss_and_grads(sn.plan(base, SPACE, ARCH, "exact"), trainer.params,
                                      None, tokens, segments)
    loss_b, _ = sn.sub_loss_and_grads(sn.plan(base, SPACE, ARCH, "bucket"), trainer.params,
                                      masks, tokens, segments)
    self.assertAlmostEqual(float(loss_e), float(loss_b), places=5)
    self.assertEqual(trainer.sub_model(ARCH).positions.embedding.shape, (32, 16))

  def test_training_steps_lower_the_loss_within_bounded_compiles(self):
    rows = np.asarray(_batch(2)[0])
    segments = np.zeros_like(rows)
    opt = training.OptimizerConfig(peak_lr=1e-2, warmup_steps=0)
    trainer = sn.SuperTrainer(sn.SuperTransformer(SPACE, BASE, rngs=nnx.Rngs(1)), opt)
    before = trainer.evaluate(SPACE.largest, rows, segments, 2)
    for step in range(6):
      trainer.train_step(sn.arch_for_step(SPACE, 0, step), rows, segments, 1e-2)
    self.assertLess(trainer.evaluate(SPACE.largest, rows, segments, 2), before)
    # One compiled shape per (embed, layers) at most.
    self.assertLessEqual(len(trainer.shapes), len(SPACE.embed_dims) * len(SPACE.layer_counts))
    for arch in trainer.shapes:
      self.assertEqual(arch.ffn_dims, (64,) * arch.num_layers)

  def test_precompiled_steps_are_reused(self):
    rows = np.asarray(_batch(2)[0])
    segments = np.zeros_like(rows)
    trainer = sn.SuperTrainer(sn.SuperTransformer(SPACE, BASE, rngs=nnx.Rngs(2)),
                              training.OptimizerConfig())
    seconds = trainer.precompile(rows.shape[1], batch_size=2, eval_batch_size=1, workers=3)
    self.assertLen(seconds, 2 * len(SPACE.embed_dims) * len(SPACE.layer_counts))
    compiled = []
    _COMPILE_LISTENERS.append(compiled.append)
    try:
      for step in range(6):  # every bucket shape was compiled: no step compiles again
        arch = sn.arch_for_step(SPACE, 0, step)
        trainer.train_step(arch, rows, segments, 1e-3)
        trainer.evaluate(arch, rows, segments, 1)
      self.assertEmpty([name for name in compiled if "_step" in name])
      trainer.train_step(arch, rows[:1], segments[:1], 1e-3)  # a batch size not precompiled
      self.assertIn("jit(_train_step)", compiled)
    finally:
      _COMPILE_LISTENERS.remove(compiled.append)
    with self.assertRaisesRegex(ValueError, "workers=0"):
      trainer.precompile(rows.shape[1], batch_size=2, workers=0)

  def test_train_supernet_resumes_exactly_from_a_checkpoint(self):
    split = data.pack_documents([np.arange(1, 30), np.arange(3, 50)], 17)
    split = dataclasses.replace(split, tokens=split.tokens % 40)  # BASE's vocabulary
    opt = training.OptimizerConfig(peak_lr=1e-2, warmup_steps=1)
    kwargs = dict(num_steps=4, batch_size=2, optimizer=opt, seed=3)

    def fresh():
      return sn.SuperTrainer(sn.SuperTransformer(SPACE, BASE, rngs=nnx.Rngs(4)), opt)

    straight = fresh()
    history = sn.train_supernet(straight, split, **kwargs)
    self.assertEqual([h["step"] for h in history], [0, 1, 2, 3])
    directory = tempfile.mkdtemp()
    ckpt = checkpoint.Checkpointer(directory, backend="msgpack")
    first = fresh()
    sn.train_supernet(first, split, **{**kwargs, "num_steps": 4}, checkpointer=ckpt,
                      checkpoint_every=2, log=lambda step, *_: self.assertLess(step, 4))
    self.assertEqual(ckpt.latest_step(), 4)
    resumed = fresh()
    state, _ = ckpt.restore(2, resumed.state())
    resumed.load_state(state)
    rest = sn.train_supernet(resumed, split, **kwargs)
    self.assertEqual([h["step"] for h in rest], [2, 3])
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with self.assertRaisesRegex(ValueError, "num_steps=0"):
      sn.train_supernet(resumed, split, **{**kwargs, "num_steps": 0})

  def test_sub_transformer_decodes_with_its_own_cache(self):
    model = sn.build_sub_transformer(BASE, ARCH, SPACE.head_dim, rngs=nnx.Rngs(0))
    cache = sn.init_sub_cache(ARCH, SPACE.head_dim, 2, 12, jnp.float32)
    self.assertEqual([k.shape[2] for k in cache.keys], [2, 1])
    tokens = _batch()[0][:, :8]
    logits, cache = model.prefill(tokens, cache)
    step_logits, cache = model.decode_step(jnp.argmax(logits[:, -1], -1), cache)
    full = model(jnp.concatenate([tokens, jnp.argmax(logits[:, -1], -1)[:, None]], 1))
    np.testing.assert_allclose(step_logits, full[:, -1], atol=1e-4)
    with self.assertRaisesRegex(ValueError, "batch_size=0"):
      sn.init_sub_cache(ARCH, 8, 0, 12, jnp.float32)


if __name__ == "__main__":
  absltest.main()
