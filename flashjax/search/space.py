"""The design space of the hardware-aware search: elastic width, depth, per-layer FFN and heads.

  space = SearchSpace(embed_dims=(32, 64), layer_counts=(1, 2), ffn_dims=(64, 128),
                      head_counts=(2, 4), head_dim=16)
  arch = space.sample(np.random.default_rng(0))     # an Arch (one SubTransformer)
  genes = space.encode(arch); space.decode(genes) == arch
  space.features(arch)                               # normalised vector for the predictor

An `Arch` is one SubTransformer: embedding (model) width, number of layers and, per layer, the
FFN hidden width and the number of attention heads (every head has the space's fixed
`head_dim`, and each head has its own key/value head: MHA). A SubTransformer uses the first
`num_layers` layers of the SuperTransformer and the front slices of its weights.

Genes (evolution) are choice indices: [embed, layers, ffn of layer 0..L_max-1, heads of layer
0..L_max-1]; the genes of layers beyond `num_layers` are carried but inactive (as in HAT), so
a mutation that adds a layer brings them back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


def _check_choices(name: str, values: Any) -> tuple[int, ...]:
  if (not isinstance(values, Sequence) or isinstance(values, str) or not values or
      not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
              for v in values)):
    raise ValueError(f"{name}={values!r} must be a non-empty sequence of positive ints")
  values = tuple(int(v) for v in values)
  if len(set(values)) != len(values):
    raise ValueError(f"{name}={values!r} has repeated values")
  return tuple(sorted(values))


@dataclasses.dataclass(frozen=True)
class Arch:
  """One SubTransformer.

  Attributes:
    embed_dim: model width d (the front d features of every width-D weight).
    ffn_dims: FFN hidden width of each layer (one entry per layer).
    head_counts: attention heads of each layer.
  """

  embed_dim: int
  ffn_dims: tuple[int, ...]
  head_counts: tuple[int, ...]

  def __post_init__(self):
    object.__setattr__(self, "ffn_dims", tuple(int(v) for v in self.ffn_dims))
    object.__setattr__(self, "head_counts", tuple(int(v) for v in self.head_counts))
    if len(self.ffn_dims) != len(self.head_counts) or not self.ffn_dims:
      raise ValueError(f"ffn_dims={self.ffn_dims} and head_counts={self.head_counts} must be "
                       "non-empty with one entry per layer")

  @property
  def num_layers(self) -> int:
    return len(self.ffn_dims)

  def to_dict(self) -> dict[str, Any]:
    return {"embed_dim": self.embed_dim, "ffn_dims": list(self.ffn_dims),
            "head_counts": list(self.head_counts)}

  @classmethod
  def from_dict(cls, value: dict[str, Any]) -> "Arch":
    return cls(int(value["embed_dim"]), tuple(value["ffn_dims"]), tuple(value["head_counts"]))

  def name(self) -> str:
    """Short readable id, e.g. "d64-L2-f128.64-h4.2"."""
    return (f"d{self.embed_dim}-L{self.num_layers}-f{'.'.join(map(str, self.ffn_dims))}"
            f"-h{'.'.join(map(str, self.head_counts))}")


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Choices of every architecture dimension (each sorted ascending).

  Attributes:
    embed_dims: model widths.
    layer_counts: numbers of layers.
    ffn_dims: per-layer FFN hidden widths.
    head_counts: per-layer head counts.
    head_dim: width of every attention head (fixed; even for RoPE).
  """

  embed_dims: tuple[int, ...]
  layer_counts: tuple[int, ...]
  ffn_dims: tuple[int, ...]
  head_counts: tuple[int, ...]
  head_dim: int = 64

  def __post_init__(self):
    for name in ("embed_dims", "layer_counts", "ffn_dims", "head_counts"):
      object.__setattr__(self, name, _check_choices(name, getattr(self, name)))
    if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim!r} must be an even int >= 2")

  @property
  def max_layers(self) -> int:
    return self.layer_counts[-1]

  @property
  def largest(self) -> Arch:
    """The SuperTransformer's own architecture (every dimension at its maximum)."""
    n = self.max_layers
    return Arch(self.embed_dims[-1], (self.ffn_dims[-1],) * n, (self.head_counts[-1],) * n)

  @property
  def smallest(self) -> Arch:
    n = self.layer_counts[0]
    return Arch(self.embed_dims[0], (self.ffn_dims[0],) * n, (self.head_counts[0],) * n)

  @property
  def gene_choices(self) -> tuple[int, ...]:
    """Number of choices of every gene."""
    n = self.max_layers
    return ((len(self.embed_dims), len(self.layer_counts)) + (len(self.ffn_dims),) * n +
            (len(self.head_counts),) * n)

  def size(self) -> int:
    """Number of distinct architectures."""
    per_layer = len(self.ffn_dims) * len(self.head_counts)
    return len(self.embed_dims) * sum(per_layer ** n for n in self.layer_counts)

  def check(self, arch: Arch) -> Arch:
    """Raises ValueError naming the value when `arch` is not in the space."""
    if not isinstance(arch, Arch):
      raise ValueError(f"arch must be an Arch, got {type(arch).__name__}")
    if arch.embed_dim not in self.embed_dims:
      raise ValueError(f"embed_dim={arch.embed_dim} is not one of {self.embed_dims}")
    if arch.num_layers not in self.layer_counts:
      raise ValueError(f"num_layers={arch.num_layers} is not one of {self.layer_counts}")
    for f in arch.ffn_dims:
      if f not in self.ffn_dims:
        raise ValueError(f"ffn_dim={f} is not one of {self.ffn_dims}")
    for h in arch.head_counts:
      if h not in self.head_counts:
        raise ValueError(f"head_count={h} is not one of {self.head_counts}")
    return arch

  def sample_genes(self, rng: np.random.Generator) -> tuple[int, ...]:
    """Uniform genes: every dimension (and every layer's FFN and heads) drawn uniformly."""
    return tuple(int(rng.integers(0, c)) for c in self.gene_choices)

  def sample(self, rng: np.random.Generator) -> Arch:
    """A uniformly sampled SubTransformer (HAT's sampling: each choice uniform)."""
    return self.decode(self.sample_genes(rng))

  def decode(self, genes: Sequence[int]) -> Arch:
    """The Arch of a gene vector (inactive layer genes ignored)."""
    genes = tuple(int(g) for g in genes)
    choices = self.gene_choices
    if len(genes) != len(choices) or any(not 0 <= g < c for g, c in zip(genes, choices)):
      raise ValueError(f"genes={genes} must be {len(choices)} indices below {choices}")
    n_max = self.max_layers
    layers = self.layer_counts[genes[1]]
    ffn = tuple(self.ffn_dims[g] for g in genes[2:2 + layers])
    heads = tuple(self.head_counts[g] for g in genes[2 + n_max:2 + n_max + layers])
    return Arch(self.embed_dims[genes[0]], ffn, heads)

  def encode(self, arch: Arch) -> tuple[int, ...]:
    """Genes of `arch` (inactive layers get index 0)."""
    self.check(arch)
    pad = self.max_layers - arch.num_layers
    ffn = [self.ffn_dims.index(f) for f in arch.ffn_dims] + [0] * pad
    heads = [self.head_counts.index(h) for h in arch.head_counts] + [0] * pad
    return (self.embed_dims.index(arch.embed_dim),
            self.layer_counts.index(arch.num_layers), *ffn, *heads)

  def features(self, arch: Arch) -> np.ndarray:
    """HAT's architecture encoding, float32 [2 + 2 L_max] in [0, 1]: embed / max, layers /
    max, then each layer's FFN / max and heads / max (0 for absent layers)."""
    self.check(arch)
    n_max = self.max_layers
    ffn = np.zeros(n_max, np.float32)
    heads = np.zeros(n_max, np.float32)
    ffn[:arch.num_layers] = np.asarray(arch.ffn_dims) / self.ffn_dims[-1]
    heads[:arch.num_layers] = np.asarray(arch.head_counts) / self.head_counts[-1]
    head = [arch.embed_dim / self.embed_dims[-1], arch.num_layers / n_max]
    return np.concatenate([np.asarray(head, np.float32), ffn, heads])

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
