"""SuperTransformer: one set of weights shared by every SubTransformer of a SearchSpace.

  supernet = SuperTransformer(space, base_config, rngs=nnx.Rngs(0))
  trainer = SuperTrainer(supernet, OptimizerConfig(peak_lr=3e-3))
  trainer.train_step(arch, tokens, segment_ids, lr)      # one sampled SubTransformer
  trainer.evaluate(arch, val_tokens, val_ids, batch_size) # weight-shared validation loss
  model = trainer.sub_model(arch)                         # a flashjax Transformer of arch

The super weights are those of a flashjax `Transformer` at the space's maxima (width
D = max embed, L_max layers, F_max FFN units and N_max heads of `head_dim` per layer). A
SubTransformer is the project's own `Transformer` (built with per-layer Blocks of its own FFN
width and head count) whose every parameter is the front slice of the super parameter at the
same tree path: `q_proj[:d, :n_l, :]`, `gate[:d, :f_l]`, `down[:f_l, :d]`, `embed[:, :d]`,
norms `[:d]`, layers 0..L-1. No copy is kept: the slices are taken inside the jitted step
(`materialize`), so gradients flow into the slices and are zero everywhere else.

Compilation (bucketing). A step is jitted per static shape. Two plans:

* "bucket" (training and evaluation): the shape is only (embed_dim, num_layers); every layer
  keeps F_max FFN units and N_max heads, and the architecture's per-layer widths enter as
  traced 0/1 masks multiplied into the sliced weights (FFN units beyond f_l: gate / up
  columns and down rows zero, so they add exactly 0; heads beyond n_l: q / k / v / o and
  their biases zero, so they add exactly 0). The loss equals the exact SubTransformer's, and
  the masked weights get zero gradient. Compiles are bounded by |embed_dims| x
  |layer_counts| (per step function), whatever the number of per-layer combinations.
* "exact": the real sliced shapes (one compile per architecture), used where the shape
  itself is measured: latency (prefill / decode) of a SubTransformer.

Plans are cached per process (`plan`), so a repeated shape never recompiles.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flashjax.models import data
from flashjax.models import training
from flashjax.models.cache import KVCache
from flashjax.models.config import TransformerConfig
from flashjax.models.transformer import Block
from flashjax.models.transformer import Transformer
from flashjax.search.space import Arch
from flashjax.search.space import SearchSpace


def super_config(space: SearchSpace, base: TransformerConfig) -> TransformerConfig:
  """`base` (variant, vocabulary, max_len, dtypes, implementations) at the space's maxima."""
  if not isinstance(space, SearchSpace):
    raise ValueError(f"space must be a SearchSpace, got {type(space).__name__}")
  if not isinstance(base, TransformerConfig):
    raise ValueError(f"base must be a TransformerConfig, got {type(base).__name__}")
  return sub_config(base, space.largest, space.head_dim)


def sub_config(base: TransformerConfig, arch: Arch, head_dim: int) -> TransformerConfig:
  """The uniform config of a SubTransformer (per-layer widths at the arch's layer maxima)."""
  heads = max(arch.head_counts)
  return dataclasses.replace(base, d_model=arch.embed_dim, num_layers=arch.num_layers,
                             num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
                             d_ff=max(arch.ffn_dims))


def build_sub_transformer(base: TransformerConfig, arch: Arch, head_dim: int, *,
                          rngs: nnx.Rngs) -> Transformer:
  """A freshly initialised flashjax Transformer of `arch` (layer i: its own d_ff and heads).

  Args:
    base: variant, vocabulary, dtypes and implementations (shape fields are replaced).
    arch: the architecture.
    head_dim: width of every head.
    rngs: random streams.
  """
  config = sub_config(base, arch, head_dim)
  model = Transformer(config, rngs=rngs)
  model.layers = nnx.List([
      Block(dataclasses.replace(config, num_heads=h, num_kv_heads=h, d_ff=f), rngs=rngs)
      for f, h in zip(arch.ffn_dims, arch.head_counts)])
  return model


def init_sub_cache(arch: Arch, head_dim: int, batch_size: int, max_len: int,
                   dtype: Any) -> KVCache:
  """An empty KV cache of a SubTransformer ([B, max_len, n_l, head_dim] for layer l)."""
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"{batch_size=} must be a positive int")
  if not isinstance(max_len, int) or max_len < 1:
    raise ValueError(f"{max_len=} must be a positive int")
  shapes = [(batch_size, max_len, h, head_dim) for h in arch.head_counts]
  return KVCache(keys=tuple(jnp.zeros(s, dtype) for s in shapes),
                 values=tuple(jnp.zeros(s, dtype) for s in shapes),
                 lengths=jnp.zeros((batch_size,), jnp.int32))


