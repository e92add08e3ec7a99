"""flashjax.sparsity.evaluate: teacher-forced scores through the decode kernels, timing."""

from absl.testing import absltest
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from flashjax.sparsity import HeadRouter, SparsityPolicy, evaluate
from tests.sparsity.test_policy import VOCAB, planted_head_router, tiny_model


class EvaluateTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.model = tiny_model("llama", num_layers=2)
    self.tokens = jax.random.randint(jax.random.key(7), (2, 12), 0, VOCAB)

  def test_dense_scores_match_the_full_forward(self):
    c = self.model.config
    full = SparsityPolicy([None, HeadRouter(c.d_model, c.num_kv_heads, rngs=nnx.Rngs(1))],
                          [None, c.num_kv_heads])
    scores = evaluate.teacher_forced(self.model, full, self.tokens, prompt_len=4)
    logits = self.model(self.tokens)  # [B, T, V]
    logp = jax.nn.log_softmax(logits[:, 3:-1].astype(jnp.float32), -1)
    nll = -np.mean(np.take_along_axis(np.asarray(logp), np.asarray(self.tokens[:, 4:, None]),
                                      -1))
    self.assertAlmostEqual(scores["nll_dense"], nll, places=4)
    # Every group selected: routed decoding is the dense one.
    self.assertAlmostEqual(scores["nll_sparse"], scores["nll_dense"], places=5)
    self.assertEqual(scores["next_token_agreement"], 1.0)
    self.assertEqual(scores["tokens"], 2 * 8)

  def test_sparse_policy_changes_the_scores(self):
    c = self.model.config
    policy = SparsityPolicy([None, planted_head_router(c.d_model, c.num_kv_heads, [0])],
                            [None, 1])
    scores = evaluate.teacher_forced(self.model, policy, self.tokens, prompt_len=4)
    self.assertTrue(np.isfinite(scores["ppl_sparse"]))
    self.assertNotAlmostEqual(scores["nll_sparse"], scores["nll_dense"], places=4)
    with self.assertRaisesRegex(ValueError, "prompt_len=12"):
      evaluate.teacher_forced(self.model, policy, self.tokens, prompt_len=12)

  def test_decode_step_time_dense_and_routed(self):
    c = self.model.config
    cache = evaluate.filled_cache(self.model, 2, 8)
    chex.assert_shape(cache.keys[0], (2, 9, c.num_kv_heads, c.head_dim))
    self.assertTrue(np.all(np.asarray(cache.lengths) == 8))
    policy = SparsityPolicy([None, planted_head_router(c.d_model, c.num_kv_heads, [1])],
                            [None, 1])
    for p in (None, policy):
      timing, cache = evaluate.decode_step_time(self.model, p, cache, iters=2, repeats=1)
      self.assertGreater(timing.median_s, 0)
      self.assertTrue(np.all(np.asarray(cache.lengths) == 8))  # every step at the same fill


if __name__ == "__main__":
  absltest.main()
