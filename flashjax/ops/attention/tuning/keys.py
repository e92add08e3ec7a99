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

Devices of one GPU architecture share entries when a device kind has none of its own
(store.py). `device_architecture` names the architecture of a device kind ("sm90" for
Hopper): from the device's compute capability when the caller has the device (jax GPU
devices have `compute_capability`, e.g. "9.0"), else from the name by `KNOWN_DEVICES`.
`device_family` and `device_sm_count` (the same table) rank the other device kinds of an
architecture by how close they are to the caller's (`device_distance`).
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


# ----------------------------------------------------------------------------------------
# Device kinds: architecture, family, SM count.

# (family, architecture, SM count by variant) of known NVIDIA device kinds. A device kind
# belongs to a family when its name (or file slug), lower-cased, contains the family as a
# token: not preceded or followed by a letter or digit, so "NVIDIA H100 80GB HBM3",
# "NVIDIA H100 NVL", "nvidia_h100_pcie" are H100, "NVIDIA H20" is not H200, and
# "NVIDIA GH200 480GB" is GH200, not H200. Variants are further tokens of the name; "" is
# every other name of the family. SM counts are the published ones of each part.
KNOWN_DEVICES: tuple[tuple[str, str, tuple[tuple[str, int], ...]], ...] = (
    # Hopper, compute capability 9.0.
    ("gh200", "sm90", (("", 132),)),
    ("h100", "sm90", (("pcie", 114), ("", 132))),  # SXM, NVL: 132
    ("h200", "sm90", (("", 132),)),  # SXM, NVL
    ("h800", "sm90", (("pcie", 114), ("", 132))),
    ("h20", "sm90", (("", 78),)),
    # Ampere (8.0) and Blackwell (10.0): no tables yet; named so that they never borrow
    # Hopper entries however their names are spelled.
    ("a100", "sm80", (("", 108),)),
    ("a800", "sm80", (("", 108),)),
    ("a30", "sm80", (("", 56),)),
    ("gb200", "sm100", ()),
    ("b200", "sm100", ()),
    ("b100", "sm100", ()),
)


def _has_token(name: str, token: str) -> bool:
  return re.search(rf"(?<![a-z0-9]){re.escape(token)}(?![a-z0-9])", name) is not None


@functools.lru_cache(maxsize=256)
def _known_device(device_kind: str):
  if not isinstance(device_kind, str) or not device_kind:
    raise ValueError(f"{device_kind=} must be a non-empty string")
  name = device_kind.lower()
  for family, architecture, variants in KNOWN_DEVICES:
    if _has_token(name, family):
      return family, architecture, variants, name
  return None


def architecture_from_capability(compute_capability: str) -> str:
  """"9.0" -> "sm90" (a jax GPU device's `compute_capability`; a suffix as in "9.0a" is
  ignored)."""
  match = re.fullmatch(r"\s*(\d+)\.(\d+)[a-z]*\s*", str(compute_capability))
  if match is None:
    raise ValueError(f"{compute_capability=} is not a compute capability like '9.0'")
  return f"sm{int(match.group(1))}{int(match.group(2))}"


def device_architecture(device_kind: str, compute_capability: str | None = None
                        ) -> str | None:
  """The GPU architecture of a device kind, e.g. "sm90" for any Hopper part; None unknown.

  Args:
    device_kind: `jax.devices()[0].device_kind` or a file slug ("nvidia_h200").
    compute_capability: the device's `compute_capability` ("9.0") when known; it wins over
      the name.

  Returns:
    "sm<major><minor>" from the compute capability, else from `KNOWN_DEVICES` by name
    (any name with an H100, H200, H800, H20 or GH200 token is "sm90"), else None (CPUs,
    TPUs, GPUs not in the table).
  """
  if compute_capability is not None and str(compute_capability).strip():
    return architecture_from_capability(compute_capability)
  known = _known_device(device_kind)
  return None if known is None else known[1]


def device_family(device_kind: str) -> str | None:
  """The family token of a known device kind ("NVIDIA H100 80GB HBM3" -> "h100"), or None."""
  known = _known_device(device_kind)
  return None if known is None else known[0]


def device_sm_count(device_kind: str) -> int | None:
  """The SM count of a known device kind by its name (KNOWN_DEVICES), or None."""
  known = _known_device(device_kind)
  if known is None:
    return None
  _, _, variants, name = known
  for variant, count in variants:
    if not variant or _has_token(name, variant):
      return count
  return None


def device_distance(device_kind: str, other_kind: str, *, sm_count: int | None = None
                    ) -> tuple[int, int]:
  """How far `other_kind`'s tuned tiles are from `device_kind`'s, for ordering fallbacks.

  (0 when both have the same, known SM count else 1, 0 when both are of the same known
  family else 1): lower is closer; the SM count comes first because it sets the number of
  programs of a persistent grid.

  Args:
    device_kind: the caller's device kind.
    other_kind: the device kind of a tuning entry.
    sm_count: the caller's SM count when the device is at hand (a jax GPU device's
      `core_count`); else the table's.
  """
  mine = sm_count if sm_count is not None else device_sm_count(device_kind)
  theirs = device_sm_count(other_kind)
  family = device_family(device_kind)
  return (0 if mine is not None and mine == theirs else 1,
          0 if family is not None and family == device_family(other_kind) else 1)


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
