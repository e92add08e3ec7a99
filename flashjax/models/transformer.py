"""Decoder-only Transformer (LLaMA-style or OPT-style) on flashjax attention kernels.

  model = Transformer(TransformerConfig(...), rngs=nnx.Rngs(0))
  logits = model(tokens, segment_ids=ids)             # [B, T, V] float32, training
  cache = model.init_cache(batch_size, max_len)
  logits, cache = model.prefill(prompts, cache, lengths=prompt_lengths)   # [B, T, V]
  logits, cache = model.decode_step(next_tokens, cache)                   # [B, V]

Packed rows: with `segment_ids` [B, T] a token attends only to earlier tokens of its own
segment, and positions restart at 0 at every segment start (unless `positions` is given).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashjax import layers
from flashjax.models import generation
from flashjax.models.cache import KVCache
from flashjax.models.config import TransformerConfig
from flashjax.ops.sparse_mlp.api import SPARSE_MLP_BACKENDS


def _norm(config: TransformerConfig) -> nnx.Module:
  cls = layers.RMSNorm if config.variant == "llama" else layers.LayerNorm
  return cls(config.d_model, eps=config.norm_eps, param_dtype=config.params_dtype)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    """Builds the block's layers from `config` (see TransformerConfig)."""
    c = config
    out_std = c.init_std / math.sqrt(2 * c.num_layers)
    self.attn_norm = _norm(c)
    self.attn = layers.Attention(
        c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, use_bias=c.use_bias,
        rope_theta=c.rope_theta if c.uses_rope else None, implementation=c.attention_impl,
        decode_implementation=c.decode_impl, interpret=c.interpret,
        block_sizes=c.block_sizes, init_std=c.init_std, out_init_std=out_std,
        param_dtype=c.params_dtype, rngs=rngs)
    self.mlp_norm = _norm(c)
    if c.variant == "llama":
      self.mlp = layers.GatedMLP(c.d_model, c.d_ff, init_std=c.init_std, out_init_std=out_std,
                                 param_dtype=c.params_dtype, rngs=rngs)
    else:
      self.mlp = layers.ReluMLP(c.d_model, c.d_ff, use_bias=c.use_bias, init_std=c.init_std,
                                out_init_std=out_std, param_dtype=c.params_dtype, rngs=rngs)
    # The sparse MLP backend of routed decode steps: the decode backend where sparse_mlp has
    # one (xla, pallas_triton, pallas_tpu), else the device default.
    self.sparse_mlp_impl = (c.decode_impl if isinstance(c.decode_impl, str)
                            and c.decode_impl in SPARSE_MLP_BACKENDS else None)

  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None) -> jax.Array:
    """x [B, T, D] -> [B, T, D]."""
    x = x + self.attn(self.attn_norm(x), positions, segment_ids)
    return x + self.mlp(self.mlp_norm(x))

  def prefill(self, x: jax.Array, positions: jax.Array, key_cache: jax.Array,
              value_cache: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, D] -> ([B, T, D], caches with slots [0, T) written)."""
    attn, key_cache, value_cache = self.attn.prefill(self.attn_norm(x), positions, key_cache,
                                                     value_cache)
    x = x + attn
    return x + self.mlp(self.mlp_norm(x)), key_cache, value_cache

  def decode(self, x: jax.Array, positions: jax.Array, key_cache: jax.Array,
             value_cache: jax.Array, head_indices: jax.Array | None,
             sparsity: Any = None, layer: int = 0
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, D] (one token per sequence) -> ([B, D], updated caches).

    With a SparsityPolicy, its routers pick this layer's KV groups (from the post-norm
    attention input) and MLP units (from the post-norm MLP input); None entries run dense.
    """
    attn_in = self.attn_norm(x)
    if sparsity is not None:
      head_indices = sparsity.heads(layer, attn_in)
    attn, key_cache, value_cache = self.attn.decode(attn_in, positions, key_cache,
                                                    value_cache, head_indices)
    x = x + attn
    mlp_in = self.mlp_norm(x)
    neurons = None if sparsity is None else sparsity.neurons(layer, mlp_in)
    if neurons is None:
      return x + self.mlp(mlp_in), key_cache, value_cache
    mlp = self.mlp.sparse(mlp_in, neurons, implementation=self.sparse_mlp_impl,
                          interpret=self.attn.interpret)
    return x + mlp, key_cache, value_cache


