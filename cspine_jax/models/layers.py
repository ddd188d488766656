"""Shared model pieces: depthwise conv with selectable formulation, drop path, attention pooling.

Why a depthwise conv of our own: XLA:CPU lowers a grouped convolution (`feature_group_count`)
to a slow generic loop (a 7x7 depthwise conv over a stage-2 batch took ~120 ms where a sum of 49
shifted multiplies took 5-9 ms), and its gradient is slow too. The "shifted" formulation pads
once and sums kh*kw shifted slices times per-channel weights; XLA fuses it into one loop and its
autodiff gradient is again shifted multiplies. On GPU/TPU the library convolution is faster, so
"auto" picks "shifted" on the CPU backend and "lax" elsewhere. Both use the same parameters as an
`nnx.Conv(feature_group_count=C)`: kernel (kh, kw, 1, C) and bias (C,).
"""
from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx

Array = jax.Array
Dtype = Any
Method = Literal["auto", "shifted", "lax"]
METHODS = ("auto", "shifted", "lax")

# timm initialises convs and linears with trunc_normal(std=.02) and zero biases.
trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)


def resolve_method(method: str) -> str:
  """Maps "auto" to "shifted" on the CPU backend and "lax" elsewhere."""
  if method not in METHODS:
    raise ValueError(f"unknown depthwise conv method {method!r}; expected one of {METHODS}")
  if method == "auto":
    return "shifted" if jax.default_backend() == "cpu" else "lax"
  return method


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def depthwise_conv2d(x: Array, kernel: Array, *, stride: int | tuple[int, int] = 1,
                     padding: int | tuple[int, int] = 0, method: str = "auto") -> Array:
  """Depthwise 2D convolution of NHWC `x` with an HWIO kernel (kh, kw, 1, C), no bias.

  `padding` is symmetric zero padding per spatial side. Both formulations compute the same
  cross-correlation as `lax.conv_general_dilated(..., feature_group_count=C)`.
  """
  if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != x.shape[3]:
    raise ValueError(f"depthwise_conv2d wants x (N,H,W,C) and kernel (kh,kw,1,C); got x "
                     f"{x.shape}, kernel {kernel.shape}")
  sh, sw = _pair(stride)
  ph, pw = _pair(padding)
  if resolve_method(method) == "lax":
    return lax.conv_general_dilated(
        x, kernel, window_strides=(sh, sw), padding=((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[3])
  if (sh, sw) == (1, 1) and (ph, pw) == (kernel.shape[0] // 2, kernel.shape[1] // 2) and \
      kernel.shape[0] % 2 == 1 and kernel.shape[1] % 2 == 1:
    return _shifted_same(x, kernel)
  return _shifted_depthwise(x, kernel, (sh, sw), (ph, pw))


@jax.custom_vjp
def _shifted_same(x: Array, kernel: Array) -> Array:
  """Stride-1 "same" shifted depthwise conv with a hand-written VJP (see `_shifted_same_bwd`)."""
  return _shifted_depthwise(x, kernel, (1, 1), (kernel.shape[0] // 2, kernel.shape[1] // 2))


def _shifted_same_fwd(x: Array, kernel: Array):
  return _shifted_same(x, kernel), (x, kernel)


def _shifted_same_bwd(res, g: Array):
  """Input gradient: the same shifted conv of g with the flipped kernel (one fused loop; the
  autodiff transpose of 49 slices is 49 pads and adds). Kernel gradient: per-tap sums of
  x_shifted * g done as batched matmuls, because XLA:CPU materialises every shifted slice that
  feeds a reduction and then runs 49 separate reductions (~4x slower)."""
  x, kernel = res
  kh, kw = kernel.shape[:2]
  ph, pw = kh // 2, kw // 2
  dx = _shifted_depthwise(g, kernel[::-1, ::-1], (1, 1), (ph, pw))
  return dx, _depthwise_kernel_grad(x, g, kh, kw).astype(kernel.dtype)


_shifted_same.defvjp(_shifted_same_fwd, _shifted_same_bwd)


def _depthwise_kernel_grad(x: Array, g: Array, kh: int, kw: int) -> Array:
  """dk[i, j, 0, c] = sum_{n,y,x} xpad[n, y+i, x+j, c] * g[n, y, x, c] (stride 1, same padding).

  Channel-major batched matmul over (n, y) for every row offset i gives
  m[c, i, a, b] = sum_{n,y} xpad[n, y+i, a, c] g[n, y, b, c]; the column offsets j are the
  diagonals a = b + j, summed with a constant 0/1 tensor.
  """
  n, h, w, c = x.shape
  ph, pw = kh // 2, kw // 2
  acc = jnp.promote_types(x.dtype, jnp.float32)
  xt = jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
  gt = jnp.transpose(g, (3, 0, 1, 2)).reshape(c, n * h, w)
  rows = jnp.stack([xt[:, :, i:i + h, :] for i in range(kh)], axis=1)
  rows = rows.reshape(c, kh, n * h, w + 2 * pw)
  m = lax.dot_general(rows, gt, (((2,), (1,)), ((0,), (0,))), preferred_element_type=acc)
  diag = (jnp.arange(w + 2 * pw)[:, None, None]
          == jnp.arange(w)[None, :, None] + jnp.arange(kw)[None, None, :]).astype(acc)
  dk = jnp.einsum("ciab,abj->ijc", m, diag)
  return dk[:, :, None, :]


def _shifted_depthwise(x: Array, kernel: Array, stride: tuple[int, int],
                       padding: tuple[int, int]) -> Array:
  n, h, w, c = x.shape
  kh, kw = kernel.shape[:2]
  (sh, sw), (ph, pw) = stride, padding
  ho = (h + 2 * ph - kh) // sh + 1
  wo = (w + 2 * pw - kw) // sw + 1
  if ho <= 0 or wo <= 0:
    raise ValueError(f"depthwise kernel {kh}x{kw} larger than padded input {x.shape}")
  # Accumulate in at least float32 so a bfloat16 compute dtype does not lose 49-term sums.
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
  xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  k = kernel[:, :, 0, :].astype(acc_dtype)
  # Taps whose window lies wholly in the zero padding add nothing (on 2x2 maps a 7x7 kernel has
  # only 9 useful taps), so they are skipped: same result, less work.
  rows = _useful_taps(h, ho, kh, sh, ph)
  cols = _useful_taps(w, wo, kw, sw, pw)
  out = None
  for i in rows:
    for j in cols:
      tap = lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                      (1, sh, sw, 1))
      term = tap.astype(acc_dtype) * k[i, j]
      out = term if out is None else out + term
  return out.astype(x.dtype)


def _useful_taps(size: int, out_size: int, k: int, stride: int, pad: int) -> list[int]:
  """Kernel offsets along one axis that reach at least one real (unpadded) input position."""
  return [i for i in range(k)
          if any(0 <= o * stride + i - pad < size for o in range(out_size))]


class DepthwiseConv2d(nnx.Module):
  """Depthwise conv layer; parameters `kernel` (kh, kw, 1, C) and `bias` (C,) like nnx.Conv."""

  def __init__(self, channels: int, kernel_size: int = 7, *, stride: int = 1,
               padding: int | None = None, use_bias: bool = True, method: str = "auto",
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    resolve_method(method)  # validate early
    self.channels = channels
    self.kernel_size = kernel_size
    self.stride = stride
    self.padding = kernel_size // 2 if padding is None else padding
    self.method = method
    self.dtype = dtype
    self.kernel = nnx.Param(trunc_normal(rngs.params(), (kernel_size, kernel_size, 1, channels),
                                         param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype)) if use_bias else nnx.data(None)

  def __call__(self, x: Array) -> Array:
    y = depthwise_conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                         stride=self.stride, padding=self.padding, method=self.method)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


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
