"""Router training data: per-layer activations of a flashjax Transformer, streamed to disk.

For every layer l of a `flashjax.models.Transformer` (llama or opt variant) and every sampled
token position, `collect` records

  attn_x.{l}        float [N, D]   the layer's post-norm attention input attn_norm(x)
                                   (the head router's input)
  head_norms.{l}    float32 [N, Nq] L2 norm of each query head's attention output before the
                                   output projection
  group_scores.{l}  float32 [N, G]  per KV group (G = num_kv_heads) the max of head_norms over
                                   the group's Nq // G query heads (query head n is in group
                                   n // (Nq // G)); = head_norms without GQA
  mlp_x.{l}         float [N, D]   (ReLU MLPs, the opt variant) post-norm MLP input
  fired.{l}         uint8 [N, ceil(F / 8)] (ReLU MLPs) np.packbits along the unit axis of
                                   fc1(mlp_x) > 0, i.e. which of the F units fired

plus `rows` int32 [N, 2]: (row of the batch, token position) of every sample.

On-disk layout of a directory:

  meta.json            model shape, sampling settings and the array names (written first;
                       a later run into the same directory must use the same settings)
  shard_00000.npz      one uncompressed npz per token batch (shard i = the i-th batch),
  shard_00001.npz ...  holding the arrays above for all layers

Every file is written to `<name>.tmp` and renamed with os.replace, so a shard is either
complete or absent. A re-run skips the shards already on disk (without running the model on
their batches), so an interrupted collection resumes where it stopped. Samples of shard i
are drawn with a generator seeded by (seed, i): a resumed run records the same rows.

`load_layer(directory, layer, split=...)` reads one layer back, concatenated over shards;
the last `val_fraction` of the shards (at least one when there are two or more) form the
validation split.
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
import re
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import auto as tqdm

from flashjax import layers

META_FILE = "meta.json"
STORE_DTYPES = ("float32", "float16")
SPLITS = ("all", "train", "val")
_SHARD_RE = re.compile(r"shard_(\d{5,})\.npz$")


def _is_relu_mlp(layer: nnx.Module) -> bool:
  return isinstance(layer.mlp, layers.ReluMLP)


def group_max(head_norms: jax.Array, num_groups: int) -> jax.Array:
  """Group scores: max over each KV group's query heads.

  Args:
    head_norms: [..., Nq] per-query-head scores.
    num_groups: KV groups G (Nq % G == 0); head n belongs to group n // (Nq // G).

  Returns:
    [..., G].
  """
  num_heads = head_norms.shape[-1]
  if num_heads % num_groups:
    raise ValueError(f"{num_heads=} is not a multiple of {num_groups=}")
  grouped = head_norms.reshape(*head_norms.shape[:-1], num_groups, num_heads // num_groups)
  return grouped.max(axis=-1)


def layer_records(model: nnx.Module, tokens: jax.Array, segment_ids: jax.Array | None = None,
                  positions: jax.Array | None = None
                  ) -> tuple[list[dict[str, jax.Array]], jax.Array]:
  """The model's forward pass, step by step, with each layer's router signals.

  Mirrors Transformer.__call__ and Block.__call__ with the model's own submodules
  (embed / positions, and per layer attn_norm, attn.heads, attn.project, mlp_norm, mlp), so
  the final hidden states are the model's.

  Args:
    model: a flashjax.models.Transformer.
    tokens: int [B, T].
    segment_ids: None or int [B, T] document ids of packed rows.
    positions: None or int [B, T]; default as in Transformer.__call__ (restarting at every
      segment start).

  Returns:
    (per-layer dicts of "attn_x" [B, T, D], "head_norms" float32 [B, T, Nq],
    "group_scores" float32 [B, T, G] and, for ReLU MLPs, "mlp_x" [B, T, D] and "fired"
    bool [B, T, F]; final hidden states [B, T, D] before the final norm).
  """
  config = model.config
  batch, length = tokens.shape
  if positions is None:
    if segment_ids is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    else:
      positions = layers.segment_positions(segment_ids)
  x = model.embed(tokens, config.compute_dtype)
  if config.variant == "opt":
    x = x + model.positions(positions, config.compute_dtype)
  records = []
  for layer in model.layers:
    attn_x = layer.attn_norm(x)
    heads = layer.attn.heads(attn_x, positions, segment_ids)  # [B, T, Nq, H]
    head_norms = jnp.linalg.norm(heads.astype(jnp.float32), axis=-1)
    record = {"attn_x": attn_x, "head_norms": head_norms,
              "group_scores": group_max(head_norms, config.num_kv_heads)}
    x = x + layer.attn.project(heads)
    mlp_x = layer.mlp_norm(x)
    if _is_relu_mlp(layer):
      record["mlp_x"] = mlp_x
      record["fired"] = layer.mlp.preactivation(mlp_x) > 0
    x = x + layer.mlp(mlp_x)
    records.append(record)
  return records, x


@functools.partial(jax.jit, static_argnums=0)
def _sampled_records(graphdef, state, tokens, segment_ids, flat_rows):
  model = nnx.merge(graphdef, state)
  records, _ = layer_records(model, tokens, segment_ids)
  out = []
  for record in records:
    out.append({name: value.reshape(-1, *value.shape[2:])[flat_rows]
                for name, value in record.items()})
  return out


def sample_rows(rng: np.random.Generator, batch: int, length: int,
                rows_per_sequence: int | None) -> np.ndarray:
  """Token positions sampled from each sequence of a batch.

  Args:
    rng: numpy generator.
    batch: sequences B.
    length: tokens per sequence T.
    rows_per_sequence: positions drawn per sequence without replacement (sorted); None or
      >= T: all T.

  Returns:
    int32 [N, 2] (sequence, position) pairs, N = B * min(rows_per_sequence, T).
  """
  if rows_per_sequence is None or rows_per_sequence >= length:
    picks = np.broadcast_to(np.arange(length), (batch, length))
  else:
    picks = np.sort(np.stack([rng.choice(length, rows_per_sequence, replace=False)
                              for _ in range(batch)]), axis=1)
  sequences = np.broadcast_to(np.arange(batch)[:, None], picks.shape)
  return np.stack([sequences.reshape(-1), picks.reshape(-1)], axis=1).astype(np.int32)


def shard_path(directory: str, index: int) -> str:
  return os.path.join(directory, f"shard_{index:05d}.npz")


def list_shards(directory: str) -> list[int]:
  """Indices of the complete shards in directory, sorted."""
  names = glob.glob(os.path.join(directory, "shard_*.npz"))
  return sorted(int(m.group(1)) for m in map(_SHARD_RE.search, names) if m)


def _write_atomic(path: str, write) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _meta(model: nnx.Module, rows_per_sequence: int | None, seed: int,
          store_dtype: str) -> dict[str, Any]:
  c = model.config
  relu = [i for i, layer in enumerate(model.layers) if _is_relu_mlp(layer)]
  return {"variant": c.variant, "num_layers": c.num_layers, "d_model": c.d_model,
          "num_heads": c.num_heads, "num_groups": c.num_kv_heads, "head_dim": c.head_dim,
          "d_ff": c.d_ff, "relu_layers": relu, "rows_per_sequence": rows_per_sequence,
          "seed": seed, "store_dtype": store_dtype}


def read_meta(directory: str) -> dict[str, Any]:
  """The meta.json of a collection directory."""
  path = os.path.join(directory, META_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{directory=} holds no {META_FILE} (not a collection directory)")
  with open(path) as f:
    return json.load(f)


def _unpack_batch(batch: Any) -> tuple[np.ndarray, np.ndarray | None]:
  if isinstance(batch, dict):
    return np.asarray(batch["tokens"]), batch.get("segment_ids")
  if isinstance(batch, (tuple, list)):
    if len(batch) != 2:
      raise ValueError("a batch must be tokens, (tokens, segment_ids) or a dict")
    return np.asarray(batch[0]), batch[1]
  return np.asarray(batch), None


def collect(model: nnx.Module, batches: Iterable[Any], directory: str, *,
            rows_per_sequence: int | None = None, seed: int = 0,
            store_dtype: str = "float32", progress: bool = True) -> dict[str, int]:
  """Runs the model over token batches and writes one shard per batch (module docstring).

  Args:
    model: a flashjax.models.Transformer.
    batches: token batches, each int [B, T], a (tokens, segment_ids) pair or a dict with
      "tokens" and optionally "segment_ids" (packed rows). Must be the same sequence on a
      resumed run; shard i is batch i.
    directory: output directory (created).
    rows_per_sequence: token positions sampled per sequence; None: all positions.
    seed: sampling seed (shard i uses the generator seeded by (seed, i)).
    store_dtype: "float32" or "float16" for the stored activations (scores stay float32).
    progress: show a tqdm progress bar.

  Returns:
    {"written": shards written now, "skipped": shards found complete, "rows": rows written}.
  """
  if store_dtype not in STORE_DTYPES:
    raise ValueError(f"{store_dtype=} must be one of {STORE_DTYPES}")
  if rows_per_sequence is not None and rows_per_sequence < 1:
    raise ValueError(f"{rows_per_sequence=} must be None or a positive int")
  os.makedirs(directory, exist_ok=True)
  meta = _meta(model, rows_per_sequence, seed, store_dtype)
  meta_path = os.path.join(directory, META_FILE)
  if os.path.exists(meta_path):
    existing = read_meta(directory)
    if existing != meta:
      raise ValueError(f"{directory=} holds a collection with other settings: "
                       f"{existing=} vs {meta=}")
  else:
    _write_atomic(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
  done = set(list_shards(directory))
  graphdef, state = nnx.split(model)
  total = len(batches) if hasattr(batches, "__len__") else None
  stats = {"written": 0, "skipped": 0, "rows": 0}
  dtype = np.dtype(store_dtype)
  for index, batch in enumerate(tqdm.tqdm(batches, total=total, disable=not progress,
                                          desc="collect", unit="shard")):
    if index in done:
      stats["skipped"] += 1
      continue
    tokens, segment_ids = _unpack_batch(batch)
    if tokens.ndim != 2:
      raise ValueError(f"batch {index}: tokens.shape={tokens.shape} must be [B, T]")
    rng = np.random.default_rng([seed, index])
    rows = sample_rows(rng, tokens.shape[0], tokens.shape[1], rows_per_sequence)
    flat_rows = jnp.asarray(rows[:, 0] * tokens.shape[1] + rows[:, 1])
    segments = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    records = jax.device_get(_sampled_records(graphdef, state, jnp.asarray(tokens, jnp.int32),
                                              segments, flat_rows))
    arrays = {"rows": rows}
    for layer, record in enumerate(records):
      arrays[f"attn_x.{layer}"] = np.asarray(record["attn_x"], np.float32).astype(dtype)
      arrays[f"head_norms.{layer}"] = np.asarray(record["head_norms"], np.float32)
      arrays[f"group_scores.{layer}"] = np.asarray(record["group_scores"], np.float32)
      if "fired" in record:
        arrays[f"mlp_x.{layer}"] = np.asarray(record["mlp_x"], np.float32).astype(dtype)
        arrays[f"fired.{layer}"] = np.packbits(np.asarray(record["fired"], bool), axis=-1)
    _write_atomic(shard_path(directory, index), lambda f, a=arrays: np.savez(f, **a))
    stats["written"] += 1
    stats["rows"] += rows.shape[0]
  return stats


def split_shards(shards: list[int], split: str, val_fraction: float) -> list[int]:
  """The shards of a split: the last ceil(val_fraction * n) shards (at least 1 and at most
  n - 1 when n >= 2; none when n == 1) are "val", the others "train"."""
  if split not in SPLITS:
    raise ValueError(f"{split=} must be one of {SPLITS}")
  if not 0 <= val_fraction < 1:
    raise ValueError(f"{val_fraction=} must lie in [0, 1)")
  if split == "all":
    return list(shards)
  n = len(shards)
  num_val = 0 if n < 2 else min(n - 1, max(1, math.ceil(val_fraction * n)))
  return list(shards[n - num_val:]) if split == "val" else list(shards[:n - num_val])


def load_layer(directory: str, layer: int, *, split: str = "all",
               val_fraction: float = 0.1) -> dict[str, np.ndarray]:
  """One layer's records, concatenated over the shards of a split.

  Args:
    directory: a collection directory.
    layer: layer index.
    split: "all", "train" or "val" (see `split_shards`).
    val_fraction: share of shards held out for "val".

  Returns:
    {"attn_x": float32 [N, D], "head_norms": float32 [N, Nq], "group_scores": float32 [N, G],
    "rows": int32 [N, 2]} and, for ReLU layers, "mlp_x" float32 [N, D] and "fired"
    bool [N, F].
  """
  meta = read_meta(directory)
  if not 0 <= layer < meta["num_layers"]:
    raise ValueError(f"{layer=} must lie in [0, {meta['num_layers']})")
  shards = split_shards(list_shards(directory), split, val_fraction)
  if not shards:
    raise ValueError(f"{directory=} has no shards in {split=}")
  names = ["attn_x", "head_norms", "group_scores"]
  relu = layer in meta["relu_layers"]
  if relu:
    names += ["mlp_x", "fired"]
  parts = {name: [] for name in names + ["rows"]}
  for index in shards:
    with np.load(shard_path(directory, index)) as shard:
      parts["rows"].append(shard["rows"])
      for name in names:
        parts[name].append(shard[f"{name}.{layer}"])
  out = {name: np.concatenate(values) for name, values in parts.items()}
  for name in ("attn_x", "mlp_x"):
    if name in out:
      out[name] = out[name].astype(np.float32)
  if relu:
    out["fired"] = np.unpackbits(out["fired"], axis=-1, count=meta["d_ff"]).astype(bool)
  return out
