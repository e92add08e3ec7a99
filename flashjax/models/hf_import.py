"""Import of local Hugging Face checkpoints (LLaMA and OPT families) into a Transformer.

A checkpoint directory holds `config.json` and one or more `*.safetensors` files (sharded
checkpoints are merged). Nothing is downloaded. Tensor layouts follow the Hugging Face
PyTorch modules: a Linear weight is [out, in], attention heads are contiguous slices of the
projection outputs, LLaMA rotary embeddings use the "rotate half" pairing (as
flashjax.layers.apply_rope does), and OPT's learned position table has two leading rows
that its position ids never reach (position p reads row p + 2), which are dropped.

Supported: LLaMA (`model_type` "llama": SiLU SwiGLU, no rope_scaling, no mlp_bias; attention_bias
allowed) and OPT (`model_type` "opt": pre-LayerNorm, ReLU,
word_embed_proj_dim == hidden_size). Other settings raise NotImplementedError naming the field.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from flashjax.models import safetensors_io
from flashjax.models.config import TransformerConfig
from flashjax.models.transformer import Transformer

# Tensors present in some checkpoints that carry no weights the model needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# OPT's learned positions start at table row 2 (HF OPTLearnedPositionalEmbedding offset).
_OPT_POSITION_OFFSET = 2


def _get(hf: dict[str, Any], name: str, default: Any = ...) -> Any:
  if name in hf:
    return hf[name]
  if default is ...:
    raise ValueError(f"config.json has no {name!r}")
  return default


def _unsupported(field: str, value: Any, family: str) -> NotImplementedError:
  return NotImplementedError(f"{family} checkpoint with {field}={value!r} is not supported")


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
  """TransformerConfig of a Hugging Face config.json.

  Args:
    hf: the parsed config.json.
    **overrides: TransformerConfig fields to set (dtype, attention_impl, max_len, ...).

  Returns:
    The config.
  """
  model_type = hf.get("model_type")
  if model_type == "llama":
    if hf.get("rope_scaling") is not None:
      raise _unsupported("rope_scaling", hf["rope_scaling"], "llama")
    if hf.get("hidden_act", "silu") != "silu":
      raise _unsupported("hidden_act", hf["hidden_act"], "llama")
    if hf.get("mlp_bias", False):
      raise _unsupported("mlp_bias", hf["mlp_bias"], "llama")
    heads = _get(hf, "num_attention_heads")
    fields = dict(
        variant="llama", vocab_size=_get(hf, "vocab_size"), d_model=_get(hf, "hidden_size"),
        num_layers=_get(hf, "num_hidden_layers"), num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or _get(hf, "hidden_size") // heads,
        d_ff=_get(hf, "intermediate_size"), max_len=_get(hf, "max_position_embeddings"),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        use_bias=bool(hf.get("attention_bias", False)))
  elif model_type == "opt":
    for field, expected in (("do_layer_norm_before", True), ("activation_function", "relu"),
                            ("layer_norm_elementwise_affine", True)):
      if hf.get(field, expected) != expected:
        raise _unsupported(field, hf[field], "opt")
    d_model = _get(hf, "hidden_size")
    if hf.get("word_embed_proj_dim", d_model) != d_model:
      raise _unsupported("word_embed_proj_dim", hf["word_embed_proj_dim"], "opt")
    fields = dict(
        variant="opt", vocab_size=_get(hf, "vocab_size"), d_model=d_model,
        num_layers=_get(hf, "num_hidden_layers"), num_heads=_get(hf, "num_attention_heads"),
        d_ff=_get(hf, "ffn_dim"), max_len=_get(hf, "max_position_embeddings"), norm_eps=1e-5,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        use_bias=bool(hf.get("enable_bias", True)))
  else:
    raise NotImplementedError(f"{model_type=} is not supported (llama, opt)")
  if fields["variant"] == "opt" and overrides.get("max_len", 0) > fields["max_len"]:
    raise ValueError(f"max_len={overrides['max_len']} exceeds the checkpoint's position "
                     f"table ({fields['max_len']} rows)")
  fields.update(overrides)
  return TransformerConfig(**fields)


def _linear(w: np.ndarray, *shape: int) -> np.ndarray:
  """A torch Linear weight [out, in] as [in, *shape] (shape splits out)."""
  return w.T.reshape(w.shape[1], *shape)


def _attention_params(c: TransformerConfig, t: Callable[[str], np.ndarray], prefix: str,
                      out_name: str) -> dict[tuple, Any]:
  """The attention layer's projections (and biases when c.use_bias) from the Hugging Face
  tensors `prefix` + "q_proj" / "k_proj" / "v_proj" / `out_name`."""
  n, k, h = c.num_heads, c.num_kv_heads, c.head_dim
  params = {
      ("attn", "q_proj"): _linear(t(prefix + "q_proj.weight"), n, h),
      ("attn", "k_proj"): _linear(t(prefix + "k_proj.weight"), k, h),
      ("attn", "v_proj"): _linear(t(prefix + "v_proj.weight"), k, h),
      # o_proj [D, N*H] -> [N, H, D]
      ("attn", "o_proj"): t(prefix + out_name + ".weight").T.reshape(n, h, c.d_model),
  }
  if c.use_bias:
    params.update({
        ("attn", "q_bias"): t(prefix + "q_proj.bias").reshape(n, h),
        ("attn", "k_bias"): t(prefix + "k_proj.bias").reshape(k, h),
        ("attn", "v_bias"): t(prefix + "v_proj.bias").reshape(k, h),
        ("attn", "o_bias"): t(prefix + out_name + ".bias"),
    })
  return params


def _model_params(c: TransformerConfig, t: Callable[[str], np.ndarray], top: dict[tuple, Any],
                  layer_params: Callable[[int], dict[tuple, Any]]) -> dict[tuple, Any]:
  """`top` (embeddings, final norm), the untied lm_head and layer i's `layer_params(i)` under
  ("layers", i)."""
  params = dict(top)
  if not c.tie_embeddings:
    params[("lm_head",)] = t("lm_head.weight").T
  for i in range(c.num_layers):
    params.update({("layers", i) + key: value for key, value in layer_params(i).items()})
  return params


def _llama_params(c: TransformerConfig, t: Callable[[str], np.ndarray]) -> dict[tuple, Any]:
  def layer(i):
    p = f"model.layers.{i}."
    return {
        ("attn_norm", "scale"): t(p + "input_layernorm.weight"),
        ("mlp_norm", "scale"): t(p + "post_attention_layernorm.weight"),
        ("mlp", "gate"): t(p + "mlp.gate_proj.weight").T,
        ("mlp", "up"): t(p + "mlp.up_proj.weight").T,
        ("mlp", "down"): t(p + "mlp.down_proj.weight").T,
        **_attention_params(c, t, p + "self_attn.", "o_proj"),
    }

  return _model_params(c, t, {("embed", "embedding"): t("model.embed_tokens.weight"),
                              ("final_norm", "scale"): t("model.norm.weight")}, layer)


def _opt_params(c: TransformerConfig, t: Callable[[str], np.ndarray]) -> dict[tuple, Any]:
  d = "model.decoder."

  def layer(i):
    p = f"{d}layers.{i}."
    params = {
        ("attn_norm", "scale"): t(p + "self_attn_layer_norm.weight"),
        ("attn_norm", "bias"): t(p + "self_attn_layer_norm.bias"),
        ("mlp_norm", "scale"): t(p + "final_layer_norm.weight"),
        ("mlp_norm", "bias"): t(p + "final_layer_norm.bias"),
        ("mlp", "fc1"): t(p + "fc1.weight"),
        ("mlp", "fc2"): t(p + "fc2.weight").T,
        **_attention_params(c, t, p + "self_attn.", "out_proj"),
    }
    if c.use_bias:
      params.update({("mlp", "fc1_bias"): t(p + "fc1.bias"),
                     ("mlp", "fc2_bias"): t(p + "fc2.bias")})
    return params

  positions = t(d + "embed_positions.weight")[_OPT_POSITION_OFFSET:]
  top = {("embed", "embedding"): t(d + "embed_tokens.weight"),
         ("positions", "embedding"): positions[:c.max_len],
         ("final_norm", "scale"): t(d + "final_layer_norm.weight"),
         ("final_norm", "bias"): t(d + "final_layer_norm.bias")}
  return _model_params(c, t, top, layer)


def load_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of the *.safetensors files of a checkpoint directory (shards merged)."""
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise ValueError(f"{path=} holds no *.safetensors file")
  tensors: dict[str, np.ndarray] = {}
  for file in files:
    for name, value in safetensors_io.load_file(file).items():
      if name in tensors:
        raise ValueError(f"tensor {name!r} appears in more than one shard of {path=}")
      tensors[name] = value
  return tensors


