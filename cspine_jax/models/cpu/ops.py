"""Building blocks the XLA:CPU forms share: a fusion stop, column sums and row contractions as dots,
and the output size of a depthwise conv."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def materialised(y: Array) -> Array:
  """`y` unchanged (non-finite values become NaN), ending in an op XLA:CPU will not duplicate.

  XLA:CPU fuses a chain of cheap elementwise ops (a tap sum) into every consumer of its result,
  so it runs once per consumer. A divide is never duplicated into several consumers, so the chain
  fuses into this divide, computed once and stored. The divisor is 1 computed from `y`: x * 0 + 1
  is not folded for floats, and a divide by a broadcast scalar would become a cheap multiply.
  Not `lax.optimization_barrier`: XLA:CPU removes barriers before fusion.
  """
  return y / (y * 0 + 1)


def col_sum(v: Array) -> Array:
  """Sum of `v` over all axes but the last, as a vector-matrix product with a ones vector.

  The gradient of a bias. XLA:CPU turns a reduction over the major axes of a row-major array into
  a reduce-window that walks the array once per feature; the dot reads it once, vectorised.
  """
  v = v.reshape(-1, v.shape[-1])
  return lax.dot_general(jnp.ones((v.shape[0],), v.dtype), v, (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.promote_types(v.dtype, jnp.float32))


def row_contraction(a: Array, b: Array, **kwargs) -> Array:
  """``a.T @ b`` for row-major (rows, p) and (rows, q): the weight gradient of a linear layer.

  XLA:CPU's matmul over the rows of both operands is faster with a wide result (p <= q), so a
  tall one is computed as ``(b.T @ a).T``. The transpose must not consume the dot directly, or
  XLA folds it back into the tall dot (`materialised` stands between them).
  """
  dims = (((0,), (0,)), ((), ()))
  if a.shape[1] <= b.shape[1]:
    return lax.dot_general(a, b, dims, **kwargs)
  return materialised(lax.dot_general(b, a, dims, **kwargs)).T


def out_size(size: int, k: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - k) // stride + 1


def out_hw(x: Array, kernel: Array, stride: tuple[int, int], padding: tuple[int, int]
           ) -> tuple[int, int]:
  """The depthwise conv's output map; an error where the kernel exceeds the padded input."""
  kh, kw = kernel.shape[:2]
  ho = out_size(x.shape[1], kh, stride[0], padding[0])
  wo = out_size(x.shape[2], kw, stride[1], padding[1])
  if ho <= 0 or wo <= 0:
    raise ValueError(f"depthwise kernel {kh}x{kw} larger than padded input {x.shape}")
  return ho, wo
