"""Mask families of the studies, built from the public constructors of flashjax.masks.

A family is a named way to draw a (T, S) mask: "causal", "sliding_window", "document"
(random packed documents), "prefix_lm", "tree" (random parents), "medusa" (MEDUSA candidate
trees), "medusa_padded" (one parent-only tree padded, as the binary block masking paper sets
it), "longformer_global" (window plus the paper's global tokens), "random_blocks" (whole
random tiles at a target block density), "permuted_band" (a band relabelled by one random
permutation, for RCM), ... `build(family, ...)` draws one; the random families take a numpy
generator, and the same generator state gives the same mask. The pieces behind them
(`document_ids`, `random_blocks`, `medusa_tree`, `random_tree`, `random_global_tokens`,
`permuted_band`) are usable on their own.

This module sits after `builders` in the layering of flashjax.masks (it imports only the
public `flashjax.masks.masks` constructors).
"""

from __future__ import annotations

import math

import numpy as np

from flashjax.masks import masks

FAMILIES = ("dense", "causal", "sliding_window", "document", "prefix_lm", "tree",
            "random_banded", "dilated", "global", "document_full", "random_blocks", "medusa",
            "medusa_padded", "longformer_global", "permuted_band")
# Families defined on a square (T == S) sequence.
SQUARE_FAMILIES = ("document", "document_full", "prefix_lm", "tree", "medusa",
                   "medusa_padded", "longformer_global", "permuted_band")
DOC_LEN_DISTS = ("uniform", "lognormal")


def document_ids(rng: np.random.Generator, batch: int, length: int, mean_len: int,
                 dist: str = "uniform") -> np.ndarray:
  """int32 [B, T] document ids of random packed documents (0, 1, 2, ... along each row).

  Args:
    rng: numpy generator.
    batch: B.
    length: T.
    mean_len: mean document length.
    dist: "uniform": lengths uniform in [1, 2 * mean_len); "lognormal": an ALPACA-like
      skewed distribution (log-normal, sigma 0.75, mean `mean_len`, at least 1).

  Returns:
    The ids.
  """
  if dist not in DOC_LEN_DISTS:
    raise ValueError(f"{dist=} must be 'uniform' or 'lognormal'")
  for name, value in (("batch", batch), ("length", length), ("doc_len (mean_len)", mean_len)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name}={value!r} must be an int >= 1")
  ids = np.empty((batch, length), np.int32)
  for b in range(batch):
    if dist == "uniform":
      lengths = rng.integers(1, 2 * mean_len, size=length)
    else:
      sigma = 0.75
      mu = math.log(mean_len) - sigma**2 / 2  # E[exp(N(mu, sigma))] = mean_len
      lengths = np.maximum(1, np.rint(rng.lognormal(mu, sigma, size=length)))
    ends = np.cumsum(lengths)
    ids[b] = np.searchsorted(ends, np.arange(length), side="right")
  return ids


def random_blocks(q_len: int, kv_len: int, block_q: int, block_kv: int, density: float,
                  rng: np.random.Generator) -> masks.Mask:
  """A mask of whole random tiles: round(density * tiles) of the block_q x block_kv tiles.

  Every row of tiles gets at least one (no query without keys: peers disagree on empty
  rows), so the block density is at least 1 / cdiv(S, block_kv).

  Args:
    q_len: T.
    kv_len: S.
    block_q: tile rows of the pattern.
    block_kv: tile columns of the pattern.
    density: target fraction of non-empty tiles, in (0, 1].
    rng: numpy generator (the seed of the pattern).

  Returns:
    A flashjax.masks Mask of shape (T, S) whose tiles at (block_q, block_kv) are FULL or
    EMPTY (edge tiles clipped to T and S).
  """
  if not 0 < density <= 1:
    raise ValueError(f"{density=} must lie in (0, 1]")
  nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
  grid = np.zeros((nq, nk), bool)
  grid[np.arange(nq), rng.integers(0, nk, size=nq)] = True
  extra = max(0, round(density * nq * nk) - nq)
  free = np.flatnonzero(~grid)
  grid.flat[rng.choice(free, size=extra, replace=False)] = True
  dense = np.repeat(np.repeat(grid, block_q, 0), block_kv, 1)
  return masks.from_dense(dense[:q_len, :kv_len])


