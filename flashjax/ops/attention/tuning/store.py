"""The tuning store: JSON files of measured BlockSizes per device kind, and their lookup.

Files: `<dir>/<device slug>.json` (slug of "NVIDIA H200": "nvidia_h200", keys.device_slug),
where <dir> is `$FLASHJAX_TUNING_DIR` or `~/.cache/flashjax/tuning` (the user cache, written
by the study), and the packaged defaults `flashjax/ops/attention/tuned/<slug>.json` (shipped
with the wheel: package data in pyproject.toml). A file is

  {"format": "flashjax-attention-tuning", "version": 1,
   "entries": [{"key": {...}, "block_sizes": {"block_q": 128, ...}, "ms": 1.2, ...}, ...]}

with one entry per key (keys.py; extra entry fields, e.g. the heuristic's time, are kept as
written). `save` / `record` merge entries into a file under an exclusive lock and replace it
atomically.

Lookup order (`lookup_source`; `lookup` and `tuned_block_sizes` return its BlockSizes):

  1. the caller's device kind: an exact key in its user file, an exact key in its packaged
     file, then the nearest entry of either file with the same backend, device kind, dtype,
     head dim, causal flag and group, by the distance |dlog2 q_len| + |dlog2 kv_len| +
     |dlog2 density| (a None density on either side adds 0); ties go to the user file, then
     to the denser entry. Match "exact" / "nearest".
  2. other device kinds of the same GPU architecture (keys.device_architecture: the
     device's compute capability when known, else keys.KNOWN_DEVICES by name; Hopper is
     "sm90": H100 SXM / PCIe / NVL, H200, H800, H20, GH200): every `*.json` in the user
     directory, then in the packaged directory, whose file name is of that architecture by
     the table, and in them the entries whose device kind is of it. First an entry equal
     to the key in every field but device_kind ("architecture-exact"; the closest device
     wins, then the user file), else the nearest as in 1 by (distance, closeness of the
     device, user file first, denser entry) ("architecture-nearest"). Closeness
     (keys.device_distance): the same SM count first, then the same family (H100, H200, ...).
  3. None: the backend uses its heuristic. Device kinds of unknown architecture (CPU, TPU,
     GPUs not in the table without a compute capability) stop after 1.

`FLASHJAX_AUTOTUNE=0` (or false / off / no) turns lookup off, as does the `disabled()`
context. Files are parsed once per (path, mtime, size) and lookups are cached in the process
under the key and the (path, mtime, size) of every file consulted, so a new, changed or
removed file is seen; a malformed file raises ValueError naming the file. The backends call
`tuned_block_sizes`, which builds the key from a call's arguments and the device
(`tuned_source` returns the TunedSource: file, device kind and match of the entry).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import fcntl
import functools
import json
import math
import os
import pathlib
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax

from flashjax.masks.block_mask import BlockMask
from flashjax.ops.attention.block_sizes import BlockSizes
from flashjax.ops.attention.tuning import keys

ENV_ENABLE = "FLASHJAX_AUTOTUNE"
ENV_DIR = "FLASHJAX_TUNING_DIR"
DEFAULT_DIR = os.path.join("~", ".cache", "flashjax", "tuning")
PACKAGED_DIR = pathlib.Path(__file__).resolve().parent.parent / "tuned"
FILE_FORMAT = "flashjax-attention-tuning"
FILE_VERSION = 1

_disabled = contextvars.ContextVar("flashjax_autotune_disabled", default=False)


# ----------------------------------------------------------------------------------------
# Paths.


def tuning_dir() -> pathlib.Path:
  """The user cache directory: $FLASHJAX_TUNING_DIR, else ~/.cache/flashjax/tuning."""
  return pathlib.Path(os.path.expanduser(os.environ.get(ENV_DIR) or DEFAULT_DIR))


def user_file(device_kind: str) -> pathlib.Path:
  """The user cache file of a device kind (may not exist)."""
  return tuning_dir() / f"{keys.device_slug(device_kind)}.json"


def packaged_file(device_kind: str) -> pathlib.Path:
  """The packaged defaults of a device kind (may not exist)."""
  return PACKAGED_DIR / f"{keys.device_slug(device_kind)}.json"


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


# ----------------------------------------------------------------------------------------
# Files.


def _validate_entry(entry: Any, where: str) -> tuple[str, dict[str, Any]]:
  """(key string, entry) of a file or caller entry; ValueError naming `where` otherwise."""
  if not isinstance(entry, Mapping):
    raise ValueError(f"{where}: an entry must be a JSON object, got {entry!r:.200}")
  key = entry.get("key")
  if not isinstance(key, Mapping) or set(key) != set(keys.KEY_FIELDS):
    raise ValueError(f"{where}: entry key must have exactly the fields {keys.KEY_FIELDS}, "
                     f"got {key!r:.300}")
  try:
    block_sizes_from_dict(entry.get("block_sizes"))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: bad block_sizes in entry {keys.key_string(key)}: {e}") from e
  return keys.key_string(key), dict(entry)


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
  entry = {"key": {name: key[name] for name in keys.KEY_FIELDS},
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
  _fallback_cached.cache_clear()


def _log2_distance(a: float | None, b: float | None) -> float:
  if a is None or b is None:
    return 0.0
  return abs(math.log2(a) - math.log2(b))


MATCHES = ("exact", "nearest", "architecture-exact", "architecture-nearest")
# Fields a nearest entry must share with the key (besides the device, which the two stages
# of lookup treat differently); the others are compared by distance.
_SHARED_FIELDS = ("backend", "dtype", "head_dim", "causal", "group")
_DISTANCE_FIELDS = ("q_len", "kv_len", "density")


@dataclasses.dataclass(frozen=True)
class TunedSource:
  """Which entry served a lookup (what benchmarks record next to their times).

  Attributes:
    block_sizes: the entry's BlockSizes.
    path: the tuning file that holds the entry.
    device_kind: the device kind of the entry (another one of the same architecture for
      the architecture-* matches).
    match: one of MATCHES: "exact" / "nearest" in the caller's device-kind files,
      "architecture-exact" / "architecture-nearest" in the files of another device kind of
      the same architecture.
    key: the entry's key string (keys.key_string).
  """

  block_sizes: BlockSizes
  path: str
  device_kind: str
  match: str
  key: str

  def as_dict(self) -> dict[str, Any]:
    """JSON-ready fields: block_sizes as a dict, key as an object."""
    return {"block_sizes": block_sizes_to_dict(self.block_sizes), "path": self.path,
            "device_kind": self.device_kind, "match": self.match,
            "key": json.loads(self.key)}


def _source(entry: Mapping[str, Any], path: str, match: str) -> TunedSource:
  return TunedSource(block_sizes=block_sizes_from_dict(entry["block_sizes"]), path=path,
                     device_kind=entry["key"]["device_kind"], match=match,
                     key=keys.key_string(entry["key"]))


def _distance(key: Mapping[str, Any], other: Mapping[str, Any]) -> float:
  return sum(_log2_distance(key[f], other[f]) for f in _DISTANCE_FIELDS)


def _entries(path: str, sig: tuple[int, int] | None) -> dict[str, dict[str, Any]]:
  return {} if sig is None else _read_cached(path, *sig)


@functools.lru_cache(maxsize=1024)
def _lookup_cached(name: str, files: tuple[tuple[str, tuple[int, int] | None], ...]
                   ) -> TunedSource | None:
  """Stage 1: the caller's device-kind files (user first), exact key then nearest."""
  key = json.loads(name)
  sources = [(path, _entries(path, sig)) for path, sig in files]
  for path, entries in sources:  # exact key, user file first
    if name in entries:
      return _source(entries[name], path, "exact")
  best, best_order = None, None
  for rank, (path, entries) in enumerate(sources):
    for other_name, entry in entries.items():
      other = entry["key"]
      if any(other[f] != key[f] for f in _SHARED_FIELDS + ("device_kind",)):
        continue
      order = (_distance(key, other), rank, -(other["density"] or 0.0), other_name)
      if best_order is None or order < best_order:
        best, best_order = (entry, path), order
  return None if best is None else _source(*best, "nearest")


