"""The box refiner's input: maximum-intensity projections of a vertebra in a crop around its box.

Around a vertebra's derived box (grown by ``MARGIN`` on each side) the refiner sees three
projections, of the top, middle and bottom third of the vertebra's slice range; a projection shows
the vertebra's whole outline, which no single axial slice does. :func:`crop_input` makes that
input for the training records and at inference; :func:`to_crop` / :func:`from_crop` map boxes
between the series' pixels and the crop's normalised frame.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from cspine_jax.pp import image as image_lib
from cspine_jax.pp import study as study_lib

MARGIN = 0.4  # the crop: the box grown by this fraction of its width / height on each side
# A box in its own crop frame's normalised coordinates: where a refiner that changes nothing
# answers (x0, y0, x1, y1).
_INNER = MARGIN / (1 + 2 * MARGIN)
INNER_BOX = (_INNER, _INNER, 1 - _INNER, 1 - _INNER)

# A crop frame: (x0, y0, width, height) in pixels of the series' slices.
Frame = tuple[float, float, float, float]


def crop_frame(box: Sequence[float], margin: float = MARGIN) -> Frame:
  """The crop around a pixel box (x0, y0, x1, y1): the box grown by ``margin`` x its size."""
  x0, y0, x1, y1 = (float(b) for b in box)
  w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
  return x0 - margin * w, y0 - margin * h, w * (1 + 2 * margin), h * (1 + 2 * margin)


def to_crop(box: Sequence[float], frame: Frame) -> np.ndarray:
  """Pixel box -> the crop's normalised coordinates."""
  fx, fy, fw, fh = frame
  x0, y0, x1, y1 = (float(b) for b in box)
  return np.array([(x0 - fx) / fw, (y0 - fy) / fh, (x1 - fx) / fw, (y1 - fy) / fh], np.float32)


def from_crop(box: Sequence[float], frame: Frame) -> tuple[float, float, float, float]:
  """The crop's normalised coordinates -> pixel box (inverse of :func:`to_crop`)."""
  fx, fy, fw, fh = frame
  x0, y0, x1, y1 = (float(b) for b in box)
  return fx + x0 * fw, fy + y0 * fh, fx + x1 * fw, fy + y1 * fh


def _sample_plane(plane: np.ndarray, frame: Frame, size: tuple[int, int]) -> np.ndarray:
  """Bilinear samples of ``plane`` (H, W) on a size grid over the frame (pixel centres; edges
  clamped, so a frame reaching past the image repeats its border)."""
  fx, fy, fw, fh = frame
  out_h, out_w = size
  height, width = plane.shape
  ys = np.clip(fy + (np.arange(out_h) + 0.5) * fh / out_h - 0.5, 0, height - 1)
  xs = np.clip(fx + (np.arange(out_w) + 0.5) * fw / out_w - 0.5, 0, width - 1)
  y0 = np.minimum(ys.astype(np.int64), max(height - 2, 0))
  x0 = np.minimum(xs.astype(np.int64), max(width - 2, 0))
  y1, x1 = np.minimum(y0 + 1, height - 1), np.minimum(x0 + 1, width - 1)
  wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
  p = plane.astype(np.float32)
  top = p[y0][:, x0] * (1 - wx) + p[y0][:, x1] * wx
  bottom = p[y1][:, x0] * (1 - wx) + p[y1][:, x1] * wx
  return top * (1 - wy) + bottom * wy


def crop_input(volume: np.ndarray, first: int, last: int, box: Sequence[float],
               size: tuple[int, int], margin: float = MARGIN,
               window: tuple[float, float] | None = None) -> tuple[np.ndarray, Frame]:
  """The refiner's input for one vertebra: (S, H0, W0) volume, its slice range (inclusive,
  clipped to the volume) and pixel box -> (uint8 (H, W, 3) maximum-intensity projections of the
  range's top / middle / bottom third inside the crop frame, the frame).

  ``volume`` is uint8 windowed, or HU with ``window`` = (level, width): then only the block the
  frame covers is windowed (the same pixels as windowing the whole volume first)."""
  n, height, width = volume.shape
  first, last = max(0, int(first)), min(n - 1, int(last))
  if last < first:
    raise study_lib.StudyError(f"empty slice range {first}..{last} of a {n}-slice volume")
  frame = crop_frame(box, margin)
  # The rows / columns the bilinear samples can touch (edges clamped as in _sample_plane).
  fx, fy, fw, fh = frame
  r0 = int(np.clip(np.floor(fy - 1), 0, height - 1))
  r1 = int(np.clip(np.ceil(fy + fh + 1), r0 + 1, height))
  c0 = int(np.clip(np.floor(fx - 1), 0, width - 1))
  c1 = int(np.clip(np.ceil(fx + fw + 1), c0 + 1, width))
  block = volume[first:last + 1, r0:r1, c0:c1]
  if window is not None:
    block = image_lib.window(block, *window)
  local = (fx - c0, fy - r0, fw, fh)
  thirds = [
      t if len(t) else np.arange(len(block)) for t in np.array_split(np.arange(len(block)), 3)
  ]
  planes = [_sample_plane(block[t].max(axis=0), local, size) for t in thirds]
  image = np.clip(np.rint(np.stack(planes, axis=-1)), 0, 255).astype(np.uint8)
  return image, frame
