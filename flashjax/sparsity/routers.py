"""Routers of Polar Sparsity and the selections they drive at decode time.

A head router scores the KV groups of one layer from that layer's attention input (the
post-norm activations, no lookahead); the top-k groups per sequence are the ones decode
attention computes. A neuron router scores the fc1 units of a ReLU MLP; the batch union is
the top-k of the batch-summed relu scores, one set of neurons for the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class HeadRouter(nnx.Module):
  """Linear(d, G) (or d -> hidden -> G with a ReLU) scores of a layer's G KV groups."""

  def __init__(self, d_model: int, num_groups: int, *, hidden: int | None = None,
               rngs: nnx.Rngs):
    """Builds the router in float32.

    Args:
      d_model: model width d (the router's input is the layer's post-norm attention input).
      num_groups: KV groups G (= heads for multi-head attention).
      hidden: None for one linear layer, else the width of a hidden ReLU layer.
      rngs: random streams (uses `params`).
    """
    self.num_groups = num_groups
    self.hidden = nnx.Linear(d_model, hidden, rngs=rngs) if hidden else None
    self.out = nnx.Linear(hidden or d_model, num_groups, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., d] -> float32 logits [..., G] (sigmoid = P(group is among the top-k))."""
    x = x.astype(jnp.float32)
    if self.hidden is not None:
      x = jax.nn.relu(self.hidden(x))
    return self.out(x)


class NeuronRouter(nnx.Module):
  """Low-rank Linear(d, r) -> Linear(r, F) scores of a ReLU MLP's F fc1 units."""

  def __init__(self, d_model: int, d_ff: int, *, rank: int = 128, rngs: nnx.Rngs):
    """Builds the router in float32.

    Args:
      d_model: model width d (input: the layer's post-norm MLP input).
      d_ff: fc1 units F.
      rank: width r of the low-rank bottleneck.
      rngs: random streams (uses `params`).
    """
    self.d_ff = d_ff
    self.down = nnx.Linear(d_model, rank, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(rank, d_ff, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., d] -> float32 logits [..., F] (sigmoid = P(unit fires))."""
    return self.up(self.down(x.astype(jnp.float32)))


def select_heads(logits: jax.Array, k: int) -> jax.Array:
  """The k highest-scoring KV groups of each sequence.

  Args:
    logits: [B, G] head-router scores.
    k: groups to keep, 1 <= k <= G (static).

  Returns:
    int32 [B, k] group ids (the `head_indices` of flashjax.decode_attention).
  """
  if not 1 <= k <= logits.shape[-1]:
    raise ValueError(f"{k=} must be in [1, G={logits.shape[-1]}]")
  return jax.lax.top_k(logits, k)[1].astype(jnp.int32)


def union_scores(logits: jax.Array) -> jax.Array:
  """[B, F] neuron-router scores -> [F] float32 batch score sum_b relu(logits[b])."""
  return jnp.sum(jax.nn.relu(logits.astype(jnp.float32)), axis=0)


def select_neurons(logits: jax.Array, k: int) -> jax.Array:
  """Batch union: the k units with the largest sum over the batch of relu(scores).

  Args:
    logits: [B, F] neuron-router scores of the batch's rows.
    k: units to keep, 1 <= k <= F (static; a calibrated bucket).

  Returns:
    int32 [k] distinct unit ids, sorted (neighbouring rows stream together), the
    `neuron_indices` of flashjax.sparse_mlp.
  """
  if not 1 <= k <= logits.shape[-1]:
    raise ValueError(f"{k=} must be in [1, F={logits.shape[-1]}]")
  return jnp.sort(jax.lax.top_k(union_scores(logits), k)[1]).astype(jnp.int32)
