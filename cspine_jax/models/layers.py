"""Shared model pieces: depthwise conv with selectable formulation, drop path, attention pooling.

Why a depthwise conv of our own: XLA:CPU lowers a grouped convolution (`feature_group_count`)
to a slow generic loop (a 7x7 depthwise conv over a stage-2 batch took ~120 ms where a sum of 49
shifted multiplies took 5-9 ms), and its gradient is slow too. The "shifted" formulation pads
once and sums kh*kw shifted slices times per-channel weights; XLA fuses it into one loop and its
autodiff gradient is again shifted multiplies. On GPU/TPU the library convolution is faster, so
"auto" picks "lax" off the CPU. On maps with fewer positions than useful taps (ConvNeXt's 4x4 and
2x2 stages) "shifted" sums over input positions instead (`_dense`): no padded copy, fewer terms.
Fastest on CPU is "native" (what "auto" picks there when it can be built): C++ loops called
through jax.ffi (`native`, `depthwise_cpu.cc`) that need no padded or transposed copies, for the
forward and both gradients; it takes float32 (other dtypes use "shifted"). All use the same
parameters as an `nnx.Conv(feature_group_count=C)`: kernel (kh, kw, 1, C) and bias (C,).
"""
from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from flax import nnx

from cspine_jax.models.cpu import native

Array = jax.Array
Dtype = Any
Method = Literal["auto", "native", "shifted", "lax"]
METHODS = ("auto", "native", "shifted", "lax")

# timm initialises convs and linears with trunc_normal(std=.02) and zero biases.
trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)


def resolve_method(method: str) -> str:
  """Maps "auto" to "lax" off the CPU; on the CPU backend to "native" where the native kernels
  are available (`native.available()`, which builds them once) and JAX has one device, else to
  "shifted".

  One device, because XLA's SPMD partitioner does not know how to split a foreign call: on a
  mesh of several CPU devices it gathers the whole batch onto every device and runs the call
  there (right, but each device then does all the work), while the "shifted" ops partition.
  Every method but "lax" means the CPU formulations for the other layers here (dense,
  normalize, patch_conv); "native" and "shifted" differ only in the depthwise conv.
  """
  if method not in METHODS:
    raise ValueError(f"unknown depthwise conv method {method!r}; expected one of {METHODS}")
  if method == "auto":
    if jax.default_backend() != "cpu":
      return "lax"
    return "native" if jax.device_count() == 1 and native.available() else "shifted"
  return method


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def depthwise_conv2d(x: Array, kernel: Array, bias: Array | None = None, *,
                     stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                     method: str = "auto") -> Array:
  """Depthwise 2D convolution of NHWC `x` with an HWIO kernel (kh, kw, 1, C), plus `bias` (C,).

  `padding` is symmetric zero padding per spatial side. Both formulations compute the same
  cross-correlation as `lax.conv_general_dilated(..., feature_group_count=C)`. "shifted" adds
  the bias inside its tap sum (the stored result is then the biased one: a LayerNorm after it
  reads it directly instead of a second full-size array of conv + bias) and returns its
  gradient as a ones-vector dot (`col_sum`). "native" runs float32 through the C++ kernels
  (other dtypes through "shifted"); it raises `native.NativeBuildError` where they cannot be
  built.
  """
  if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != x.shape[3]:
    raise ValueError(f"depthwise_conv2d wants x (N,H,W,C) and kernel (kh,kw,1,C); got x "
                     f"{x.shape}, kernel {kernel.shape}")
  sh, sw = _pair(stride)
  ph, pw = _pair(padding)
  method = resolve_method(method)
  if method == "lax":
    y = lax.conv_general_dilated(
        x, kernel, window_strides=(sh, sw), padding=((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[3])
    return y if bias is None else y + bias
  bias = _bias_or_zeros(bias, kernel)
  if _takes_native(method, x, kernel):
    return _native(x, kernel, bias, (sh, sw), (ph, pw))
  return _shifted(x, kernel, bias, (sh, sw), (ph, pw))


def _bias_or_zeros(bias: Array | None, kernel: Array) -> Array:
  return jnp.zeros(kernel.shape[3:], kernel.dtype) if bias is None else bias.astype(kernel.dtype)


def _takes_native(method: str, x: Array, kernel: Array) -> bool:
  """Whether the resolved `method` sends this conv to the C++ kernels (float32 only)."""
  return method == "native" and x.dtype == kernel.dtype == jnp.float32


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - k) // stride + 1


def _out_hw(x: Array, kernel: Array, stride: tuple[int, int], padding: tuple[int, int]
            ) -> tuple[int, int]:
  """The output map of the depthwise conv; an error where the kernel exceeds the padded input."""
  kh, kw = kernel.shape[:2]
  ho = _out_size(x.shape[1], kh, stride[0], padding[0])
  wo = _out_size(x.shape[2], kw, stride[1], padding[1])
  if ho <= 0 or wo <= 0:
    raise ValueError(f"depthwise kernel {kh}x{kw} larger than padded input {x.shape}")
  return ho, wo


def _useful_taps(lo: int, hi: int, out_size: int, k: int, stride: int) -> list[int]:
  """Kernel offsets along one axis whose window meets the real data [lo, hi) of the padded axis.

  Taps that only ever see zero padding add nothing (on 2x2 maps a 7x7 kernel has 9 useful taps),
  so they are skipped: same result, less work.
  """
  return [i for i in range(k) if any(lo <= o * stride + i < hi for o in range(out_size))]


def _shifted_valid(xp: Array, kernel: Array, stride: tuple[int, int], out_hw: tuple[int, int],
                   real: tuple[tuple[int, int], tuple[int, int]],
                   bias: Array | None = None) -> Array:
  """Sum of kh*kw strided slices of the already padded `xp` times per-channel weights.

  `real` gives the [lo, hi) range of non-padding rows and columns of `xp` (for tap skipping).
  Accumulates in at least float32 so a bfloat16 compute dtype does not lose 49-term sums.
  """
  n, _, _, c = xp.shape
  kh, kw = kernel.shape[:2]
  (sh, sw), (ho, wo) = stride, out_hw
  acc_dtype = jnp.promote_types(xp.dtype, jnp.float32)
  k = kernel[:, :, 0, :].astype(acc_dtype)
  out = jnp.zeros((n, ho, wo, c), acc_dtype)
  if bias is not None:
    out = out + bias.astype(acc_dtype)
  for i in _useful_taps(*real[0], ho, kh, sh):
    for j in _useful_taps(*real[1], wo, kw, sw):
      tap = lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                      (1, sh, sw, 1))
      out = out + tap.astype(acc_dtype) * k[i, j]
  return _materialised(out.astype(xp.dtype))


