"""Evolutionary search over gene vectors (HAT's loop) and Pareto fronts.

  result = evolve(gene_choices, fitness, feasible, population=125, parents=25,
                  mutations=50, crossovers=50, mutate_prob=0.3, generations=30, seed=0)
  result.best_genes, result.best_fitness, result.history   # lower fitness is better

Generation 0 is `population` random feasible gene vectors. Every generation keeps the
`parents` fittest, then adds `mutations` children (a random parent with each gene redrawn
with probability `mutate_prob`) and `crossovers` children (each gene from one of two random
parents), each child redrawn until it is feasible (the constraint, e.g. predicted latency
<= budget). Fitness values are memoised per gene vector (and may be given from an earlier,
interrupted run through `known`), so a repeated candidate is never evaluated twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

Genes = tuple[int, ...]


@dataclasses.dataclass
class EvolutionResult:
  """Outcome of `evolve`.

  Attributes:
    best_genes: the fittest feasible gene vector found.
    best_fitness: its fitness.
    history: per generation {"generation", "best_fitness", "mean_parent_fitness",
      "evaluated"} (evaluated: distinct candidates evaluated so far).
    evaluated: {genes: fitness} of every candidate evaluated.
  """

  best_genes: Genes
  best_fitness: float
  history: list[dict[str, Any]]
  evaluated: dict[Genes, float]


def _check_positive(name: str, value: Any, minimum: int = 1) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an int >= {minimum}")


def evolve(gene_choices: Sequence[int], fitness: Callable[[Genes], float],
           feasible: Callable[[Genes], bool] | None = None, *, population: int = 125,
           parents: int = 25, mutations: int = 50, crossovers: int = 50,
           mutate_prob: float = 0.3, generations: int = 30, seed: int = 0,
           max_tries: int = 1000, known: dict[Genes, float] | None = None,
           on_evaluate: Callable[[Genes, float], None] | None = None) -> EvolutionResult:
  """Minimises `fitness` over gene vectors (module docstring).

  Args:
    gene_choices: number of choices of every gene.
    fitness: genes -> value to minimise (e.g. validation loss).
    feasible: genes -> bool (the constraint); None: every vector.
    population: candidates per generation (parents + mutations + crossovers).
    parents: candidates kept per generation.
    mutations: mutated children per generation.
    crossovers: crossover children per generation.
    mutate_prob: probability of redrawing each gene of a mutated child.
    generations: generations after the initial population.
    seed: the search's random generator.
    max_tries: draws per feasible candidate before giving up (ValueError).
    known: fitness values already measured (resume).
    on_evaluate: called with (genes, fitness) after each new evaluation.
  """
  choices = tuple(int(c) for c in gene_choices)
  if not choices or any(c < 1 for c in choices):
    raise ValueError(f"gene_choices={gene_choices!r} must be positive ints")
  for name, value in (("population", population), ("parents", parents),
                      ("generations", generations), ("max_tries", max_tries)):
    _check_positive(name, value, 0 if name == "generations" else 1)
  for name, value in (("mutations", mutations), ("crossovers", crossovers)):
    _check_positive(name, value, 0)
  if parents + mutations + crossovers != population:
    raise ValueError(f"parents={parents} + mutations={mutations} + crossovers={crossovers} "
                     f"must equal population={population}")
  if not 0 <= mutate_prob <= 1:
    raise ValueError(f"{mutate_prob=} must lie in [0, 1]")
  rng = np.random.default_rng(seed)
  feasible = feasible or (lambda genes: True)
  evaluated: dict[Genes, float] = {}
  known = dict(known or {})

  def score(genes: Genes) -> float:
    if genes not in evaluated:
      if genes in known:
        evaluated[genes] = float(known[genes])
      else:
        evaluated[genes] = float(fitness(genes))
        if on_evaluate is not None:
          on_evaluate(genes, evaluated[genes])
    return evaluated[genes]

  def draw(make: Callable[[], Genes]) -> Genes:
    for _ in range(max_tries):
      genes = make()
      if feasible(genes):
        return genes
    raise ValueError(f"no feasible candidate in max_tries={max_tries} draws (is the "
                     "constraint satisfiable?)")

  def random_genes() -> Genes:
    return tuple(int(rng.integers(0, c)) for c in choices)

  def mutate(parent: Genes) -> Genes:
    return tuple(int(rng.integers(0, c)) if rng.random() < mutate_prob else g
                 for g, c in zip(parent, choices))

  def crossover(a: Genes, b: Genes) -> Genes:
    return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b))

  pop = [draw(random_genes) for _ in range(population)]
  history = []
  for generation in range(generations + 1):
    ranked = sorted(set(pop), key=lambda g: (score(g), g))
    top = ranked[:parents]
    history.append({"generation": generation, "best_fitness": score(top[0]),
                    "mean_parent_fitness": float(np.mean([score(g) for g in top])),
                    "evaluated": len(evaluated)})
    if generation == generations:
      break
    children = [draw(lambda: mutate(top[rng.integers(len(top))])) for _ in range(mutations)]
    children += [draw(lambda: crossover(top[rng.integers(len(top))],
                                        top[rng.integers(len(top))]))
                 for _ in range(crossovers)]
    pop = top + children
  best = min(evaluated, key=lambda g: (evaluated[g], g) if feasible(g) else (np.inf, g))
  return EvolutionResult(best, evaluated[best], history, evaluated)


def pareto_front(points: Sequence[tuple[float, float, Any]]) -> list[tuple[float, float, Any]]:
  """The non-dominated (cost, loss, item) points (no other point is <= in both and < in one),
  sorted by cost."""
  front = []
  best_loss = np.inf
  for cost, loss, item in sorted(points, key=lambda p: (p[0], p[1])):
    if loss < best_loss:
      front.append((cost, loss, item))
      best_loss = loss
  return front