def _check_int_array(name: str, x: Any, shape: tuple[int, ...]) -> None:
  if not isinstance(x, (np.ndarray, jax.Array)):
    raise ValueError(f"{name} must be a jax or numpy array, got {type(x).__name__}")
  if tuple(x.shape) != shape or not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} (shape={tuple(x.shape)}, dtype={x.dtype}) must be an int array "
                     f"of shape {shape}")


class Transformer(nnx.Module):
  """Decoder-only language model; see the module docstring and TransformerConfig."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    """Builds the model with freshly initialised weights.

    Args:
      config: shapes, variant, numerics and attention implementation.
      rngs: random streams (uses `params`).
    """
    if not isinstance(config, TransformerConfig):
      raise ValueError(f"config must be a TransformerConfig, got {type(config).__name__}")
    c = config
    self.config = c
    self.embed = layers.Embed(c.vocab_size, c.d_model, param_dtype=c.params_dtype,
                              init_std=c.init_std, rngs=rngs)
    if c.variant == "opt":
      self.positions = layers.LearnedPositions(c.max_len, c.d_model,
                                               param_dtype=c.params_dtype,
                                               init_std=c.init_std, rngs=rngs)
    self.layers = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = _norm(c)
    if not c.tie_embeddings:
      init = nnx.initializers.normal(c.init_std)
      self.lm_head = nnx.Param(init(rngs.params(), (c.d_model, c.vocab_size),
                                    c.params_dtype))  # DV

  def _embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    x = self.embed(tokens, self.config.compute_dtype)
    if self.config.variant == "opt":
      x = x + self.positions(positions, self.config.compute_dtype)
    return x

  def _logits(self, x: jax.Array) -> jax.Array:
    """float32 logits [..., V] of the final hidden states x [..., D]."""
    x = self.final_norm(x)
    if self.config.tie_embeddings:
      return self.embed.attend(x)
    return jnp.einsum("...D,DV->...V", x, self.lm_head[...].astype(x.dtype),
                      preferred_element_type=jnp.float32)

  def check_tokens(self, tokens: Any) -> tuple[int, int]:
    """(B, T) of int tokens [B, T]; ValueError naming a wrong shape, dtype or T > max_len."""
    if not isinstance(tokens, (np.ndarray, jax.Array)) or tokens.ndim != 2:
      raise ValueError(f"tokens must be an int array [B, T], got "
                       f"{getattr(tokens, 'shape', type(tokens).__name__)}")
    batch, length = tokens.shape
    _check_int_array("tokens", tokens, (batch, length))
    if length > self.config.max_len:
      raise ValueError(f"sequence length {length} exceeds max_len={self.config.max_len}")
    return batch, length

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """Causal language-model logits.

    Args:
      tokens: int [B, T] token ids (T <= max_len).
      segment_ids: None or int [B, T] document ids of packed rows; tokens attend only to
        earlier tokens of the same segment.
      positions: None or int [B, T]; default: restarting at every segment start (or
        0..T-1 without segment ids).

    Returns:
      float32 logits [B, T, V].
    """
    batch, length = self.check_tokens(tokens)
    if segment_ids is not None:
      _check_int_array("segment_ids", segment_ids, (batch, length))
      segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if positions is None:
      if segment_ids is None:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
      else:
        positions = layers.segment_positions(segment_ids)
    else:
      _check_int_array("positions", positions, (batch, length))
    x = self._embed(tokens, positions)
    for layer in self.layers:
      x = layer(x, positions, segment_ids)
    return self._logits(x)

  def init_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
    """An empty KV cache.

    Args:
      batch_size: sequences B.
      max_len: slots per sequence (prompt plus generated tokens); default config.max_len.

    Returns:
      KVCache with lengths 0, keys/values in the compute dtype.
    """
    c = self.config
    max_len = c.max_len if max_len is None else max_len
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"{batch_size=} must be a positive int")
    if not isinstance(max_len, int) or not 1 <= max_len <= c.max_len:
      raise ValueError(f"{max_len=} must be an int in [1, config.max_len={c.max_len}]")
    return KVCache.zeros(c.num_layers, batch_size, max_len, c.num_kv_heads, c.head_dim,
                         c.compute_dtype)

  def prefill(self, tokens: jax.Array, cache: KVCache,
              lengths: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Runs right-padded prompts through the model and fills an empty cache.

    Args:
      tokens: int [B, T] prompts, sequence b valid in [0, lengths[b]) (T <= cache slots).
      cache: an empty cache from `init_cache` (its slots [0, T) are overwritten).
      lengths: int [B] prompt lengths in [1, T]; None: all T.

    Returns:
      (float32 logits [B, T, V] (row b meaningful up to lengths[b] - 1), cache with
      lengths set).
    """
    batch, length = self.check_tokens(tokens)
    if batch != cache.batch_size or length > cache.max_len:
      raise ValueError(f"tokens.shape={tuple(tokens.shape)} does not fit the cache "
                       f"(batch {cache.batch_size}, {cache.max_len} slots)")
    if lengths is None:
      lengths = jnp.full((batch,), length, jnp.int32)
    else:
      _check_int_array("lengths", lengths, (batch,))
      lengths = jnp.asarray(lengths, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    x = self._embed(tokens, positions)
    keys, values = [], []
    for layer, key_cache, value_cache in zip(self.layers, cache.keys, cache.values):
      x, key_cache, value_cache = layer.prefill(x, positions, key_cache, value_cache)
      keys.append(key_cache)
      values.append(value_cache)
    cache = KVCache(keys=tuple(keys), values=tuple(values), lengths=lengths)
    return self._logits(x), cache

  def _per_layer(self, head_indices: Any) -> list[jax.Array | None]:
    num_layers = self.config.num_layers
    if head_indices is None:
      return [None] * num_layers
    if isinstance(head_indices, (np.ndarray, jax.Array)):
      if head_indices.ndim != 3:
        raise ValueError(f"head_indices.shape={tuple(head_indices.shape)} must be "
                         f"[num_layers={num_layers}, B, K] (or a per-layer sequence)")
      head_indices = list(head_indices)
    if not isinstance(head_indices, Sequence) or len(head_indices) != num_layers:
      got = (len(head_indices) if isinstance(head_indices, Sequence)
             else type(head_indices).__name__)
      raise ValueError(f"head_indices must have one entry (None or [B, K]) per layer, "
                       f"num_layers={num_layers}; got {got}")
    return list(head_indices)

  def decode_step(self, tokens: jax.Array, cache: KVCache, head_indices: Any = None,
                  sparsity: Any = None) -> tuple[jax.Array, KVCache]:
    """Appends one token per sequence and returns the next-token logits.

    Args:
      tokens: int [B] the tokens at positions cache.lengths.
      cache: the cache (slots [0, lengths[b]) filled; lengths[b] < S_max).
      head_indices: None (all heads), or per layer None / int32 [B, K] KV groups to compute
        (a sequence of num_layers entries, or an array [num_layers, B, K]).
      sparsity: None (dense), or a flashjax.sparsity.SparsityPolicy whose routers choose
        every layer's KV groups and MLP units inside the step (not with head_indices).

    Returns:
      (float32 logits [B, V], cache with the new entries and lengths + 1).
    """
    batch = cache.batch_size
    _check_int_array("tokens", tokens, (batch,))
    if sparsity is not None:
      if head_indices is not None:
        raise ValueError("pass head_indices or a sparsity policy, not both")
      if sparsity.num_layers != self.config.num_layers:
        raise ValueError(f"the sparsity policy has {sparsity.num_layers} layers, the model "
                         f"{self.config.num_layers}")
    per_layer = self._per_layer(head_indices)
    positions = cache.lengths
    x = self._embed(jnp.asarray(tokens, jnp.int32), positions)
    keys, values = [], []
    for index, (layer, key_cache, value_cache, heads) in enumerate(
        zip(self.layers, cache.keys, cache.values, per_layer)):
      x, key_cache, value_cache = layer.decode(x, positions, key_cache, value_cache, heads,
                                               sparsity, index)
      keys.append(key_cache)
      values.append(value_cache)
    cache = KVCache(keys=tuple(keys), values=tuple(values), lengths=cache.lengths + 1)
    return self._logits(x), cache

  def generate(self, prompts: jax.Array, **kwargs: Any) -> Any:
    """`flashjax.models.generate(self, prompts, **kwargs)`."""
    return generation.generate(self, prompts, **kwargs)