def bucket_of(space: SearchSpace, arch: Arch) -> Arch:
  """The compiled shape of `arch` under the "bucket" plan: its width and depth, every layer
  at the space's FFN and head maxima."""
  n = arch.num_layers
  return Arch(arch.embed_dim, (space.ffn_dims[-1],) * n, (space.head_counts[-1],) * n)


def masks(space: SearchSpace, arch: Arch) -> tuple[np.ndarray, np.ndarray]:
  """float32 masks of `arch` in its bucket: FFN units [L, F_max] and heads [L, N_max]."""
  space.check(arch)
  ffn = (np.arange(space.ffn_dims[-1])[None] < np.asarray(arch.ffn_dims)[:, None])
  heads = (np.arange(space.head_counts[-1])[None] < np.asarray(arch.head_counts)[:, None])
  return ffn.astype(np.float32), heads.astype(np.float32)


def _abstract(base: TransformerConfig, arch: Arch, head_dim: int):
  model = nnx.eval_shape(lambda: build_sub_transformer(base, arch, head_dim,
                                                       rngs=nnx.Rngs(0)))
  return nnx.split(model, nnx.Param)


def _leaves(tree: Any) -> list[tuple[Any, Any]]:
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def _layer_index(path: tuple[Any, ...]) -> int | None:
  keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  return keys[keys.index("layers") + 1] if "layers" in keys else None


def _differing_axis(a: tuple[int, ...], b: tuple[int, ...]) -> int | None:
  axes = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
  if len(axes) > 1:
    raise ValueError(f"parameter shapes {a} and {b} differ in more than one axis")
  return axes[0] if axes else None


class Plan:
  """The static structure of one compiled SubTransformer shape (hashable by identity; one
  object per shape through `plan`).

  Attributes:
    arch: the compiled shape (for "bucket" plans, the bucket).
    graphdef: nnx graph of the Transformer of that shape.
    abstract: its parameter State of ShapeDtypeStructs.
    mask_axes: for "bucket" plans, per leaf (layer, FFN axis or None, head axis or None).
  """

  def __init__(self, arch: Arch, graphdef: Any, abstract: Any,
               mask_axes: list[tuple[int | None, int | None, int | None]] | None):
    self.arch = arch
    self.graphdef = graphdef
    self.abstract = abstract
    self.mask_axes = mask_axes


_PLANS: dict[tuple[Any, ...], Plan] = {}


def plan(base: TransformerConfig, space: SearchSpace, arch: Arch, kind: str = "bucket") -> Plan:
  """The cached Plan of `arch`: kind "bucket" (shape (embed, layers), per-layer widths as
  masks) or "exact" (the real sliced shapes)."""
  if kind not in ("bucket", "exact"):
    raise ValueError(f"kind={kind!r} must be 'bucket' or 'exact'")
  space.check(arch)
  shape = bucket_of(space, arch) if kind == "bucket" else arch
  key = (base, space, kind, shape)
  if key in _PLANS:
    return _PLANS[key]
  graphdef, abstract = _abstract(base, shape, space.head_dim)
  mask_axes = None
  if kind == "bucket":
    n = shape.num_layers
    wider_ffn = Arch(shape.embed_dim, (space.ffn_dims[-1] + 1,) * n, shape.head_counts)
    more_heads = Arch(shape.embed_dim, shape.ffn_dims, (space.head_counts[-1] + 1,) * n)
    ffn_leaves = _leaves(_abstract(base, wider_ffn, space.head_dim)[1])
    head_leaves = _leaves(_abstract(base, more_heads, space.head_dim)[1])
    mask_axes = []
    for (path, leaf), (_, f), (_, h) in zip(_leaves(abstract), ffn_leaves, head_leaves):
      mask_axes.append((_layer_index(path), _differing_axis(leaf.shape, f.shape),
                        _differing_axis(leaf.shape, h.shape)))
  _PLANS[key] = Plan(shape, graphdef, abstract, mask_axes)
  return _PLANS[key]


