"""Shared model layers: depthwise conv, GELU, the linear and norm ops of ConvNeXt, drop path,
attention pooling.

The conv, dense, norm and bias ops take a `method`, the model's `dw_method` already chosen for
its devices (`models.cpu.choose_method`): "lax" runs the library ops with autodiff, "shifted"
and "native" the XLA:CPU forms of `models.cpu` (XLA:CPU runs the library forms of these ops and
their gradients slowly). The two CPU methods differ only in the depthwise conv, which "native"
runs through C++ kernels for float32 (other dtypes take "shifted"). The depthwise conv has the
parameters of an `nnx.Conv(feature_group_count=C)`: kernel (kh, kw, 1, C) and bias (C,).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx

from cspine_jax.models.cpu import shifted
from cspine_jax.models.cpu import linear as linear_lib
from cspine_jax.models.cpu import native_conv
from cspine_jax.models.cpu import norm as norm_lib

Array = jax.Array
Dtype = Any
METHODS = ("native", "shifted", "lax")

# timm initialises convs and linears with trunc_normal(std=.02) and zero biases.
trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)


def check_method(method: str) -> str:
  """`method` if it is one of METHODS, else a ValueError ("auto" is resolved before a model is
  built, from the devices it runs on: `registry.make_model`, `models.cpu.choose_method`)."""
  if method not in METHODS:
    raise ValueError(f"unknown depthwise conv method {method!r}; expected one of {METHODS} "
                     "('auto' is chosen by registry.make_model from the model's devices)")
  return method


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def _bias_or_zeros(bias: Array | None, kernel: Array) -> Array:
  return jnp.zeros(kernel.shape[3:], kernel.dtype) if bias is None else bias.astype(kernel.dtype)


def _takes_native(method: str, x: Array, kernel: Array) -> bool:
  """Whether `method` sends this conv to the C++ kernels (float32 only)."""
  return method == "native" and x.dtype == kernel.dtype == jnp.float32


def depthwise_conv2d(x: Array, kernel: Array, bias: Array | None = None, *,
                     stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                     method: str = "lax") -> Array:
  """Depthwise 2D convolution of NHWC `x` with an HWIO kernel (kh, kw, 1, C), plus `bias` (C,).

  `padding` is symmetric zero padding per spatial side. Every method computes the
  cross-correlation of `lax.conv_general_dilated(..., feature_group_count=C)`. "native" raises
  `native.NativeBuildError` where the kernels are not loaded (`native.load_once`).
  """
  if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != x.shape[3]:
    raise ValueError(f"depthwise_conv2d wants x (N,H,W,C) and kernel (kh,kw,1,C); got x "
                     f"{x.shape}, kernel {kernel.shape}")
  sh, sw = _pair(stride)
  ph, pw = _pair(padding)
  if check_method(method) == "lax":
    y = lax.conv_general_dilated(
        x, kernel, window_strides=(sh, sw), padding=((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[3])
    return y if bias is None else y + bias
  bias = _bias_or_zeros(bias, kernel)
  if _takes_native(method, x, kernel):
    return native_conv.depthwise_conv2d(x, kernel, bias, (sh, sw), (ph, pw))
  return shifted.depthwise_conv2d(x, kernel, bias, (sh, sw), (ph, pw))


def depthwise_conv2d_normalize(x: Array, kernel: Array, bias: Array | None, epsilon: float,
                               scale: Array | None = None, shift: Array | None = None, *,
                               padding: int | tuple[int, int] = 0,
                               method: str = "lax") -> Array:
  """`normalize(depthwise_conv2d(x, kernel, bias, padding=padding), epsilon)` (stride 1), times
  `scale` plus `shift` when given: ConvNeXt's depthwise conv and the LayerNorm after it, as one
  C++ call with "native" and float32 (`native_conv`), elsewhere the separate ops.
  """
  check_method(method)
  ph, pw = _pair(padding)
  if (scale is None) != (shift is None):
    raise ValueError("depthwise_conv2d_normalize wants both scale and shift, or neither")
  if _takes_native(method, x, kernel):
    bias = _bias_or_zeros(bias, kernel)
    if scale is None:
      return native_conv.depthwise_conv2d_normalize(x, kernel, bias, (ph, pw), float(epsilon))
    return native_conv.depthwise_conv2d_layer_norm(x, kernel, bias, scale.astype(kernel.dtype),
                                                   shift.astype(kernel.dtype), (ph, pw),
                                                   float(epsilon))
  y = normalize(depthwise_conv2d(x, kernel, bias, padding=(ph, pw), method=method), epsilon,
                method=method)
  return y if scale is None else y * scale + shift


def patch_conv(x: Array, kernel: Array, *, method: str = "lax") -> Array:
  """k x k stride-k VALID convolution of NHWC `x` with an HWIO kernel (k, k, Cin, Cout), no bias:
  the ConvNeXt stem (4x4/4) and downsample (2x2/2) convs. The CPU methods differ in the VJP only
  (`linear.patch_conv`)."""
  k = kernel.shape[0]
  if kernel.ndim != 4 or kernel.shape[1] != k or x.ndim != 4 or kernel.shape[2] != x.shape[3]:
    raise ValueError(f"patch_conv wants x (N,H,W,Cin) and kernel (k,k,Cin,Cout); got x {x.shape}, "
                     f"kernel {kernel.shape}")
  if check_method(method) == "lax":
    return linear_lib.patch_conv_lax(x, kernel)
  return linear_lib.patch_conv(x, kernel)


class DepthwiseConv2d(nnx.Module):
  """Depthwise conv layer; parameters `kernel` (kh, kw, 1, C) and `bias` (C,) like nnx.Conv."""

  def __init__(self, channels: int, kernel_size: int = 7, *, stride: int = 1,
               padding: int | None = None, use_bias: bool = True, method: str = "lax",
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.channels = channels
    self.kernel_size = kernel_size
    self.stride = stride
    self.padding = kernel_size // 2 if padding is None else padding
    self.method = check_method(method)
    self.dtype = dtype
    self.kernel = nnx.Param(trunc_normal(rngs.params(), (kernel_size, kernel_size, 1, channels),
                                         param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype)) if use_bias else nnx.data(None)

  def __call__(self, x: Array) -> Array:
    bias = None if self.bias is None else self.bias[...].astype(self.dtype)
    return depthwise_conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), bias,
                            stride=self.stride, padding=self.padding, method=self.method)

  def normalized(self, x: Array, epsilon: float, scale: Array | None = None,
                 shift: Array | None = None) -> Array:
    """`normalize(self(x), epsilon)` (times `scale` plus `shift` when given), as one native call
    where it can be (stride 1 only)."""
    if self.stride != 1:
      raise ValueError(f"normalized() wants stride 1; this conv has stride {self.stride}")
    bias = None if self.bias is None else self.bias[...].astype(self.dtype)
    return depthwise_conv2d_normalize(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                      bias, epsilon, scale, shift, padding=self.padding,
                                      method=self.method)


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@jax.custom_vjp
def gelu(x: Array) -> Array:
  """Exact GELU x/2 (1 + erf(x/sqrt2)) (timm's nn.GELU) whose gradient recomputes from x.

  Written with lax.erf because jax.nn.gelu(approximate=False) goes through erfc, whose XLA:CPU
  expansion adds an exp branch. The custom VJP keeps only x for the backward: with autodiff's VJP
  XLA:CPU stores erf(x/sqrt2) as a second full-size array (the largest activation of a ConvNeXt
  block), and recomputing erf and exp in the backward costs less than that memory traffic.
  """
  return x * (0.5 + 0.5 * lax.erf(x * _SQRT_HALF))


def _gelu_fwd(x: Array) -> tuple[Array, Array]:
  return gelu(x), x


def _gelu_bwd(x: Array, g: Array) -> tuple[Array]:
  # d/dx x Phi(x) = Phi(x) + x phi(x): the same terms autodiff of the forward produces. Phi
  # through erf(-z) (erf is odd): the forward's erf(z) would be merged with it by XLA's CSE and
  # then stored for the backward, which is what this VJP is meant to avoid.
  cdf = 0.5 - 0.5 * lax.erf(x * -_SQRT_HALF)
  pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
  return (g * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def dense(x: Array, kernel: Array, bias: Array | None = None, *, method: str = "lax") -> Array:
  """`x @ kernel + bias` over the last axis of `x` (what `nnx.Linear` computes); the CPU methods
  take `linear.dense` (its VJP contracts rows as they lie)."""
  if check_method(method) == "lax":
    y = linear_lib.matmul(x, kernel)
    return y if bias is None else y + bias
  if bias is None:
    return linear_lib.dense(x, kernel, jnp.zeros(kernel.shape[1:], kernel.dtype))
  return linear_lib.dense(x, kernel, bias)


def normalize(x: Array, epsilon: float, *, method: str = "lax") -> Array:
  """LayerNorm without the affine part: `(x - mean) * rsqrt(var + epsilon)` over the last axis,
  statistics in at least float32 (as `nnx.LayerNorm`); the CPU methods take `norm.normalize`
  (its VJP keeps the row statistics)."""
  if check_method(method) == "lax":
    return norm_lib.normalize_with_stats(x, epsilon)[0]
  return norm_lib.normalize(x, epsilon)


def add_bias(y: Array, bias: Array, *, method: str = "lax") -> Array:
  """`y + bias` over the last axis; on the CPU methods its gradient is a column sum
  (`linear.add_bias`)."""
  if check_method(method) == "lax":
    return y + bias
  return linear_lib.add_bias(y, bias.astype(y.dtype))


def layer_norm(x: Array, scale: Array, shift: Array, epsilon: float, *,
               method: str = "lax") -> Array:
  """LayerNorm with its affine part, `normalize(x) * scale + shift` (what `nnx.LayerNorm`
  computes); on the CPU methods the scale and shift gradients are column sums."""
  if check_method(method) == "lax":
    return norm_lib.normalize_with_stats(x, epsilon)[0] * scale + shift
  return norm_lib.scale_shift(normalize(x, epsilon, method=method), scale.astype(x.dtype),
                              shift.astype(x.dtype))


class DropPath(nnx.Module):
  """Stochastic depth (timm `DropPath`): zeroes whole samples of a residual branch in training.

  Keeps the sample with probability 1 - rate and rescales by 1 / (1 - rate). Active only while
  `deterministic` is False (`model.train()`); `model.eval()` makes it the identity.
  """

  def __init__(self, rate: float, *, deterministic: bool = False, rngs: nnx.Rngs | None = None):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"drop path rate must be in [0, 1); got {rate}")
    self.rate = float(rate)
    self.deterministic = deterministic
    # Only a module that can drop needs a key stream (keeps rate-0 modules stateless).
    if self.rate > 0.0:
      if rngs is None:
        raise ValueError("DropPath with rate > 0 needs rngs (a 'dropout' stream)")
      self.rngs = rngs.dropout.fork()
    else:
      self.rngs = nnx.data(None)

  def __call__(self, x: Array) -> Array:
    if self.deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.rngs(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))

  def set_view(self, deterministic: bool | None = None):
    """Used by `nnx.view`."""
    if deterministic is not None:
      self.deterministic = deterministic


def drop_path_rates(depths: tuple[int, ...], drop_path_rate: float) -> list[list[float]]:
  """timm's schedule: rates rise linearly from 0 to `drop_path_rate` over all blocks."""
  total = sum(depths)
  rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
  out, start = [], 0
  for d in depths:
    out.append(rates[start:start + d])
    start += d
  return out


class AttentionPool(nnx.Module):
  """MLP attention pooling over a sequence: tanh projection, softmax over time, weighted sum.

  `__call__(x (B, T, F), mask (B, T) bool | None) -> (pooled (B, F), weights (B, T))`; the
  weights of each row sum to 1 (masked steps get 0).
  """

  def __init__(self, features: int, hidden: int | None = None, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    hidden = features if hidden is None else hidden
    self.proj = nnx.Linear(features, hidden, kernel_init=trunc_normal, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
    self.score = nnx.Linear(hidden, 1, kernel_init=trunc_normal, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: Array, mask: Array | None = None) -> tuple[Array, Array]:
    logits = self.score(jnp.tanh(self.proj(x)))[..., 0].astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    pooled = jnp.einsum("bt,btf->bf", weights, x.astype(jnp.float32))
    return pooled, weights
