"""Tuning keys: which calls share a measured entry.

Tuning key (`make_key`), a JSON object; lengths and densities are bucketed so that one
measurement serves nearby shapes:

  backend      "pallas_mosaic_gpu", "pallas_triton", ...
  device_kind  `jax.devices()[0].device_kind`, e.g. "NVIDIA H200"
  dtype        dtype name of the inputs, e.g. "bfloat16"
  head_dim     D as the kernels pad it: the next power of two, at least 16
  causal       True when no query may attend a later key: `is_causal`, or a Mask whose
               ElementRule band has hi <= 0 and no prefix (causal, causal window, causal
               documents)
  density      block density bucket: the fraction of non-empty 128 x 128 tiles
               (`DENSITY_TILE`), rounded to the nearest power of two in log2 and clamped to
               [1/64, 1] (dense 1, causal ~1/2, documents of 512 in 4k ~1/8); None when
               unknown at trace time (segment ids or a bool array)
  q_len        T rounded up to a power of two, clamped to [128, 131072] (`LENGTH_RANGE`)
  kv_len       S, bucketed as q_len
  group        GQA group size Nq // Nkv

`key_string` is the canonical text of a key (the identity of an entry in a file, store.py);
`device_slug` names a device kind's file; `mask_features` derives `causal` and `density`
from a call's mask arguments.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from flashjax import masks as masks_lib
from flashjax.masks.block_mask import EMPTY
from flashjax.ops.attention.block_sizes import padded_head_dim as _padded_head_dim
from flashjax.ops.tiling import pow2_ceil

KEY_FIELDS = ("backend", "device_kind", "dtype", "head_dim", "causal", "density", "q_len",
              "kv_len", "group")
LENGTH_RANGE = (128, 131072)
DENSITY_MIN = 1 / 64
DENSITY_TILE = 128


def bucket_length(n: int) -> int:
  """Sequence-length bucket: the next power of two, clamped to LENGTH_RANGE."""
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"sequence length {n=} must be a positive int")
  lo, hi = LENGTH_RANGE
  return min(hi, max(lo, pow2_ceil(int(n))))


def bucket_density(density: float | None) -> float | None:
  """Block-density bucket: the nearest power of two (in log2) in [1/64, 1]; None stays None."""
  if density is None:
    return None
  if not 0 <= density <= 1:
    raise ValueError(f"{density=} must lie in [0, 1] or be None")
  if density <= DENSITY_MIN:
    return DENSITY_MIN
  return 2.0 ** max(math.log2(DENSITY_MIN), round(math.log2(density)))


def padded_head_dim(head_dim: int) -> int:
  """D as the Pallas kernels pad it: the next power of two, at least 16."""
  if not isinstance(head_dim, (int, np.integer)) or head_dim < 1:
    raise ValueError(f"{head_dim=} must be a positive int")
  return _padded_head_dim(int(head_dim))


def make_key(backend: str, *, device_kind: str, dtype: Any, head_dim: int, q_len: int,
             kv_len: int, causal: bool, density: float | None, group: int) -> dict[str, Any]:
  """The tuning key of a call (module docstring: fields and buckets).

  Args:
    backend: implementation name, e.g. "pallas_mosaic_gpu".
    device_kind: `jax.devices()[0].device_kind`, e.g. "NVIDIA H200".
    dtype: input dtype (anything `jnp.dtype` accepts).
    head_dim: D (unpadded).
    q_len: T.
    kv_len: S.
    causal: whether no query attends a later key.
    density: fraction of non-empty 128 x 128 tiles, or None when unknown.
    group: Nq // Nkv.

  Returns:
    The key as a dict with the KEY_FIELDS.
  """
  if not isinstance(backend, str) or not backend:
    raise ValueError(f"{backend=} must be a non-empty string")
  if not isinstance(device_kind, str) or not device_kind:
    raise ValueError(f"{device_kind=} must be a non-empty string")
  if not isinstance(group, (int, np.integer)) or group < 1:
    raise ValueError(f"{group=} must be a positive int")
  return {"backend": backend, "device_kind": device_kind, "dtype": jnp.dtype(dtype).name,
          "head_dim": padded_head_dim(head_dim), "causal": bool(causal),
          "density": bucket_density(density), "q_len": bucket_length(q_len),
          "kv_len": bucket_length(kv_len), "group": int(group)}


def key_string(key: Mapping[str, Any]) -> str:
  """Canonical JSON text of a key (sorted fields): the identity of an entry in a file."""
  return json.dumps({name: key[name] for name in KEY_FIELDS}, sort_keys=True)


def device_slug(device_kind: str) -> str:
  """File name stem of a device kind: "NVIDIA H200" -> "nvidia_h200"."""
  slug = re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_")
  if not slug:
    raise ValueError(f"{device_kind=} gives an empty file name")
  return slug


@functools.lru_cache(maxsize=64)
def _causal_nonempty(q_len: int, kv_len: int) -> np.ndarray:
  """bool [nq, nk]: the non-empty 128 x 128 tiles of the causal mask (read-only)."""
  kinds = masks_lib.causal(q_len, kv_len).block_kinds(DENSITY_TILE, DENSITY_TILE)
  return np.asarray(kinds) != EMPTY


def mask_features(mask: Any, q_len: int, kv_len: int, *, is_causal: bool = False,
                  has_segment_ids: bool = False) -> tuple[bool, float | None]:
  """(causal, block density) of a call's mask, the key's `causal` and `density` inputs.

  Args:
    mask: None, a flashjax.masks Mask, a BlockMask or a bool array (as the backends get it).
    q_len: T.
    kv_len: S.
    is_causal: the call's is_causal.
    has_segment_ids: whether the call passes segment ids (their layout is unknown here).

  Returns:
    causal: is_causal, or a Mask whose rule is a causal band without prefix.
    density: fraction of non-empty 128 x 128 tiles of the mask (AND causal when is_causal);
      None for segment ids, bool arrays and BlockMasks (unknown when tracing).
  """
  causal = bool(is_causal)
  if isinstance(mask, masks_lib.Mask):
    rule = mask.rule()
    causal = causal or (rule is not None and rule.band.hi is not None and rule.band.hi <= 0
                        and rule.kv_in_prefix is None)
  if has_segment_ids or (mask is not None and not isinstance(mask, masks_lib.Mask)):
    return causal, None
  if mask is None:
    return causal, float(np.mean(_causal_nonempty(q_len, kv_len))) if is_causal else 1.0
  if mask.shape[-2:] != (q_len, kv_len):
    return causal, None  # the backend reports the shape mismatch
  # Host-side tile kinds, memoised per Mask object (as the backends' BlockMasks are).
  nonempty = np.asarray(mask.block_kinds(DENSITY_TILE, DENSITY_TILE)) != EMPTY
  if is_causal:
    nonempty = nonempty & _causal_nonempty(q_len, kv_len)
  return causal, float(np.mean(nonempty))