@functools.lru_cache(maxsize=1024)
def _fallback_cached(name: str, architecture: str, sm_count: int | None,
                     files: tuple[tuple[int, str, tuple[int, int] | None], ...]
                     ) -> TunedSource | None:
  """Stage 2: entries of other device kinds of `architecture` in `files` ((rank, path,
  signature), user files rank 0, packaged rank 1); exact in every field but device_kind,
  then nearest (module docstring: order)."""
  key = json.loads(name)
  device_kind = key["device_kind"]
  exact, exact_order, nearest, nearest_order = None, None, None, None
  for rank, path, sig in files:
    for other_name, entry in _entries(path, sig).items():
      other = entry["key"]
      if (any(other[f] != key[f] for f in _SHARED_FIELDS)
          or keys.device_architecture(other["device_kind"]) != architecture):
        continue
      closeness = keys.device_distance(device_kind, other["device_kind"],
                                       sm_count=sm_count)
      distance = _distance(key, other)
      if all(other[f] == key[f] for f in _DISTANCE_FIELDS):
        order = (closeness, rank, other["device_kind"], path)
        if exact_order is None or order < exact_order:
          exact, exact_order = (entry, path), order
      else:
        order = (distance, closeness, rank, -(other["density"] or 0.0),
                 other["device_kind"], other_name, path)
        if nearest_order is None or order < nearest_order:
          nearest, nearest_order = (entry, path), order
  if exact is not None:
    return _source(*exact, "architecture-exact")
  return None if nearest is None else _source(*nearest, "architecture-nearest")


