"""Byte-level language-model data: the Python standard library's source files.

Every machine with Python has the corpus offline: the `*.py` files under
`sysconfig.get_paths()["stdlib"]` (site-packages excluded). One file is one document,
tokenised as BOS + its bytes + EOS. Documents are ordered by a CRC32 of their relative path
(a fixed pseudo-random order); the first `val_fraction` of them (at least one) are held out
for validation. Each split is concatenated and cut into rows of `row_len` tokens with
segment ids (one id per document), so a model given the ids never attends across documents;
a document cut by a row boundary continues in the next row as a new segment.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import sysconfig
import zlib
from collections.abc import Sequence

import numpy as np

BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258  # 256 byte values + BOS + EOS
_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")


def encode(text: str | bytes) -> np.ndarray:
  """int32 byte tokens of text (UTF-8), without BOS / EOS."""
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  return np.frombuffer(data, np.uint8).astype(np.int32)


def decode(tokens: Sequence[int] | np.ndarray) -> str:
  """Text of byte tokens; BOS / EOS and ids >= 256 are dropped, bad UTF-8 replaced."""
  ids = np.asarray(tokens).reshape(-1)
  return bytes(ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tolist()).decode(
      "utf-8", errors="replace")


def stdlib_root() -> str:
  """Directory of the running Python's standard library sources."""
  return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[str]:
  """Relative paths of the *.py files under root (default: the stdlib), sorted.

  Args:
    root: directory to scan; site-packages / dist-packages / __pycache__ are skipped.

  Returns:
    Paths relative to root.
  """
  root = stdlib_root() if root is None else root
  found = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in _EXCLUDED_DIRS)
    found.extend(os.path.relpath(os.path.join(directory, f), root) for f in files
                 if f.endswith(".py"))
  return sorted(found)


@dataclasses.dataclass(frozen=True)
class PackedSplit:
  """Documents packed into fixed-length rows.

  Attributes:
    tokens: int32 [R, row_len].
    segment_ids: int32 [R, row_len], >= 1, one id per document.
    num_documents: documents packed.
    num_bytes: source bytes of those documents.
  """

  tokens: np.ndarray
  segment_ids: np.ndarray
  num_documents: int
  num_bytes: int

  @property
  def num_rows(self) -> int:
    return self.tokens.shape[0]


def pack_documents(documents: Sequence[np.ndarray], row_len: int) -> PackedSplit:
  """Concatenates BOS + doc + EOS of every document and cuts the stream into rows.

  Args:
    documents: int token arrays (no BOS / EOS).
    row_len: tokens per row.

  Returns:
    PackedSplit; the last incomplete row is dropped.
  """
  if row_len < 2:
    raise ValueError(f"{row_len=} must be >= 2")
  pieces, ids = [], []
  for index, doc in enumerate(documents):
    doc = np.asarray(doc, np.int32)
    pieces.append(np.concatenate([[BOS_ID], doc, [EOS_ID]]).astype(np.int32))
    ids.append(np.full(doc.size + 2, index + 1, np.int32))
  total = sum(p.size for p in pieces)
  rows = total // row_len
  if rows == 0:
    raise ValueError(f"{len(documents)} documents hold {total} tokens, fewer than one row "
                     f"({row_len=})")
  stream = np.concatenate(pieces)[:rows * row_len].reshape(rows, row_len)
  segments = np.concatenate(ids)[:rows * row_len].reshape(rows, row_len)
  num_bytes = sum(int(np.asarray(d).size) for d in documents)
  return PackedSplit(stream, segments, len(documents), num_bytes)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Train and validation splits of the packed stdlib corpus."""

  train: PackedSplit
  val: PackedSplit
  root: str
  python_version: str

  def summary(self) -> dict[str, int | str]:
    return {"corpus_root": self.root, "python_version": self.python_version,
            "train_documents": self.train.num_documents, "train_bytes": self.train.num_bytes,
            "train_rows": self.train.num_rows, "val_documents": self.val.num_documents,
            "val_bytes": self.val.num_bytes, "val_rows": self.val.num_rows}


def load_stdlib_corpus(row_len: int, *, val_fraction: float = 0.05,
                       max_bytes: int | None = None, root: str | None = None) -> Corpus:
  """Loads, splits and packs the standard-library corpus (module docstring).

  Args:
    row_len: tokens per packed row.
    val_fraction: share of documents held out (at least one document).
    max_bytes: stop adding documents (in CRC32 order) once this many source bytes are
      taken; None: all.
    root: directory to read instead of the stdlib (tests).

  Returns:
    Corpus with train and val PackedSplits.
  """
  if not 0 < val_fraction < 1:
    raise ValueError(f"{val_fraction=} must lie in (0, 1)")
  root = stdlib_root() if root is None else root
  paths = sorted(stdlib_files(root), key=lambda p: (zlib.crc32(p.encode()), p))
  documents, total = [], 0
  for path in paths:
    if max_bytes is not None and total >= max_bytes:
      break
    with open(os.path.join(root, path), "rb") as f:
      doc = encode(f.read())
    documents.append(doc)
    total += doc.size
  if len(documents) < 2:
    raise ValueError(f"{root=} gave {len(documents)} documents; need at least 2")
  num_val = min(len(documents) - 1, max(1, round(val_fraction * len(documents))))
  version = ".".join(map(str, sys.version_info[:3]))
  return Corpus(train=pack_documents(documents[num_val:], row_len),
                val=pack_documents(documents[:num_val], row_len), root=root,
                python_version=version)


def sample_rows(split: PackedSplit, step: int, batch_size: int,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The training batch of a step: rows drawn uniformly with a generator seeded by (seed,
  step), so a resumed run sees the same batches.

  Args:
    split: packed rows.
    step: training step.
    batch_size: rows per batch.
    seed: data seed.

  Returns:
    (tokens, segment_ids), each int32 [batch_size, row_len].
  """
  rng = np.random.default_rng([seed, step])
  rows = rng.integers(0, split.num_rows, size=batch_size)
  return split.tokens[rows], split.segment_ids[rows]
