"""XLA:CPU forms of the linear layers (dense, bias add, patchify conv), with hand-written VJPs whose
weight gradients contract the rows of both operands as they lie in memory and whose bias gradients
are `ops.col_sum`s: autodiff's forms make XLA:CPU copy operands into transposed layouts first."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from cspine_jax.models.cpu import ops

Array = jax.Array


def matmul(x: Array, kernel: Array) -> Array:
  """`x @ kernel` over the last axis of `x`."""
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def dense(x: Array, kernel: Array, bias: Array) -> Array:
  """`x @ kernel + bias` (what `nnx.Linear` computes)."""
  return matmul(x, kernel) + bias


def _dense_fwd(x, kernel, bias):
  return dense(x, kernel, bias), (x, kernel)


def _dense_bwd(res, g):
  x, kernel = res
  x2 = x.reshape(-1, x.shape[-1])
  g2 = g.reshape(-1, g.shape[-1])
  dx = lax.dot_general(g2, kernel, (((1,), (1,)), ((), ()))).reshape(x.shape)
  dk = ops.row_contraction(x2, g2)
  return dx.astype(x.dtype), dk.astype(kernel.dtype), ops.col_sum(g2).astype(g.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def add_bias(y: Array, bias: Array) -> Array:
  """`y + bias` over the last axis, its bias gradient a `ops.col_sum`."""
  return y + bias


def _add_bias_fwd(y, bias):
  return y + bias, None


def _add_bias_bwd(_, g):
  return g, ops.col_sum(g).astype(g.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def patch_conv_lax(x: Array, kernel: Array) -> Array:
  """k x k stride-k VALID convolution of NHWC `x` with HWIO `kernel`: the library convolution
  (on XLA:CPU faster than a patch matmul, which first copies `x` into patch order)."""
  k = kernel.shape[0]
  return lax.conv_general_dilated(x, kernel, window_strides=(k, k), padding="VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def patch_conv(x: Array, kernel: Array) -> Array:
  """`patch_conv_lax` whose VJP is patch matmuls: autodiff's transposed convs run in a
  channel-major layout on XLA:CPU and transpose the NHWC operands element by element, where the
  patch form is a reshape, one transpose and plain matmuls. Input rows/columns past the last
  whole patch get zero gradient, as with the conv."""
  return patch_conv_lax(x, kernel)


def _patch_conv_fwd(x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
  return patch_conv_lax(x, kernel), (x, kernel)


def _patch_conv_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
  x, kernel = res
  n, h, w, cin = x.shape
  k, cout = kernel.shape[0], kernel.shape[3]
  _, ho, wo, _ = g.shape
  acc = jnp.promote_types(x.dtype, jnp.float32)
  patches = (x[:, :ho * k, :wo * k].reshape(n, ho, k, wo, k, cin)
             .transpose(0, 1, 3, 2, 4, 5).reshape(n * ho * wo, k * k * cin))
  g2 = g.reshape(n * ho * wo, cout)
  dk = ops.row_contraction(patches, g2, preferred_element_type=acc)
  dp = lax.dot_general(g2, kernel.reshape(k * k * cin, cout), (((1,), (1,)), ((), ())),
                       preferred_element_type=acc).astype(x.dtype)
  dx = (dp.reshape(n, ho, wo, k, k, cin).transpose(0, 1, 3, 2, 4, 5)
        .reshape(n, ho * k, wo * k, cin))
  dx = jnp.pad(dx, ((0, 0), (0, h - ho * k), (0, w - wo * k), (0, 0)))
  return dx, dk.reshape(k, k, cin, cout).astype(kernel.dtype)


patch_conv.defvjp(_patch_conv_fwd, _patch_conv_bwd)