def _architecture_files(architecture: str, exclude: Iterable[pathlib.Path]
                        ) -> tuple[tuple[int, str, tuple[int, int] | None], ...]:
  """(rank, path, signature) of the user (rank 0) and packaged (rank 1) files whose name
  (device slug) is of `architecture` by keys.KNOWN_DEVICES, less `exclude`."""
  seen = {str(p) for p in exclude}
  files = []
  for rank, directory in enumerate((tuning_dir(), PACKAGED_DIR)):
    if not directory.is_dir():
      continue
    for path in sorted(directory.glob("*.json")):
      if str(path) in seen or keys.device_architecture(path.stem) != architecture:
        continue
      seen.add(str(path))
      sig = _signature(path)
      if sig is not None:  # removed since the listing
        files.append((rank, str(path), sig))
  return tuple(files)


def lookup_source(backend: str, *, device_kind: str, dtype: Any, head_dim: int,
                  q_len: int, kv_len: int, causal: bool, density: float | None, group: int,
                  compute_capability: str | None = None, sm_count: int | None = None
                  ) -> TunedSource | None:
  """The entry that serves a call, with where it came from, or None (module docstring:
  order and distance).

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
    compute_capability: the device's `compute_capability` (e.g. "9.0") when known: it sets
      the architecture whose other device kinds may serve; else keys.KNOWN_DEVICES does,
      by name.
    sm_count: the device's SM count (`core_count` of a jax GPU device) when known, to
      prefer device kinds with as many SMs; else the table's.

  Returns:
    A TunedSource, or None when lookup is disabled or no entry of this device kind or of
    another one of its architecture matches.

  Raises:
    ValueError: a tuning file is malformed (the message names it), or a bad
      compute_capability / sm_count.
  """
  if not enabled():
    return None
  if sm_count is not None and (not isinstance(sm_count, int) or isinstance(sm_count, bool)
                               or sm_count < 1):
    raise ValueError(f"{sm_count=} must be a positive int or None")
  key = keys.make_key(backend, device_kind=device_kind, dtype=dtype, head_dim=head_dim,
                      q_len=q_len, kv_len=kv_len, causal=causal, density=density,
                      group=group)
  name = keys.key_string(key)
  own = (user_file(device_kind), packaged_file(device_kind))
  found = _lookup_cached(name, tuple((str(p), _signature(p)) for p in own))
  if found is not None:
    return found
  architecture = keys.device_architecture(device_kind, compute_capability)
  if architecture is None:
    return None
  return _fallback_cached(name, architecture, sm_count,
                          _architecture_files(architecture, own))


def lookup(backend: str, *, device_kind: str, dtype: Any, head_dim: int, q_len: int,
           kv_len: int, causal: bool, density: float | None, group: int,
           compute_capability: str | None = None, sm_count: int | None = None
           ) -> BlockSizes | None:
  """Recorded BlockSizes for a call, or None: `lookup_source`'s block sizes (same args)."""
  source = lookup_source(backend, device_kind=device_kind, dtype=dtype, head_dim=head_dim,
                         q_len=q_len, kv_len=kv_len, causal=causal, density=density,
                         group=group, compute_capability=compute_capability,
                         sm_count=sm_count)
  return None if source is None else source.block_sizes


def _device_facts(device: Any) -> tuple[str, str | None, int | None]:
  """(device_kind, compute_capability, SM count) of a jax device; None where it has none
  (only GPU devices have `compute_capability` and `core_count`)."""
  if getattr(device, "platform", None) != "gpu":
    return device.device_kind, None, None
  capability = getattr(device, "compute_capability", None)
  capability = str(capability) if capability is not None and str(capability) else None
  count = getattr(device, "core_count", None)
  count = count if isinstance(count, int) and not isinstance(count, bool) and count > 0 \
      else None
  return device.device_kind, capability, count


def tuned_source(backend: str, query: jax.Array, key: jax.Array, *, mask: Any = None,
                 is_causal: bool = False, q_segment_ids: jax.Array | None = None,
                 interpret: bool = False) -> TunedSource | None:
  """`lookup_source` for a backend call on `jax.devices()[0]` (args: `tuned_block_sizes`)."""
  if interpret or isinstance(mask, BlockMask) or not enabled():
    return None
  q_len, kv_len = query.shape[1], key.shape[1]
  causal, density = keys.mask_features(mask, q_len, kv_len, is_causal=is_causal,
                                       has_segment_ids=q_segment_ids is not None)
  device_kind, capability, sm_count = _device_facts(jax.devices()[0])
  return lookup_source(backend, device_kind=device_kind, dtype=query.dtype,
                       head_dim=query.shape[3], q_len=q_len, kv_len=kv_len, causal=causal,
                       density=density, group=max(1, query.shape[2] // key.shape[2]),
                       compute_capability=capability, sm_count=sm_count)


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
    lookup disabled, or no entry). `tuned_source` says which entry it was.
  """
  source = tuned_source(backend, query, key, mask=mask, is_causal=is_causal,
                        q_segment_ids=q_segment_ids, interpret=interpret)
  return None if source is None else source.block_sizes
