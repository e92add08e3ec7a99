"""TransformerConfig: one frozen dataclass for the LLaMA-style and OPT-style models.

variant "llama": RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query attention, no biases,
  untied output projection by default.
variant "opt": LayerNorm, learned absolute positions, ReLU MLP, biases, output projection
  tied to the token embedding by default.

Fields left as None are resolved in `__post_init__` from the variant and the other fields,
so a constructed config always holds concrete values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from flashjax.layers.attention import check_implementation
from flashjax.layers.attention import decode_implementation_for
from flashjax.ops.attention.api import ATTENTION_BACKENDS
from flashjax.ops.attention.block_sizes import BlockSizes
from flashjax.ops.decode.api import DECODE_BACKENDS

VARIANTS = ("llama", "opt")
DTYPES = ("float32", "bfloat16", "float16")


def _llama_ffn_dim(d_model: int, multiple_of: int = 64) -> int:
  """SwiGLU hidden width: 8/3 * d_model rounded up to a multiple (LLaMA's rule)."""
  hidden = (8 * d_model) // 3
  return -(-hidden // multiple_of) * multiple_of


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Shape, numerics and attention implementation of a decoder-only Transformer.

  Attributes:
    variant: "llama" or "opt" (module docstring).
    vocab_size: number of tokens V.
    d_model: model width D.
    num_layers: number of blocks.
    num_heads: query heads Nq.
    num_kv_heads: key/value heads Nkv (Nq % Nkv == 0); None: num_heads.
    head_dim: width of each head; None: d_model // num_heads (which must divide).
    d_ff: MLP hidden width; None: 8/3 * d_model rounded up to 64 (llama), 4 * d_model (opt).
    max_len: positions of the learned table (opt) and the longest sequence / cache allowed.
    norm_eps: epsilon of the norms; None: 1e-6 (llama), 1e-5 (opt).
    rope_theta: RoPE base (llama).
    tie_embeddings: output projection = token embedding^T; None: False (llama), True (opt).
    use_bias: biases in the attention projections (and, for opt, the MLP); None: False
      (llama), True (opt).
    init_std: standard deviation of the initial weights; output projections of each block
      use init_std / sqrt(2 * num_layers).
    dtype: activation / compute dtype name ("float32", "bfloat16", "float16"); logits are
      float32.
    param_dtype: parameter dtype name.
    attention_impl: attention implementation for training and prefill: a flashjax backend
      name ("xla", "xla_chunked", "pallas_triton", "pallas_tpu", "pallas_mosaic_gpu"), a
      tuple of them tried in order, None (flashjax's default for the device), or
      "jax_nn_cudnn" / "jax_nn_xla" (jax.nn.dot_product_attention; see flashjax.layers).
    decode_impl: implementation of the cached decode step (a flashjax decode backend, a tuple
      of them, None, or a jax.nn name); None: derived from attention_impl.
    interpret: run the Pallas backends in interpret mode (CPU tests).
    block_q: query tile of the tiled attention backends; None: the backend's default.
    block_kv: key tile of the tiled attention backends; None: the backend's default.
  """

  variant: str = "llama"
  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None
  d_ff: int | None = None
  max_len: int = 2048
  norm_eps: float | None = None
  rope_theta: float = 10000.0
  tie_embeddings: bool | None = None
  use_bias: bool | None = None
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: Any = "xla"
  decode_impl: Any = None
  interpret: bool = False
  block_q: int | None = None
  block_kv: int | None = None

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"variant={self.variant!r} must be one of {VARIANTS}")
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "max_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    for name in ("num_kv_heads", "head_dim", "d_ff"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}={value!r} must be None or a positive int")
    llama = self.variant == "llama"
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(f"d_model={self.d_model} is not divisible by "
                         f"num_heads={self.num_heads} (or set head_dim explicitly)")
      self._set("head_dim", self.d_model // self.num_heads)
    if self.num_kv_heads is None:
      self._set("num_kv_heads", self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if llama and self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.d_ff is None:
      self._set("d_ff", _llama_ffn_dim(self.d_model) if llama else 4 * self.d_model)
    if self.norm_eps is None:
      self._set("norm_eps", 1e-6 if llama else 1e-5)
    if self.tie_embeddings is None:
      self._set("tie_embeddings", not llama)
    if self.use_bias is None:
      self._set("use_bias", not llama)
    for name in ("norm_eps", "rope_theta", "init_std"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}={value!r} must be a positive number")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r} must be one of {DTYPES}")
    if isinstance(self.attention_impl, list):
      self._set("attention_impl", tuple(self.attention_impl))
    if isinstance(self.decode_impl, list):
      self._set("decode_impl", tuple(self.decode_impl))
    check_implementation("attention_impl", self.attention_impl, tuple(ATTENTION_BACKENDS))
    if self.decode_impl is None:
      self._set("decode_impl", decode_implementation_for(self.attention_impl))
    check_implementation("decode_impl", self.decode_impl, tuple(DECODE_BACKENDS))
    if not isinstance(self.interpret, bool):
      raise ValueError(f"interpret={self.interpret!r} must be a bool")
    if (self.block_q is None) != (self.block_kv is None):
      raise ValueError(f"block_q={self.block_q} and block_kv={self.block_kv} must be given "
                       "together")
    if self.block_q is not None:
      BlockSizes(block_q=self.block_q, block_kv=self.block_kv)  # validates both

  def _set(self, name: str, value: Any) -> None:
    object.__setattr__(self, name, value)  # resolving defaults of a frozen dataclass

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def block_sizes(self) -> BlockSizes | None:
    """BlockSizes for the tiled backends, or None for their defaults."""
    if self.block_q is None:
      return None
    return BlockSizes(block_q=self.block_q, block_kv=self.block_kv)

  @property
  def uses_rope(self) -> bool:
    return self.variant == "llama"

  def num_params(self) -> int:
    """Number of parameters of the model this config builds."""
    d, f, v = self.d_model, self.d_ff, self.vocab_size
    q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    attention = d * (2 * q_out + 2 * kv_out)
    if self.variant == "llama":
      mlp, norms = 3 * d * f, 2 * d
    else:
      mlp, norms = 2 * d * f, 4 * d
    if self.use_bias:
      attention += q_out + 2 * kv_out + d
      if self.variant == "opt":
        mlp += f + d
    total = self.num_layers * (attention + mlp + norms) + v * d
    total += d if self.variant == "llama" else 2 * d  # final norm
    if not self.tie_embeddings:
      total += v * d
    if self.variant == "opt":
      total += self.max_len * d
    return total
