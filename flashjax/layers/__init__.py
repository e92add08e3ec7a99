"""Flax NNX building blocks of flashjax models.

  Attention        grouped-query self-attention on flashjax kernels (+ KV-cache decode)
  GatedMLP         SwiGLU feed-forward (LLaMA)
  ReluMLP          two-layer ReLU feed-forward with biases (OPT)
  RMSNorm          root-mean-square norm (LLaMA)
  LayerNorm        layer norm (OPT)
  Embed            token embedding with a tied output projection
  LearnedPositions learned absolute position table (OPT)
  apply_rope, segment_positions   rotary embeddings; per-document positions of packed rows
"""

from flashjax.layers.attention import Attention
from flashjax.layers.attention import JAX_NN_IMPLEMENTATIONS
from flashjax.layers.attention import cached_decode_attention
from flashjax.layers.attention import causal_self_attention
from flashjax.layers.embeddings import Embed
from flashjax.layers.embeddings import LearnedPositions
from flashjax.layers.mlp import GatedMLP
from flashjax.layers.mlp import ReluMLP
from flashjax.layers.norms import LayerNorm
from flashjax.layers.norms import RMSNorm
from flashjax.layers.rotary import apply_rope
from flashjax.layers.rotary import segment_positions

__all__ = [
    "Attention", "Embed", "GatedMLP", "JAX_NN_IMPLEMENTATIONS", "LayerNorm",
    "LearnedPositions", "RMSNorm", "ReluMLP", "apply_rope", "cached_decode_attention",
    "causal_self_attention", "segment_positions",
]
