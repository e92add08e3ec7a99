"""Scale-out of flashjax attention over jax.sharding meshes.

  context_parallel_attention  attention with the sequence sharded over one mesh axis (ring
                              or all-gather K/V; zig-zag layout for causal masks)
  plan_context_parallel       the static plan it runs: strategy, layout, skipped pairs, why
  load_balance                max / mean non-empty tile pairs per device of a layout
  device_tile_counts          those per-device counts
  sharded_decode_attention    decode_attention with batch and / or KV heads sharded
  layout_permutation, to_layout, from_layout
                              host-side contiguous / zig-zag sequence layouts
  make_mesh, parse_mesh_spec  "data:2,model:2" -> jax.sharding.Mesh (axes data / fsdp / model)
  sharding                    rule tables sharding the Transformer's parameters, optimizer
                              state and KV cache (used by training.Trainer(mesh=...))
  ShardedDecoder              a Transformer's prefill / decode_step jitted with mesh
                              shardings (parameters per the rules, KV cache over B and Nkv)

docs/scaling.md describes the design and what is measured.
"""

from flashjax.distributed.context_parallel import (ALLGATHER_MAX_LOCAL_LEN, LSE_BACKENDS,
                                                   ContextParallelPlan,
                                                   context_parallel_attention,
                                                   device_tile_counts, load_balance,
                                                   plan_context_parallel)
from flashjax.distributed import sharding
from flashjax.distributed.decode import sharded_decode_attention
from flashjax.distributed.layout import (LAYOUTS, from_layout, layout_chunks,
                                         layout_permutation, to_layout)
from flashjax.distributed.mesh import MESH_AXES, make_mesh, parse_mesh_spec
from flashjax.distributed.sharded_model import ShardedDecoder

__all__ = ["ALLGATHER_MAX_LOCAL_LEN", "ContextParallelPlan", "LAYOUTS", "LSE_BACKENDS",
           "MESH_AXES", "ShardedDecoder", "context_parallel_attention", "device_tile_counts", "from_layout",
           "layout_chunks", "layout_permutation", "load_balance", "make_mesh",
           "parse_mesh_spec", "plan_context_parallel", "sharded_decode_attention", "sharding",
           "to_layout"]
