"""Pass-through backends: jax.nn.dot_product_attention itself.

  "jax_nn"  jax.nn.dot_product_attention(..., implementation="xla")
  "cudnn"   jax.nn.dot_product_attention(..., implementation="cudnn") (cuDNN flash attention)

These run jax.nn's code with jax.nn's semantics, not flashjax's: a query row without an
allowed key outputs the mean of the values under "jax_nn" (flashjax's own backends output
zeros), and whatever cuDNN gives under "cudnn". api.py gives them jax.nn's own arguments
(query_seq_lengths, key_value_seq_lengths, local_window_size, return_residual) unchanged and
the flashjax-only ones translated: a flashjax.masks Mask and segment ids become dense bool
masks ANDed with `mask`. What jax.nn cannot express raises NotImplementedError (so lists of
names move on): logits_soft_cap, a BlockMask, and for "cudnn" any input that jax.nn's cuDNN
path refuses while tracing. api.py checks that "cudnn" runs on a GPU before calling it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.masks import masks as masks_lib
from flashjax.masks.block_mask import BlockMask


def _dense_mask(name: str, mask: Any, q_segment_ids: Any, kv_segment_ids: Any,
                logits_soft_cap: Any) -> jax.Array | None:
  """jax.nn's bool mask [B|1, N|1, T, S] for the flashjax mask arguments (or None)."""
  if logits_soft_cap is not None:
    raise NotImplementedError(f"{name}: jax.nn.dot_product_attention has no logits_soft_cap; "
                              "use implementation='xla'")
  if isinstance(mask, BlockMask):
    raise NotImplementedError(f"{name}: jax.nn.dot_product_attention takes dense bool masks, "
                              "not a BlockMask; use implementation='xla' (or a Pallas backend)")
  if isinstance(mask, masks_lib.Mask):
    mask = mask.to_dense()
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  if q_segment_ids is not None:
    same = (jnp.asarray(q_segment_ids)[:, :, None] == jnp.asarray(kv_segment_ids)[:, None, :])
    mask = same[:, None] if mask is None else mask & same[:, None]
  return mask


def _call(name: str, implementation: str, query: jax.Array, key: jax.Array,
          value: jax.Array, *, bias: Any, mask: Any, q_segment_ids: Any, kv_segment_ids: Any,
          is_causal: bool, scale: Any, logits_soft_cap: Any, query_seq_lengths: Any,
          key_value_seq_lengths: Any, local_window_size: Any, return_residual: bool) -> Any:
  mask = _dense_mask(name, mask, q_segment_ids, kv_segment_ids, logits_soft_cap)
  as_jax = lambda x: None if x is None else jnp.asarray(x)
  return jax.nn.dot_product_attention(
      query, key, value, as_jax(bias), mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=as_jax(query_seq_lengths),
      key_value_seq_lengths=as_jax(key_value_seq_lengths),
      local_window_size=local_window_size, implementation=implementation,
      return_residual=return_residual)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          block_sizes: Any = None, interpret: bool = False,
                          **arguments: Any) -> jax.Array | tuple[jax.Array, jax.Array]:
  """jax.nn.dot_product_attention(implementation="xla") (backend "jax_nn").

  Args:
    query: [B, T, Nq, D].
    key: [B, S, Nkv, D].
    value: [B, S, Nkv, D].
    block_sizes: ignored.
    interpret: ignored.
    **arguments: the backend protocol's keywords as api.py passes them: bias, mask (None,
      a Mask or bool [B|1, Nq|1, T, S]; a BlockMask raises NotImplementedError),
      q_segment_ids / kv_segment_ids (turned into a dense mask), is_causal, scale (a float
      or a traced scalar), logits_soft_cap (must be None), query_seq_lengths,
      key_value_seq_lengths, local_window_size, return_residual (jax.nn's meaning).

  Returns:
    jax.nn.dot_product_attention's result.
  """
  del block_sizes, interpret
  return _call("jax_nn", "xla", query, key, value, **arguments)


def dot_product_attention_cudnn(query: jax.Array, key: jax.Array, value: jax.Array, *,
                                scale: Any = None, block_sizes: Any = None,
                                interpret: bool = False, **arguments: Any
                                ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """jax.nn.dot_product_attention(implementation="cudnn") (backend "cudnn").

  Args: as `dot_product_attention`; `scale` must be a Python float (api.py multiplies the
    query by a traced scale instead).

  Returns:
    jax.nn.dot_product_attention's result.

  Raises:
    NotImplementedError: for logits_soft_cap, a BlockMask, or inputs that jax.nn's cuDNN
      path refuses while tracing (its ValueError / RuntimeError / NotImplementedError, e.g.
      an unsupported dtype, head dim or right window without is_causal).
  """
  del block_sizes, interpret
  try:
    return _call("cudnn", "cudnn", query, key, value, scale=float(np.asarray(scale)),
                 **arguments)
  except NotImplementedError:
    raise
  except (ValueError, RuntimeError) as e:
    raise NotImplementedError(f"cudnn: jax.nn.dot_product_attention(implementation='cudnn') "
                              f"refused these inputs: {type(e).__name__}: {e}") from e
