"""Router data collection: the recorded signals, shards on disk, resuming, the reader."""

import functools
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from flashjax import layers
from flashjax.models import Transformer, TransformerConfig
from flashjax.sparsity import collect

VOCAB = 64


@functools.lru_cache(maxsize=None)  # built once per variant (eager init is slow); not mutated
def tiny_model(variant):
  config = TransformerConfig(variant=variant, vocab_size=VOCAB, d_model=32, num_layers=2,
                             num_heads=4, num_kv_heads=2 if variant == "llama" else 4,
                             d_ff=64, max_len=16, init_std=0.2)
  return Transformer(config, rngs=nnx.Rngs(0))


def token_batches(num_batches, batch=2, length=12, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB, (batch, length)).astype(np.int32) for _ in range(num_batches)]


records_of = nnx.jit(collect.layer_records)


@nnx.jit
def direct_head_norms(attn, x, positions):
  """Per-query-head output norms [B, T, Nq] of causal attention, from the weights."""
  q = jnp.einsum("BTD,DNH->BTNH", x, attn.q_proj[...])
  k = jnp.einsum("BTD,DKH->BTKH", x, attn.k_proj[...])
  v = jnp.einsum("BTD,DKH->BTKH", x, attn.v_proj[...])
  if attn.use_bias:
    q, k, v = q + attn.q_bias[...], k + attn.k_bias[...], v + attn.v_bias[...]
  if attn.rope_theta is not None:
    q = layers.apply_rope(q, positions, attn.rope_theta)
    k = layers.apply_rope(k, positions, attn.rope_theta)
  rep = attn.num_heads // attn.num_kv_heads
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(attn.head_dim)
  length = x.shape[1]
  causal = np.tril(np.ones((length, length), bool))
  probs = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
  heads = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
  return jnp.sqrt(jnp.sum(heads ** 2, axis=-1))


class LayerRecordsTest(parameterized.TestCase):

  @parameterized.parameters("llama", "opt")
  def test_records_equal_a_direct_computation(self, variant):
    model = tiny_model(variant)
    tokens = jnp.asarray(token_batches(1)[0])
    records, hidden = records_of(model, tokens)
    logits = nnx.jit(lambda m, h: m._logits(h))(model, hidden)
    chex.assert_trees_all_close(logits, nnx.jit(lambda m, t: m(t))(model, tokens), atol=1e-5,
                                rtol=1e-5)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    config = model.config
    for layer, record in zip(model.layers, records):
      norms = direct_head_norms(layer.attn, record["attn_x"], positions)
      chex.assert_trees_all_close(record["head_norms"], norms, atol=1e-5, rtol=1e-5)
      groups = norms.reshape(*norms.shape[:2], config.num_kv_heads, -1).max(-1)
      chex.assert_trees_all_close(record["group_scores"], groups, atol=1e-5, rtol=1e-5)
      chex.assert_shape(record["group_scores"], (*tokens.shape, config.num_kv_heads))
      if variant == "opt":
        fc1 = record["mlp_x"] @ layer.mlp.fc1[...].T + layer.mlp.fc1_bias[...]
        np.testing.assert_array_equal(record["fired"], fc1 > 0)
        self.assertTrue(0 < float(np.mean(record["fired"])) < 1)
      else:
        self.assertNotIn("fired", record)

  def test_group_max(self):
    norms = jnp.asarray([[1.0, 5.0, 2.0, 0.5, 3.0, 3.5]])
    np.testing.assert_array_equal(collect.group_max(norms, 3), [[5.0, 2.0, 3.5]])
    np.testing.assert_array_equal(collect.group_max(norms, 6), norms)
    with self.assertRaisesRegex(ValueError, "num_groups=4"):
      collect.group_max(norms, 4)


class CollectTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.directory = os.path.join(tempfile.mkdtemp(), "collected")

  @parameterized.parameters(("llama", False), ("opt", True))
  def test_writes_shards_and_resumes(self, variant, packed):
    model = tiny_model(variant)
    batches = token_batches(3)
    if packed:  # (tokens, segment_ids): two documents per row
      segments = np.repeat(np.asarray([[1] * 5 + [2] * 7]), 2, axis=0).astype(np.int32)
      batches = [(tokens, segments) for tokens in batches]
    stats = collect.collect(model, batches, self.directory, rows_per_sequence=5,
                            progress=False)
    self.assertEqual(stats, {"written": 3, "skipped": 0, "rows": 30})
    self.assertEqual(collect.list_shards(self.directory), [0, 1, 2])
    self.assertEqual([n for n in os.listdir(self.directory) if n.endswith(".tmp")], [])
    paths = [collect.shard_path(self.directory, i) for i in range(3)]
    with np.load(paths[1]) as shard:
      before = dict(shard)
    os.remove(paths[1])
    mtimes = {p: os.stat(p).st_mtime_ns for p in (paths[0], paths[2])}

    stats = collect.collect(model, batches, self.directory, rows_per_sequence=5,
                            progress=False)
    self.assertEqual(stats, {"written": 1, "skipped": 2, "rows": 10})
    self.assertEqual({p: os.stat(p).st_mtime_ns for p in mtimes}, mtimes)
    with np.load(paths[1]) as shard:  # same sampled rows and values after the resume
      chex.assert_trees_all_equal(dict(shard), before)

    # The stored rows are the model's records at the sampled positions.
    tokens, segments = batches[1] if packed else (batches[1], None)
    records, _ = records_of(
        model, jnp.asarray(tokens), None if segments is None else jnp.asarray(segments))
    rows = before["rows"]
    self.assertTrue(np.all(np.diff(rows[rows[:, 0] == 0, 1]) > 0))
    for l, record in enumerate(records):
      np.testing.assert_allclose(before[f"group_scores.{l}"],
                                 record["group_scores"][rows[:, 0], rows[:, 1]], atol=1e-6)
      np.testing.assert_allclose(before[f"attn_x.{l}"],
                                 record["attn_x"][rows[:, 0], rows[:, 1]], atol=1e-6)
      if packed:
        np.testing.assert_array_equal(np.unpackbits(before[f"fired.{l}"], axis=-1, count=64),
                                      record["fired"][rows[:, 0], rows[:, 1]])

  def test_reader_splits_by_shard(self):
    model = tiny_model("opt")
    collect.collect(model, token_batches(4), self.directory, rows_per_sequence=3,
                    store_dtype="float16", progress=False)
    every = collect.load_layer(self.directory, 1)
    train = collect.load_layer(self.directory, 1, split="train", val_fraction=0.25)
    val = collect.load_layer(self.directory, 1, split="val", val_fraction=0.25)
    self.assertEqual((every["attn_x"].shape, train["attn_x"].shape, val["attn_x"].shape),
                     ((24, 32), (18, 32), (6, 32)))
    self.assertEqual(every["fired"].shape, (24, 64))
    self.assertEqual(every["fired"].dtype, bool)
    self.assertEqual(every["mlp_x"].dtype, np.float32)
    np.testing.assert_array_equal(np.concatenate([train["fired"], val["fired"]]),
                                  every["fired"])
    with np.load(collect.shard_path(self.directory, 3)) as shard:
      np.testing.assert_array_equal(val["group_scores"], shard["group_scores.1"])
      self.assertEqual(shard["attn_x.1"].dtype, np.float16)
    self.assertEqual(collect.read_meta(self.directory)["relu_layers"], [0, 1])
    self.assertEqual(collect.split_shards([0, 1, 2], "val", 0.0), [2])
    self.assertEqual(collect.split_shards([0], "train", 0.5), [0])

  def test_other_settings_in_the_same_directory_raise(self):
    model = tiny_model("llama")
    collect.collect(model, token_batches(1), self.directory, rows_per_sequence=4,
                    progress=False)
    with self.assertRaisesRegex(ValueError, "other settings"):
      collect.collect(model, token_batches(1), self.directory, rows_per_sequence=6,
                      progress=False)


if __name__ == "__main__":
  absltest.main()