def _mask_along(leaf: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  shape = [1] * leaf.ndim
  shape[axis] = mask.shape[0]
  return leaf * mask.reshape(shape).astype(leaf.dtype)


def materialize(p: Plan, super_params: Any, ffn_mask: Any = None, head_mask: Any = None
                ) -> Any:
  """The SubTransformer parameters of plan `p`: front slices of `super_params` (the super
  Transformer's nnx.Param State) at the same paths, masked per layer for bucket plans.

  Args:
    p: a Plan.
    super_params: the SuperTransformer's parameter State.
    ffn_mask: bucket plans: float [L, F_max] (see `masks`).
    head_mask: bucket plans: float [L, N_max].

  Returns:
    A parameter State for `nnx.merge(p.graphdef, ...)`.
  """
  super_leaves = dict(_leaves(super_params))
  paths, treedef = jax.tree_util.tree_flatten_with_path(p.abstract)
  out = []
  for index, (path, leaf) in enumerate(paths):
    if path not in super_leaves:
      raise ValueError(f"the super parameters have no entry {jax.tree_util.keystr(path)}")
    value = super_leaves[path][tuple(slice(0, s) for s in leaf.shape)]
    if p.mask_axes is not None:
      layer, ffn_axis, head_axis = p.mask_axes[index]
      if ffn_axis is not None:
        value = _mask_along(value, ffn_mask[layer], ffn_axis)
      if head_axis is not None:
        value = _mask_along(value, head_mask[layer], head_axis)
    out.append(value)
  return jax.tree_util.tree_unflatten(treedef, out)


def _loss(p: Plan, params, ffn_mask, head_mask, tokens, segment_ids):
  model = nnx.merge(p.graphdef, materialize(p, params, ffn_mask, head_mask))
  loss_sum, count = training.next_token_loss(model, tokens, segment_ids)
  return loss_sum / jnp.maximum(count, 1.0), count


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def _train_step(p, tx, params, opt_state, ffn_mask, head_mask, tokens, segment_ids, lr):
  (loss, count), grads = jax.value_and_grad(_loss, argnums=1, has_aux=True)(
      p, params, ffn_mask, head_mask, tokens, segment_ids)
  opt_state.hyperparams["learning_rate"] = lr
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads),
                             "targets": count}


@functools.partial(jax.jit, static_argnums=0)
def _eval_step(p, params, ffn_mask, head_mask, tokens, segment_ids):
  model = nnx.merge(p.graphdef, materialize(p, params, ffn_mask, head_mask))
  return training.next_token_loss(model, tokens, segment_ids)


def sub_loss_and_grads(p: Plan, super_params: Any, arch_masks: Any, tokens: Any,
                       segment_ids: Any) -> tuple[jax.Array, Any]:
  """Mean next-token loss of a SubTransformer and its gradient w.r.t. the super params."""
  ffn_mask, head_mask = arch_masks if arch_masks is not None else (None, None)
  (loss, _), grads = jax.value_and_grad(_loss, argnums=1, has_aux=True)(
      p, super_params, ffn_mask, head_mask, jnp.asarray(tokens), jnp.asarray(segment_ids))
  return loss, grads


class SuperTransformer(nnx.Module):
  """The shared weights: a flashjax Transformer at the space's maxima (`transformer`)."""

  def __init__(self, space: SearchSpace, base: TransformerConfig, *, rngs: nnx.Rngs):
    """Builds the super model.

    Args:
      space: the design space.
      base: variant, vocabulary, max_len, dtypes and attention / decode implementations of
        every SubTransformer (its shape fields are replaced by the space's).
      rngs: random streams.
    """
    self.space = space
    self.base = base
    self.config = super_config(space, base)
    self.transformer = Transformer(self.config, rngs=rngs)


