"""Language-model training: next-token loss on packed rows, AdamW, warmup + cosine.

  trainer = Trainer(model, OptimizerConfig(peak_lr=3e-3, warmup_steps=100))
  lr = lr_schedule(step, ...)
  metrics = trainer.train_step(tokens, segment_ids, lr)   # rows of T + 1 tokens
  loss = trainer.evaluate(val_tokens, val_segment_ids, batch_size=32)
  flops = train_flops_per_token(model_config, seq_len) * tokens_per_s   # achieved FLOP/s

A row of T + 1 tokens gives inputs row[:-1] and targets row[1:]; a target counts only when
it is in the same segment (document) as its input, so no token is trained to predict the
first token of the next document. The model sees the inputs' segment ids, so attention
never crosses documents.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def train_flops_per_token(config: Any, seq_len: int) -> float:
  """Training FLOPs per token: 6 per weight used in a matmul plus causal attention.

  Weights: every parameter except lookup tables (token embedding unless tied, learned
  positions). Attention: QK^T and PV are 4 * T * Nq * H FLOPs per token forward, half of
  it for causal rows, times 3 for forward + backward.

  Args:
    config: the model's TransformerConfig.
    seq_len: T, tokens per training row.

  Returns:
    FLOPs per trained token.
  """
  if seq_len < 1:
    raise ValueError(f"{seq_len=} must be >= 1")
  c = config
  lookups = (0 if c.tie_embeddings else c.vocab_size * c.d_model)
  if c.variant == "opt":
    lookups += c.max_len * c.d_model
  weights = c.num_params() - lookups
  attention = c.num_layers * 3 * 2 * seq_len * c.num_heads * c.head_dim
  return 6.0 * weights + attention


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with global-norm clipping and a warmup + cosine learning rate.

  Attributes:
    peak_lr: learning rate at the end of the warmup.
    warmup_steps: linear warmup from 0.
    final_lr_fraction: the cosine decays to peak_lr * final_lr_fraction at the last step.
    weight_decay: decoupled weight decay of matrices (ndim >= 2; norms and biases excluded).
    b1: Adam first-moment decay.
    b2: Adam second-moment decay.
    eps: Adam epsilon.
    clip_norm: gradients are rescaled to at most this global norm.
  """

  peak_lr: float = 1e-3
  warmup_steps: int = 100
  final_lr_fraction: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0

  def __post_init__(self):
    for name in ("peak_lr", "eps", "clip_norm"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
    if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      raise ValueError(f"warmup_steps={self.warmup_steps!r} must be an int >= 0")
    if not 0 <= self.final_lr_fraction <= 1:
      raise ValueError(f"final_lr_fraction={self.final_lr_fraction!r} must lie in [0, 1]")
    if not self.weight_decay >= 0:
      raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0")
    for name in ("b1", "b2"):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)!r} must lie in [0, 1)")


def lr_schedule(step: int, total_steps: int, config: OptimizerConfig) -> float:
  """Learning rate of `step`: linear warmup to peak_lr, then cosine to the final fraction.

  Args:
    step: 0-based training step.
    total_steps: steps of the whole run (the cosine ends there).
    config: the optimizer config.

  Returns:
    The learning rate.
  """
  peak, warmup = config.peak_lr, config.warmup_steps
  if step < warmup:
    return peak * (step + 1) / warmup
  progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
  final = peak * config.final_lr_fraction
  return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * progress))


