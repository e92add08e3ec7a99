"""Router training: labels, the weighted BCE, planted rules, importance -> densities."""

from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np
import optax

from flashjax.sparsity import train
from flashjax.sparsity.routers import HeadRouter
from flashjax.sparsity.routers import NeuronRouter

FAST = train.RouterTrainConfig(epochs=40, batch_size=256, learning_rate=1e-2, patience=5)


def planted_rows(num_rows, d, width, seed):
  """x [N, d] and hidden linear scores x @ W + b [N, width]."""
  rng = np.random.default_rng(seed)
  weights = rng.normal(size=(d, width)).astype(np.float32)
  bias = rng.normal(size=width).astype(np.float32)
  x = rng.normal(size=(num_rows, d)).astype(np.float32)
  return x, x @ weights + bias


class LossTest(absltest.TestCase):

  def test_bce_weights_are_one_for_positives_and_w_for_negatives(self):
    labels = np.asarray([[1, 0, 0, 0], [0, 1, 0, 0]], bool)
    w = float(labels.mean())  # 0.25
    np.testing.assert_allclose(train.bce_weights(labels, w), np.where(labels, 1.0, 0.25))
    logits = jnp.asarray([[2.0, -1.0, 0.5, 0.0], [-3.0, 1.0, 4.0, -0.5]])
    y = labels.astype(np.float32)
    expected = np.mean(np.where(labels, 1.0, w) *
                       np.asarray(optax.sigmoid_binary_cross_entropy(logits, y)))
    np.testing.assert_allclose(train.weighted_bce(logits, labels, w), expected, rtol=1e-6)

  def test_labels_and_recalls(self):
    scores = np.asarray([[0.1, 3.0, 2.0, -1.0], [4.0, 4.0, 0.0, 1.0]])
    labels = train.topk_labels(scores, 2)
    np.testing.assert_array_equal(labels, [[0, 1, 1, 0], [1, 1, 0, 0]])
    self.assertEqual(float(train.topk_recall(jnp.asarray(scores), labels, 2)), 1.0)
    self.assertEqual(float(train.topk_recall(-jnp.asarray(scores), labels, 2)), 0.0)
    fired = np.asarray([[1, 0, 1, 0], [0, 0, 0, 1]], bool)
    logits = jnp.asarray([[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    # Row 0 keeps its 2 best (0, 1): 1 of 2 fired units; row 1 keeps unit 3: 1 of 1.
    self.assertAlmostEqual(float(train.oracle_budget_recall(logits, fired)), 2 / 3, places=6)
    self.assertEqual(train.num_selected(0.3, 10), 3)
    self.assertEqual(train.num_selected(0.26, 4), 2)
    self.assertEqual(train.num_selected(0.01, 4), 1)


class PlantedRuleTest(parameterized.TestCase):

  # The linear router can rank exactly like the planted map; the hidden-layer one is only
  # checked to learn it well (it plateaus near 0.96 on this data).
  @parameterized.parameters(dict(hidden=None, floor=0.95), dict(hidden=32, floor=0.9))
  def test_head_router_recovers_a_planted_top_k_rule(self, hidden, floor):
    x, scores = planted_rows(6000, 32, 8, seed=0)
    router, metrics = train.train_head_router(x[:5000], scores[:5000], x[5000:], scores[5000:],
                                              density=0.5, hidden=hidden, config=FAST)
    self.assertIsInstance(router, HeadRouter)
    self.assertEqual(metrics["k"], 4)
    self.assertGreater(metrics["best_recall"], floor)
    self.assertEqual(metrics["best_recall"], max(metrics["val_recall"]))
    self.assertLen(metrics["train_loss"], metrics["epochs_run"])
    # The returned parameters are the best epoch's.
    recall = train.topk_recall(router(jnp.asarray(x[5000:])),
                               train.topk_labels(scores[5000:], 4), 4)
    self.assertAlmostEqual(float(recall), metrics["best_recall"], places=5)

  def test_neuron_router_recovers_planted_fired_units(self):
    x, pre = planted_rows(6000, 32, 64, seed=1)
    fired = pre > 0
    router, metrics = train.train_neuron_router(x[:5000], fired[:5000], x[5000:], fired[5000:],
                                                rank=32, config=FAST)
    self.assertIsInstance(router, NeuronRouter)
    self.assertGreater(metrics["best_recall"], 0.95)
    self.assertGreater(metrics["threshold_recall"], 0.9)
    self.assertAlmostEqual(metrics["positive_rate"], float(fired[:5000].mean()), places=6)

  def test_early_stop_keeps_the_best_epoch(self):
    x, scores = planted_rows(400, 8, 4, seed=2)
    config = train.RouterTrainConfig(epochs=30, batch_size=400, learning_rate=1e-3, patience=1)
    _, metrics = train.train_head_router(x[:300], scores[:300], x[300:], scores[300:],
                                         density=0.5, config=config)
    recalls = metrics["val_recall"]
    if metrics["epochs_run"] < 30:  # stopped: the last epoch did not beat the best
      self.assertLessEqual(recalls[-1], max(recalls[:-1]))
    self.assertEqual(recalls[metrics["best_epoch"]], metrics["best_recall"])


class DensityTest(parameterized.TestCase):

  def test_layer_importance(self):
    concentrated = np.asarray([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    self.assertEqual(train.layer_importance(concentrated, 0.25), 0.0)
    uniform = np.ones((3, 4))
    self.assertAlmostEqual(train.layer_importance(uniform, 0.5), 0.5)
    self.assertAlmostEqual(train.layer_importance(uniform, 1.0), 0.0)

  @parameterized.parameters(
      dict(importance=[0.1, 0.2, 0.3, 0.4], target=0.5),
      dict(importance=[0.0, 0.01, 0.5, 0.9, 0.95], target=0.3),
      dict(importance=[1e-4, 1.0, 1.0, 1.0], target=0.8),
      dict(importance=[0.3, 0.3, 0.3], target=0.4),
  )
  def test_densities_respect_clamps_mean_and_order(self, importance, target):
    densities = train.densities_from_importance(importance, target)
    self.assertAlmostEqual(float(densities.mean()), target, places=6)
    self.assertTrue(np.all(densities >= 0.2 - 1e-12) and np.all(densities <= 1.0 + 1e-12))
    order = np.argsort(importance, kind="stable")
    self.assertTrue(np.all(np.diff(densities[order]) >= -1e-9))

  def test_densities_hit_the_clamps(self):
    densities = train.densities_from_importance([0.0, 0.0, 1.0], 0.6)
    np.testing.assert_allclose(densities, [0.4, 0.4, 1.0], atol=1e-6)
    densities = train.densities_from_importance([0.01, 1.0], 0.5, lo=0.2)
    np.testing.assert_allclose(densities, [0.2, 0.8], atol=1e-6)
    np.testing.assert_array_equal(train.densities_from_importance([0.0, 0.0], 0.5), [0.5, 0.5])
    with self.assertRaisesRegex(ValueError, "target=0.1"):
      train.densities_from_importance([0.5, 0.5], 0.1)


if __name__ == "__main__":
  absltest.main()
