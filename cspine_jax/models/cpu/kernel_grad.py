"""The kernel gradient of the "shifted" depthwise conv: three XLA:CPU forms and the choice between
them by map, batch and channel sizes.

dk[i, j, 0, c] = sum_{n,y,x} xpad[n, y*sh+i, x*sw+j, c] * g[n, y, x, c]. No form is a direct tap
sum: XLA:CPU materialises every shifted slice that feeds a reduction and then runs kh*kw separate
reductions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def kernel_grad(x: Array, g: Array, kh: int, kw: int, stride: tuple[int, int],
                padding: tuple[int, int]) -> Array:
  """dk (kh, kw, 1, C) of the depthwise conv of `x` with output gradient `g`.

  `pairs` costs ~ (h*w)*(ho*wo) per channel and sample, `rows` ~ kh*(w+2pw)*(ho*wo), `fft`
  (stride 1 only) ~ an FFT of each sample's channel: pairs on output maps that are small against
  the batch and the kernel, the FFT on large stride-1 maps with enough channels (with few, rows
  has less overhead), else rows. The thresholds are measured on ConvNeXt's and EfficientNet's
  maps.
  """
  n = x.shape[0]
  _, ho, wo, _ = g.shape
  if 9 * ho * wo <= n * kh * kw and ho * wo <= 256:
    return pairs(x, g, kh, kw, stride, padding)
  if tuple(stride) == (1, 1) and ho * wo >= 196 and x.shape[-1] >= 24:
    return fft(x, g, kh, kw, padding)
  return rows(x, g, kh, kw, stride, padding)


def fft_size(m: int) -> int:
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


def fft(x: Array, g: Array, kh: int, kw: int, padding: tuple[int, int]) -> Array:
  """Stride-1 kernel gradient as a correlation by FFT: per sample and channel, the padded input
  correlated with g, summed over the batch in the frequency domain, lags 0..kh-1 x 0..kw-1.

  A circular correlation of length L >= h + 2ph has no wrap-around at those lags (the last row a
  lag reaches is ho - 1 + kh - 1 = h + 2ph - 1), so L is the next fast FFT size above it.
  Computed in float32 at least.
  """
  _, h, w, _ = x.shape
  ph, pw = padding
  acc = jnp.promote_types(x.dtype, jnp.float32)
  size = (fft_size(h + 2 * ph), fft_size(w + 2 * pw))
  xt = jnp.pad(jnp.transpose(x.astype(acc), (0, 3, 1, 2)), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
  gt = jnp.transpose(g.astype(acc), (0, 3, 1, 2))  # rfft2 pads it with zeros to `size`
  spectrum = jnp.sum(jnp.fft.rfft2(xt, s=size) * jnp.conj(jnp.fft.rfft2(gt, s=size)), axis=0)
  lags = jnp.fft.irfft2(spectrum, s=size)[:, :kh, :kw]  # (c, kh, kw)
  return jnp.transpose(lags, (1, 2, 0))[:, :, None, :]


def pairs(x: Array, g: Array, kh: int, kw: int, stride: tuple[int, int],
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


def rows(x: Array, g: Array, kh: int, kw: int, stride: tuple[int, int],
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
  # XLA:CPU's batched matmul runs fastest.
  xt = jnp.pad(jnp.transpose(x, (3, 2, 0, 1)), ((0, 0), (pw, pw), (0, 0), (ph, ph)))
  wp = w + 2 * pw
  gt = jnp.transpose(g, (3, 2, 0, 1)).reshape(c, wo, n * ho)
  taps = jnp.stack([lax.slice(xt, (0, 0, 0, i), (c, wp, n, i + (ho - 1) * sh + 1), (1, 1, 1, sh))
                    for i in range(kh)], axis=1).reshape(c, kh * wp, n * ho)
  m = lax.dot_general(taps, gt, (((2,), (2,)), ((0,), (0,))), preferred_element_type=acc)
  diag = (jnp.arange(wp)[:, None, None]
          == sw * jnp.arange(wo)[None, :, None] + jnp.arange(kw)[None, None, :]).astype(acc)
  return jnp.einsum("ciab,abj->ijc", m.reshape(c, kh, wp, wo), diag)[:, :, None, :]
