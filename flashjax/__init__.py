"""flashjax: IO-aware and sparsity-aware attention for JAX.

Public API:
  dot_product_attention   blocked (block-sparse) attention, jax.nn layout [B, T, N, H]
  decode_attention        one-token (head-sparse) decode attention over a KV cache
  resolve_implementation  which backend a dot_product_attention / decode_attention call runs
  sparse_mlp              MLP over a batch-union of selected neurons (gather-GEMM)
  context_parallel_attention
                          attention with the sequence sharded over a mesh axis (ring or
                          all-gather K/V; flashjax.distributed has its plan and layouts)
  masks                   host-side mask library; masks.BlockMask is what kernels consume
  BlockSizes              dot_product_attention's tiles, stages, grid and backward options
"""

from flashjax import masks
from flashjax.masks import BlockMask
from flashjax.ops.attention.api import dot_product_attention
from flashjax.ops.attention.api import resolve_implementation
from flashjax.ops.attention.block_sizes import BlockSizes
from flashjax.ops.decode.api import decode_attention
from flashjax.ops.sparse_mlp.api import sparse_mlp
from flashjax import distributed
from flashjax.distributed import context_parallel_attention

__version__ = "0.1.0"

__all__ = ["BlockMask", "BlockSizes", "context_parallel_attention", "decode_attention",
           "distributed", "dot_product_attention", "layers", "masks", "models",
           "resolve_implementation", "sparse_mlp"]


def __getattr__(name: str):
  # flax is imported only when the models are asked for.
  if name in ("layers", "models"):
    import importlib  # pylint: disable=import-outside-toplevel
    return importlib.import_module(f"flashjax.{name}")
  raise AttributeError(f"module 'flashjax' has no attribute {name!r}")
