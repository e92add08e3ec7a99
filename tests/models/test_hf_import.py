"""Tests of the Hugging Face checkpoint import (LLaMA, OPT) and of the safetensors reader.

Each test writes a tiny checkpoint itself (config.json plus *.safetensors with random
weights named as the Hugging Face PyTorch modules name them) and compares the imported
model's logits with a float64 numpy forward pass written here from the Hugging Face
modelling code's semantics (LlamaForCausalLM, OPTForCausalLM). When `transformers` and
`torch` are importable, a real Hugging Face model is also saved and compared.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile

import chex
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from flashjax.models import hf_import
from flashjax.models import safetensors_io

ATOL = 1e-4


def _llama_checkpoint(rng: np.random.Generator, *, tie: bool = False,
                      attention_bias: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
  vocab, d, layers, heads, kv, ff = 53, 32, 2, 4, 2, 48
  head = d // heads
  config = {"model_type": "llama", "vocab_size": vocab, "hidden_size": d,
            "intermediate_size": ff, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 500.0,
            "tie_word_embeddings": tie, "attention_bias": attention_bias,
            "hidden_act": "silu", "rope_scaling": None}
  w = lambda *shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)
  norm = lambda: (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
  t = {"model.embed_tokens.weight": w(vocab, d), "model.norm.weight": norm()}
  if not tie:
    t["lm_head.weight"] = w(vocab, d)
  for i in range(layers):
    p = f"model.layers.{i}."
    t.update({p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight":
              norm(), p + "self_attn.q_proj.weight": w(heads * head, d),
              p + "self_attn.k_proj.weight": w(kv * head, d),
              p + "self_attn.v_proj.weight": w(kv * head, d),
              p + "self_attn.o_proj.weight": w(d, heads * head),
              p + "mlp.gate_proj.weight": w(ff, d), p + "mlp.up_proj.weight": w(ff, d),
              p + "mlp.down_proj.weight": w(d, ff),
              p + "self_attn.rotary_emb.inv_freq": np.ones(head // 2, np.float32)})
    if attention_bias:
      for name, size in (("q", heads * head), ("k", kv * head), ("v", kv * head), ("o", d)):
        t[p + f"self_attn.{name}_proj.bias"] = w(size)
  return config, t


def _opt_checkpoint(rng: np.random.Generator) -> tuple[dict, dict[str, np.ndarray]]:
  vocab, d, layers, heads, ff, max_pos = 47, 32, 2, 4, 64, 40
  config = {"model_type": "opt", "vocab_size": vocab, "hidden_size": d, "ffn_dim": ff,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "max_position_embeddings": max_pos, "do_layer_norm_before": True,
            "word_embed_proj_dim": d, "activation_function": "relu", "enable_bias": True,
            "layer_norm_elementwise_affine": True, "tie_word_embeddings": True}
  w = lambda *shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)
  norm = lambda: (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
  p = "model.decoder."
  t = {p + "embed_tokens.weight": w(vocab, d), p + "embed_positions.weight": w(max_pos + 2, d),
       p + "final_layer_norm.weight": norm(), p + "final_layer_norm.bias": w(d)}
  for i in range(layers):
    q = f"{p}layers.{i}."
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      t[q + f"self_attn.{name}.weight"] = w(d, d)
      t[q + f"self_attn.{name}.bias"] = w(d)
    for name in ("self_attn_layer_norm", "final_layer_norm"):
      t[q + f"{name}.weight"] = norm()
      t[q + f"{name}.bias"] = w(d)
    t.update({q + "fc1.weight": w(ff, d), q + "fc1.bias": w(ff), q + "fc2.weight": w(d, ff),
              q + "fc2.bias": w(d)})
  return config, t


def _softmax_attention(q, k, v, scale):
  """Causal attention, float64: q [T, N, H], k / v [T, N, H] -> [T, N * H]."""
  s = np.einsum("tnh,snh->nts", q, k) * scale
  length = q.shape[0]
  s = np.where(np.tril(np.ones((length, length), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("nts,snh->tnh", p, v).reshape(length, -1)


def llama_oracle(config: dict, t: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
  """Hugging Face LLaMA forward in float64 for one sequence: tokens [T] -> logits [T, V]."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
  head = config["hidden_size"] // heads
  eps = config["rms_norm_eps"]
  rms = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w
  inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, head, 2) / head)
  angles = np.arange(len(tokens))[:, None] * inv_freq
  cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))

  def rope(x):  # [T, N, H], rotate_half
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]

  def proj(x, name):
    y = x @ t[name + ".weight"].T
    return y + t[name + ".bias"] if name + ".bias" in t else y

  h = t["model.embed_tokens.weight"][tokens]
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    x = rms(h, t[p + "input_layernorm.weight"])
    q = rope(proj(x, p + "self_attn.q_proj").reshape(len(tokens), heads, head))
    k = rope(proj(x, p + "self_attn.k_proj").reshape(len(tokens), kv, head))
    v = proj(x, p + "self_attn.v_proj").reshape(len(tokens), kv, head)
    k, v = np.repeat(k, heads // kv, axis=1), np.repeat(v, heads // kv, axis=1)
    h = h + proj(_softmax_attention(q, k, v, head ** -0.5), p + "self_attn.o_proj")
    x = rms(h, t[p + "post_attention_layernorm.weight"])
    gate = x @ t[p + "mlp.gate_proj.weight"].T
    up = x @ t[p + "mlp.up_proj.weight"].T
    h = h + (gate / (1 + np.exp(-gate)) * up) @ t[p + "mlp.down_proj.weight"].T
  h = rms(h, t["model.norm.weight"])
  head_w = t["model.embed_tokens.weight"] if config["tie_word_embeddings"] else t[
      "lm_head.weight"]
  return h @ head_w.T


def opt_oracle(config: dict, t: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
  """Hugging Face OPT forward (pre-LN) in float64: tokens [T] -> logits [T, V]."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  heads = config["num_attention_heads"]
  head = config["hidden_size"] // heads

  def ln(x, name):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * t[name + ".weight"] + t[name + ".bias"]

  lin = lambda x, name: x @ t[name + ".weight"].T + t[name + ".bias"]
  d = "model.decoder."
  length = len(tokens)
  h = t[d + "embed_tokens.weight"][tokens] + t[d + "embed_positions.weight"][
      np.arange(length) + 2]
  for i in range(config["num_hidden_layers"]):
    p = f"{d}layers.{i}."
    x = ln(h, p + "self_attn_layer_norm")
    q = (lin(x, p + "self_attn.q_proj") * head ** -0.5).reshape(length, heads, head)
    k = lin(x, p + "self_attn.k_proj").reshape(length, heads, head)
    v = lin(x, p + "self_attn.v_proj").reshape(length, heads, head)
    h = h + lin(_softmax_attention(q, k, v, 1.0), p + "self_attn.out_proj")
    x = ln(h, p + "final_layer_norm")
    h = h + lin(np.maximum(lin(x, p + "fc1"), 0), p + "fc2")
  return ln(h, d + "final_layer_norm") @ t[d + "embed_tokens.weight"].T


def _write_checkpoint(directory: str, config: dict, tensors: dict[str, np.ndarray],
                      shards: int = 1) -> None:
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  names = sorted(tensors)
  for s in range(shards):
    part = {n: tensors[n] for n in names[s::shards]}
    safetensors_io.save_file(part, os.path.join(directory, f"model-{s:05d}.safetensors"),
                             metadata={"format": "pt"})


class SafetensorsTest(parameterized.TestCase):

  def test_round_trip_every_dtype(self):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "bf16": rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16),
        "f64": rng.standard_normal((1,)),
        "i64": rng.integers(-9, 9, (4, 1)),
        "i32": rng.integers(-9, 9, (2,)).astype(np.int32),
        "u8": rng.integers(0, 255, (3,)).astype(np.uint8),
        "bool": rng.random((2, 2)) > 0.5,
        "scalar": np.array(1.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "x.safetensors")
      safetensors_io.save_file(tensors, path, metadata={"format": "np"})
      header, start = safetensors_io.read_header(path)
      self.assertEqual(start % 8, 0)
      self.assertEqual(header["__metadata__"], {"format": "np"})
      loaded = safetensors_io.load_file(path)
    self.assertSetEqual(set(loaded), set(tensors))
    for name, value in tensors.items():
      self.assertEqual(loaded[name].dtype, value.dtype, name)
      np.testing.assert_array_equal(loaded[name], value)

  def test_corrupt_file_raises(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "x.safetensors")
      safetensors_io.save_file({"w": np.ones((4, 4), np.float32)}, path)
      with open(path, "rb") as f:
        data = f.read()
      with open(path, "wb") as f:
        f.write(data[:-8])  # truncated buffer
      with self.assertRaisesRegex(ValueError, "'w'"):
        safetensors_io.load_file(path)

  @absltest.skipUnless(importlib.util.find_spec("safetensors"), "safetensors not installed")
  def test_agrees_with_the_safetensors_package(self):
    from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(1)
    tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32),
               "b": rng.standard_normal((5,)).astype(np.float16)}
    with tempfile.TemporaryDirectory() as tmp:
      ours, theirs = os.path.join(tmp, "ours.safetensors"), os.path.join(tmp, "t.safetensors")
      safetensors_io.save_file(tensors, ours)
      st.save_file(tensors, theirs)
      for name, value in tensors.items():
        np.testing.assert_array_equal(st.load_file(ours)[name], value)
        np.testing.assert_array_equal(safetensors_io.load_file(theirs)[name], value)


class ImportTest(parameterized.TestCase):

  def _check(self, config, tensors, oracle, shards=1, **overrides):
    with tempfile.TemporaryDirectory() as tmp:
      _write_checkpoint(tmp, config, tensors, shards)
      model = hf_import.load_hf_checkpoint(tmp, **overrides)
    tokens = np.random.default_rng(len(tensors)).integers(0, config["vocab_size"], (2, 24))
    logits = model(jnp.asarray(tokens, jnp.int32))
    expected = np.stack([oracle(config, tensors, row) for row in tokens])
    self.assertGreater(np.std(expected), 0.5)
    chex.assert_trees_all_close(np.asarray(logits, np.float64), expected, atol=ATOL,
                                rtol=ATOL)
    return model

  @parameterized.named_parameters(
      (f"{tie=}_{bias=}_{shards=}", tie, bias, shards)
      for tie, bias, shards in ((False, False, 1), (True, True, 2)))
  def test_llama_logits_match_oracle(self, tie, bias, shards):
    config, tensors = _llama_checkpoint(np.random.default_rng(2), tie=tie,
                                        attention_bias=bias)
    model = self._check(config, tensors, llama_oracle, shards=shards)
    self.assertEqual((model.config.num_kv_heads, model.config.rope_theta), (2, 500.0))

  def test_llama_bfloat16_checkpoint(self):
    config, tensors = _llama_checkpoint(np.random.default_rng(3))
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    self._check(config, tensors, llama_oracle)

  def test_opt_logits_match_oracle(self):
    config, tensors = _opt_checkpoint(np.random.default_rng(4))
    model = self._check(config, tensors, opt_oracle)
    self.assertEqual(model.positions.embedding.shape, (40, 32))

  def test_opt_checkpoint_without_model_prefix(self):
    config, tensors = _opt_checkpoint(np.random.default_rng(5))
    tensors = {k[len("model."):]: v for k, v in tensors.items()}
    with tempfile.TemporaryDirectory() as tmp:
      _write_checkpoint(tmp, config, tensors)
      model = hf_import.load_hf_checkpoint(tmp, dtype="bfloat16")
    self.assertEqual(model.config.dtype, "bfloat16")

  @parameterized.named_parameters(
      ("unknown_family", {"model_type": "gpt2"}, NotImplementedError, "model_type"),
      ("rope_scaling", {"rope_scaling": {"rope_type": "llama3"}}, NotImplementedError,
       "rope_scaling"),
      ("mlp_bias", {"mlp_bias": True}, NotImplementedError, "mlp_bias"),
      ("bad_heads", {"num_key_value_heads": 3}, ValueError, "num_kv_heads"),
  )
  def test_unsupported_configs_raise(self, change, error, name):
    config, tensors = _llama_checkpoint(np.random.default_rng(6))
    config.update(change)
    with tempfile.TemporaryDirectory() as tmp:
      _write_checkpoint(tmp, config, tensors)
      with self.assertRaisesRegex(error, name):
        hf_import.load_hf_checkpoint(tmp)

  @parameterized.named_parameters(
      ("missing", "drop", "model.layers.1.mlp.up_proj.weight"),
      ("unexpected", "add", "model.layers.9.extra.weight"),
      ("wrong_shape", "reshape", "layers.0.mlp.down"),
  )
  def test_tensor_mismatch_raises(self, how, name):
    config, tensors = _llama_checkpoint(np.random.default_rng(7))
    if how == "drop":
      del tensors[name]
    elif how == "add":
      tensors[name] = np.ones((2,), np.float32)
    else:
      tensors["model.layers.0.mlp.down_proj.weight"] = np.ones((32, 40), np.float32)
    with tempfile.TemporaryDirectory() as tmp:
      _write_checkpoint(tmp, config, tensors)
      with self.assertRaisesRegex(ValueError, name):
        hf_import.load_hf_checkpoint(tmp)

  @absltest.skipUnless(importlib.util.find_spec("transformers") and
                       importlib.util.find_spec("torch"), "transformers/torch not installed")
  def test_matches_transformers(self):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    models = [
        transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)),
        transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=61, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)),
    ]
    tokens = np.random.default_rng(8).integers(3, 61, (2, 20))
    for hf_model in models:
      with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        model = hf_import.load_hf_checkpoint(tmp)
      with torch.no_grad():
        expected = hf_model(torch.tensor(tokens)).logits.double().numpy()
      chex.assert_trees_all_close(np.asarray(model(jnp.asarray(tokens, jnp.int32)),
                                             np.float64), expected, atol=ATOL, rtol=ATOL)


if __name__ == "__main__":
  absltest.main()
