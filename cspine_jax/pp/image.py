"""Image operations on slices: HU window or per-slice min-max, resize, 2.5D stacking, even slice
sampling, the circular field of view.

- :func:`window`: HU -> uint8 through a level/width window (bone window 400/1800 by default), one
  fused pass per block of slices. Windowing is elementwise, so windowing a whole volume first or a
  crop later gives the same pixels.
- :func:`minmax`: HU -> uint8 per slice, its minimum to 0 and maximum to 255 (truncated), as the
  seed's DICOM loader; not elementwise: a crop must use its whole slice's range
  (:func:`minmax_range`, :func:`to_uint8`).
- :func:`resize_plane` / :func:`resize_slices`: bilinear resampling as banded matrix products
  (:func:`resize_weights`), float32 inside: antialiased (PIL's BILINEAR filter) or plain two-tap
  linear interpolation (cv2's INTER_LINEAR).
- :class:`SliceImager`: a HU slice -> the uint8 (H, W) image of stage 1 / slices2d: the window's
  clip at full resolution (min-max: the slice's range), the resize, then the affine part on the
  small image, then the field-of-view mask when asked. The reader applies it to every slice as it
  is decoded, and inference to its HU volume, so training records and inference get the same
  bytes.
- :func:`stack_25d`: slices i-1, i, i+1 into channels 0, 1, 2 (edges repeat the end slice).
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from cspine_jax.pp import options as options_lib

# Bumped whenever image bytes change for the same options (a restart must not mix the two).
# 2: banded antialiased bilinear resize of each windowed slice once (1 was PIL per image).
PIXELS_VERSION = 2

# ----------------------------------------------------------------------------- image helpers


def minmax_range(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per slice (the last two axes) of ``hu``: (minimum, 255 / (maximum - minimum)) as float32,
  the scale 0 for a constant slice."""
  lo = hu.min(axis=(-2, -1)).astype(np.float32)
  span = hu.max(axis=(-2, -1)).astype(np.float32) - lo
  scale = np.divide(np.float32(255.0), span, out=np.zeros_like(span), where=span > 0)
  return lo, scale.astype(np.float32)


def minmax(hu: np.ndarray, lo: np.ndarray | None = None,
           scale: np.ndarray | None = None) -> np.ndarray:
  """HU (..., H, W) -> uint8: each slice's minimum -> 0, maximum -> 255, truncated (the seed's
  ``(x - min) / max(x - min) * 255`` cast to uint8); a constant slice -> 0. ``lo`` / ``scale``
  (:func:`minmax_range` of the whole slices) when ``hu`` is a crop of them."""
  if lo is None or scale is None:
    lo, scale = minmax_range(hu)
  t = (hu.astype(np.float32) - lo[..., None, None]) * scale[..., None, None]
  return np.clip(t, 0, 255).astype(np.uint8)


def to_uint8(hu: np.ndarray, options: options_lib.Options,
             whole: np.ndarray | None = None) -> np.ndarray:
  """HU slices (..., H, W) -> uint8 as ``options.intensity`` says; ``whole``: the full slices
  ``hu`` was cropped from (min-max takes their range)."""
  if options.intensity == "window":
    return window(hu, options.window_level, options.window_width)
  return minmax(hu, *minmax_range(hu if whole is None else whole))


