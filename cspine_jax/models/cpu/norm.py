"""LayerNorm pieces: the normalisation formula, and its XLA:CPU form with a hand-written VJP."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from cspine_jax.models.cpu import ops

Array = jax.Array


def normalize_with_stats(x: Array, epsilon: float) -> tuple[Array, Array, Array]:
  """(`(x - mean) * rstd` over the last axis, mean, rstd), statistics in at least float32 and the
  one-pass variance, as `nnx.LayerNorm` computes them."""
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(xf * xf, axis=-1, keepdims=True) - mean * mean)
  rstd = lax.rsqrt(var + epsilon)
  return ((xf - mean) * rstd).astype(x.dtype), mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def normalize(x: Array, epsilon: float) -> Array:
  """`normalize_with_stats(x)[0]` whose VJP keeps `x` and the two per-row statistics: two row
  reductions in the backward, where autodiff of the one-pass form makes XLA:CPU run and store
  more."""
  return normalize_with_stats(x, epsilon)[0]


def _normalize_fwd(x, epsilon):
  y, mean, rstd = normalize_with_stats(x, epsilon)
  return y, (x, mean, rstd)


def _normalize_bwd(epsilon, res, g):
  del epsilon
  x, mean, rstd = res
  xhat = (x.astype(mean.dtype) - mean) * rstd
  return (normalize_grad(g, xhat, rstd).astype(x.dtype),)


def normalize_grad(g: Array, xhat: Array, rstd: Array) -> Array:
  """The input gradient of `(x - mean) * rstd` over the last axis, from the normalised `xhat`
  and `rstd` (broadcastable, float32 or wider): rstd (g - mean(g) - xhat mean(g xhat))."""
  gf = g.astype(rstd.dtype)
  return rstd * (gf - jnp.mean(gf, axis=-1, keepdims=True)
                 - xhat * jnp.mean(gf * xhat, axis=-1, keepdims=True))


normalize.defvjp(_normalize_fwd, _normalize_bwd)


@jax.custom_vjp
def scale_shift(xhat: Array, scale: Array, shift: Array) -> Array:
  """`xhat * scale + shift` (a LayerNorm's affine part) with `ops.col_sum` parameter gradients."""
  return xhat * scale + shift


def _scale_shift_fwd(xhat, scale, shift):
  return xhat * scale + shift, (xhat, scale)


def _scale_shift_bwd(res, g):
  xhat, scale = res
  return g * scale, ops.col_sum(g * xhat).astype(g.dtype), ops.col_sum(g).astype(g.dtype)


scale_shift.defvjp(_scale_shift_fwd, _scale_shift_bwd)