@functools.cache
def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW; the learning rate is an injected hyperparameter
  (set per step by `Trainer.train_step`). Cached per config, so trainers of one config
  share compiled steps."""

  def chain(learning_rate):
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(learning_rate, b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=_matrices))

  return optax.inject_hyperparams(chain)(learning_rate=config.peak_lr)


def _matrices(params: Any) -> Any:
  """Weight-decay mask: True for parameters with ndim >= 2."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def split_rows(tokens: jax.Array, segment_ids: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Inputs, targets, input segment ids and target weights of packed rows.

  Args:
    tokens: int [B, T + 1].
    segment_ids: int [B, T + 1].

  Returns:
    (inputs [B, T], targets [B, T], segment_ids [B, T], float32 weights [B, T]: 1 where the
    target is in the input's segment).
  """
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  segments = segment_ids[:, :-1]
  weights = (segment_ids[:, 1:] == segments).astype(jnp.float32)
  return inputs, targets, segments, weights


def next_token_loss(model: nnx.Module, tokens: jax.Array, segment_ids: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy of the next token over packed rows and the number of targets.

  Args:
    model: a Transformer.
    tokens: int [B, T + 1] packed rows.
    segment_ids: int [B, T + 1] their document ids.

  Returns:
    (float32 loss sum, float32 target count).
  """
  inputs, targets, segments, weights = split_rows(tokens, segment_ids)
  logits = model(inputs, segment_ids=segments)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(losses * weights), jnp.sum(weights)


def _mean_loss(graphdef, params, tokens, segment_ids):
  loss_sum, count = next_token_loss(nnx.merge(graphdef, params), tokens, segment_ids)
  return loss_sum / jnp.maximum(count, 1.0), count


def _train_step_impl(graphdef, tx, params, opt_state, tokens, segment_ids, lr):
  (loss, count), grads = jax.value_and_grad(_mean_loss, argnums=1, has_aux=True)(
      graphdef, params, tokens, segment_ids)
  opt_state.hyperparams["learning_rate"] = lr
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "targets": count}
  return params, opt_state, metrics


_train_step = jax.jit(_train_step_impl, static_argnums=(0, 1), donate_argnums=(2, 3))


def _eval_step_impl(graphdef, params, tokens, segment_ids):
  return next_token_loss(nnx.merge(graphdef, params), tokens, segment_ids)


_eval_step = jax.jit(_eval_step_impl, static_argnums=0)


