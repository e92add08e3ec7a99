"""Measuring a SparsityPolicy: accuracy through the kernels and decode speed.

Accuracy is measured with the routers in the loop, through the decode kernels (not by
masking a dense forward): `teacher_forced` prefills the first `prompt_len` tokens of each
sequence densely, then feeds the true next tokens one decode step at a time, dense and
routed side by side, and scores both.

Speed: `decode_step_time` times the model's jitted decode step at a given batch and cache
fill on the device (steps inside one jitted loop, the cache carried and updated in place),
dense or with a policy (routers included in the step).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashjax import benchmarking
from flashjax.models.cache import KVCache


def _log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log softmax(logits)[target], float32 [B]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len"))
def _teacher_forced(graphdef, state, tokens, *, prompt_len):
  model, policy = nnx.merge(graphdef, state)
  batch, length = tokens.shape
  cache = model.init_cache(batch, length)
  logits, cache = model.prefill(tokens[:, :prompt_len], cache)
  first = logits[:, -1]

  def step(carry, t):
    dense_cache, sparse_cache, dense_logits, sparse_logits = carry
    target = tokens[:, t]
    scores = (_log_probs(dense_logits, target), _log_probs(sparse_logits, target),
              jnp.argmax(dense_logits, -1) == jnp.argmax(sparse_logits, -1))
    dense_logits, dense_cache = model.decode_step(target, dense_cache)
    sparse_logits, sparse_cache = model.decode_step(target, sparse_cache, sparsity=policy)
    return (dense_cache, sparse_cache, dense_logits, sparse_logits), scores

  carry = (cache, cache, first, first)
  _, (dense_lp, sparse_lp, agree) = jax.lax.scan(step, carry,
                                                 jnp.arange(prompt_len, length))
  return dense_lp, sparse_lp, agree


def teacher_forced(model: nnx.Module, policy: Any, tokens: jax.Array, *,
                   prompt_len: int) -> dict[str, float]:
  """Dense and routed next-token scores of `tokens` past a dense prefill of prompt_len.

  Every position t >= prompt_len is predicted from the cache of tokens [0, t): dense by
  the plain decode step, routed by the decode step with `policy` (its own cache, so routing
  errors compound as in generation). The last token is only fed, never predicted.

  Args:
    model: a flashjax.models.Transformer.
    policy: a flashjax.sparsity.SparsityPolicy.
    tokens: int [B, T] sequences, T <= config.max_len.
    prompt_len: tokens prefilled densely, 1 <= prompt_len < T.

  Returns:
    {"nll_dense", "nll_sparse": mean negative log-likelihood per predicted token,
     "ppl_dense", "ppl_sparse": their exponentials, "next_token_agreement": fraction of
     positions whose greedy token is the same, "tokens": positions scored}.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  if tokens.ndim != 2 or not 1 <= prompt_len < tokens.shape[1]:
    raise ValueError(f"tokens.shape={tuple(tokens.shape)} must be [B, T] with "
                     f"1 <= {prompt_len=} < T")
  graphdef, state = nnx.split((model, policy))
  dense_lp, sparse_lp, agree = _teacher_forced(graphdef, state, tokens,
                                               prompt_len=int(prompt_len))
  nll_dense = -float(jnp.mean(dense_lp))
  nll_sparse = -float(jnp.mean(sparse_lp))
  return {"nll_dense": nll_dense, "nll_sparse": nll_sparse,
          "ppl_dense": float(np.exp(nll_dense)), "ppl_sparse": float(np.exp(nll_sparse)),
          "next_token_agreement": float(jnp.mean(agree)), "tokens": int(agree.size)}


def filled_cache(model: nnx.Module, batch: int, context: int, *, seed: int = 0) -> KVCache:
  """A cache of `batch` sequences holding `context` random (unit-normal) entries each.

  Decode speed depends on how much cache is read, not on its values; random entries keep
  the softmax away from degenerate cases (never zeros).
  """
  c = model.config
  if not 1 <= context < c.max_len:
    raise ValueError(f"{context=} must be in [1, max_len={c.max_len})")
  keys = jax.random.split(jax.random.key(seed), 2 * c.num_layers)
  shape = (batch, context + 1, c.num_kv_heads, c.head_dim)
  make = lambda key: jax.random.normal(key, shape, jnp.float32).astype(c.compute_dtype)
  return KVCache(keys=tuple(make(k) for k in keys[:c.num_layers]),
                 values=tuple(make(k) for k in keys[c.num_layers:]),
                 lengths=jnp.full((batch,), context, jnp.int32))


@functools.partial(jax.jit, static_argnums=0, static_argnames="iters", donate_argnums=2)
def _decode_loop(graphdef, state, cache, tokens, lengths, *, iters):
  """`iters` decode steps on alternating rows of tokens [2, B], the cache carried."""
  model, policy = nnx.merge(graphdef, state)

  def body(i, carry):
    cache, acc = carry
    logits, cache = model.decode_step(tokens[i % 2], cache, sparsity=policy)
    cache = cache.replace(lengths=lengths)
    return cache, acc + jnp.sum(logits)

  return jax.lax.fori_loop(0, iters, body, (cache, jnp.zeros((), jnp.float32)))


def decode_step_time(model: nnx.Module, policy: Any, cache: KVCache, *, iters: int = 20,
                     repeats: int = 5, seed: int = 0) -> tuple[benchmarking.Timing, KVCache]:
  """Device time of one decode step (dense when policy is None), the cache carried in place.

  Steps run inside one jitted loop on two rotating sets of random tokens with the same
  lengths every step. The cache is the loop carry: each step writes its new entry into the
  carried cache, which XLA updates in place, and the lengths are reset after every step. A
  cache passed as a loop-invariant input (as benchmarking.time_in_loop does) cannot be
  updated in place, so every step would also copy every layer's whole cache (reading and
  writing all of it), more traffic than the attention itself, hiding the head-sparse saving.

  Args:
    model: a flashjax Transformer.
    policy: None (dense) or a SparsityPolicy.
    cache: a filled KVCache (`filled_cache`). It is donated to the loop (no second
      copy of a cache that may fill most of the device) and must not be used afterwards:
      use the returned one (the same entries, except the slot at `lengths`).
    iters: steps per timed loop.
    repeats: timed loops after the compiling call.
    seed: seed of the token sets.

  Returns:
    (benchmarking.Timing (method "loop"; times_s per step, one per loop), the cache).
  """
  graphdef, state = nnx.split((model, policy))
  vocab = model.config.vocab_size
  tokens = jnp.stack([jax.random.randint(jax.random.key(seed + i), (cache.batch_size,), 0,
                                         vocab) for i in range(2)])
  lengths = jnp.copy(cache.lengths)  # its own buffer: the cache is donated
  loop = functools.partial(_decode_loop, graphdef, iters=iters)
  args = (tokens, lengths)

  start = time.perf_counter()
  cache, acc = jax.block_until_ready(loop(state, cache, *args))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    cache, acc = jax.block_until_ready(loop(state, cache, *args))
    times.append((time.perf_counter() - start) / iters)
  del acc
  timing = benchmarking.Timing(compile_s=compile_s, times_s=tuple(times), method="loop",
                               calls_per_sample=iters)
  return timing, cache
