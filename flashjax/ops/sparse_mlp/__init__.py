"""Batch-union sparse MLP: gather-GEMM over the neurons a router selected for the batch.

`flashjax.sparse_mlp` (api.py) validates and dispatches to "xla", "pallas_triton" or
"pallas_tpu"; reference.py is the float32 oracle; block_sizes.py holds the kernels' static
tile parameters. Layouts, kernels and limits: docs/sparse_mlp.md.
"""
