"""Method "shifted": the depthwise conv in a form XLA:CPU runs well, with its own VJP.

XLA:CPU lowers a grouped convolution (`feature_group_count`) to a slow generic loop, forward and
gradient. Here the input is padded once and the kh*kw shifted slices times per-channel weights
are summed, which XLA fuses into one loop; on maps with fewer positions than useful taps
(ConvNeXt's 4x4 and 2x2 stages) the sum runs over input positions instead (`dense`). Same
parameters and result as `lax.conv_general_dilated(..., feature_group_count=C)`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cspine_jax.models.cpu import kernel_grad
from cspine_jax.models.cpu import ops

Array = jax.Array


def useful_taps(lo: int, hi: int, out_size: int, k: int, stride: int) -> list[int]:
  """Kernel offsets along one axis whose window meets the real data [lo, hi) of the padded axis.

  Taps that only ever see zero padding add nothing (on 2x2 maps a 7x7 kernel has 9 useful taps),
  so they are skipped: same result, less work.
  """
  return [i for i in range(k) if any(lo <= o * stride + i < hi for o in range(out_size))]


def shifted_valid(xp: Array, kernel: Array, stride: tuple[int, int], out_hw: tuple[int, int],
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
  for i in useful_taps(*real[0], ho, kh, sh):
    for j in useful_taps(*real[1], wo, kw, sw):
      tap = lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                      (1, sh, sw, 1))
      out = out + tap.astype(acc_dtype) * k[i, j]
  # Stored once: the LayerNorm after it has three consumers that would each recompute the sum.
  return ops.materialised(out.astype(xp.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def depthwise_conv2d(x: Array, kernel: Array, bias: Array, stride: tuple[int, int],
                     padding: tuple[int, int]) -> Array:
  """Depthwise conv of NHWC `x` with kernel (kh, kw, 1, C) plus `bias` (C,), added inside the tap
  sum (a LayerNorm after it reads the stored biased result, not a second full-size array)."""
  _, h, w, _ = x.shape
  kh, kw = kernel.shape[:2]
  ph, pw = padding
  ho, wo = ops.out_hw(x, kernel, stride, padding)
  if dense_wins(h, w, ho, wo, kh, kw, stride, padding):
    return dense(x, position_matrix(kernel, h, w, ho, wo, stride, padding), (ho, wo), bias)
  xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  return shifted_valid(xp, kernel, stride, (ho, wo), ((ph, ph + h), (pw, pw + w)), bias)


def dense_wins(h: int, w: int, ho: int, wo: int, kh: int, kw: int, stride: tuple[int, int],
               padding: tuple[int, int]) -> bool:
  """Whether `dense` does fewer multiplies than the tap sum: on maps with fewer positions than
  useful taps (ConvNeXt's 7x7 on 4x4 and 2x2 maps: 16 < 49 and 4 < 9 terms per output)."""
  taps = (len(useful_taps(padding[0], padding[0] + h, ho, kh, stride[0]))
          * len(useful_taps(padding[1], padding[1] + w, wo, kw, stride[1])))
  return h * w < taps


def position_matrix(kernel: Array, h: int, w: int, ho: int, wo: int, stride: tuple[int, int],
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


def dense(x: Array, t: Array, out_hw: tuple[int, int], bias: Array | None = None) -> Array:
  """out[n, o, c] = sum_a x[n, a, c] t[a, o, c] over the h*w input positions a, as one fused
  loop of broadcast multiplies (channels minor), for small maps: no padded copy of `x` (a 2x2
  map padded by 3 is 16x larger) and only h*w terms per output (a channel-batched matmul would
  need two transposes)."""
  n, h, w, c = x.shape
  acc = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.reshape(n, h * w, c)
  # `t` is an einsum of 0/1 tensors and the kernel: left to fusion, it would be recomputed inside
  # the loop for every term.
  t = ops.materialised(t)
  out = jnp.zeros((n, t.shape[1], c), acc)
  if bias is not None:
    out = out + bias.astype(acc)
  for a in range(h * w):
    out = out + xf[:, a:a + 1, :].astype(acc) * t[a]
  return ops.materialised(out.astype(x.dtype)).reshape(n, *out_hw, c)


def _fwd(x, kernel, bias, stride, padding):
  return depthwise_conv2d(x, kernel, bias, stride, padding), (x, kernel)


def _bwd(stride, padding, res, g):
  """Input gradient: g dilated by the stride, padded, and correlated with the flipped kernel -
  again one fused loop of shifted multiplies (autodiff's transpose is kh*kw pads and adds, slow
  to run and to compile). Kernel gradient: `kernel_grad`; bias gradient: `ops.col_sum`."""
  x, kernel = res
  _, h, w, _ = x.shape
  kh, kw = kernel.shape[:2]
  (sh, sw), (ph, pw) = stride, padding
  _, ho, wo, _ = g.shape
  dk = kernel_grad.kernel_grad(x, g, kh, kw, stride, padding).astype(kernel.dtype)
  db = ops.col_sum(g).astype(kernel.dtype)
  if dense_wins(h, w, ho, wo, kh, kw, stride, padding):
    # The forward's position matrix, transposed, maps output positions back to input positions
    # (ho*wo <= h*w terms per input position).
    t = position_matrix(kernel, h, w, ho, wo, stride, padding)
    return dense(g, jnp.transpose(t, (1, 0, 2)), (h, w)), dk, db
  # Dilated g has (ho-1)*s+1 rows; pad so a valid kh-tap correlation gives h rows (lax.pad
  # accepts the negative high padding of inputs whose last rows no window reached).
  lo_h, lo_w = kh - 1 - ph, kw - 1 - pw
  hi_h = h + kh - 1 - lo_h - ((ho - 1) * sh + 1)
  hi_w = w + kw - 1 - lo_w - ((wo - 1) * sw + 1)
  gp = lax.pad(g, jnp.zeros((), g.dtype),
               ((0, 0, 0), (lo_h, hi_h, sh - 1), (lo_w, hi_w, sw - 1), (0, 0, 0)))
  real = ((max(lo_h, 0), lo_h + (ho - 1) * sh + 1), (max(lo_w, 0), lo_w + (wo - 1) * sw + 1))
  return shifted_valid(gp, kernel[::-1, ::-1], (1, 1), (h, w), real), dk, db


depthwise_conv2d.defvjp(_fwd, _bwd)
