"""Scale-out of flashjax attention over jax.sharding meshes.

  context_parallel_attention  attention with the sequence sharded over one mesh axis (ring
                              or all-gather K/V; zig-zag layout for causal masks)
  plan_context_parallel       the static plan it runs: strategy, layout, skipped pairs, why
  load_balance                max / mean non-empty tile pairs per device of a layout
  device_tile_counts          those per-device counts
  sharded_decode_attention    decode_attention with batch and / or KV heads sharded
  layout_permutation, to_layout, from_layout
                              host-side contiguous / zig-zag sequence layouts

docs/scaling.md describes the design and what is measured.
"""

from flashjax.distributed.context_parallel import (ALLGATHER_MAX_LOCAL_LEN, LSE_BACKENDS,
                                                   ContextParallelPlan,
                                                   context_parallel_attention,
                                                   device_tile_counts, load_balance,
                                                   plan_context_parallel)
from flashjax.distributed.decode import sharded_decode_attention
from flashjax.distributed.layout import (LAYOUTS, from_layout, layout_chunks,
                                         layout_permutation, to_layout)

__all__ = ["ALLGATHER_MAX_LOCAL_LEN", "ContextParallelPlan", "LAYOUTS", "LSE_BACKENDS",
           "context_parallel_attention", "device_tile_counts", "from_layout", "layout_chunks",
           "layout_permutation", "load_balance", "plan_context_parallel", "sharded_decode_attention", "to_layout"]
