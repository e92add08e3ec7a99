"""Grouped-query self-attention on flashjax kernels, with a KV-cache decode path.

The attention core is chosen by an implementation name:

* a flashjax backend ("xla", "xla_chunked", "pallas_triton", "pallas_tpu",
  "pallas_mosaic_gpu"), a sequence of them tried in order, or None (flashjax's default for
  the device): `flashjax.dot_product_attention` with `is_causal=True` and the packed rows'
  `segment_ids`, and `flashjax.decode_attention` for cached decoding;
* "jax_nn_cudnn" / "jax_nn_xla": `jax.nn.dot_product_attention(implementation="cudnn" /
  "xla")`, the peer baselines of the training benchmark. Segment ids become a dense
  [B, 1, T, T] bool mask (cuDNN applies it as a bias, without skipping any tile); cached
  decoding uses `key_value_seq_lengths`, and KV groups left out of `head_indices` are
  computed and then zeroed (same outputs as flashjax's head-sparse decode, no saving).
  cuDNN needs a GPU and bfloat16 / float16 inputs.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flashjax.layers import rotary
from flashjax.ops.attention.api import dot_product_attention
from flashjax.ops.decode.api import DECODE_BACKENDS, decode_attention

# Model-level names of jax.nn.dot_product_attention's implementations.
JAX_NN_IMPLEMENTATIONS = {"jax_nn_cudnn": "cudnn", "jax_nn_xla": "xla"}


def check_implementation(field: str, value: Any, backends: Sequence[str]) -> None:
  """Raises ValueError unless `value` is None, a known name or a sequence of backend names.

  Args:
    field: config field name for the message.
    value: the implementation value.
    backends: flashjax backend names allowed (also inside sequences); the jax.nn names are
      allowed alone.
  """
  if value is None or value in JAX_NN_IMPLEMENTATIONS or value in backends:
    return
  if (isinstance(value, Sequence) and not isinstance(value, str) and value and
      all(isinstance(v, str) and v in backends for v in value)):
    return
  raise ValueError(f"{field}={value!r} must be None, one of "
                   f"{sorted(backends) + sorted(JAX_NN_IMPLEMENTATIONS)} or a non-empty "
                   f"sequence of {sorted(backends)}")


def decode_implementation_for(attention_impl: Any) -> Any:
  """The decode implementation that goes with an attention implementation.

  The same name where a decode backend of that name exists (and the jax.nn names),
  "xla" for "xla_chunked", the decode backends of a sequence, None for None.
  """
  if attention_impl is None or attention_impl in JAX_NN_IMPLEMENTATIONS:
    return attention_impl
  if isinstance(attention_impl, str):
    return attention_impl if attention_impl in DECODE_BACKENDS else "xla"
  names = tuple(dict.fromkeys(n if n in DECODE_BACKENDS else "xla" for n in attention_impl))
  return names[0] if len(names) == 1 else names


def causal_self_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          segment_ids: jax.Array | None = None, implementation: Any = "xla",
                          interpret: bool = False, block_sizes: Any = None) -> jax.Array:
  """Causal attention, restricted to equal segment ids when given.

  Args:
    query: [B, T, Nq, H].
    key: [B, T, Nkv, H], Nq % Nkv == 0.
    value: [B, T, Nkv, H].
    segment_ids: None or int [B, T]; token i attends j only when ids are equal (and j <= i).
    implementation: see the module docstring.
    interpret: run Pallas backends in interpret mode.
    block_sizes: None or flashjax BlockSizes for the tiled backends.

  Returns:
    [B, T, Nq, H] in query's dtype.
  """
  if implementation in JAX_NN_IMPLEMENTATIONS:
    mask = None
    if segment_ids is not None:
      mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [B, 1, T, T]
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask, is_causal=True,
        implementation=JAX_NN_IMPLEMENTATIONS[implementation])
  return dot_product_attention(
      query, key, value, is_causal=True, segment_ids=segment_ids, block_sizes=block_sizes,
      implementation=implementation, interpret=interpret)


def _selected_heads(head_indices: jax.Array, num_kv_heads: int, num_heads: int) -> jax.Array:
  """bool [B, Nq]: query heads whose KV group is listed in head_indices [B, K]."""
  batch = head_indices.shape[0]
  groups = jnp.zeros((batch, num_kv_heads), bool)
  groups = groups.at[jnp.arange(batch)[:, None], head_indices].set(True)
  return jnp.repeat(groups, num_heads // num_kv_heads, axis=1)


def cached_decode_attention(query: jax.Array, key_cache: jax.Array, value_cache: jax.Array,
                            lengths: jax.Array, *, head_indices: jax.Array | None = None,
                            implementation: Any = "xla", interpret: bool = False) -> jax.Array:
  """One query token per sequence against its first `lengths` cache entries.

  Args:
    query: [B, Nq, H].
    key_cache: [B, S_max, Nkv, H].
    value_cache: [B, S_max, Nkv, H].
    lengths: int32 [B], valid cache entries per sequence (>= 1).
    head_indices: None or int32 [B, K] KV groups to compute; the other groups' query heads
      output zeros.
    implementation: see the module docstring (a decode backend or a jax.nn name).
    interpret: run Pallas backends in interpret mode.

  Returns:
    [B, Nq, H] in query's dtype.
  """
  if implementation in JAX_NN_IMPLEMENTATIONS:
    out = jax.nn.dot_product_attention(
        query[:, None], key_cache, value_cache, key_value_seq_lengths=lengths,
        implementation=JAX_NN_IMPLEMENTATIONS[implementation])[:, 0]
    if head_indices is not None:
      keep = _selected_heads(head_indices, key_cache.shape[2], query.shape[1])
      out = jnp.where(keep[:, :, None], out, jnp.zeros_like(out))
    return out
  return decode_attention(query, key_cache, value_cache, lengths, head_indices=head_indices,
                          implementation=implementation, interpret=interpret)


# How Attention layers call their attention op (causal_self_attention / cached_decode_attention):
# directly, or through a wrapper installed while a step is traced (flashjax.distributed's
# model_attention runs the op per device shard of a mesh this way).
_OP_WRAPPER: contextvars.ContextVar[Callable[..., jax.Array] | None] = contextvars.ContextVar(
    "flashjax_attention_op_wrapper", default=None)


@contextlib.contextmanager
def wrap_attention_ops(wrapper: Callable[..., jax.Array]) -> Iterator[None]:
  """Within this context Attention layers call `wrapper(op, *args, **kwargs)` instead of
  `op(*args, **kwargs)` for their attention op (projections, RoPE and cache writes stay
  the layer's); the wrapper must return what op would."""
  if not callable(wrapper):
    raise ValueError(f"wrapper must be callable, got {type(wrapper).__name__}")
  token = _OP_WRAPPER.set(wrapper)
  try:
    yield
  finally:
    _OP_WRAPPER.reset(token)


def _call_op(op: Callable[..., jax.Array], *args: Any, **kwargs: Any) -> jax.Array:
  wrapper = _OP_WRAPPER.get()
  return op(*args, **kwargs) if wrapper is None else wrapper(op, *args, **kwargs)


class Attention(nnx.Module):
  """Multi-head self-attention with grouped KV heads, optional RoPE and biases.

  Weights are stored per head: q_proj [D, Nq, H], k_proj / v_proj [D, Nkv, H],
  o_proj [Nq, H, D] (biases [Nq, H], [Nkv, H], [D] when `use_bias`).
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               use_bias: bool = False, rope_theta: float | None = 10000.0,
               implementation: Any = "xla", decode_implementation: Any = "xla",
               interpret: bool = False, block_sizes: Any = None, init_std: float = 0.02,
               out_init_std: float | None = None, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    """Builds the projections with N(0, std^2) weights and zero biases.

    Args:
      d_model: model width D.
      num_heads: query heads Nq.
      num_kv_heads: key/value heads Nkv (Nq % Nkv == 0).
      head_dim: width H of every head.
      use_bias: add biases to the four projections (OPT).
      rope_theta: RoPE base, or None for no rotary embedding.
      implementation: attention implementation (module docstring).
      decode_implementation: implementation of the cached decode step.
      interpret: run Pallas backends in interpret mode.
      block_sizes: None or flashjax BlockSizes.
      init_std: standard deviation of the q, k, v projections.
      out_init_std: standard deviation of the output projection (default init_std).
      param_dtype: dtype of the weights.
      rngs: random streams (uses `params`).
    """
    if num_heads % num_kv_heads:
      raise ValueError(f"{num_heads=} must be a multiple of {num_kv_heads=}")
    init = nnx.initializers.normal(init_std)
    out_init = nnx.initializers.normal(init_std if out_init_std is None else out_init_std)
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.rope_theta = rope_theta
    self.implementation = implementation
    self.decode_implementation = decode_implementation
    self.interpret = interpret
    self.block_sizes = block_sizes
    self.use_bias = use_bias
    self.q_proj = nnx.Param(init(rngs.params(), (d_model, num_heads, head_dim), param_dtype))
    self.k_proj = nnx.Param(init(rngs.params(), (d_model, num_kv_heads, head_dim),
                                 param_dtype))
    self.v_proj = nnx.Param(init(rngs.params(), (d_model, num_kv_heads, head_dim),
                                 param_dtype))
    self.o_proj = nnx.Param(out_init(rngs.params(), (num_heads, head_dim, d_model),
                                     param_dtype))
    if use_bias:
      self.q_bias = nnx.Param(jnp.zeros((num_heads, head_dim), param_dtype))
      self.k_bias = nnx.Param(jnp.zeros((num_kv_heads, head_dim), param_dtype))
      self.v_bias = nnx.Param(jnp.zeros((num_kv_heads, head_dim), param_dtype))
      self.o_bias = nnx.Param(jnp.zeros((d_model,), param_dtype))

  def _qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projections of x [B, T, D]: q [B, T, Nq, H], k and v [B, T, Nkv, H] (RoPE applied)."""
    dtype = x.dtype
    q = jnp.einsum("BTD,DNH->BTNH", x, self.q_proj[...].astype(dtype))
    k = jnp.einsum("BTD,DKH->BTKH", x, self.k_proj[...].astype(dtype))
    v = jnp.einsum("BTD,DKH->BTKH", x, self.v_proj[...].astype(dtype))
    if self.use_bias:
      q = q + self.q_bias[...].astype(dtype)
      k = k + self.k_bias[...].astype(dtype)
      v = v + self.v_bias[...].astype(dtype)
    if self.rope_theta is not None:
      q = rotary.apply_rope(q, positions, self.rope_theta)
      k = rotary.apply_rope(k, positions, self.rope_theta)
    return q, k, v

  def heads(self, x: jax.Array, positions: jax.Array,
            segment_ids: jax.Array | None = None) -> jax.Array:
    """Per-head causal self-attention outputs over x, before the output projection.

    `project(heads(x, positions, segment_ids))` is `self(x, positions, segment_ids)`; query
    head n belongs to KV group n // (Nq // Nkv).

    Args:
      x: [B, T, D] activations.
      positions: int [B, T] token positions (for RoPE).
      segment_ids: None or int [B, T]; tokens attend only within their segment.

    Returns:
      [B, T, Nq, H] in x's dtype.
    """
    q, k, v = self._qkv(x, positions)
    return _call_op(causal_self_attention, q, k, v, segment_ids=segment_ids,
                    implementation=self.implementation, interpret=self.interpret,
                    block_sizes=self.block_sizes)

  def project(self, heads: jax.Array) -> jax.Array:
    """Output projection (plus bias) of per-head outputs heads [B, T, Nq, H] -> [B, T, D]."""
    out = jnp.einsum("BTNH,NHD->BTD", heads, self.o_proj[...].astype(heads.dtype))
    if self.use_bias:
      out = out + self.o_bias[...].astype(heads.dtype)
    return out

  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal self-attention over x.

    Args:
      x: [B, T, D] activations.
      positions: int [B, T] token positions (for RoPE).
      segment_ids: None or int [B, T]; tokens attend only within their segment.

    Returns:
      [B, T, D] in x's dtype.
    """
    return self.project(self.heads(x, positions, segment_ids))

  def prefill(self, x: jax.Array, positions: jax.Array, key_cache: jax.Array,
              value_cache: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Causal self-attention over a prompt, writing its keys/values to cache slots [0, T).

    Args:
      x: [B, T, D] prompt activations (T <= S_max).
      positions: int [B, T] token positions.
      key_cache: [B, S_max, Nkv, H].
      value_cache: [B, S_max, Nkv, H].

    Returns:
      (out [B, T, D], key_cache, value_cache) with the prompt's entries written.
    """
    if x.shape[1] > key_cache.shape[1]:
      raise ValueError(f"prompt length {x.shape[1]} exceeds the cache length "
                       f"{key_cache.shape[1]}")
    q, k, v = self._qkv(x, positions)
    heads = _call_op(causal_self_attention, q, k, v, implementation=self.implementation,
                     interpret=self.interpret, block_sizes=self.block_sizes)
    key_cache = jax.lax.dynamic_update_slice(key_cache, k.astype(key_cache.dtype), (0, 0, 0, 0))
    value_cache = jax.lax.dynamic_update_slice(value_cache, v.astype(value_cache.dtype),
                                               (0, 0, 0, 0))
    return self.project(heads), key_cache, value_cache

  def decode(self, x: jax.Array, positions: jax.Array, key_cache: jax.Array,
             value_cache: jax.Array, head_indices: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One new token per sequence: writes its key/value at cache slot `positions[b]` and
    attends to slots [0, positions[b]].

    Args:
      x: [B, D] activations of the new tokens.
      positions: int32 [B] their positions (= cache entries already filled).
      key_cache: [B, S_max, Nkv, H].
      value_cache: [B, S_max, Nkv, H].
      head_indices: None or int32 [B, K] KV groups to compute per sequence.

    Returns:
      (out [B, D], key_cache, value_cache).
    """
    q, k, v = self._qkv(x[:, None], positions[:, None])
    rows = jnp.arange(x.shape[0])
    key_cache = key_cache.at[rows, positions].set(k[:, 0].astype(key_cache.dtype), mode="drop")
    value_cache = value_cache.at[rows, positions].set(v[:, 0].astype(value_cache.dtype),
                                                      mode="drop")
    heads = _call_op(
        cached_decode_attention, q[:, 0].astype(key_cache.dtype), key_cache, value_cache,
        positions + 1,
        head_indices=head_indices, implementation=self.decode_implementation,
        interpret=self.interpret)
    return self.project(heads[:, None].astype(x.dtype))[:, 0], key_cache, value_cache
