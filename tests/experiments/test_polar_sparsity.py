"""Tests of the Polar Sparsity study (configs/polar_sparsity.py, experiments/polar_sparsity.py).

The real `:cpu` study takes minutes on 2 cores; these tests run the same code through the
launcher on an even smaller override (2-layer models, a few training steps, one batch size
and context), which keeps the whole file at well under a minute.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from configs import polar_sparsity as study_config
from experiments import launch
from experiments import polar_sparsity
from flashjax import benchmarking
from flashjax.models import Transformer
from flashjax.models import checkpoint
from flashjax.models import safetensors_io
from flashjax.models import training
from flashjax.sparsity import collect
from flashjax.sparsity import router_checkpoint
from flashjax.sparsity import train

_METRICS = ("tokens_per_s_dense", "tokens_per_s_sparse", "speedup_e2e", "speedup_attention",
            "speedup_mlp", "router_us", "head_router_recall", "mlp_union_recall", "ppl_dense",
            "ppl_sparse", "next_token_agreement")


def _tiny_config(workdir, **overrides):
  c = study_config.get_config("cpu")
  for shape in c.model_shapes.values():
    shape.num_layers = 2
  c.train_steps = 10
  c.seq_len = 32
  c.corpus_max_bytes = 60_000
  c.collect_batches = 4
  c.collect_batch_size = 4
  c.rows_per_sequence = 8
  c.router_epochs = 2
  c.eval_rows = 2
  c.eval_batch_size = 2
  c.eval_len = 24
  c.eval_prompt_len = 12
  c.timing_iters = 1
  c.timing_repeats = 1
  c.batches = (2,)
  c.contexts = (8,)
  c.setup_dir = os.path.join(workdir, "setup")
  for name, value in overrides.items():
    c[name] = value
  return c


def _rows(workdir):
  with open(os.path.join(workdir, launch.RESULTS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]


class ConfigTest(absltest.TestCase):

  def test_grids(self):
    for arg, points in (("cpu", 16), ("gpu", 72)):
      c = study_config.get_config(arg)
      expanded = launch.expand_sweep(c.sweep)
      self.assertLen(expanded, points)
      for point in expanded:
        launch.apply_point(c, point)
      for variant in c.models:
        mc = polar_sparsity.model_config(c, variant)
        self.assertEqual(mc.variant, variant)
        self.assertGreater(mc.max_len, max(c.contexts))
    gpu = study_config.get_config("gpu")
    self.assertEqual(tuple(gpu.batches), (1, 8, 32, 64, 128, 256))
    self.assertEqual(tuple(gpu.contexts), (1024, 4096))
    self.assertEqual(tuple(gpu.densities), (1.0, 0.5, 0.3))
    self.assertIsNone(gpu.decode_impl)  # the device's default
    self.assertEqual(study_config.get_config("cpu").decode_impl, "xla")
    self.assertLess(polar_sparsity.model_config(gpu, "llama").num_kv_heads,
                    polar_sparsity.model_config(gpu, "llama").num_heads)  # GQA


class InferenceCopyTest(absltest.TestCase):

  def test_weights_in_the_compute_dtype_same_logits(self):
    config = polar_sparsity.model_config(_tiny_config("/tmp/unused"), "opt")
    config = dataclasses.replace(config, dtype="bfloat16", param_dtype="float32")
    model = Transformer(config, rngs=nnx.Rngs(3))
    copy = polar_sparsity.inference_copy(model)
    self.assertEqual(copy.config.param_dtype, "bfloat16")
    self.assertEqual(copy.layers[1].mlp.fc1[...].dtype, jnp.bfloat16)
    self.assertEqual(model.layers[1].mlp.fc1[...].dtype, jnp.float32)  # the original kept
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, config.vocab_size)
    want, got = model(tokens), copy(tokens)
    self.assertEqual(got.dtype, want.dtype)
    # Only the weights' rounding to bfloat16 differs (the step already computed in bf16).
    chex.assert_trees_all_close(got.astype(jnp.float32), want.astype(jnp.float32),
                                atol=0.1, rtol=0.05)
    self.assertGreater(float(jnp.abs(want.astype(jnp.float32)).max()), 0.1)


class StudyTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp(prefix="fj_polar_test_")
    self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)
    self.addCleanup(polar_sparsity._SETUPS.clear)
    polar_sparsity._SETUPS.clear()

  def test_opt_study_runs_resumes_and_grows_without_setup(self):
    config = _tiny_config(self.workdir, models=("opt",))
    rows = launch.run(config, self.workdir, progress=False)
    self.assertLen(rows, 2)
    by_density = {}
    for row in rows:
      self.assertEqual(row["status"], "ok", row.get("traceback"))
      self.assertContainsSubset(_METRICS, row["metrics"])
      by_density[row["point"]["density"]] = row["metrics"]
    dense, sparse = by_density[1.0], by_density[0.5]
    # Density 1.0 is the dense baseline: same perplexity, every greedy token agrees.
    self.assertEqual(dense["ppl_sparse"], dense["ppl_dense"])
    self.assertEqual(dense["next_token_agreement"], 1.0)
    for name in ("speedup_attention", "speedup_mlp", "router_us", "head_router_recall",
                 "mlp_union_recall"):
      self.assertIsNone(dense[name])
    self.assertGreater(dense["speedup_e2e"], 0)
    # Routed rows: every metric measured.
    for name in ("speedup_e2e", "speedup_attention", "speedup_mlp", "tokens_per_s_sparse",
                 "router_us"):
      self.assertGreater(sparse[name], 0, name)
    for name in ("head_router_recall", "mlp_union_recall", "next_token_agreement"):
      self.assertBetween(sparse[name], 0.0, 1.0)
    self.assertAlmostEqual(sparse["ppl_dense"], dense["ppl_dense"], places=4)
    self.assertEqual(sparse["head_k"][0], None)  # layer 0 dense
    # The RouterSet is on disk and drives a policy.
    saved = router_checkpoint.load_routers(
        os.path.join(config.setup_dir, "opt", "routers", "d0.5"))
    self.assertIsNotNone(saved.neuron_routers[1])
    self.assertIn(2, saved.neuron_k)
    saved.policy()
    for name in ("report.md", "speedup_e2e_vs_batch.png", "ppl_sparse_vs_density.png"):
      self.assertTrue(os.path.exists(os.path.join(self.workdir, name)), name)

    # The same command again: nothing recomputed.
    with mock.patch.object(polar_sparsity, "run_point", side_effect=AssertionError):
      launch.run(config, self.workdir, progress=False)
    self.assertLen(_rows(self.workdir), 2)

    # A new process (no loaded setup) growing the sweep by a batch size: new points, the
    # neurons calibrated for it, and no training or collection stage rerun.
    polar_sparsity._SETUPS.clear()
    config.batches = (2, 3)
    forbidden = AssertionError("a setup stage ran again")
    with mock.patch.object(training.Trainer, "train_step", side_effect=forbidden), \
         mock.patch.object(collect, "collect", side_effect=forbidden), \
         mock.patch.object(train, "train_head_routers", side_effect=forbidden), \
         mock.patch.object(train, "train_neuron_routers", side_effect=forbidden):
      rows = launch.run(config, self.workdir, progress=False)
    self.assertLen(rows, 4)
    for row in rows:
      self.assertEqual(row["status"], "ok", row.get("traceback"))
    self.assertLen(_rows(self.workdir), 4)  # no finished point ran twice
    saved = router_checkpoint.load_routers(
        os.path.join(config.setup_dir, "opt", "routers", "d0.5"))
    self.assertEqual(set(saved.neuron_k), {2, 3})

  def test_llama_from_a_checkpoint_resumes_after_a_failed_stage(self):
    config = _tiny_config(self.workdir, models=("llama",), densities=(0.5,))
    # A train_lm-style checkpoint (Trainer state) of an untrained model of the config's shape.
    model = Transformer(polar_sparsity.model_config(config, "llama"), rngs=nnx.Rngs(3))
    trainer = training.Trainer(model, training.OptimizerConfig(**config.optimizer.to_dict()))
    source = os.path.join(self.workdir, "given")
    saver = checkpoint.Checkpointer(source)
    saver.save(0, trainer.state(), {})
    saver.close()
    config.model_checkpoint.llama = source
    no_training = mock.patch.object(training.Trainer, "train_step",
                                    side_effect=AssertionError("trained instead of loading"))
    # A run that dies in the head-router stage (after the model and collection stages).
    with no_training, mock.patch.object(train, "train_head_routers",
                                        side_effect=RuntimeError("killed")):
      rows = launch.run(config, self.workdir, progress=False)
    self.assertEqual(rows[0]["status"], "error")
    self.assertIn("killed", rows[0]["error"])
    # The next run (a new process) goes on from there: the collection is not redone.
    polar_sparsity._SETUPS.clear()
    with no_training, mock.patch.object(collect, "collect",
                                        side_effect=AssertionError("collected again")):
      rows = launch.run(config, self.workdir, progress=False)
    self.assertLen(rows, 1)
    row = rows[0]
    self.assertEqual(row["status"], "ok", row.get("traceback"))
    metrics = row["metrics"]
    self.assertContainsSubset(_METRICS, metrics)
    self.assertIsNone(metrics["speedup_mlp"])  # no ReLU MLP
    self.assertIsNone(metrics["mlp_union_recall"])
    self.assertGreater(metrics["speedup_attention"], 0)
    loaded = polar_sparsity.get_setup(config, "llama").model
    chex.assert_trees_all_equal(nnx.state(loaded, nnx.Param), nnx.state(model, nnx.Param))
    self.assertEqual(polar_sparsity.get_setup(config, "llama").model_info["source"], source)

  def test_kernel_timing_makes_one_dense_call_per_routed_layer(self):
    # The dense side of speedup_attention must not collapse to one call: identical calls
    # (same query, no head indices) are merged by XLA, which timed 1 dense call against
    # n routed ones on the first GPU run.
    config = _tiny_config(self.workdir, models=("llama",), densities=(0.5,))
    for shape in config.model_shapes.values():
      shape.num_layers = 3  # two routed layers
    setup = polar_sparsity.get_setup(config, "llama")
    point = launch.apply_point(config, {"model": "llama", "density": 0.5, "batch": 2,
                                        "context": 8})
    timed = []
    real = benchmarking.time_in_loop

    def spy(fn, *args, **kwargs):
      timed.append((fn, args))
      return real(fn, *args, **kwargs)

    with mock.patch.object(benchmarking, "time_in_loop", spy):
      polar_sparsity.attention_speedup(point, setup, setup.routers[0.5])
    self.assertLen(timed, 2)  # dense, routed
    for fn, args in timed:  # one softmax (exp) per routed layer survives compilation
      hlo = jax.jit(fn).lower(*args).compile().as_text()
      self.assertEqual(hlo.count("exponential("), 2)

  def test_opt_from_a_hugging_face_checkpoint(self):
    config = _tiny_config(self.workdir, models=("opt",), densities=(0.5,))
    rng = np.random.default_rng(0)
    vocab, d, heads, ff, max_pos = 300, 32, 4, 64, 48
    w = lambda *shape: (0.1 * rng.standard_normal(shape)).astype(np.float32)
    hf_config = {"model_type": "opt", "vocab_size": vocab, "hidden_size": d, "ffn_dim": ff,
                 "num_hidden_layers": 2, "num_attention_heads": heads,
                 "max_position_embeddings": max_pos, "do_layer_norm_before": True,
                 "word_embed_proj_dim": d, "activation_function": "relu",
                 "enable_bias": True, "layer_norm_elementwise_affine": True,
                 "tie_word_embeddings": True}
    p = "model.decoder."
    tensors = {p + "embed_tokens.weight": w(vocab, d),
               p + "embed_positions.weight": w(max_pos + 2, d),
               p + "final_layer_norm.weight": 1 + w(d), p + "final_layer_norm.bias": w(d)}
    for i in range(2):
      q = f"{p}layers.{i}."
      for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        tensors.update({q + f"self_attn.{name}.weight": w(d, d), q + f"self_attn.{name}.bias":
                        w(d)})
      for name in ("self_attn_layer_norm", "final_layer_norm"):
        tensors.update({q + f"{name}.weight": 1 + w(d), q + f"{name}.bias": w(d)})
      tensors.update({q + "fc1.weight": w(ff, d), q + "fc1.bias": w(ff),
                      q + "fc2.weight": w(d, ff), q + "fc2.bias": w(d)})
    source = os.path.join(self.workdir, "hf_opt")
    os.makedirs(source)
    with open(os.path.join(source, "config.json"), "w") as f:
      json.dump(hf_config, f)
    safetensors_io.save_file(tensors, os.path.join(source, "model.safetensors"))
    config.hf_checkpoint.opt = source
    with mock.patch.object(training.Trainer, "train_step",
                           side_effect=AssertionError("trained instead of loading")):
      rows = launch.run(config, self.workdir, progress=False)
    self.assertLen(rows, 1)
    self.assertEqual(rows[0]["status"], "ok", rows[0].get("traceback"))
    self.assertContainsSubset(_METRICS, rows[0]["metrics"])
    self.assertGreater(rows[0]["metrics"]["speedup_mlp"], 0)  # a ReLU model: neurons routed
    setup = polar_sparsity.get_setup(config, "opt")
    self.assertEqual(setup.model_info["source"], f"hf:{source}")
    np.testing.assert_array_equal(  # the checkpoint's fc1, neuron-major as stored by torch
        np.asarray(setup.model.layers[1].mlp.fc1[...]), tensors[p + "layers.1.fc1.weight"])

  def test_hugging_face_checkpoint_of_the_wrong_family_raises(self):
    config = _tiny_config(self.workdir, models=("llama",), densities=(0.5,))
    source = os.path.join(self.workdir, "hf_bad")
    os.makedirs(source)
    with open(os.path.join(source, "config.json"), "w") as f:
      json.dump({"model_type": "opt", "vocab_size": 100}, f)
    config.hf_checkpoint.llama = source
    rows = launch.run(config, self.workdir, progress=False)
    self.assertEqual(rows[0]["status"], "error")
    self.assertIn("holds model_type='opt', not 'llama'", rows[0]["error"])


if __name__ == "__main__":
  absltest.main()