class Trainer:
  """Parameters, optimizer state and jitted train / eval steps of a model.

  With `mesh` (a jax.sharding.Mesh, e.g. flashjax.distributed.make_mesh("data:2,model:2"))
  the parameters and optimizer state are sharded per flashjax.distributed.sharding's rule
  table, batches are split over the mesh's "data" / "fsdp" axes and the steps are jitted
  with those shardings (XLA's SPMD partitioner inserts the collectives). Without a mesh
  everything stays on the default device, as before.
  """

  def __init__(self, model: nnx.Module, config: OptimizerConfig, *, mesh: Any = None,
               rules: Any = None):
    """Splits the model into its static graph and parameters and initialises AdamW.

    Args:
      model: an nnx model whose state is all nnx.Param (a flashjax Transformer).
      config: optimizer settings.
      mesh: None (one device) or a jax.sharding.Mesh with axes among data / fsdp / model.
      rules: logical axis -> mesh axis rules (default
        flashjax.distributed.sharding.DEFAULT_RULES); only with a mesh.
    """
    if jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param))):
      raise ValueError("Trainer needs a model whose state is all nnx.Param")
    if rules is not None and mesh is None:
      raise ValueError(f"rules={rules!r} need a mesh")
    self.graphdef, self.params = nnx.split(model, nnx.Param)
    self.config = config
    self.tx = make_optimizer(config)
    self.mesh = mesh
    self.step = 0
    if mesh is None:
      self.opt_state = jax.jit(self.tx.init)(self.params)
      return
    from flashjax.distributed import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
    from flashjax.distributed import model_attention  # pylint: disable=import-outside-toplevel
    from flashjax.distributed import sharding  # pylint: disable=import-outside-toplevel
    if not isinstance(mesh, jax.sharding.Mesh):
      raise ValueError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    self.param_shardings = sharding.param_shardings(self.params, mesh, rules)
    self.params = jax.device_put(self.params, self.param_shardings)
    self.opt_shardings = sharding.opt_state_shardings(
        self.tx, jax.eval_shape(self.tx.init, self.params), self.param_shardings, mesh)
    self.opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(self.params)
    self._batch_sharding = mesh_lib.batch_sharding(mesh)
    self._batch_shards = mesh_lib.batch_size_divisor(mesh)
    replicated = mesh_lib.replicated(mesh)
    self._replicated = replicated
    # The models' attention op runs per (batch, head) shard (distributed.model_attention),
    # so Pallas backends, which XLA cannot partition, run on each device's share.
    self._sharded_train_step = jax.jit(
        model_attention.with_attention_mesh(
            functools.partial(_train_step_impl, self.graphdef, self.tx), mesh),
        in_shardings=(self.param_shardings, self.opt_shardings, self._batch_sharding,
                      self._batch_sharding, replicated),
        out_shardings=(self.param_shardings, self.opt_shardings, replicated),
        donate_argnums=(0, 1))
    self._sharded_eval_steps = {}

  def _sharded_eval_step(self, batch_sharding: Any) -> Any:
    from flashjax.distributed import model_attention  # pylint: disable=import-outside-toplevel
    key = batch_sharding.spec
    if key not in self._sharded_eval_steps:
      self._sharded_eval_steps[key] = jax.jit(
          model_attention.with_attention_mesh(
              functools.partial(_eval_step_impl, self.graphdef), self.mesh),
          in_shardings=(self.param_shardings, batch_sharding, batch_sharding),
          out_shardings=self._replicated)
    return self._sharded_eval_steps[key]

  def shard_batch(self, tokens: Any, segment_ids: Any) -> tuple[jax.Array, jax.Array]:
    """A training batch placed on the mesh (rows split over the batch axes)."""
    rows = np.shape(tokens)[0]
    if rows % self._batch_shards:
      raise ValueError(f"batch of {rows} rows must be divisible by the {self._batch_shards} "
                       f"batch shards of the mesh {dict(self.mesh.shape)}")
    return (jax.device_put(jnp.asarray(tokens), self._batch_sharding),
            jax.device_put(jnp.asarray(segment_ids), self._batch_sharding))

  def train_step(self, tokens: Any, segment_ids: Any, lr: float) -> dict[str, jax.Array]:
    """One AdamW step on a batch of packed rows; returns device scalars (not synced).

    Args:
      tokens: int [B, T + 1] (with a mesh: B divisible by the batch shards).
      segment_ids: int [B, T + 1].
      lr: learning rate of this step.

    Returns:
      {"loss": mean loss, "grad_norm": global gradient norm, "targets": counted targets}.
    """
    if self.mesh is not None:
      tokens, segment_ids = self.shard_batch(tokens, segment_ids)
      self.params, self.opt_state, metrics = self._sharded_train_step(
          self.params, self.opt_state, tokens, segment_ids, jnp.float32(lr))
      self.step += 1
      return metrics
    self.params, self.opt_state, metrics = _train_step(
        self.graphdef, self.tx, self.params, self.opt_state, jnp.asarray(tokens),
        jnp.asarray(segment_ids), jnp.float32(lr))
    self.step += 1
    return metrics

  def evaluate(self, tokens: np.ndarray, segment_ids: np.ndarray, batch_size: int) -> float:
    """Mean next-token loss over all rows (batches of `batch_size`, the last one smaller).

    Args:
      tokens: int [R, T + 1] packed rows.
      segment_ids: int [R, T + 1].
      batch_size: rows per eval call.

    Returns:
      Loss in nats per target token.
    """
    total, count = 0.0, 0.0
    for start in range(0, tokens.shape[0], batch_size):
      rows = jnp.asarray(tokens[start:start + batch_size])
      ids = jnp.asarray(segment_ids[start:start + batch_size])
      if self.mesh is None:
        loss_sum, n = _eval_step(self.graphdef, self.params, rows, ids)
      else:  # a last batch the batch shards do not divide runs replicated
        placement = (self._batch_sharding if rows.shape[0] % self._batch_shards == 0
                     else self._replicated)
        loss_sum, n = self._sharded_eval_step(placement)(self.params, rows, ids)
      total += float(loss_sum)
      count += float(n)
    return total / max(count, 1.0)

  def model(self) -> nnx.Module:
    """The model with the current parameters."""
    return nnx.merge(self.graphdef, self.params)

  def state(self) -> dict[str, Any]:
    """Checkpointable state: params, opt_state, step."""
    return {"params": self.params, "opt_state": self.opt_state,
            "step": np.asarray(self.step, np.int64)}

  def load_state(self, state: dict[str, Any]) -> None:
    """Restores a state produced by `state()` (e.g. through a Checkpointer); with a mesh the
    arrays are placed on the trainer's shardings (a no-op when they already are)."""
    self.params = state["params"]
    self.opt_state = state["opt_state"]
    if self.mesh is not None:
      self.params = jax.device_put(self.params, self.param_shardings)
      self.opt_state = jax.device_put(self.opt_state, self.opt_shardings)
    self.step = int(state["step"])
