"""Integer and padding helpers of the tiled kernels (one home for each).

Host-side (static int) arithmetic of tile counts and power-of-two tile sizes, and the
end-padding of one array axis, shared by the attention, decode and sparse-MLP backends.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cdiv(a: int, b: int) -> int:
  """ceil(a / b) of static non-negative ints."""
  return -(-a // b)


def round_up(x: int, m: int) -> int:
  """The smallest multiple of m that is >= x."""
  return cdiv(x, m) * m


def is_pow2(x: int) -> bool:
  """Whether x is a positive power of two."""
  return x > 0 and (x & (x - 1)) == 0


def pow2_ceil(n: int) -> int:
  """The smallest power of two >= n (1 for n <= 1)."""
  return 1 << max(0, n - 1).bit_length()


def pad_axis(x: jax.Array, axis: int, size: int, value: float = 0) -> jax.Array:
  """Pads `x` at the end of `axis` up to `size` with `value`."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)
