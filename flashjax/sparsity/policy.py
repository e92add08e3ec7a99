"""SparsityPolicy: the routers and per-layer sizes a Transformer decode step runs with.

`Transformer.decode_step(tokens, cache, sparsity=policy)` (and `generate(...,
sparsity=policy)`) calls, inside the jitted step and for every layer:

  heads   = policy.heads(layer, attn_norm(x))   # int32 [B, k_l] KV groups, or None (dense)
  neurons = policy.neurons(layer, mlp_norm(x))  # int32 [k_l(B)] batch union, or None (dense)

and runs flashjax.decode_attention with those head_indices and flashjax.sparse_mlp over
those neurons. Prefill, the QKV projections and the KV-cache writes stay dense; unselected
heads output zeros before the dense output projection. A layer whose router is None runs
dense (Polar Sparsity keeps layer 0 dense).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from flax import nnx

from flashjax.sparsity.routers import HeadRouter, NeuronRouter, select_heads, select_neurons


class SparsityPolicy(nnx.Module):
  """Per-layer head routers (+ k) and, for ReLU/gated MLPs, neuron routers (+ k per batch)."""

  def __init__(self, head_routers: Sequence[HeadRouter | None], head_k: Sequence[int | None],
               *, neuron_routers: Sequence[NeuronRouter | None] | None = None,
               neuron_k: Mapping[int, Sequence[int | None]] | None = None):
    """Checks and stores the policy.

    Args:
      head_routers: one entry per layer: a HeadRouter or None (that layer computes every
        KV group).
      head_k: per layer, groups kept per sequence (None exactly where the router is None).
      neuron_routers: None (dense MLPs), or one NeuronRouter / None per layer.
      neuron_k: with neuron_routers, {batch size: per-layer k} from calibration (None where
        the router is None); a step of batch B uses the smallest calibrated batch >= B
        (the largest calibrated one when B exceeds them all).

    Raises:
      ValueError: lengths that differ, a k without a router or the reverse, k out of range.
    """
    num_layers = len(head_routers)
    if len(head_k) != num_layers:
      raise ValueError(f"{len(head_k)=} must equal len(head_routers)={num_layers}")
    for layer, (router, k) in enumerate(zip(head_routers, head_k)):
      if (router is None) != (k is None):
        raise ValueError(f"layer {layer}: head router {router is not None} but head_k={k}")
      if router is not None and not 1 <= k <= router.num_groups:
        raise ValueError(f"layer {layer}: head_k={k} must be in [1, {router.num_groups}]")
    self.num_layers = num_layers
    self.head_routers = nnx.List(list(head_routers))
    self.head_k = tuple(head_k)
    if (neuron_routers is None) != (neuron_k is None):
      raise ValueError("neuron_routers and neuron_k go together")
    self.neuron_routers = nnx.data(None)
    self.neuron_k: tuple[tuple[int, tuple[int | None, ...]], ...] = ()
    if neuron_routers is not None:
      if len(neuron_routers) != num_layers:
        raise ValueError(f"{len(neuron_routers)=} must equal the {num_layers} layers")
      if not neuron_k:
        raise ValueError("neuron_k needs at least one calibrated batch size")
      table = []
      for batch, ks in sorted(neuron_k.items()):
        ks = tuple(ks)
        if len(ks) != num_layers:
          raise ValueError(f"neuron_k[{batch}] has {len(ks)} entries for {num_layers} layers")
        for layer, (router, k) in enumerate(zip(neuron_routers, ks)):
          if (router is None) != (k is None):
            raise ValueError(f"layer {layer}: neuron router {router is not None} but "
                             f"neuron_k[{batch}]={k}")
          if router is not None and not 1 <= k <= router.d_ff:
            raise ValueError(f"layer {layer}: neuron_k[{batch}]={k} must be in [1, "
                             f"{router.d_ff}]")
        table.append((int(batch), ks))
      self.neuron_routers = nnx.data(nnx.List(list(neuron_routers)))
      self.neuron_k = tuple(table)

  def heads(self, layer: int, x: jax.Array) -> jax.Array | None:
    """int32 [B, k] KV groups for the attention input x [B, d] of `layer`, or None."""
    router = self.head_routers[layer]
    if router is None:
      return None
    return select_heads(router(x), self.head_k[layer])

  def neuron_budget(self, layer: int, batch: int) -> int | None:
    """The calibrated k of `layer` for a step of `batch` sequences (None: dense)."""
    if self.neuron_routers is None or self.neuron_routers[layer] is None:
      return None
    for calibrated, ks in self.neuron_k:
      if calibrated >= batch:
        return ks[layer]
    return self.neuron_k[-1][1][layer]

  def neurons(self, layer: int, x: jax.Array) -> jax.Array | None:
    """int32 [k] batch-union neurons for the MLP input x [B, d] of `layer`, or None."""
    k = self.neuron_budget(layer, x.shape[0])
    if k is None:
      return None
    return select_neurons(self.neuron_routers[layer](x), k)
