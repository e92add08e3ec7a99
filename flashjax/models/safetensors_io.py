"""Reading and writing the safetensors format with numpy only (no `safetensors` package).

Layout of a file: an unsigned 64-bit little-endian header size N, N bytes of UTF-8 JSON
(`{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__":
{str: str}}`, padded with spaces), then the raw little-endian tensor bytes; offsets are
relative to the first byte after the header.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"), "I64": np.dtype("<i8"), "U64": np.dtype("<u8"),
    "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str) -> tuple[dict, int]:
  """(header dict, byte offset of the data buffer) of a safetensors file."""
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) != 8:
      raise ValueError(f"{path=} is too short for a safetensors file")
    (size,) = struct.unpack("<Q", prefix)
    if size > _MAX_HEADER:
      raise ValueError(f"{path=}: header size {size} is implausible (not safetensors?)")
    header = json.loads(f.read(size).decode("utf-8"))
  if not isinstance(header, dict):
    raise ValueError(f"{path=}: header is not a JSON object")
  return header, 8 + size


def load_file(path: str) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as numpy arrays (bfloat16 via ml_dtypes).

  Args:
    path: the .safetensors file.

  Returns:
    name -> array (a copy, not a view of the file).
  """
  header, start = read_header(path)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=start)
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _DTYPES.get(info.get("dtype"))
    if dtype is None:
      raise ValueError(f"{path=}: tensor {name!r} has unsupported dtype={info.get('dtype')!r}")
    shape = tuple(int(d) for d in info["shape"])
    begin, end = (int(o) for o in info["data_offsets"])
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not 0 <= begin <= end <= data.shape[0] or end - begin != nbytes:
      raise ValueError(f"{path=}: tensor {name!r} data_offsets={[begin, end]} do not hold "
                       f"{shape=} of {info['dtype']} (buffer {data.shape[0]} bytes)")
    tensors[name] = np.array(data[begin:end].view(dtype).reshape(shape))
  return tensors


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors to a safetensors file (header padded to 8 bytes).

  Args:
    tensors: name -> numpy array of a supported dtype.
    path: output file (written to a temporary name, then renamed).
    metadata: optional str -> str map stored as "__metadata__".
  """
  header: dict = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  arrays = []
  offset = 0
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype not in _NAMES:
      raise ValueError(f"tensor {name!r} has unsupported dtype={array.dtype}")
    array = array.astype(dtype, copy=False)
    header[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    arrays.append(array)
    offset += array.nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
  encoded += b" " * (-len(encoded) % 8)
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for array in arrays:
      f.write(array.tobytes())
  os.replace(tmp, path)