def medusa_tree(length: int, heads: int, topk: int) -> masks.Mask:
  """Tree attention over MEDUSA candidate trees filling `length` tokens.

  One candidate tree has `topk` children per node down to depth `heads` (one level per
  MEDUSA head), in breadth-first order; the sequence is copies of it back to back (the last
  one cut). Each node attends to itself and all its ancestors in its own copy.

  Args:
    length: T = S.
    heads: tree depth (MEDUSA heads).
    topk: predictions kept per head.

  Returns:
    A flashjax.masks Mask of shape (T, T).
  """
  if heads < 1 or topk < 1:
    raise ValueError(f"need heads >= 1 and topk >= 1: {heads=}, {topk=}")
  parents = [-1]  # the root: the last accepted token
  level = [0]
  for _ in range(heads):
    children = []
    for node in level:
      for _ in range(topk):
        parents.append(node)
        children.append(len(parents) - 1)
    level = children
  size = len(parents)
  rows, cols = [], []
  for node in range(size):
    ancestor = node
    while ancestor >= 0:
      rows.append(node)
      cols.append(ancestor)
      ancestor = parents[ancestor]
  rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
  starts = np.arange(0, length, size)
  all_rows = (starts[:, None] + rows[None]).ravel()
  all_cols = (starts[:, None] + cols[None]).ravel()
  keep = all_rows < length  # ancestors precede their nodes, so cols < length too
  return masks.CoordinateMask(length, length, all_rows[keep], all_cols[keep])


def medusa_nodes(heads: int, topk: int) -> int:
  """Nodes of one MEDUSA candidate tree without its root: topk + topk**2 + ... + topk**heads."""
  if heads < 1 or topk < 1:
    raise ValueError(f"need heads >= 1 and topk >= 1: {heads=}, {topk=}")
  return sum(topk**level for level in range(1, heads + 1))


def medusa_depth(length: int, topk: int) -> int:
  """The deepest MEDUSA tree (heads) whose nodes (`medusa_nodes`) fit in `length` tokens."""
  if topk < 1 or length < topk:
    raise ValueError(f"no MEDUSA tree of {topk=} fits {length=} tokens (need length >= topk)")
  heads = 1
  while medusa_nodes(heads + 1, topk) <= length:
    heads += 1
  return heads


def medusa_padded(length: int, heads: int | None, topk: int) -> masks.Mask:
  """One parent-only MEDUSA candidate tree, padded to `length` tokens (Sharma & Geiping 2024).

  The tree has `topk` children per node down to depth `heads`, in breadth-first order,
  without its root (the last accepted token): node k's parent is k // topk - 1, and the
  first `topk` nodes (the root's children) have none. Node k attends to itself and its
  parent only (`masks.tree`), not to its further ancestors. The tokens after the tree are
  padding; each attends to itself only (the paper's padding rows are empty; a diagonal
  keeps every row non-empty, at the cost of the padding's diagonal tiles).

  Args:
    length: T = S, at least the tree's nodes.
    heads: tree depth (MEDUSA heads); None: the deepest that fits (`medusa_depth`).
    topk: predictions kept per head (children per node).

  Returns:
    A flashjax.masks Mask of shape (T, T).
  """
  if heads is None:
    heads = medusa_depth(length, topk)
  nodes = medusa_nodes(heads, topk)
  if nodes > length:
    raise ValueError(f"a MEDUSA tree of {heads=}, {topk=} has {nodes} nodes > {length=}")
  parents = np.full(length, -1, np.int64)
  k = np.arange(nodes)
  parents[:nodes] = k // topk - 1
  return masks.tree(parents)


