"""Cached decoding of a flashjax Transformer on a device mesh.

  decoder = ShardedDecoder(model, make_mesh("data:2,model:2"))
  cache = decoder.init_cache(batch_size=4, max_len=64)     # KVCache split over B and Nkv
  logits, cache = decoder.prefill(prompts, cache, lengths)
  logits, cache = decoder.decode_step(tokens, cache)        # [B, V], cache stays sharded

The parameters are placed per flashjax.distributed.sharding's rules (heads / KV heads / MLP
units / vocabulary over "model", d_model over "fsdp"), the cache over the batch axes and
"model", and `Transformer.prefill` / `decode_step` are jitted with those in / out
shardings: XLA's SPMD partitioner splits the projections, MLPs and cache writes, and the
attention op itself (prefill and decode attention, any backend, Pallas included) runs
inside a shard_map over the batch and KV-head shards (flashjax.distributed.model_attention),
so each device calls the kernel on its rows and heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flashjax.distributed import model_attention, sharding

_AUTO = "auto"


def _named(mesh: Mesh, specs: Any) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


class ShardedDecoder:
  """A Transformer's prefill / decode_step jitted with mesh shardings (module docstring)."""

  def __init__(self, model: Any, mesh: Mesh, *, rules: Mapping[str, Any] | None = None,
               batch_axis: Any = _AUTO, head_axis: Any = _AUTO):
    """Places the model's parameters on the mesh.

    Args:
      model: a flashjax.models.Transformer (its parameters are moved in place).
      mesh: the mesh (axes among data / fsdp / model).
      rules: logical axis -> mesh axis rules (default sharding.DEFAULT_RULES).
      batch_axis: mesh axis (or tuple) splitting the cache batch; "auto": the mesh's batch
        axes when they divide the batch, else whole.
      head_axis: mesh axis splitting the cache's KV heads; "auto": "model" when in the mesh
        and it divides Nkv, else whole.
    """
    from flax import nnx  # pylint: disable=import-outside-toplevel
    if not isinstance(mesh, Mesh):
      raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    self.mesh = mesh
    self.config = model.config
    sharding.shard_model(model, mesh, rules)
    self.graphdef, self.params = nnx.split(model, nnx.Param)
    self.param_shardings = jax.tree.map(lambda x: x.sharding, self.params)
    self.batch_axis, self.head_axis = batch_axis, head_axis
    self._compiled: dict[Any, Any] = {}

  def _axes(self, batch_size: int) -> tuple[Any, Any]:
    auto_batch, auto_head = sharding.default_cache_axes(self.mesh, self.config.num_kv_heads,
                                                        batch_size)
    return (auto_batch if self.batch_axis == _AUTO else self.batch_axis,
            auto_head if self.head_axis == _AUTO else self.head_axis)

  def cache_shardings(self, cache: Any) -> Any:
    """NamedShardings of a KVCache of this model on the mesh."""
    batch_axis, head_axis = self._axes(cache.batch_size)
    return _named(self.mesh, sharding.cache_specs(cache, self.mesh, batch_axis, head_axis))

  def model(self) -> Any:
    """The model (its parameters on the mesh)."""
    from flax import nnx  # pylint: disable=import-outside-toplevel
    return nnx.merge(self.graphdef, self.params)

  def init_cache(self, batch_size: int, max_len: int | None = None) -> Any:
    """An empty KVCache created directly on the mesh (Transformer.init_cache's arguments)."""
    model = self.model()
    abstract = jax.eval_shape(lambda: model.init_cache(batch_size, max_len))
    shardings = self.cache_shardings(abstract)
    return jax.jit(lambda: model.init_cache(batch_size, max_len), out_shardings=shardings)()

  def shard_cache(self, cache: Any) -> Any:
    """A KVCache placed on the mesh."""
    return jax.device_put(cache, self.cache_shardings(cache))

  def _rows(self, batch_size: int, ndim: int) -> NamedSharding:
    batch_axis, _ = self._axes(batch_size)
    lead = (None if batch_axis is None else batch_axis[0]
            if isinstance(batch_axis, tuple) and len(batch_axis) == 1 else batch_axis)
    return NamedSharding(self.mesh, PartitionSpec(lead, *([None] * (ndim - 1))))

  def _jitted(self, kind: str, cache: Any, *shapes: Any) -> Any:
    key = (kind, jax.tree.map(lambda x: (x.shape, x.dtype), cache), shapes)
    if key in self._compiled:
      return self._compiled[key]
    from flax import nnx  # pylint: disable=import-outside-toplevel
    graphdef = self.graphdef
    cache_sh = self.cache_shardings(cache)
    batch = cache.batch_size
    logits_sh = self._rows(batch, 3 if kind == "prefill" else 2)
    if kind == "prefill":
      def fn(params, tokens, cache, lengths):
        with model_attention.attention_mesh(self.mesh):
          return nnx.merge(graphdef, params).prefill(tokens, cache, lengths)
      ins = (self.param_shardings, self._rows(batch, 2), cache_sh, self._rows(batch, 1))
    else:
      def fn(params, tokens, cache):
        with model_attention.attention_mesh(self.mesh):
          return nnx.merge(graphdef, params).decode_step(tokens, cache)
      ins = (self.param_shardings, self._rows(batch, 1), cache_sh)
    self._compiled[key] = jax.jit(fn, in_shardings=ins, out_shardings=(logits_sh, cache_sh))
    return self._compiled[key]

  def prefill(self, tokens: Any, cache: Any, lengths: Any = None) -> tuple[jax.Array, Any]:
    """Transformer.prefill on the mesh: (float32 logits [B, T, V], sharded cache)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    self.model().check_tokens(tokens)  # the unsharded model's errors
    if lengths is None:
      lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    if tokens.shape[0] != cache.batch_size or tokens.shape[1] > cache.max_len:
      raise ValueError(f"tokens.shape={tuple(tokens.shape)} does not fit the cache "
                       f"(batch {cache.batch_size}, {cache.max_len} slots)")
    fn = self._jitted("prefill", cache, tokens.shape)
    return fn(self.params, tokens, cache, jnp.asarray(lengths, jnp.int32))

  def decode_step(self, tokens: Any, cache: Any) -> tuple[jax.Array, Any]:
    """Transformer.decode_step (dense) on the mesh: (float32 logits [B, V], sharded cache)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.shape != (cache.batch_size,):
      raise ValueError(f"tokens.shape={tuple(tokens.shape)} must be (B,) = "
                       f"({cache.batch_size},)")
    return self._jitted("decode", cache)(self.params, tokens, cache)