class SuperTrainer(training.Trainer):
  """Super parameters, AdamW state and the per-shape jitted steps of sampled SubTransformers.

  A flashjax.models.training.Trainer of the super Transformer (`state`, `load_state` and
  `model` are its own) whose steps train and evaluate one SubTransformer.
  """

  def __init__(self, supernet: SuperTransformer, config: training.OptimizerConfig):
    if not isinstance(supernet, SuperTransformer):
      raise ValueError(f"supernet must be a SuperTransformer, got {type(supernet).__name__}")
    super().__init__(supernet.transformer, config)
    self.space = supernet.space
    self.base = supernet.base
    self.shapes: set[Arch] = set()  # compiled bucket shapes of this trainer

  def _bucket(self, arch: Arch) -> tuple[Plan, tuple[jax.Array, jax.Array]]:
    p = plan(self.base, self.space, arch, "bucket")
    self.shapes.add(p.arch)
    ffn, heads = masks(self.space, arch)
    return p, (jnp.asarray(ffn), jnp.asarray(heads))

  def train_step(  # pylint: disable=arguments-differ
      self, arch: Arch, tokens: Any, segment_ids: Any, lr: float) -> dict[str, jax.Array]:
    """One AdamW step of SubTransformer `arch` on packed rows [B, T + 1]."""
    p, (ffn, heads) = self._bucket(arch)
    self.params, self.opt_state, metrics = _train_step(
        p, self.tx, self.params, self.opt_state, ffn, heads, jnp.asarray(tokens),
        jnp.asarray(segment_ids), jnp.float32(lr))
    self.step += 1
    return metrics

  def precompile(self, row_len: int, *, batch_size: int | None = None,
                 eval_batch_size: int | None = None, workers: int = 1) -> list[float]:
    """Compiles the train step (with batch_size) and the evaluation step (with
    eval_batch_size) of every bucket shape ahead of time, `workers` at once in threads
    (XLA compiles without the GIL); later calls on int32 rows [batch, row_len] of those
    batch sizes reuse the compiled steps.

    Returns:
      Seconds per compiled function.
    """
    if not isinstance(workers, int) or workers < 1:
      raise ValueError(f"{workers=} must be a positive int")
    jobs = []
    for embed in self.space.embed_dims:
      for depth in self.space.layer_counts:
        p, (ffn, heads) = self._bucket(Arch(embed, (self.space.ffn_dims[-1],) * depth,
                                            (self.space.head_counts[-1],) * depth))
        if batch_size:
          rows = jax.ShapeDtypeStruct((batch_size, row_len), jnp.int32)
          jobs.append(functools.partial(
              _train_step.lower, p, self.tx, self.params, self.opt_state, ffn, heads, rows,
              rows, jnp.float32(0)))
        if eval_batch_size:
          rows = jax.ShapeDtypeStruct((eval_batch_size, row_len), jnp.int32)
          jobs.append(functools.partial(_eval_step.lower, p, self.params, ffn, heads, rows,
                                        rows))

    def compile_one(lower):
      start = time.perf_counter()
      lower().compile()
      return time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      return list(pool.map(compile_one, jobs))

  def evaluate(self, arch: Arch, tokens: np.ndarray,  # pylint: disable=arguments-differ
               segment_ids: np.ndarray, batch_size: int) -> float:
    """Mean next-token loss (nats per target) of the weight-shared SubTransformer `arch`."""
    p, (ffn, heads) = self._bucket(arch)
    total, count = 0.0, 0.0
    for start in range(0, tokens.shape[0], batch_size):
      loss_sum, n = _eval_step(p, self.params, ffn, heads,
                               jnp.asarray(tokens[start:start + batch_size]),
                               jnp.asarray(segment_ids[start:start + batch_size]))
      total += float(loss_sum)
      count += float(n)
    return total / max(count, 1.0)

  def sub_model(self, arch: Arch) -> Transformer:
    """SubTransformer `arch` as a flashjax Transformer holding the sliced super weights
    (concrete arrays: for measuring, not for training)."""
    p = plan(self.base, self.space, arch, "exact")
    return nnx.merge(p.graphdef, materialize(p, self.params))


def arch_for_step(space: SearchSpace, seed: int, step: int) -> Arch:
  """The SubTransformer trained at `step`: uniform, from a generator seeded by (seed, step), so
  a resumed run samples the same sequence."""
  return space.sample(np.random.default_rng([seed, step, 7]))


def train_supernet(trainer: SuperTrainer, train_split: Any, *, num_steps: int,
                   batch_size: int, optimizer: training.OptimizerConfig, seed: int = 0,
                   checkpointer: Any = None, checkpoint_every: int = 0,
                   log: Callable[[int, Arch, dict[str, float]], None] | None = None
                   ) -> list[dict[str, Any]]:
  """Trains the SuperTransformer from `trainer.step` to `num_steps`, one uniformly sampled
  SubTransformer per step (HAT), checkpointing every `checkpoint_every` steps and at the end.

  Args:
    trainer: the SuperTrainer (possibly restored from a checkpoint).
    train_split: a flashjax.models.data PackedSplit of rows of seq_len + 1 tokens.
    num_steps: total steps (the cosine schedule ends there).
    batch_size: rows per step.
    optimizer: the schedule's settings (the trainer's optimizer config).
    seed: data and architecture seed.
    checkpointer: None or a flashjax.models.checkpoint.Checkpointer.
    checkpoint_every: steps between checkpoints (0: only at the end).
    log: called with (step, arch, {"loss", "grad_norm", "lr"}) every step.

  Returns:
    One {"step", "arch", "loss", "lr"} per step run here.
  """
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"{num_steps=} must be a positive int")
  history = []
  for step in range(trainer.step, num_steps):
    arch = arch_for_step(trainer.space, seed, step)
    tokens, segments = data.sample_rows(train_split, step, batch_size, seed)
    lr = training.lr_schedule(step, num_steps, optimizer)
    metrics = trainer.train_step(arch, tokens, segments, lr)
    row = {"step": step, "arch": arch.name(), "loss": float(metrics["loss"]), "lr": lr}
    history.append(row)
    if log is not None:
      log(step, arch, {"loss": row["loss"], "grad_norm": float(metrics["grad_norm"]),
                       "lr": lr})
    done = trainer.step == num_steps
    if checkpointer is not None and (done or (checkpoint_every and
                                              trainer.step % checkpoint_every == 0)):
      checkpointer.save(trainer.step, trainer.state(), {"num_steps": num_steps})
  return history