def fov_mask(size: tuple[int, int]) -> np.ndarray:
  """bool (H, W): the disc inscribed in the image, centred at (W // 2, H // 2) with radius
  min(H, W) // 2 (the seed's cv2.circle on the resized image; True inside)."""
  h, w = size
  y, x = np.ogrid[:h, :w]
  r = min(h, w) // 2
  return (x - w // 2) ** 2 + (y - h // 2) ** 2 <= r * r


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
  """HU (any shape) -> uint8: level - width/2 -> 0, level + width/2 -> 255, rounded, clipped."""
  scale = np.float32(255.0 / width)
  # (hu - lo) * scale + 0.5 folded into one multiply-add: 4 passes over each block instead of 5.
  offset = np.float32(0.5 - (level - width / 2) * 255.0 / width)
  out = np.empty(hu.shape, np.uint8)
  # Blocks of slices keep the float temporaries small (cache friendly, bounded memory).
  flat_in = hu.reshape(-1, *hu.shape[-2:]) if hu.ndim >= 2 else hu.reshape(1, 1, -1)
  flat_out = out.reshape(flat_in.shape)
  block = max(1, (1 << 20) // max(1, flat_in[0].size))
  for s in range(0, flat_in.shape[0], block):
    t = np.multiply(flat_in[s:s + block], scale, dtype=np.float32)
    t += offset
    np.clip(t, 0, 255, out=t)
    flat_out[s:s + block] = t  # Truncation after +0.5 rounds to nearest.
  return out


# Antialiased bilinear resampling as banded matrix products. Each output row (column) reads only
# about twice the reduction factor of input rows (columns), so the weight matrix is cut into blocks
# of _BAND outputs and the input span they read, and each block is one small BLAS product: ~14
# MFLOP for a 512^2 -> 224^2 slice, a few times less CPU than PIL's per-slice C loop.
_BAND = 16


@functools.lru_cache(maxsize=512)
def resize_weights(n_in: int, n_out: int, antialias: bool = True) -> np.ndarray:
  """float32 (n_out, n_in) resampling weights, rows summing to 1 (read-only, cached).

  PIL's Image.BILINEAR filter: output j is centred on input (j + 0.5) * n_in / n_out - 0.5, a
  triangle whose support grows with the reduction factor when shrinking (antialiasing), its taps
  cut at the borders and renormalised. ``antialias=False``: the triangle stays one input wide
  (two taps, cv2's INTER_LINEAR; the edge taps renormalised as a clamped border reads them).
  """
  if n_in < 1 or n_out < 1:
    raise ValueError(f"cannot resample {n_in} -> {n_out} samples")
  scale = n_in / n_out
  support = max(scale, 1.0) if antialias else 1.0
  centers = (np.arange(n_out) + 0.5) * scale
  first = np.maximum(np.trunc(centers - support + 0.5), 0)[:, None]  # PIL's int() truncation.
  stop = np.minimum(np.trunc(centers + support + 0.5), n_in)[:, None]
  x = np.arange(n_in, dtype=np.float64)[None, :]
  w = np.maximum(0.0, 1.0 - np.abs((x - centers[:, None] + 0.5) / support))
  w[(x < first) | (x >= stop)] = 0.0
  w /= w.sum(1, keepdims=True)
  out = w.astype(np.float32)
  out.setflags(write=False)
  return out


@functools.lru_cache(maxsize=512)
def _bands(n_in: int, n_out: int,
           antialias: bool = True) -> tuple[tuple[slice, slice, np.ndarray, np.ndarray], ...]:
  """(outputs, inputs they read, block, block transposed) for blocks of _BAND outputs."""
  w = resize_weights(n_in, n_out, antialias)
  bands = []
  for o0 in range(0, n_out, _BAND):
    o1 = min(o0 + _BAND, n_out)
    used = np.flatnonzero(w[o0:o1].any(0))
    i0, i1 = int(used[0]), int(used[-1]) + 1
    block = np.ascontiguousarray(w[o0:o1, i0:i1])
    bands.append((slice(o0, o1), slice(i0, i1), block, np.ascontiguousarray(block.T)))
  return tuple(bands)


def resize_plane(image: np.ndarray, size: tuple[int, int], out: np.ndarray | None = None,
                 antialias: bool = True) -> np.ndarray:
  """float32 (h, w) -> float32 (H, W) by :func:`resize_weights` (rows, then columns).

  A convex combination of the inputs: the output stays within the input's range.
  """
  height, width = size
  h, w = image.shape
  if out is None:
    out = np.empty((height, width), np.float32)
  rows = image
  if h != height:
    rows = np.empty((height, w), np.float32)
    for o, i, block, _ in _bands(h, height, antialias):
      np.matmul(block, image[i], out=rows[o])
  if w == width:
    out[...] = rows
    return out
  for o, i, _, block_t in _bands(w, width, antialias):
    np.matmul(rows[:, i], block_t, out=out[:, o])
  return out


def resize_slices(slices: np.ndarray, size: tuple[int, int], antialias: bool = True) -> np.ndarray:
  """uint8 (N, h, w) -> uint8 (N, H, W), :func:`resize_plane` of each slice, rounded."""
  height, width = size
  n = slices.shape[0]
  if slices.shape[1:] == (height, width):
    return np.ascontiguousarray(slices)
  out = np.empty((n, height, width), np.uint8)
  plane = np.empty(slices.shape[1:], np.float32)
  res = np.empty((height, width), np.float32)
  for i in range(n):
    plane[...] = slices[i]
    resize_plane(plane, size, res, antialias)
    res += 0.5  # Within 0..255 (a convex combination): truncation rounds to nearest.
    out[i] = res
  return out


class SliceImager:
  """A HU slice (float32 (h, w)) -> its uint8 (H, W) image: the intensity map, then the resize.

  The window's clip is applied at full resolution (so, as when windowing to uint8 first, a pixel
  beyond the window cannot bleed into its neighbours), its affine part after the resize, on the
  small image (the weights sum to 1, so the two commute). Rounded to nearest. Min-max takes the
  slice's range at full resolution and maps after the resize too, truncated as the seed's cast
  (which maps before its resize: the two differ by the rounding of one grey level). Then, with
  ``fov_mask``, the pixels outside the inscribed circle are zeroed. Buffers are kept between
  calls: the reader calls it on every slice (``read_series(map_hu=)``). One object per thread.
  """

  def __init__(self, options: options_lib.Options):
    self.size = options.image_size
    self.minmax = options.intensity == "minmax"
    self.antialias = options.resize == "antialias"
    self.lo = options.window_level - options.window_width / 2
    self.hi = options.window_level + options.window_width / 2
    self.scale = np.float32(255.0 / options.window_width)
    self.offset = np.float32(0.5 - self.lo * 255.0 / options.window_width)
    self.outside = ~fov_mask(self.size) if options.fov_mask else None
    self._clipped: np.ndarray | None = None
    self._resized = np.empty(self.size, np.float32)

  def __call__(self, hu: np.ndarray) -> np.ndarray:
    if self._clipped is None or self._clipped.shape != hu.shape:
      self._clipped = np.empty(hu.shape, np.float32)
    if self.minmax:
      self._clipped[...] = hu
      lo, scale = minmax_range(self._clipped)
      res = resize_plane(self._clipped, self.size, self._resized, self.antialias)
      res -= lo
      res *= scale
      np.clip(res, 0, 255, out=res)  # truncated below, as the seed's cast
    else:
      np.clip(hu, self.lo, self.hi, out=self._clipped)
      res = resize_plane(self._clipped, self.size, self._resized, self.antialias)
      res *= self.scale
      res += self.offset  # In 0.5..255.5: truncation rounds to nearest.
    out = res.astype(np.uint8)
    if self.outside is not None:
      out[self.outside] = 0
    return out


def neighbour_indices(centers: np.ndarray, num_slices: int) -> np.ndarray:
  """(N,) slice indices -> (N, 3) indices i-1, i, i+1 clipped to the volume (edges repeat)."""
  centers = np.asarray(centers, np.int64)
  return np.clip(centers[:, None] + np.array([-1, 0, 1]), 0, num_slices - 1)


def stack_25d(slices: np.ndarray, centers: Sequence[int] | None = None) -> np.ndarray:
  """(S, H, W) -> (N, H, W, 3): 2.5D images centred on ``centers`` (default: every slice)."""
  if centers is None:
    # Every slice: three shifted copies straight into the channels, no gathered temporaries.
    out = np.empty(slices.shape + (3,), slices.dtype)
    out[..., 1] = slices
    out[1:, ..., 0] = slices[:-1]
    out[:1, ..., 0] = slices[:1]
    out[:-1, ..., 2] = slices[1:]
    out[-1:, ..., 2] = slices[-1:]
    return out
  idx = neighbour_indices(np.asarray(centers), slices.shape[0])
  return np.stack([slices[idx[:, c]] for c in range(3)], axis=-1)


def evenly_spaced(first: int, last: int, n: int) -> np.ndarray:
  """``n`` indices spread evenly over first..last inclusive (np.linspace, rounded)."""
  return np.round(np.linspace(first, last, n)).astype(np.int64)
