"""Tests of the LM data pipeline (stdlib corpus, packing), training utilities and
checkpointing (orbax and msgpack backends, exact resume)."""

from __future__ import annotations

import math
import os
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

from flashjax.models import Transformer
from flashjax.models import TransformerConfig
from flashjax.models import checkpoint
from flashjax.models import data
from flashjax.models import training


def _tiny_model(seed: int = 0) -> Transformer:
  config = TransformerConfig(vocab_size=data.VOCAB_SIZE, d_model=32, num_layers=1,
                             num_heads=2, max_len=32)
  return Transformer(config, rngs=nnx.Rngs(seed))


def _random_rows(seed: int, rows: int = 4, length: int = 17) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  documents = [rng.integers(0, 256, rng.integers(3, 12)) for _ in range(40)]
  packed = data.pack_documents(documents, length)
  return packed.tokens[:rows], packed.segment_ids[:rows]


class DataTest(parameterized.TestCase):

  def test_encode_decode(self):
    text = "def f(x):\n  return 'ünï'  # ✓\n"
    tokens = data.encode(text)
    self.assertEqual(tokens.dtype, np.int32)
    self.assertEqual(len(tokens), len(text.encode()))
    with_specials = np.concatenate([[data.BOS_ID], tokens, [data.EOS_ID]])
    self.assertEqual(data.decode(with_specials), text)

  def test_pack_documents(self):
    documents = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6, 7, 8, 9])]
    packed = data.pack_documents(documents, 4)
    bos, eos = data.BOS_ID, data.EOS_ID
    stream = [bos, 1, 2, 3, eos, bos, 4, eos, bos, 5, 6, 7, 8, 9, eos]
    np.testing.assert_array_equal(packed.tokens, np.reshape(stream[:12], (3, 4)))
    np.testing.assert_array_equal(packed.segment_ids,
                                  [[1, 1, 1, 1], [1, 2, 2, 2], [3, 3, 3, 3]])
    self.assertEqual((packed.num_documents, packed.num_bytes, packed.num_rows), (3, 9, 3))
    with self.assertRaisesRegex(ValueError, "row_len=100"):
      data.pack_documents(documents, 100)

  def test_stdlib_files(self):
    files = data.stdlib_files()
    self.assertIn("os.py", files)
    self.assertGreater(len(files), 500)
    self.assertFalse(any("site-packages" in f for f in files))

  def test_corpus_split_is_deterministic_and_disjoint(self):
    with tempfile.TemporaryDirectory() as root:
      os.makedirs(os.path.join(root, "pkg"))
      os.makedirs(os.path.join(root, "site-packages"))
      for i in range(20):
        with open(os.path.join(root, "pkg" if i % 2 else "", f"m{i}.py"), "w") as f:
          f.write(f"x = {i}\n" * (i + 1))
      with open(os.path.join(root, "site-packages", "skip.py"), "w") as f:
        f.write("skipped = True\n")
      corpus = data.load_stdlib_corpus(8, val_fraction=0.1, root=root)
      again = data.load_stdlib_corpus(8, val_fraction=0.1, root=root)
      small = data.load_stdlib_corpus(8, val_fraction=0.1, root=root, max_bytes=50)
    self.assertEqual((corpus.train.num_documents, corpus.val.num_documents), (18, 2))
    np.testing.assert_array_equal(corpus.val.tokens, again.val.tokens)
    total = sum(len(f"x = {i}\n") * (i + 1) for i in range(20))
    self.assertEqual(corpus.train.num_bytes + corpus.val.num_bytes, total)
    self.assertNotIn(data.encode("skipped").tolist()[0:3], corpus.train.tokens.tolist())
    self.assertLess(small.train.num_documents + small.val.num_documents, 20)
    self.assertGreaterEqual(small.val.num_documents, 1)

  def test_sample_rows_is_a_function_of_step(self):
    split = data.pack_documents([np.arange(200) % 256], 10)
    a, b = data.sample_rows(split, 3, 5), data.sample_rows(split, 3, 5)
    np.testing.assert_array_equal(a[0], b[0])
    self.assertFalse(np.array_equal(a[0], data.sample_rows(split, 4, 5)[0]))
    self.assertEqual(a[0].shape, (5, 10))


