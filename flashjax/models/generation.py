"""Autoregressive generation with a KV cache: greedy or temperature / top-k sampling.

`generate` prefills right-padded prompts, then runs one `decode_step` per new token inside a
single jitted `lax.while_loop` that ends when every sequence has produced one of its stop
tokens or `max_new_tokens` tokens.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import struct


@struct.dataclass
class GenerationOutput:
  """Result of `generate`.

  Attributes:
    tokens: int32 [B, max_new_tokens] generated tokens; after a sequence stopped (or beyond
      the loop's last step) its entries are `fill_id`.
    lengths: int32 [B] generated tokens per sequence, the stop token included.
    stopped: bool [B] whether the sequence produced one of its stop tokens.
  """

  tokens: jax.Array
  lengths: jax.Array
  stopped: jax.Array


def sample_tokens(logits: jax.Array, rng: jax.Array | None, *, temperature: float = 0.0,
                  top_k: int | None = None) -> jax.Array:
  """Picks one token per row of logits.

  Args:
    logits: float [B, V].
    rng: PRNG key (unused when temperature == 0).
    temperature: 0 for greedy (argmax), else softmax(logits / temperature) sampling.
    top_k: sample only among the k largest logits (ties at the k-th value are kept);
      None: all.

  Returns:
    int32 [B].
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _stop_matrix(stop_tokens: Any, batch: int) -> np.ndarray:
  """int32 [B, S] stop tokens per sequence, -1 meaning none."""
  if stop_tokens is None:
    return np.full((batch, 1), -1, np.int32)
  stop = np.asarray(stop_tokens)
  if not np.issubdtype(stop.dtype, np.integer):
    raise ValueError(f"stop_tokens (dtype={stop.dtype}) must be integers")
  if stop.ndim == 0:
    stop = np.full((batch, 1), stop)
  elif stop.ndim == 1 and stop.shape[0] == batch:
    stop = stop[:, None]
  if stop.ndim != 2 or stop.shape[0] != batch:
    raise ValueError(f"stop_tokens.shape={stop.shape} must be (), [B] or [B, S] with B={batch}")
  return stop.astype(np.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "cache_len",
                                             "temperature", "top_k", "fill_id"))
def _generate(graphdef, state, prompts, prompt_lengths, stop, rng, head_indices, *,
              max_new_tokens: int, cache_len: int, temperature: float, top_k: int | None,
              fill_id: int) -> GenerationOutput:
  model, sparsity = nnx.merge(graphdef, state)
  batch = prompts.shape[0]
  cache = model.init_cache(batch, cache_len)
  logits, cache = model.prefill(prompts, cache, prompt_lengths)
  logits = logits[jnp.arange(batch), prompt_lengths - 1]  # [B, V] at each last prompt token

  def cond(carry):
    step, _, _, _, done, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, cache, logits, tokens, done, lengths, rng = carry
    rng, key = jax.random.split(rng)
    new = sample_tokens(logits, key, temperature=temperature, top_k=top_k)
    new = jnp.where(done, fill_id, new)
    tokens = tokens.at[:, step].set(new)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.any(new[:, None] == stop, axis=1)
    logits, cache = model.decode_step(new, cache, head_indices, sparsity)
    return step + 1, cache, logits, tokens, done, lengths, rng

  tokens = jnp.full((batch, max_new_tokens), fill_id, jnp.int32)
  no = jnp.zeros((batch,), bool)
  carry = (jnp.int32(0), cache, logits, tokens, no, jnp.zeros((batch,), jnp.int32), rng)
  _, _, _, tokens, done, lengths, _ = jax.lax.while_loop(cond, body, carry)
  return GenerationOutput(tokens=tokens, lengths=lengths, stopped=done)


def generate(model: nnx.Module, prompts: jax.Array, *, max_new_tokens: int,
             prompt_lengths: jax.Array | None = None, temperature: float = 0.0,
             top_k: int | None = None, stop_tokens: Any = None, rng: jax.Array | None = None,
             head_indices: Any = None, sparsity: Any = None,
             fill_id: int = 0) -> GenerationOutput:
  """Continues each prompt until one of its stop tokens or `max_new_tokens` tokens.

  Args:
    model: a flashjax.models.Transformer.
    prompts: int [B, T] right-padded prompts; T + max_new_tokens <= config.max_len.
    max_new_tokens: most tokens generated per sequence (>= 1).
    prompt_lengths: int [B] valid prompt tokens per sequence, in [1, T]; None: all T.
    temperature: 0 for greedy decoding, > 0 to sample from softmax(logits / temperature).
    top_k: with temperature > 0, sample among the k most likely tokens only.
    stop_tokens: None, one token id for all sequences, int [B] (one per sequence), or
      int [B, S] (several per sequence, -1 entries ignored).
    rng: PRNG key for sampling; default jax.random.key(0).
    head_indices: passed to every decode_step (per layer None or [B, K] KV groups).
    sparsity: None, or a flashjax.sparsity.SparsityPolicy whose routers pick every decode
      step's KV groups and MLP units (the prefill stays dense).
    fill_id: token written after a sequence has stopped.

  Returns:
    GenerationOutput with tokens [B, max_new_tokens], lengths [B], stopped [B].
  """
  config = model.config
  if not isinstance(prompts, (np.ndarray, jax.Array)) or prompts.ndim != 2:
    raise ValueError(f"prompts must be an int array [B, T], got "
                     f"{getattr(prompts, 'shape', type(prompts).__name__)}")
  batch, length = prompts.shape
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"{max_new_tokens=} must be a positive int")
  if length + max_new_tokens > config.max_len:
    raise ValueError(f"prompt length {length} + {max_new_tokens=} exceeds "
                     f"max_len={config.max_len}")
  if not temperature >= 0:
    raise ValueError(f"{temperature=} must be >= 0")
  if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= config.vocab_size):
    raise ValueError(f"{top_k=} must be None or an int in [1, vocab_size="
                     f"{config.vocab_size}]")
  if prompt_lengths is None:
    prompt_lengths = np.full((batch,), length, np.int32)
  lengths_host = np.asarray(prompt_lengths)
  if lengths_host.shape != (batch,) or lengths_host.min() < 1 or lengths_host.max() > length:
    raise ValueError(f"prompt_lengths={lengths_host.tolist()} must be [B={batch}] ints in "
                     f"[1, T={length}]")
  stop = _stop_matrix(stop_tokens, batch)
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split((model, sparsity))
  return _generate(graphdef, state, jnp.asarray(prompts, jnp.int32),
                   jnp.asarray(lengths_host, jnp.int32), jnp.asarray(stop), rng, head_indices,
                   max_new_tokens=max_new_tokens, cache_len=length + max_new_tokens,
                   temperature=float(temperature), top_k=top_k, fill_id=int(fill_id))