def longformer_global(length: int, window: int, rng: np.random.Generator) -> masks.Mask:
  """LongFormer window plus global tokens as Sharma & Geiping (2024) set them.

  A symmetric window of `window` keys on each side, the first two tokens global, and
  log2(length) - 2 more global tokens drawn from the rest (a global token attends to every
  key and every query attends to it).

  Args:
    length: T = S, at least 4.
    window: keys per side.
    rng: numpy generator for the extra global positions.

  Returns:
    A flashjax.masks Mask of shape (T, T).
  """
  if length < 4:
    raise ValueError(f"{length=} must be >= 4 (two fixed global tokens, log2(T) - 2 more)")
  extra = int(math.log2(length)) - 2
  drawn = rng.choice(np.arange(2, length), size=min(extra, length - 2), replace=False)
  global_ids = np.sort(np.concatenate([[0, 1], drawn])).astype(np.int64)
  return masks.global_tokens(length, length, window, global_ids)


def prefix_lengths_from_fraction(ids: np.ndarray, fraction: float) -> np.ndarray:
  """int32 [B, num_ids]: round(fraction * length) of each document of `ids` ([B, T])."""
  if not 0 <= fraction <= 1:
    raise ValueError(f"prefix {fraction=} must lie in [0, 1]")
  num_ids = int(ids.max()) + 1
  lengths = np.stack([np.bincount(row, minlength=num_ids) for row in ids])
  return np.rint(fraction * lengths).astype(np.int32)


def random_tree(length: int, span: int, rng: np.random.Generator) -> masks.Mask:
  """`masks.tree` over random parents: node i attends to itself and its parent, drawn
  uniformly from the `span` nodes before it (node 0 is the root).

  Args:
    length: T = S.
    span: how far back a parent may be, >= 1.
    rng: numpy generator.

  Returns:
    A flashjax.masks Mask of shape (T, T).
  """
  if span < 1:
    raise ValueError(f"{span=} must be >= 1")
  parents = np.array([-1] + [int(rng.integers(max(0, i - span), i))
                             for i in range(1, length)], np.int32)
  return masks.tree(parents)


def permuted_band(length: int, window: int, rng: np.random.Generator) -> masks.Mask:
  """A symmetric band |i - j| <= window with both axes relabelled by one random permutation.

  Query p(a) may attend key p(b) exactly when |a - b| <= window, for a random permutation p
  of 0..length-1: the band's pairs, scattered over the whole T x S grid, so nearly every tile
  is non-empty. The mask is a band in disguise, the case Reverse Cuthill-McKee reordering
  should undo (its ordering recovers a bandwidth near `window`, and the tile density falls
  to about a band's). Every row keeps its diagonal.

  Args:
    length: T = S.
    window: half width of the band (>= 0).
    rng: numpy generator of the permutation.
  """
  if window < 0:
    raise ValueError(f"{window=} must be >= 0")
  perm = rng.permutation(length)
  a = np.repeat(np.arange(length), 2 * window + 1)
  b = a + np.tile(np.arange(-window, window + 1), length)
  keep = (b >= 0) & (b < length)
  return masks.CoordinateMask(length, length, perm[a[keep]], perm[b[keep]])


def random_global_tokens(q_len: int, kv_len: int, window: int, num_global: int,
                         rng: np.random.Generator) -> masks.Mask:
  """`masks.global_tokens` with `num_global` distinct random global positions below q_len."""
  if not 0 <= num_global <= q_len:
    raise ValueError(f"{num_global=} must lie in [0, {q_len=}]")
  global_ids = np.sort(rng.choice(q_len, size=num_global, replace=False)).astype(np.int32)
  return masks.global_tokens(q_len, kv_len, window, global_ids)


