"""Hardware-aware Transformer search (HAT) on flashjax models (docs/search.md).

  space         SearchSpace, Arch: the design space (elastic width, depth, per-layer FFN
                and heads), gene encoding, normalised features
  supernet      SuperTransformer (NNX), SuperTrainer: weight-shared SubTransformers as
                front slices of the super weights, bucketed jitted steps, train_supernet
  latency       trimmed-mean measuring protocol, prefill / decode latency of a
                SubTransformer, analytic cost counts, the resumable JSONL dataset
  predictor     MLP latency predictor (optax), linear cost baseline, RMSE / MAPE / R^2
  evolution     evolutionary search under a constraint, Pareto fronts
  kernel_choice the same machinery for Pallas attention block sizes
"""

from flashjax.search import evolution
from flashjax.search import kernel_choice
from flashjax.search import latency
from flashjax.search import predictor
from flashjax.search import space
from flashjax.search import supernet
from flashjax.search.space import Arch
from flashjax.search.space import SearchSpace
from flashjax.search.supernet import SuperTrainer
from flashjax.search.supernet import SuperTransformer

__all__ = ["Arch", "SearchSpace", "SuperTrainer", "SuperTransformer", "evolution",
           "kernel_choice", "latency", "predictor", "space", "supernet"]
