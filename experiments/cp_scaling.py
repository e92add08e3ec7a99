"""Experiment kind "cp_scaling": weak / strong scaling of context-parallel attention.

One point times `flashjax.context_parallel_attention` (forward) on the first `devices`
devices, the sequence sharded over a 1-D mesh "cp":

  scaling "strong"   T = length for every device count
  scaling "weak"     T = length * devices (length tokens per device)
  mask "causal"      is_causal=True (zig-zag layout where it balances)
  mask "documents"   causal packed documents (random lengths around doc_mean_len), given as
                     a host-side masks.document Mask so empty shard pairs are skipped

Reports tokens/s (B * T / median call time), tokens/s per device, the median call time
(every device runs the call concurrently, so it is also the per-device time), the plan's
strategy / layout, its load-balance ratio (max / mean non-empty tiles per device, host-side)
and skipped shard pairs. On a CPU host the devices are fake host devices sharing the CPU
cores (XLA_FLAGS=--xla_force_host_platform_device_count=8): the timings say nothing about
real scaling there, only that the study runs.

Config fields: scalings, device_counts, lengths, masks (swept), batch, num_heads,
num_kv_heads, head_dim, dtype, doc_mean_len, implementation, strategy, warmup, iters, seed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import flashjax
from flashjax import benchmarking, distributed, masks
from flashjax.masks import families

SCALINGS = ("strong", "weak")
MASKS = ("causal", "documents")


def seq_len(config: ml_collections.ConfigDict) -> int:
  """T of a point: `length` (strong) or `length * devices` (weak)."""
  if config.scaling not in SCALINGS:
    raise ValueError(f"scaling={config.scaling!r} must be one of {SCALINGS}")
  return config.length * (config.devices if config.scaling == "weak" else 1)


def run_point(config: ml_collections.ConfigDict, point: dict[str, Any]) -> dict[str, Any]:
  """Times one (scaling, devices, length, mask) point (module docstring)."""
  del point  # the config holds the point's fields
  devices = config.devices
  if not isinstance(devices, int) or devices < 1:
    raise ValueError(f"devices={devices!r} must be a positive int")
  if devices > jax.device_count():
    raise ValueError(f"devices={devices} but JAX has {jax.device_count()} devices (on a CPU "
                     f"host set XLA_FLAGS=--xla_force_host_platform_device_count={devices})")
  if config.mask not in MASKS:
    raise ValueError(f"mask={config.mask!r} must be one of {MASKS}")
  t = seq_len(config)
  mesh = Mesh(np.array(jax.devices()[:devices]), ("cp",))
  sharding = NamedSharding(mesh, PartitionSpec(None, "cp"))
  dtype = jnp.dtype(config.dtype)
  keys = jax.random.split(jax.random.key(config.seed), 3)
  b = config.batch
  q = jax.device_put(jax.random.normal(keys[0], (b, t, config.num_heads, config.head_dim),
                                       dtype), sharding)
  k, v = (jax.device_put(jax.random.normal(key, (b, t, config.num_kv_heads, config.head_dim),
                                           dtype), sharding) for key in keys[1:])
  kwargs: dict[str, Any] = dict(mesh=mesh, axis_name="cp",
                                implementation=config.implementation or None,
                                strategy=config.strategy or None)
  if config.mask == "causal":
    kwargs["is_causal"] = True
    plan = distributed.plan_context_parallel(t, t, devices, is_causal=True,
                                             strategy=kwargs["strategy"],
                                             implementation=kwargs["implementation"])
  else:
    ids = families.document_ids(np.random.default_rng(config.seed), 1, t,
                                 config.doc_mean_len)[0]
    kwargs["mask"] = masks.document(ids)
    plan = distributed.plan_context_parallel(t, t, devices, mask=kwargs["mask"],
                                             strategy=kwargs["strategy"],
                                             implementation=kwargs["implementation"])
  fn = jax.jit(lambda q, k, v: flashjax.context_parallel_attention(q, k, v, **kwargs))
  timing = benchmarking.time_fn(fn, q, k, v, warmup=config.warmup, iters=config.iters)
  tokens = b * t
  return {"seq_len": t, "tokens_per_s": tokens / timing.median_s,
          "tokens_per_s_per_device": tokens / timing.median_s / devices,
          **timing.summary(), "strategy": plan.strategy, "layout": plan.layout,
          "load_balance": float(plan.balance), "skipped_pairs": int(plan.skipped_pairs),
          "backend": jax.default_backend()}
