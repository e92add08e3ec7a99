"""Contextual sparsity (Polar Sparsity) for flashjax models.

  routers    HeadRouter / NeuronRouter (flax.nnx) and the selections they drive at decode:
             per-sequence KV-group ids for flashjax.decode_attention (`select_heads`) and the
             batch union of MLP neurons for flashjax.sparse_mlp (`select_neurons`)
  policy     SparsityPolicy: the routers and per-layer k a Transformer.decode_step runs with
  collect    router data from any Transformer, streamed to resumable shards on disk
  train      head / neuron router training (weighted BCE, AdamW, best validation recall),
             layer importance -> per-layer head densities
  calibrate  per-layer, per-batch-size neuron union sizes k_l(B) for >= 99% union recall
  router_checkpoint   RouterSet: routers + densities + k's saved next to a model
  evaluate   routed vs dense accuracy through the kernels, decode-step timing
"""

from flashjax.sparsity.policy import SparsityPolicy
from flashjax.sparsity.routers import HeadRouter
from flashjax.sparsity.routers import NeuronRouter
from flashjax.sparsity.routers import select_heads
from flashjax.sparsity.routers import select_neurons

__all__ = ["HeadRouter", "NeuronRouter", "SparsityPolicy", "select_heads", "select_neurons"]