def build(family: str, q_len: int, kv_len: int, rng: np.random.Generator, *,
          batch: int = 1, window: int = 128, window_right: int = 0, doc_len: int = 128,
          doc_len_dist: str = "uniform", tree_span: int = 16, band_peak: float = 0.5,
          band_decay: float = 0.01, band_floor: float = 2e-4, band_symmetric: bool = False,
          dilation: int = 2, num_global: int = 4, block_q: int = 128, block_kv: int = 128,
          block_density: float = 0.25, medusa_heads: int | None = 4,
          medusa_topk: int = 3, prefix_frac: float | None = None) -> masks.Mask | None:
  """One mask of `family` at (T, S) (None for "dense"), drawn with `rng`.

  Args:
    family: one of FAMILIES.
    q_len: T.
    kv_len: S (== T for SQUARE_FAMILIES).
    rng: numpy generator for the random families (left untouched by the others).
    batch: B of the families with a batch axis ("document", "document_full", "prefix_lm").
    window: left window of "sliding_window", "dilated" and "global"; the band's half width
      of "permuted_band".
    window_right: right window of "sliding_window".
    doc_len: mean document length ("document", "document_full", "prefix_lm"); prefix-LM
      prefixes are uniform in [0, doc_len) unless `prefix_frac` is set.
    doc_len_dist: "uniform" or "lognormal" (see `document_ids`).
    tree_span: "tree": how far back a parent may be.
    band_peak, band_decay, band_floor, band_symmetric: "random_banded"
      (`masks.random_banded`'s peak, decay, floor, symmetric).
    dilation: "dilated".
    num_global: "global": random global tokens.
    block_q, block_kv: "random_blocks": tiles of the pattern.
    block_density: "random_blocks": target fraction of non-empty tiles.
    medusa_heads, medusa_topk: "medusa" (see `medusa_tree`) and "medusa_padded" (see
      `medusa_padded`; heads None: the deepest tree that fits T).
    prefix_frac: "prefix_lm": each document's prefix is round(prefix_frac * its length)
      (None: uniform in [0, doc_len)).

  Returns:
    A flashjax.masks Mask of shape (T, S) or (B, 1, T, S), or None for "dense".

  Raises:
    ValueError: an unknown family, T != S for a square family, bad parameters.
  """
  t, s = q_len, kv_len
  if family not in FAMILIES:
    raise ValueError(f"unknown mask family {family=}; known: {FAMILIES}")
  if family in SQUARE_FAMILIES and t != s:
    raise ValueError(f"{family=} needs q_len == kv_len: {t=}, {s=}")
  if family == "dense":
    return None
  if family == "causal":
    return masks.causal(t, s)
  if family == "sliding_window":
    return masks.sliding_window(t, s, window, window_right)
  if family in ("document", "document_full", "prefix_lm"):
    ids = document_ids(rng, batch, t, doc_len, doc_len_dist)
    if family != "prefix_lm":
      return masks.document(ids, causal=family == "document")
    num_docs = int(ids.max()) + 1
    if prefix_frac is not None:
      return masks.prefix_lm(ids, prefix_lengths_from_fraction(ids, prefix_frac))
    prefix = rng.integers(0, doc_len, size=(batch, num_docs)).astype(np.int32)
    return masks.prefix_lm(ids, prefix)
  if family == "tree":
    return random_tree(t, tree_span, rng)
  if family == "medusa":
    return medusa_tree(t, medusa_heads, medusa_topk)
  if family == "medusa_padded":
    return medusa_padded(t, medusa_heads, medusa_topk)
  if family == "longformer_global":
    return longformer_global(t, window, rng)
  if family == "random_blocks":
    return random_blocks(t, s, block_q, block_kv, block_density, rng)
  if family == "random_banded":
    return masks.random_banded(t, s, seed=int(rng.integers(2**31)), peak=band_peak,
                               decay=band_decay, floor=band_floor, symmetric=band_symmetric)
  if family == "dilated":
    return masks.dilated(t, s, window, dilation)
  if family == "permuted_band":
    return permuted_band(t, window, rng)
  return random_global_tokens(t, s, window, num_global, rng)