def model_from_hf(hf_config: dict[str, Any], tensors: dict[str, np.ndarray],
                  **overrides: Any) -> Transformer:
  """Builds a Transformer from a parsed config.json and its tensors.

  Args:
    hf_config: the Hugging Face config.
    tensors: Hugging Face parameter name -> numpy array.
    **overrides: TransformerConfig fields to set (dtype, param_dtype, attention_impl, ...).

  Returns:
    The model with the checkpoint's weights (in config.param_dtype).
  """
  config = config_from_hf(hf_config, **overrides)
  if config.variant == "opt" and not any(k.startswith("model.") for k in tensors):
    tensors = {f"model.{k}" if k.startswith("decoder.") else k: v for k, v in tensors.items()}
  used = set()

  def take(name: str) -> np.ndarray:
    if name not in tensors:
      raise ValueError(f"checkpoint has no tensor {name!r}")
    used.add(name)
    return tensors[name]

  build = _llama_params if config.variant == "llama" else _opt_params
  params = build(config, take)
  unused = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES)
                  and not (config.tie_embeddings and k == "lm_head.weight"))
  if unused:
    raise ValueError(f"{len(unused)} checkpoint tensors have no place in the model: "
                     f"{unused[:5]}")

  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  pure = nnx.to_pure_dict(state)
  for path, value in params.items():
    node = pure
    for key in path[:-1]:
      node = node[key]
    target = node[path[-1]]
    if tuple(value.shape) != tuple(target.shape):
      raise ValueError(f"checkpoint tensor for {'.'.join(map(str, path))} has shape "
                       f"{value.shape}, the model expects {target.shape}")
    node[path[-1]] = jax.numpy.asarray(value, dtype=target.dtype)
  missing = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(pure)
             if isinstance(leaf, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(f"model parameters not set by the checkpoint: {missing[:5]}")
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def load_hf_checkpoint(path: str, **overrides: Any) -> Transformer:
  """Loads a local Hugging Face LLaMA or OPT checkpoint directory.

  Args:
    path: directory with config.json and *.safetensors.
    **overrides: TransformerConfig fields to set, e.g. dtype="bfloat16",
      attention_impl="pallas_triton", max_len=4096.

  Returns:
    The Transformer.
  """
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise ValueError(f"{path=} has no config.json")
  with open(config_path) as f:
    hf_config = json.load(f)
  return model_from_hf(hf_config, load_tensors(path), **overrides)
