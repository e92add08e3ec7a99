"""Autotuned attention block sizes: tuning keys, JSON caches per device kind, the search.

A Pallas attention backend picks its tiles (`BlockSizes`) with a heuristic. This module keeps
measured better choices in JSON files and finds them again for a call (issue 4):
`lookup` maps a call's shape to the recorded `BlockSizes` (or None: use the heuristic),
`search` times candidate `BlockSizes` with a caller's timing function, `record` / `save`
merge results into a file. The study that fills the files is `configs/tune_attention.py`
(experiment kind `experiments/attention_tune.py`); docs/autotune.md is the user guide.

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

Files: `<dir>/<device slug>.json` (slug of "NVIDIA H200": "nvidia_h200"), where <dir> is
`$FLASHJAX_TUNING_DIR` or `~/.cache/flashjax/tuning` (the user cache, written by the study),
and the packaged defaults `flashjax/ops/attention/tuned/<slug>.json` (shipped with the
wheel). A file is

  {"format": "flashjax-attention-tuning", "version": 1,
   "entries": [{"key": {...}, "block_sizes": {"block_q": 128, ...}, "ms": 1.2, ...}, ...]}

with one entry per key (extra entry fields, e.g. the heuristic's time, are kept as written).

Lookup order: an exact key in the user file, an exact key in the packaged file, then the
nearest entry of either file with the same backend, device kind, dtype, head dim, causal
flag and group, by the distance |dlog2 q_len| + |dlog2 kv_len| + |dlog2 density| (a None
density on either side adds 0); ties go to the user file, then to the denser entry. No such
entry: None. `FLASHJAX_AUTOTUNE=0` (or false / off / no) turns lookup off, as does the
`disabled()` context. Files are parsed once per (path, mtime, size) and lookups are cached in
the process; a malformed file raises ValueError naming the file.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import fcntl
import functools
import itertools
import json
import math
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashjax import masks as masks_lib
from flashjax.masks.block_mask import EMPTY, BlockMask
from flashjax.ops.attention import configs
from flashjax.ops.attention.configs import BlockSizes

ENV_ENABLE = "FLASHJAX_AUTOTUNE"
ENV_DIR = "FLASHJAX_TUNING_DIR"
DEFAULT_DIR = os.path.join("~", ".cache", "flashjax", "tuning")
PACKAGED_DIR = pathlib.Path(__file__).resolve().parent / "tuned"
FILE_FORMAT = "flashjax-attention-tuning"
FILE_VERSION = 1
KEY_FIELDS = ("backend", "device_kind", "dtype", "head_dim", "causal", "density", "q_len",
              "kv_len", "group")
LENGTH_RANGE = (128, 131072)
DENSITY_MIN = 1 / 64
DENSITY_TILE = 128
# Backends with a search space (`candidates`).
TUNABLE = ("pallas_mosaic_gpu", "pallas_triton")
_MAX_ERROR_CHARS = 400

_disabled = contextvars.ContextVar("flashjax_autotune_disabled", default=False)


# ----------------------------------------------------------------------------------------
# Keys.


def bucket_length(n: int) -> int:
  """Sequence-length bucket: the next power of two, clamped to LENGTH_RANGE."""
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"sequence length {n=} must be a positive int")
  lo, hi = LENGTH_RANGE
  return min(hi, max(lo, configs.pow2_ceil(int(n))))


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
  return configs.padded_head_dim(int(head_dim))


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


def tuning_dir() -> pathlib.Path:
  """The user cache directory: $FLASHJAX_TUNING_DIR, else ~/.cache/flashjax/tuning."""
  return pathlib.Path(os.path.expanduser(os.environ.get(ENV_DIR) or DEFAULT_DIR))


def user_file(device_kind: str) -> pathlib.Path:
  """The user cache file of a device kind (may not exist)."""
  return tuning_dir() / f"{device_slug(device_kind)}.json"


def packaged_file(device_kind: str) -> pathlib.Path:
  """The packaged defaults of a device kind (may not exist)."""
  return PACKAGED_DIR / f"{device_slug(device_kind)}.json"


# ----------------------------------------------------------------------------------------
# BlockSizes <-> JSON.


def block_sizes_to_dict(sizes: BlockSizes) -> dict[str, Any]:
  """The fields of `sizes` that are not None."""
  return {f.name: getattr(sizes, f.name) for f in dataclasses.fields(sizes)
          if getattr(sizes, f.name) is not None}


def block_sizes_from_dict(fields: Mapping[str, Any]) -> BlockSizes:
  """BlockSizes from a dict of its fields (missing ones take the dataclass defaults)."""
  if not isinstance(fields, Mapping):
    raise ValueError(f"block sizes must be a JSON object: {fields=}")
  known = {f.name for f in dataclasses.fields(BlockSizes)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"unknown BlockSizes fields {unknown} in {dict(fields)}")
  return BlockSizes(**fields)


def describe(sizes: BlockSizes | None) -> str:
  """Short label, e.g. "128x64 w4 s3 persistent"; "heuristic" for None."""
  if sizes is None:
    return "heuristic"
  parts = [f"{sizes.block_q}x{sizes.block_kv}"]
  if sizes.block_q_bwd is not None or sizes.block_kv_bwd is not None:
    parts.append(f"bwd {sizes.bwd_q}x{sizes.bwd_kv}")
  if sizes.num_warps is not None:
    parts.append(f"w{sizes.num_warps}")
  if sizes.num_stages is not None:
    parts.append(f"s{sizes.num_stages}")
  if sizes.persistent is not None:
    parts.append("persistent" if sizes.persistent else "grid")
  return " ".join(parts)


# ----------------------------------------------------------------------------------------
# Files.


def _validate_entry(entry: Any, where: str) -> tuple[str, dict[str, Any]]:
  """(key string, entry) of a file or caller entry; ValueError naming `where` otherwise."""
  if not isinstance(entry, Mapping):
    raise ValueError(f"{where}: an entry must be a JSON object, got {entry!r:.200}")
  key = entry.get("key")
  if not isinstance(key, Mapping) or set(key) != set(KEY_FIELDS):
    raise ValueError(f"{where}: entry key must have exactly the fields {KEY_FIELDS}, got "
                     f"{key!r:.300}")
  try:
    block_sizes_from_dict(entry.get("block_sizes"))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: bad block_sizes in entry {key_string(key)}: {e}") from e
  return key_string(key), dict(entry)


def _parse(path: str, text: str) -> dict[str, dict[str, Any]]:
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"tuning file {path} is not valid JSON: {e}") from e
  if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
    raise ValueError(f"tuning file {path} is not a {FILE_FORMAT!r} file (no such 'format')")
  if data.get("version") != FILE_VERSION:
    raise ValueError(f"tuning file {path} has version {data.get('version')!r}; this "
                     f"flashjax reads version {FILE_VERSION}")
  entries = data.get("entries")
  if not isinstance(entries, list):
    raise ValueError(f"tuning file {path}: 'entries' must be a list")
  out = {}
  for i, entry in enumerate(entries):
    name, entry = _validate_entry(entry, f"tuning file {path}, entry {i}")
    out[name] = entry
  return out


@functools.lru_cache(maxsize=32)
def _read_cached(path: str, mtime_ns: int, size: int) -> dict[str, dict[str, Any]]:
  del mtime_ns, size  # only invalidate the cache
  with open(path) as f:
    return _parse(path, f.read())


def _signature(path: pathlib.Path) -> tuple[int, int] | None:
  try:
    stat = path.stat()
  except FileNotFoundError:
    return None
  return stat.st_mtime_ns, stat.st_size


def load_entries(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
  """Entries of a tuning file by key string ({} when the file does not exist).

  Args:
    path: the JSON file.

  Returns:
    A new dict key string -> entry (the entries are shared: do not modify them).

  Raises:
    ValueError: the file is malformed (the message names it).
  """
  path = pathlib.Path(path)
  sig = _signature(path)
  return {} if sig is None else dict(_read_cached(str(path), *sig))


def make_entry(key: Mapping[str, Any], block_sizes: BlockSizes, ms: float | None = None,
               **extra: Any) -> dict[str, Any]:
  """An entry for `record` / `save`: key, block sizes, time, the time of recording, extras."""
  entry = {"key": {name: key[name] for name in KEY_FIELDS},
           "block_sizes": block_sizes_to_dict(block_sizes), "ms": ms,
           "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="seconds")}
  entry.update(extra)
  return entry


def save(entries: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
  """Merges entries into a tuning file, atomically; same key: the new entry replaces it.

  The existing file is read under an exclusive lock (`<path>.lock`), so concurrent writers
  do not lose each other's entries; the result is written to a temporary file in the same
  directory and moved over the old one with os.replace (readers see the old or the new file,
  never a partial one). A malformed existing file is left alone (ValueError).

  Args:
    entries: entries as made by `make_entry` (validated).
    path: the JSON file (created with its directory when missing).
  """
  path = pathlib.Path(path)
  new = dict(_validate_entry(e, f"entry for {path}") for e in entries)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(f"{path}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    merged = {}
    if path.exists():
      merged = _parse(str(path), path.read_text())
    merged.update(new)
    data = {"format": FILE_FORMAT, "version": FILE_VERSION,
            "entries": [merged[name] for name in sorted(merged)]}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
      with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise
  clear_cache()


def record(entry: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
  """Merges one entry into a tuning file (`save` of one entry)."""
  save([entry], path)


# ----------------------------------------------------------------------------------------
# Lookup.


def enabled() -> bool:
  """False under `disabled()` or when $FLASHJAX_AUTOTUNE is 0 / false / off / no."""
  if _disabled.get():
    return False
  return os.environ.get(ENV_ENABLE, "1").strip().lower() not in ("0", "false", "off", "no")


@contextlib.contextmanager
def disabled() -> Iterator[None]:
  """Context in which `lookup` returns None (e.g. to time the heuristic)."""
  token = _disabled.set(True)
  try:
    yield
  finally:
    _disabled.reset(token)


def clear_cache() -> None:
  """Forgets parsed files and cached lookups (`save` calls it)."""
  _read_cached.cache_clear()
  _lookup_cached.cache_clear()


def _log2_distance(a: float | None, b: float | None) -> float:
  if a is None or b is None:
    return 0.0
  return abs(math.log2(a) - math.log2(b))


@functools.lru_cache(maxsize=1024)
def _lookup_cached(name: str, files: tuple[tuple[str, tuple[int, int] | None], ...]
                   ) -> BlockSizes | None:
  key = json.loads(name)
  sources = [{} if sig is None else _read_cached(path, *sig) for path, sig in files]
  for entries in sources:  # exact key, user file first
    if name in entries:
      return block_sizes_from_dict(entries[name]["block_sizes"])
  same = ("backend", "device_kind", "dtype", "head_dim", "causal", "group")
  best, best_rank = None, None
  for rank, entries in enumerate(sources):
    for other_name, entry in entries.items():
      other = entry["key"]
      if any(other[f] != key[f] for f in same):
        continue
      distance = (_log2_distance(key["q_len"], other["q_len"])
                  + _log2_distance(key["kv_len"], other["kv_len"])
                  + _log2_distance(key["density"], other["density"]))
      order = (distance, rank, -(other["density"] or 0.0), other_name)
      if best_rank is None or order < best_rank:
        best, best_rank = entry, order
  return None if best is None else block_sizes_from_dict(best["block_sizes"])


def lookup(backend: str, *, device_kind: str, dtype: Any, head_dim: int, q_len: int,
           kv_len: int, causal: bool, density: float | None, group: int
           ) -> BlockSizes | None:
  """Recorded BlockSizes for a call, or None (module docstring: order and distance).

  Args:
    backend: implementation name.
    device_kind: `jax.devices()[0].device_kind`.
    dtype: input dtype.
    head_dim: D.
    q_len: T.
    kv_len: S.
    causal: whether no query attends a later key.
    density: fraction of non-empty 128 x 128 tiles, or None when unknown.
    group: Nq // Nkv.

  Returns:
    The user file's or the packaged file's BlockSizes for the exact or nearest key, or None
    when lookup is disabled or no entry matches.

  Raises:
    ValueError: a tuning file is malformed (the message names it).
  """
  if not enabled():
    return None
  key = make_key(backend, device_kind=device_kind, dtype=dtype, head_dim=head_dim,
                 q_len=q_len, kv_len=kv_len, causal=causal, density=density, group=group)
  paths = (user_file(device_kind), packaged_file(device_kind))
  return _lookup_cached(key_string(key), tuple((str(p), _signature(p)) for p in paths))


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


def tuned_block_sizes(backend: str, query: jax.Array, key: jax.Array, *, mask: Any = None,
                      is_causal: bool = False, q_segment_ids: jax.Array | None = None,
                      interpret: bool = False) -> BlockSizes | None:
  """`lookup` for a backend call: the key's fields from the call's arguments.

  Args:
    backend: implementation name.
    query: [B, T, Nq, D] (shape and dtype only; may be a tracer).
    key: [B, S, Nkv, D].
    mask: the backend's mask argument.
    is_causal: the call's is_causal.
    q_segment_ids: the call's query segment ids or None.
    interpret: interpret mode: never tuned (returns None), so CPU tests keep their tiles.

  Returns:
    The recorded BlockSizes, or None (interpret mode, a BlockMask, which fixes the tiles,
    lookup disabled, or no entry).
  """
  if interpret or isinstance(mask, BlockMask) or not enabled():
    return None
  q_len, kv_len = query.shape[1], key.shape[1]
  causal, density = mask_features(mask, q_len, kv_len, is_causal=is_causal,
                                  has_segment_ids=q_segment_ids is not None)
  return lookup(backend, device_kind=jax.devices()[0].device_kind, dtype=query.dtype,
                head_dim=query.shape[3], q_len=q_len, kv_len=kv_len, causal=causal,
                density=density, group=max(1, query.shape[2] // key.shape[2]))


# ----------------------------------------------------------------------------------------
# Search.


def candidates(backend: str, head_dim: int) -> list[BlockSizes]:
  """The search space of a backend.

  pallas_mosaic_gpu: block_q {64, 128} x block_kv {64, 128} x num_stages {2, 3} x
  persistent {False, True} (block_kv 64 only when the padded D > 128: a 128-key ring slot
  of D = 256 overflows shared memory); other shared-memory overflows are left to the backend
  (ValueError, skipped by `search`). pallas_triton: block_q {64, 128} x block_kv
  {32, 64, 128} x num_warps {4, 8} x num_stages {2, 3}.

  Args:
    backend: one of TUNABLE.
    head_dim: D.

  Returns:
    The candidate BlockSizes (forward tiles; backward tiles left to the backend).
  """
  dp = padded_head_dim(head_dim)
  if backend == "pallas_mosaic_gpu":
    kvs = (64, 128) if dp <= 128 else (64,)
    return [BlockSizes(block_q=q, block_kv=kv, num_stages=s, persistent=p)
            for q, kv, s, p in itertools.product((64, 128), kvs, (2, 3), (False, True))]
  if backend == "pallas_triton":
    return [BlockSizes(block_q=q, block_kv=kv, num_warps=w, num_stages=s)
            for q, kv, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))]
  raise ValueError(f"{backend=} has no search space; tunable: {TUNABLE}")


def _error_text(error: BaseException) -> str:
  text = f"{type(error).__name__}: {error}".strip()
  return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " ..."


def search(candidate_sizes: Sequence[BlockSizes], time_fn: Callable[[BlockSizes], float], *,
           key: Mapping[str, Any] | None = None,
           skip: tuple[type[BaseException], ...] = (Exception,)
           ) -> tuple[BlockSizes, list[dict[str, Any]]]:
  """Times every candidate and returns the fastest.

  Args:
    candidate_sizes: BlockSizes to try, in order (ties keep the first).
    time_fn: fn(block_sizes) -> milliseconds (e.g. a median), raising for a candidate the
      backend cannot run.
    key: the tuning key, named in the error when no candidate runs.
    skip: exception types that mark a candidate as failed (its error text is kept) instead
      of stopping the search; the default skips any Exception (ValueError for tiles the
      backend refuses, NotImplementedError, XlaRuntimeError / JaxRuntimeError for shared
      memory overflows at compile time, Pallas lowering errors).

  Returns:
    (best BlockSizes, rows): one row per candidate, {"block_sizes": dict, "label": str,
    "ms": float or None, "error": str or None}.

  Raises:
    ValueError: no candidates.
    RuntimeError: no candidate ran; the message lists every candidate's error.
  """
  if not candidate_sizes:
    raise ValueError(f"no candidates to search ({key=})")
  rows = []
  for sizes in candidate_sizes:
    row = {"block_sizes": block_sizes_to_dict(sizes), "label": describe(sizes), "ms": None,
           "error": None}
    try:
      ms = float(time_fn(sizes))
      if not math.isfinite(ms) or ms <= 0:
        raise ValueError(f"time_fn returned {ms} ms")
      row["ms"] = ms
    except skip as e:
      row["error"] = _error_text(e)
    rows.append(row)
  ok = [(row["ms"], i) for i, row in enumerate(rows) if row["ms"] is not None]
  if not ok:
    errors = "; ".join(f"{row['label']}: {row['error']}" for row in rows)
    name = key_string(key) if key is not None else None
    raise RuntimeError(f"no candidate ran (key {name}): {errors}")
  return candidate_sizes[min(ok)[1]], rows