def _materialised(y: Array) -> Array:
  """`y` unchanged (non-finite values become NaN), ending in an op XLA:CPU will not duplicate.

  The kh*kw-tap sum is a chain of cheap elementwise ops, and XLA:CPU fuses such a chain into
  every consumer of its result: the LayerNorm after a ConvNeXt depthwise conv has three (mean,
  variance, normalisation), so the sum ran three times, more in the backward. Instruction fusion
  never duplicates an expensive op into several consumers, and a divide is one, so the chain
  fuses into this divide, which is computed once and stored. The divisor is 1 computed from `y`
  (x * 0 + 1 is not folded for floats, and a divide by a broadcast scalar would be rewritten to
  a cheap multiply). Not `lax.optimization_barrier` (XLA:CPU removes barriers before fusion) and
  not a concatenate of > 8 pieces (also never fused, but it multiplies the code to compile, and
  pieces along the batch axis take the SPMD partitioner minutes on a data-parallel mesh).
  """
  return y / (y * 0 + 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _shifted(x: Array, kernel: Array, bias: Array, stride: tuple[int, int],
             padding: tuple[int, int]) -> Array:
  """Shifted-slices depthwise conv with a hand-written VJP (see `_shifted_bwd`)."""
  _, h, w, _ = x.shape
  kh, kw = kernel.shape[:2]
  ph, pw = padding
  ho, wo = _out_hw(x, kernel, stride, padding)
  if _dense_wins(h, w, ho, wo, kh, kw, stride, padding):
    return _dense(x, _position_matrix(kernel, h, w, ho, wo, stride, padding), (ho, wo), bias)
  xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  return _shifted_valid(xp, kernel, stride, (ho, wo), ((ph, ph + h), (pw, pw + w)), bias)


def _dense_wins(h: int, w: int, ho: int, wo: int, kh: int, kw: int, stride: tuple[int, int],
                padding: tuple[int, int]) -> bool:
  """Whether `_dense` does fewer multiplies than the tap sum: on maps with fewer positions than
  useful taps (ConvNeXt's 7x7 on 4x4 and 2x2 maps: 16 < 49 and 4 < 9 terms per output)."""
  taps = (len(_useful_taps(padding[0], padding[0] + h, ho, kh, stride[0]))
          * len(_useful_taps(padding[1], padding[1] + w, wo, kw, stride[1])))
  return h * w < taps


def _position_matrix(kernel: Array, h: int, w: int, ho: int, wo: int, stride: tuple[int, int],
                     padding: tuple[int, int]) -> Array:
  """t[a, o, c]: the weight input position a (of h*w) has in output position o (of ho*wo) of
  channel c - kernel[a_y - o_y*sh + ph, a_x - o_x*sw + pw, 0, c], 0 where outside the kernel."""
  kh, kw = kernel.shape[:2]
  acc = jnp.promote_types(kernel.dtype, jnp.float32)

  def taps(size, out, k, s, pad):  # [input index, output index, tap] -> 1 where they meet
    return (np.arange(size)[:, None, None] == s * np.arange(out)[None, :, None]
            + np.arange(k)[None, None, :] - pad).astype(np.float32)

  t = jnp.einsum("ayi,bxj,ijc->abyxc", taps(h, ho, kh, stride[0], padding[0]),
                 taps(w, wo, kw, stride[1], padding[1]), kernel[:, :, 0, :].astype(acc))
  return t.reshape(h * w, ho * wo, -1)


def _dense(x: Array, t: Array, out_hw: tuple[int, int], bias: Array | None = None) -> Array:
  """out[n, o, c] = sum_a x[n, a, c] t[a, o, c] over the h*w input positions a, as one fused
  loop of broadcast multiplies (channels minor), for small maps: no padded copy of `x` (a 2x2
  map padded by 3 is 16x larger) and only h*w terms per output. ~4x faster than the tap sum on
  2x2x320 and ~1.7x on 4x4x160 at n = 128 (a channel-batched matmul needs two transposes)."""
  n, h, w, c = x.shape
  acc = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.reshape(n, h * w, c)
  # `t` is made from the kernel by an einsum of 0/1 tensors (`_position_matrix`): left to
  # fusion, that einsum is recomputed inside the loop for every term (2.4x slower on 4x4x160).
  t = _materialised(t)
  out = jnp.zeros((n, t.shape[1], c), acc)
  if bias is not None:
    out = out + bias.astype(acc)
  for a in range(h * w):
    out = out + xf[:, a:a + 1, :].astype(acc) * t[a]
  return _materialised(out.astype(x.dtype)).reshape(n, *out_hw, c)


def _shifted_fwd(x, kernel, bias, stride, padding):
  return _shifted(x, kernel, bias, stride, padding), (x, kernel)


def _shifted_bwd(stride, padding, res, g):
  """Input gradient: g dilated by the stride, padded, and correlated with the flipped kernel -
  again one fused loop of shifted multiplies (autodiff's transpose is kh*kw pads and adds, slow
  to run and to compile). Kernel gradient: batched matmuls (`_kernel_grad`)."""
  x, kernel = res
  _, h, w, _ = x.shape
  kh, kw = kernel.shape[:2]
  (sh, sw), (ph, pw) = stride, padding
  _, ho, wo, _ = g.shape
  dk = _kernel_grad(x, g, kh, kw, stride, padding).astype(kernel.dtype)
  db = col_sum(g).astype(kernel.dtype)
  if _dense_wins(h, w, ho, wo, kh, kw, stride, padding):
    # The forward's position matrix, transposed, maps output positions back to input positions
    # (ho*wo <= h*w terms per input position).
    t = _position_matrix(kernel, h, w, ho, wo, stride, padding)
    return _dense(g, jnp.transpose(t, (1, 0, 2)), (h, w)), dk, db
  # Dilated g has (ho-1)*s+1 rows; pad so a valid kh-tap correlation gives h rows (lax.pad
  # accepts the negative high padding of inputs whose last rows no window reached).
  lo_h, lo_w = kh - 1 - ph, kw - 1 - pw
  hi_h = h + kh - 1 - lo_h - ((ho - 1) * sh + 1)
  hi_w = w + kw - 1 - lo_w - ((wo - 1) * sw + 1)
  gp = lax.pad(g, jnp.zeros((), g.dtype),
               ((0, 0, 0), (lo_h, hi_h, sh - 1), (lo_w, hi_w, sw - 1), (0, 0, 0)))
  real = ((max(lo_h, 0), lo_h + (ho - 1) * sh + 1), (max(lo_w, 0), lo_w + (wo - 1) * sw + 1))
  return _shifted_valid(gp, kernel[::-1, ::-1], (1, 1), (h, w), real), dk, db


_shifted.defvjp(_shifted_fwd, _shifted_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _native(x: Array, kernel: Array, bias: Array, stride: tuple[int, int],
            padding: tuple[int, int]) -> Array:
  """The C++ depthwise conv (float32); gradients by its two backward kernels."""
  return native.depthwise_forward(x, kernel[:, :, 0, :], bias,
                                  _out_hw(x, kernel, stride, padding), stride, padding)


def _native_fwd(x, kernel, bias, stride, padding):
  return _native(x, kernel, bias, stride, padding), (x, kernel)


def _native_bwd(stride, padding, res, g):
  x, kernel = res
  dx = native.depthwise_input_grad(g, kernel[:, :, 0, :], x.shape[1:3], stride, padding)
  dk = native.depthwise_kernel_grad(x, g, kernel.shape[:2], stride, padding)[:, :, None, :]
  return dx, dk, col_sum(g).astype(kernel.dtype)


_native.defvjp(_native_fwd, _native_bwd)


def depthwise_conv2d_normalize(x: Array, kernel: Array, bias: Array | None, epsilon: float,
                               scale: Array | None = None, shift: Array | None = None, *,
                               padding: int | tuple[int, int] = 0,
                               method: str = "auto") -> Array:
  """`normalize(depthwise_conv2d(x, kernel, bias, padding=padding), epsilon)` (stride 1), times
  `scale` plus `shift` when given: ConvNeXt's depthwise conv and the LayerNorm after it.

  With "native" and float32 one C++ call normalises each output row while it is still in cache
  (the separate statistics, normalisation and affine passes over the activation are gone).
  Without the affine part its gradient needs only the normalised output and the per-pixel
  1/std; with it, the backward recomputes those (one more forward: training folds the affine
  part into the next layer instead, see `ConvNeXtBlock`). Elsewhere the separate ops.
  """
  m = resolve_method(method)
  ph, pw = _pair(padding)
  if (scale is None) != (shift is None):
    raise ValueError("depthwise_conv2d_normalize wants both scale and shift, or neither")
  if _takes_native(m, x, kernel):
    bias = _bias_or_zeros(bias, kernel)
    if scale is None:
      return _native_normalized(x, kernel, bias, (ph, pw), float(epsilon))
    return _native_normalized_affine(x, kernel, bias, scale.astype(kernel.dtype),
                                     shift.astype(kernel.dtype), (ph, pw), float(epsilon))
  y = normalize(depthwise_conv2d(x, kernel, bias, padding=(ph, pw), method=m), epsilon, method=m)
  return y if scale is None else y * scale + shift


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _native_normalized(x: Array, kernel: Array, bias: Array, padding: tuple[int, int],
                       epsilon: float) -> Array:
  return _native_normalized_fwd(x, kernel, bias, padding, epsilon)[0]


def _native_normalized_fwd(x, kernel, bias, padding, epsilon):
  y, rstd = native.depthwise_forward_normalized(
      x, kernel[:, :, 0, :], bias, _out_hw(x, kernel, (1, 1), padding), (1, 1), padding, epsilon)
  return y, (x, kernel, y, rstd[..., None])


def _native_normalized_bwd(padding, epsilon, res, g):
  del epsilon
  x, kernel, xhat, rstd = res
  g_conv = _normalize_grad(g, xhat, rstd)
  return _native_bwd((1, 1), padding, (x, kernel), g_conv)


_native_normalized.defvjp(_native_normalized_fwd, _native_normalized_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _native_normalized_affine(x: Array, kernel: Array, bias: Array, scale: Array, shift: Array,
                              padding: tuple[int, int], epsilon: float) -> Array:
  return native.depthwise_forward_normalized(
      x, kernel[:, :, 0, :], bias, _out_hw(x, kernel, (1, 1), padding), (1, 1), padding, epsilon,
      scale, shift)[0]


def _native_normalized_affine_fwd(x, kernel, bias, scale, shift, padding, epsilon):
  y = _native_normalized_affine(x, kernel, bias, scale, shift, padding, epsilon)
  return y, (x, kernel, bias, scale)


def _native_normalized_affine_bwd(padding, epsilon, res, g):
  x, kernel, bias, scale = res
  xhat, vjp = jax.vjp(lambda x, k, b: _native_normalized(x, k, b, padding, epsilon),
                      x, kernel, bias)
  dx, dk, db = vjp(g * scale)
  return dx, dk, db, col_sum(g * xhat).astype(scale.dtype), col_sum(g).astype(scale.dtype)


_native_normalized_affine.defvjp(_native_normalized_affine_fwd, _native_normalized_affine_bwd)


def _kernel_grad(x: Array, g: Array, kh: int, kw: int, stride: tuple[int, int],
                 padding: tuple[int, int]) -> Array:
  """dk[i, j, 0, c] = sum_{n,y,x} xpad[n, y*sh+i, x*sw+j, c] * g[n, y, x, c].

  XLA:CPU materialises every shifted slice that feeds a reduction and then runs kh*kw separate
  reductions (~4x slower), so no form is a direct tap sum. `_kernel_grad_pairs` (a matmul) costs
  ~ (h*w)*(ho*wo) per channel and sample, `_kernel_grad_rows` (a matmul) ~ kh*(w+2pw)*(ho*wo), and
  `_kernel_grad_fft` (stride 1 only) ~ an FFT of each sample's channel. Pairs win where the output
  map is small against the batch and the kernel (9*ho*wo <= n*kh*kw) and at most 16x16; past
  that, at stride 1 on maps of 14x14 or more with 24 channels or more, the FFT (the matmul forms
  spend most of their time on channel-major copies and the rows form on 7x as many column pairs
  as the taps use; with few channels rows stays faster: 16x16x8 at n = 32 0.67 / 1.12 ms); else
  rows. Measured, ms per kernel gradient (pairs / rows), 7x7 at n = 128: 16x16x40 12.8 / 41.0,
  8x8x80 3.2 / 23.4, 4x4x160 1.1 / 10.6, 2x2x320 0.9 / 2.5 (a direct tap sum); 7x7 at n = 16:
  7x7x768 7.0 / 26.9, 14x14x384 87.5 / 41.8; 3x3 at n = 64: 8x8x128 3.4 / 4.8, 16x16x64 31.5 /
  19.0. The chosen form / the FFT (ConvNeXt-Tiny's maps at n = 16, 7x7): 56x56x96 109 / 70,
  28x28x192 53 / 24, 14x14x384 16 / 13, 7x7x768 4.9 / 14 (pairs); at n = 128: 32x32x40 110 / 72,
  16x16x40 6.2 / 15.8 (pairs); 32x32x24 at n = 64 30 / 11.
  """
  n = x.shape[0]
  _, ho, wo, _ = g.shape
  if 9 * ho * wo <= n * kh * kw and ho * wo <= 256:
    return _kernel_grad_pairs(x, g, kh, kw, stride, padding)
  if tuple(stride) == (1, 1) and ho * wo >= 196 and x.shape[-1] >= 24:
    return _kernel_grad_fft(x, g, kh, kw, padding)
  return _kernel_grad_rows(x, g, kh, kw, stride, padding)


def _fft_size(m: int) -> int:
  """The smallest length >= m whose prime factors are 2, 3 and 5 (fast FFT sizes: 62 -> 64)."""
  k = max(m, 1)
  while True:
    r = k
    for f in (2, 3, 5):
      while r % f == 0:
        r //= f
    if r == 1:
      return k
    k += 1


def _kernel_grad_fft(x: Array, g: Array, kh: int, kw: int, padding: tuple[int, int]) -> Array:
  """Stride-1 kernel gradient as a correlation by FFT: per sample and channel, the padded input
  correlated with g, summed over the batch in the frequency domain, lags 0..kh-1 x 0..kw-1.

  A circular correlation of length L >= h + 2ph has no wrap-around at those lags (the last row a
  lag reaches is ho - 1 + kh - 1 = h + 2ph - 1), so L is the next fast FFT size above it. Computed
  in float32 at least: ~5e-7 relative to the matmul forms on ConvNeXt's maps.
  """
  _, h, w, _ = x.shape
  ph, pw = padding
  acc = jnp.promote_types(x.dtype, jnp.float32)
  size = (_fft_size(h + 2 * ph), _fft_size(w + 2 * pw))
  xt = jnp.pad(jnp.transpose(x.astype(acc), (0, 3, 1, 2)), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
  gt = jnp.transpose(g.astype(acc), (0, 3, 1, 2))  # rfft2 pads it with zeros to `size`
  spectrum = jnp.sum(jnp.fft.rfft2(xt, s=size) * jnp.conj(jnp.fft.rfft2(gt, s=size)), axis=0)
  lags = jnp.fft.irfft2(spectrum, s=size)[:, :kh, :kw]  # (c, kh, kw)
  return jnp.transpose(lags, (1, 2, 0))[:, :, None, :]


def _kernel_grad_pairs(x: Array, g: Array, kh: int, kw: int, stride: tuple[int, int],
                       padding: tuple[int, int]) -> Array:
  """Kernel gradient from all (input, output) position pairs, contracted over the batch only.

  p[c, a, b, y, x] = sum_n x[n, a, b, c] g[n, y, x, c] is one batched matmul (no padding, no
  shifted copies); the tap (i, j) then sums the pairs with a = y*sh + i - ph, b = x*sw + j - pw,
  through constant 0/1 tensors. p has c*(h*w)*(ho*wo) elements, so this suits small maps.
  """
  n, h, w, c = x.shape
  _, ho, wo, _ = g.shape
  (sh, sw), (ph, pw) = stride, padding
  acc = jnp.promote_types(x.dtype, jnp.float32)
  p = lax.dot_general(x.reshape(n, h * w, c), g.reshape(n, ho * wo, c),
                      (((0,), (0,)), ((2,), (2,))), preferred_element_type=acc)
  p = p.reshape(c, h, w, ho, wo)

  def taps(size, out, k, s, pad):  # [input index, output index, tap] -> 1 where they meet
    return (jnp.arange(size)[:, None, None] == s * jnp.arange(out)[None, :, None]
            + jnp.arange(k)[None, None, :] - pad).astype(acc)

  q = jnp.einsum("cabyx,bxj->cayj", p, taps(w, wo, kw, sw, pw))
  return jnp.einsum("cayj,ayi->ijc", q, taps(h, ho, kh, sh, ph))[:, :, None, :]


def _kernel_grad_rows(x: Array, g: Array, kh: int, kw: int, stride: tuple[int, int],
                      padding: tuple[int, int]) -> Array:
  """Kernel gradient as one channel-major batched matmul over (n, y) for all row offsets i.

  m[c, i, a, b] = sum_{n,y} xpad[n, y*sh+i, a, c] g[n, y, b, c], then the column offsets j are
  the diagonals a = b*sw + j, summed with a constant 0/1 tensor.
  """
  n, h, w, c = x.shape
  _, ho, wo, _ = g.shape
  (sh, sw), (ph, pw) = stride, padding
  acc = jnp.promote_types(x.dtype, jnp.float32)
  # Layout (c, column, n, row): the contraction (n, row) is minor in both operands, the layout
  # XLA:CPU's batched matmul runs fastest (~2x over contraction-major).
  xt = jnp.pad(jnp.transpose(x, (3, 2, 0, 1)), ((0, 0), (pw, pw), (0, 0), (ph, ph)))
  wp = w + 2 * pw
  gt = jnp.transpose(g, (3, 2, 0, 1)).reshape(c, wo, n * ho)
  rows = jnp.stack([lax.slice(xt, (0, 0, 0, i), (c, wp, n, i + (ho - 1) * sh + 1), (1, 1, 1, sh))
                    for i in range(kh)], axis=1).reshape(c, kh * wp, n * ho)
  m = lax.dot_general(rows, gt, (((2,), (2,)), ((0,), (0,))), preferred_element_type=acc)
  diag = (jnp.arange(wp)[:, None, None]
          == sw * jnp.arange(wo)[None, :, None] + jnp.arange(kw)[None, None, :]).astype(acc)
  return jnp.einsum("ciab,abj->ijc", m.reshape(c, kh, wp, wo), diag)[:, :, None, :]


def patch_conv(x: Array, kernel: Array, *, method: str = "auto") -> Array:
  """k x k stride-k VALID convolution of NHWC `x` with an HWIO kernel (k, k, Cin, Cout), no bias.

  The ConvNeXt stem (4x4/4) and downsample (2x2/2) convs. The forward is always the library
  convolution (on XLA:CPU faster than the patch matmul below: that one first copies `x` into
  patch order). Method "shifted" (what "auto" picks on CPU) gives it a hand-written VJP of patch
  matmuls: autodiff's transposed convs run in a channel-major layout on XLA:CPU and transpose the
  NHWC operands element by element, where the patch form is a reshape, one transpose and plain
  matmuls. Input rows/columns past the last whole patch get zero gradient, as with the conv.
  """
  k = kernel.shape[0]
  if kernel.ndim != 4 or kernel.shape[1] != k or x.ndim != 4 or kernel.shape[2] != x.shape[3]:
    raise ValueError(f"patch_conv wants x (N,H,W,Cin) and kernel (k,k,Cin,Cout); got x {x.shape}, "
                     f"kernel {kernel.shape}")
  if resolve_method(method) == "lax":
    return _lax_patch_conv(x, kernel)
  return _patch_conv(x, kernel)


def _lax_patch_conv(x: Array, kernel: Array) -> Array:
  k = kernel.shape[0]
  return lax.conv_general_dilated(x, kernel, window_strides=(k, k), padding="VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def _patch_conv(x: Array, kernel: Array) -> Array:
  return _lax_patch_conv(x, kernel)


def _patch_conv_fwd(x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
  return _lax_patch_conv(x, kernel), (x, kernel)


def _patch_conv_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
  x, kernel = res
  n, h, w, cin = x.shape
  k, cout = kernel.shape[0], kernel.shape[3]
  _, ho, wo, _ = g.shape
  acc = jnp.promote_types(x.dtype, jnp.float32)
  patches = (x[:, :ho * k, :wo * k].reshape(n, ho, k, wo, k, cin)
             .transpose(0, 1, 3, 2, 4, 5).reshape(n * ho * wo, k * k * cin))
  g2 = g.reshape(n * ho * wo, cout)
  dk = row_contraction(patches, g2, preferred_element_type=acc)
  dp = lax.dot_general(g2, kernel.reshape(k * k * cin, cout), (((1,), (1,)), ((), ())),
                       preferred_element_type=acc).astype(x.dtype)
  dx = (dp.reshape(n, ho, wo, k, k, cin).transpose(0, 1, 3, 2, 4, 5)
        .reshape(n, ho * k, wo * k, cin))
  dx = jnp.pad(dx, ((0, 0), (0, h - ho * k), (0, w - wo * k), (0, 0)))
  return dx, dk.reshape(k, k, cin, cout).astype(kernel.dtype)


_patch_conv.defvjp(_patch_conv_fwd, _patch_conv_bwd)


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
  expansion adds an exp branch (~15% slower atto forward at 64 px). The custom VJP keeps only x
  for the backward: with autodiff's VJP XLA:CPU stores erf(x/sqrt2) as a second full-size array
  (one more write and two more reads of the largest activation of a ConvNeXt block), and
  the backward's recomputation of erf and exp costs less than that memory traffic.
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


def col_sum(v: Array) -> Array:
  """Sum of `v` over all axes but the last, as a vector-matrix product with a ones vector.

  The gradient of a bias over a (rows, features) activation. XLA:CPU rewrites a reduction over
  more than 32 elements into a reduce-window of 32-element windows plus a reduce, and a
  reduce-window over the major axes of a row-major array walks the array once per feature (3.4
  ms for the column sums of a 32768 x 160 activation); it also merges staged reductions back
  into one. The dot reads `v` once, vectorised over the features.
  """
  v = v.reshape(-1, v.shape[-1])
  return lax.dot_general(jnp.ones((v.shape[0],), v.dtype), v, (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.promote_types(v.dtype, jnp.float32))


def row_contraction(a: Array, b: Array, **kwargs) -> Array:
  """``a.T @ b`` for row-major (rows, p) and (rows, q): the weight gradient of a linear layer.

  XLA:CPU's matmul over the rows of both operands runs 1.5-1.8x faster when the result is
  wide (p <= q) than when it is tall (32768 x 160 by 32768 x 40: 2.5 vs 4.1 ms; 8192 x 320 by
  8192 x 80: 2.6 vs 4.6 ms), so a tall result is computed as ``(b.T @ a).T``: a copy of a
  small weight-shaped array. The transpose must not consume the dot directly, or XLA folds it
  back into the tall dot (`_materialised` stands between them).
  """
  dims = (((0,), (0,)), ((), ()))
  if a.shape[1] <= b.shape[1]:
    return lax.dot_general(a, b, dims, **kwargs)
  return _materialised(lax.dot_general(b, a, dims, **kwargs)).T


def dense(x: Array, kernel: Array, bias: Array | None = None, *, method: str = "auto") -> Array:
  """`x @ kernel + bias` over the last axis of `x` (what `nnx.Linear` computes).

  Method "shifted" (what "auto" picks on CPU) gives it a hand-written VJP: autodiff's kernel
  gradient made XLA:CPU copy the output gradient into a transposed layout first (3.4 ms for a
  32768 x 160 one) and its bias gradient is a slow reduce-window (see `col_sum`); here the
  kernel gradient is one dot contracting the rows of both operands as they lie. "lax": the
  library form with autodiff.
  """
  if resolve_method(method) == "lax":
    y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y if bias is None else y + bias
  if bias is None:
    return _linear(x, kernel, jnp.zeros(kernel.shape[1:], kernel.dtype))
  return _linear(x, kernel, bias)


@jax.custom_vjp
def _linear(x: Array, kernel: Array, bias: Array) -> Array:
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias


def _linear_fwd(x, kernel, bias):
  return _linear(x, kernel, bias), (x, kernel)


def _linear_bwd(res, g):
  x, kernel = res
  x2 = x.reshape(-1, x.shape[-1])
  g2 = g.reshape(-1, g.shape[-1])
  dx = lax.dot_general(g2, kernel, (((1,), (1,)), ((), ()))).reshape(x.shape)
  dk = row_contraction(x2, g2)
  return dx.astype(x.dtype), dk.astype(kernel.dtype), col_sum(g2).astype(g.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def normalize(x: Array, epsilon: float, *, method: str = "auto") -> Array:
  """LayerNorm without the affine part: `(x - mean) * rsqrt(var + epsilon)` over the last axis,
  statistics in at least float32 (as `nnx.LayerNorm`, incl. its one-pass variance).

  Method "shifted" (what "auto" picks on CPU) gives it a hand-written VJP that keeps `x` and the
  two per-row statistics and returns `rstd * (g - mean(g) - xhat * mean(g * xhat))`: two row
  reductions, where autodiff of the one-pass form makes XLA:CPU run and store more. "lax": the
  library formulas with autodiff.
  """
  if resolve_method(method) == "lax":
    return _normalize_plain(x, epsilon)[0]
  return _normalize(x, epsilon)


def _normalize_plain(x: Array, epsilon: float) -> tuple[Array, Array, Array]:
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(xf * xf, axis=-1, keepdims=True) - mean * mean)
  rstd = lax.rsqrt(var + epsilon)
  return ((xf - mean) * rstd).astype(x.dtype), mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _normalize(x: Array, epsilon: float) -> Array:
  return _normalize_plain(x, epsilon)[0]


def _normalize_fwd(x, epsilon):
  y, mean, rstd = _normalize_plain(x, epsilon)
  return y, (x, mean, rstd)


def _normalize_bwd(epsilon, res, g):
  del epsilon
  x, mean, rstd = res
  xhat = (x.astype(mean.dtype) - mean) * rstd
  return (_normalize_grad(g, xhat, rstd).astype(x.dtype),)


def _normalize_grad(g: Array, xhat: Array, rstd: Array) -> Array:
  """The input gradient of `(x - mean) * rstd` over the last axis, from the normalised `xhat`
  and `rstd` (broadcastable, float32 or wider): rstd (g - mean(g) - xhat mean(g xhat))."""
  gf = g.astype(rstd.dtype)
  return rstd * (gf - jnp.mean(gf, axis=-1, keepdims=True)
                 - xhat * jnp.mean(gf * xhat, axis=-1, keepdims=True))


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def add_bias(y: Array, bias: Array, *, method: str = "auto") -> Array:
  """`y + bias` over the last axis. On the CPU forms its gradient is a `col_sum` (XLA:CPU's
  reduction over the major axes of the autodiff form took ~20 ms for the bias of a ConvNeXt-Tiny
  downsample conv, 12544 x 192, in the paper-size train step)."""
  if resolve_method(method) == "lax":
    return y + bias
  return _add_bias(y, bias.astype(y.dtype))


@jax.custom_vjp
def _add_bias(y: Array, bias: Array) -> Array:
  return y + bias


def _add_bias_fwd(y, bias):
  return y + bias, None


def _add_bias_bwd(_, g):
  return g, col_sum(g).astype(g.dtype)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def layer_norm(x: Array, scale: Array, shift: Array, epsilon: float, *,
               method: str = "auto") -> Array:
  """LayerNorm with its affine part, `normalize(x) * scale + shift` (what `nnx.LayerNorm`
  computes). On the CPU forms the scale and shift gradients are `col_sum`s (see `add_bias`)."""
  if resolve_method(method) == "lax":
    return _normalize_plain(x, epsilon)[0] * scale + shift
  return _scale_shift(normalize(x, epsilon, method=method), scale.astype(x.dtype),
                      shift.astype(x.dtype))


@jax.custom_vjp
def _scale_shift(xhat: Array, scale: Array, shift: Array) -> Array:
  return xhat * scale + shift


def _scale_shift_fwd(xhat, scale, shift):
  return xhat * scale + shift, (xhat, scale)


def _scale_shift_bwd(res, g):
  xhat, scale = res
  return g * scale, col_sum(g * xhat).astype(g.dtype), col_sum(g).astype(g.dtype)


_scale_shift.defvjp(_scale_shift_fwd, _scale_shift_bwd)


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
