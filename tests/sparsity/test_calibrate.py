"""Neuron union calibration, and the pipeline collect -> train -> calibrate -> save / load."""

import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from flashjax.models import Transformer, TransformerConfig
from flashjax.sparsity import calibrate
from flashjax.sparsity import collect
from flashjax.sparsity import router_checkpoint
from flashjax.sparsity import train
from flashjax.sparsity.routers import HeadRouter
from flashjax.sparsity.routers import NeuronRouter


def synthetic_fired(num_rows, width, seed, noise=0.3):
  """Router logits and fired units: fired = pre > 0, logits = pre + noise (units differ in
  how often they fire, so the union fills up with the batch size)."""
  rng = np.random.default_rng(seed)
  offsets = rng.normal(-1.5, 1.0, size=width)
  pre = rng.normal(size=(num_rows, width)) + offsets
  logits = pre + noise * rng.normal(size=pre.shape)
  return logits.astype(np.float32), pre > 0


class UnionTest(parameterized.TestCase):

  def test_curve_matches_select_neurons(self):
    logits, fired = synthetic_fired(16, 300, seed=0)
    curve = calibrate.union_recall_curve(logits, fired)
    for k in (1, 37, 128, 256, 299, 300):
      self.assertAlmostEqual(curve[k - 1], calibrate.union_recall(logits, fired, k), places=6)
    self.assertEqual(curve[-1], 1.0)
    self.assertEqual(calibrate.union_recall(logits, np.zeros_like(fired), 5), 1.0)

  @parameterized.parameters(dict(noise=0.3, width=512), dict(noise=1.0, width=700))
  def test_calibration_reaches_target_with_the_smallest_multiple(self, noise, width):
    logits, fired = synthetic_fired(400, width, seed=1, noise=noise)
    batch_sizes = [1, 8, 32]
    ks = calibrate.calibrate_layer(logits, fired, batch_sizes, num_batches=16, seed=3)
    self.assertEqual(list(ks), batch_sizes)
    for batch_size, k in ks.items():
      self.assertTrue(k % 128 == 0 or k == width, msg=f"{k=}")
      rows = calibrate.sample_batches(400, batch_size, 16, 3)

      def mean_recall(k, rows=rows):
        return np.mean([calibrate.union_recall(logits[r], fired[r], k) for r in rows])

      self.assertGreaterEqual(mean_recall(k), 0.99 - 1e-9)
      if k > 128:
        self.assertLess(mean_recall(k - 128 if k % 128 == 0 else k // 128 * 128), 0.99)

  def test_small_width_and_round_up(self):
    logits, fired = synthetic_fired(50, 100, seed=2)
    self.assertEqual(calibrate.calibrate_layer(logits, fired, [4], num_batches=4), {4: 100})
    self.assertEqual([calibrate.round_up(k, 128, 300) for k in (1, 128, 129, 257)],
                     [128, 128, 256, 300])

  def test_union_density(self):
    self.assertEqual(calibrate.union_density(np.ones((10, 6), bool), 3), 1.0)
    one_hot = np.eye(8, dtype=bool)  # distinct rows fire distinct units
    self.assertAlmostEqual(calibrate.union_density(one_hot, 1), 1 / 8)
    self.assertAlmostEqual(calibrate.union_density(one_hot, 4), 4 / 8)
    _, fired = synthetic_fired(400, 256, seed=4)
    growth = [calibrate.union_density(fired, b) for b in (1, 8, 64)]
    self.assertTrue(growth[0] < growth[1] < growth[2] <= 1.0)


class PipelineTest(absltest.TestCase):

  def test_collect_train_calibrate_save_load(self):
    config = TransformerConfig(variant="opt", vocab_size=64, d_model=32, num_layers=2,
                               num_heads=4, d_ff=160, max_len=16, init_std=0.2)
    model = Transformer(config, rngs=nnx.Rngs(0))
    root = tempfile.mkdtemp()
    data = os.path.join(root, "data")
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 64, (4, 16)).astype(np.int32) for _ in range(4)]
    collect.collect(model, batches, data, rows_per_sequence=8, progress=False)

    densities, importance = train.head_densities(data, 0.5, val_fraction=0.25)
    self.assertEqual(densities[0], 1.0)
    self.assertIsNone(importance[0])
    self.assertAlmostEqual(densities[1], 0.5)  # the one routed layer carries the target
    fit = train.RouterTrainConfig(epochs=2, batch_size=32)
    heads, head_metrics = train.train_head_routers(data, densities, config=fit,
                                                   val_fraction=0.25)
    self.assertIsNone(heads[0])
    self.assertIsInstance(heads[1], HeadRouter)
    self.assertEqual(head_metrics[1]["k"], 2)
    neurons, _ = train.train_neuron_routers(data, rank=8, dense_layers=(0,), config=fit,
                                            val_fraction=0.25)
    self.assertIsNone(neurons[0])
    self.assertIsInstance(neurons[1], NeuronRouter)
    neuron_k = calibrate.calibrate_neuron_k(neurons, data, [1, 4], val_fraction=0.25,
                                            num_batches=4)
    self.assertEqual(set(neuron_k), {1, 4})
    for ks in neuron_k.values():
      self.assertIsNone(ks[0])
      self.assertIn(ks[1], (128, 160))

    saved = router_checkpoint.RouterSet(heads, neurons, densities, neuron_k,
                                        meta={"recall": head_metrics[1]["best_recall"]})
    directory = os.path.join(root, "routers")
    router_checkpoint.save_routers(directory, saved)
    router_checkpoint.save_routers(directory, saved)  # replaces the first save
    loaded = router_checkpoint.load_routers(directory)
    x = jax.random.normal(jax.random.key(1), (5, 32))
    self.assertIsNone(loaded.head_routers[0])
    self.assertIsNone(loaded.neuron_routers[0])
    chex.assert_trees_all_equal(loaded.head_routers[1](x), heads[1](x))
    chex.assert_trees_all_equal(loaded.neuron_routers[1](x), neurons[1](x))
    self.assertEqual(loaded.head_densities, densities)
    self.assertEqual(loaded.neuron_k, neuron_k)
    self.assertEqual(loaded.meta, saved.meta)
    self.assertEqual(loaded.head_k(), (None, 2))

    # The loaded set drives a routed decode step (here the first token of each sequence).
    step_logits, _ = model.decode_step(jnp.asarray(batches[0][:2, 0]), model.init_cache(2, 16),
                                       sparsity=loaded.policy())
    self.assertEqual(step_logits.shape, (2, 64))
    self.assertTrue(bool(jnp.all(jnp.isfinite(step_logits))))


if __name__ == "__main__":
  absltest.main()
