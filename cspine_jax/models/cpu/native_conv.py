"""Method "native": the depthwise conv, and the depthwise conv followed by a LayerNorm, through
the C++ kernels (`native`), float32, differentiable by the kernels' two backward passes. The
fastest CPU form: loops that need no padded or transposed copies, forward and both gradients.

The fused conv + LayerNorm normalises each output row while it is still in cache. Without the
affine part its gradient needs only the normalised output and the per-pixel 1/std; with it, the
backward recomputes those (one more forward), so training folds the affine part into the next
layer instead (`convnext.ConvNeXtBlock`).
"""
from __future__ import annotations

import functools

import jax

from cspine_jax.models.cpu import native
from cspine_jax.models.cpu import norm
from cspine_jax.models.cpu import ops

Array = jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def depthwise_conv2d(x: Array, kernel: Array, bias: Array, stride: tuple[int, int],
                     padding: tuple[int, int]) -> Array:
  """Depthwise conv of float32 NHWC `x` with kernel (kh, kw, 1, C) plus `bias` (C,)."""
  return native.depthwise_forward(x, kernel[:, :, 0, :], bias,
                                  ops.out_hw(x, kernel, stride, padding), stride, padding)


def _fwd(x, kernel, bias, stride, padding):
  return depthwise_conv2d(x, kernel, bias, stride, padding), (x, kernel)


def _bwd(stride, padding, res, g):
  x, kernel = res
  dx = native.depthwise_input_grad(g, kernel[:, :, 0, :], x.shape[1:3], stride, padding)
  dk = native.depthwise_kernel_grad(x, g, kernel.shape[:2], stride, padding)[:, :, None, :]
  return dx, dk, ops.col_sum(g).astype(kernel.dtype)


depthwise_conv2d.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def depthwise_conv2d_normalize(x: Array, kernel: Array, bias: Array, padding: tuple[int, int],
                               epsilon: float) -> Array:
  """LayerNorm (no affine part) of the stride-1 depthwise conv, in one call."""
  return _normalize_fwd(x, kernel, bias, padding, epsilon)[0]


def _normalize_fwd(x, kernel, bias, padding, epsilon):
  y, rstd = native.depthwise_forward_normalized(
      x, kernel[:, :, 0, :], bias, ops.out_hw(x, kernel, (1, 1), padding), (1, 1), padding,
      epsilon)
  return y, (x, kernel, y, rstd[..., None])


def _normalize_bwd(padding, epsilon, res, g):
  del epsilon
  x, kernel, xhat, rstd = res
  g_conv = norm.normalize_grad(g, xhat, rstd)
  return _bwd((1, 1), padding, (x, kernel), g_conv)


depthwise_conv2d_normalize.defvjp(_normalize_fwd, _normalize_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def depthwise_conv2d_layer_norm(x: Array, kernel: Array, bias: Array, scale: Array, shift: Array,
                                padding: tuple[int, int], epsilon: float) -> Array:
  """LayerNorm with its affine part (`scale`, `shift` (C,)) of the stride-1 depthwise conv."""
  return native.depthwise_forward_normalized(
      x, kernel[:, :, 0, :], bias, ops.out_hw(x, kernel, (1, 1), padding), (1, 1), padding,
      epsilon, scale, shift)[0]


def _layer_norm_fwd(x, kernel, bias, scale, shift, padding, epsilon):
  y = depthwise_conv2d_layer_norm(x, kernel, bias, scale, shift, padding, epsilon)
  return y, (x, kernel, bias, scale)


def _layer_norm_bwd(padding, epsilon, res, g):
  x, kernel, bias, scale = res
  xhat, vjp = jax.vjp(lambda x, k, b: depthwise_conv2d_normalize(x, k, b, padding, epsilon),
                      x, kernel, bias)
  dx, dk, db = vjp(g * scale)
  return (dx, dk, db, ops.col_sum(g * xhat).astype(scale.dtype),
          ops.col_sum(g).astype(scale.dtype))


depthwise_conv2d_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)
