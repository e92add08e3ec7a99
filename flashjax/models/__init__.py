"""flashjax models: decoder-only Transformers (LLaMA-style and OPT-style) on flashjax kernels.

  TransformerConfig, Transformer   the model (flax.nnx) and its frozen config
  KVCache                          per-layer key/value cache for prefill / decode_step
  generate, GenerationOutput       greedy / temperature / top-k generation with stop tokens
  load_hf_checkpoint               import a local Hugging Face LLaMA or OPT checkpoint
"""

from flashjax.models.cache import KVCache
from flashjax.models.config import TransformerConfig
from flashjax.models.generation import GenerationOutput
from flashjax.models.generation import generate
from flashjax.models.generation import sample_tokens
from flashjax.models.hf_import import load_hf_checkpoint
from flashjax.models.transformer import Transformer

__all__ = [
    "GenerationOutput", "KVCache", "Transformer", "TransformerConfig", "generate",
    "load_hf_checkpoint", "sample_tokens",
]