class TrainingTest(parameterized.TestCase):

  def test_lr_schedule(self):
    config = training.OptimizerConfig(peak_lr=1.0, warmup_steps=10, final_lr_fraction=0.1)
    lrs = [training.lr_schedule(s, 110, config) for s in range(111)]
    self.assertAlmostEqual(lrs[0], 0.1)
    self.assertAlmostEqual(lrs[9], 1.0)
    self.assertAlmostEqual(lrs[60], 0.55)
    self.assertAlmostEqual(lrs[110], 0.1)
    self.assertTrue(all(a >= b for a, b in zip(lrs[9:], lrs[10:])))

  @parameterized.named_parameters(
      ("peak_lr", dict(peak_lr=0.0)), ("warmup_steps", dict(warmup_steps=-1)),
      ("final_lr_fraction", dict(final_lr_fraction=2.0)), ("b2", dict(b2=1.0)))
  def test_bad_optimizer_config_raises(self, kwargs):
    with self.assertRaisesRegex(ValueError, next(iter(kwargs))):
      training.OptimizerConfig(**kwargs)

  def test_loss_counts_only_same_document_targets(self):
    model = _tiny_model(1)
    tokens, segments = _random_rows(1)
    total, count = jax.jit(training.next_token_loss)(model, tokens, segments)
    inputs, targets, input_ids, weights = training.split_rows(tokens, segments)
    self.assertEqual(float(count), float((segments[:, 1:] == segments[:, :-1]).sum()))
    logits = np.asarray(jax.jit(lambda t, s: model(t, segment_ids=s))(inputs, input_ids),
                        np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    self.assertAlmostEqual(float(total), float(-(picked * weights).sum()), places=2)

  def test_training_reduces_loss_and_decays_only_matrices(self):
    trainer = training.Trainer(_tiny_model(2), training.OptimizerConfig(
        peak_lr=1e-2, warmup_steps=2, weight_decay=0.5))
    tokens, segments = _random_rows(2)
    first = trainer.evaluate(tokens, segments, batch_size=4)
    for step in range(12):
      trainer.train_step(tokens, segments, training.lr_schedule(step, 12, trainer.config))
    self.assertLess(trainer.evaluate(tokens, segments, batch_size=4), first - 0.5)
    self.assertEqual(trainer.step, 12)
    # From a fresh state, a zero gradient leaves vectors (norm scales) alone and shrinks
    # matrices (decoupled weight decay).
    zeros = jax.tree.map(jnp.zeros_like, trainer.params)
    updates, _ = jax.jit(trainer.tx.update)(zeros, trainer.tx.init(trainer.params),
                                            trainer.params)
    self.assertEqual(float(jnp.abs(updates["final_norm"]["scale"]).max()), 0.0)
    self.assertGreater(float(jnp.abs(updates["embed"]["embedding"]).max()), 0.0)


class CheckpointTest(parameterized.TestCase):

  @parameterized.named_parameters((f"{backend=}", backend) for backend in ("orbax", "msgpack"))
  def test_resumed_training_equals_uninterrupted(self, backend):
    config = training.OptimizerConfig(peak_lr=5e-3, warmup_steps=1)
    batches = [_random_rows(10 + s) for s in range(4)]
    straight = training.Trainer(_tiny_model(3), config)
    for step, batch in enumerate(batches):
      straight.train_step(*batch, training.lr_schedule(step, 4, config))
    with tempfile.TemporaryDirectory() as tmp:
      first = training.Trainer(_tiny_model(3), config)
      ckpt = checkpoint.Checkpointer(tmp, backend=backend, max_to_keep=2)
      for step, batch in enumerate(batches[:2]):
        first.train_step(*batch, training.lr_schedule(step, 4, config))
        ckpt.save(first.step, first.state(), {"step": first.step, "note": "x"})
      ckpt.save(7, first.state(), {})
      self.assertEqual(ckpt.latest_step(), 7)
      ckpt.close()
      reopened = checkpoint.Checkpointer(tmp, backend=backend, max_to_keep=2)
      resumed = training.Trainer(_tiny_model(99), config)  # other init, overwritten
      state, meta = reopened.restore(2, resumed.state())
      reopened.close()
    self.assertEqual(meta, {"step": 2, "note": "x"})
    resumed.load_state(state)
    self.assertEqual(resumed.step, 2)
    chex.assert_trees_all_equal(resumed.params, first.params)
    chex.assert_trees_all_equal_structs(resumed.opt_state, first.opt_state)
    for step, batch in enumerate(batches[2:], start=2):
      resumed.train_step(*batch, training.lr_schedule(step, 4, config))
    chex.assert_trees_all_close(resumed.params, straight.params, atol=1e-6)
    self.assertTrue(math.isfinite(resumed.evaluate(*batches[0], batch_size=4)))

  def test_msgpack_keeps_the_latest(self):
    with tempfile.TemporaryDirectory() as tmp:
      ckpt = checkpoint.Checkpointer(tmp, backend="msgpack", max_to_keep=2)
      for step in (1, 2, 3):
        ckpt.save(step, {"w": np.full((2,), step, np.float32)}, {})
      self.assertEqual(sorted(os.listdir(tmp)), ["step_00000002.msgpack",
                                                 "step_00000003.msgpack"])
      restored, _ = ckpt.restore(3, {"w": np.zeros((2,), np.float32)})
      np.testing.assert_array_equal(restored["w"], [3, 3])
      with self.assertRaisesRegex(ValueError, "shape"):
        ckpt.restore(3, {"w": np.zeros((3,), np.float32)})

  def test_flatten_names_are_dotted_paths(self):
    state = {"a": {0: np.zeros(1), 1: np.zeros(1)}, "b": (np.ones(2), np.ones(3))}
    self.assertEqual(sorted(checkpoint.flatten(state)), ["a.0", "a.1", "b.0", "b.1"])
    opt = optax.adam(1e-3).init({"w": jnp.zeros(2)})
    self.assertIn("0.mu.w", checkpoint.flatten(opt))


class FlopsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("llama_untied", "llama", False), ("llama_tied", "llama", True),
      ("opt_untied", "opt", False), ("opt_tied", "opt", True))
  def test_train_flops_per_token_counts_the_matmul_weights(self, variant, tied):
    config = TransformerConfig(variant=variant, vocab_size=data.VOCAB_SIZE, d_model=32,
                               num_layers=2, num_heads=4, num_kv_heads=2, max_len=48,
                               tie_embeddings=tied)
    model = Transformer(config, rngs=nnx.Rngs(0))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    lookups = (0 if tied else data.VOCAB_SIZE * 32) + (48 * 32 if variant == "opt" else 0)
    head_dim = 32 // 4
    attention = 2 * 3 * (4 * 40 * 4 * head_dim) / 2  # 2 layers, fwd + bwd, causal half
    self.assertEqual(training.train_flops_per_token(config, 40),
                     6.0 * (params - lookups) + attention)
    with self.assertRaisesRegex(ValueError, "seq_len=0"):
      training.train_flops_per_token(config, 0)


if __name__ == "__main__":
  absltest.main()
