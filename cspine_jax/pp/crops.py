"""Stage 2's input: a vertebra cropped by its box (grown by a margin, made square when asked), its
slices sampled evenly and stacked three by three into 2.5D images. Cropping comes before
resizing, so only the vertebra's pixels are resampled; a per-slice min-max takes the whole
slice's range, as the seed maps each slice before cropping it."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from cspine_jax.pp import image as image_lib
from cspine_jax.pp import options as options_lib
from cspine_jax.pp import study as study_lib


def crop_box(box: Sequence[float], margin: float, height: int, width: int,
             square: bool = False) -> tuple[int, int, int, int]:
  """Pixel box grown by ``margin`` x its size on each side, clipped to the image, >= 1 pixel.

  ``square``: then its shorter side grown to the longer one, half on each side (the seed's
  square_bbox: the odd pixel dropped), and clipped to the image again.
  """
  x0, y0, x1, y1 = (float(b) for b in box)
  mx, my = margin * (x1 - x0), margin * (y1 - y0)
  cx0 = max(0, int(math.floor(x0 - mx)))
  cy0 = max(0, int(math.floor(y0 - my)))
  cx1 = min(width, int(math.ceil(x1 + mx)))
  cy1 = min(height, int(math.ceil(y1 + my)))
  if square:
    w, h = cx1 - cx0, cy1 - cy0
    pad_x, pad_y = (h - w) // 2 if h > w else 0, (w - h) // 2 if w > h else 0
    cx0, cx1 = max(0, cx0 - pad_x), min(width, cx1 + pad_x)
    cy0, cy1 = max(0, cy0 - pad_y), min(height, cy1 + pad_y)
  if cx1 <= cx0 or cy1 <= cy0:
    raise study_lib.StudyError(f"empty crop for box {tuple(box)} on a {height}x{width} image")
  return cx0, cy0, cx1, cy1


def vertebra_images(volume: np.ndarray, extent: study_lib.Extent, options: options_lib.Options,
                    applied: tuple[float, float] | str | None = None) -> np.ndarray:
  """(S, H0, W0) HU volume + one vertebra's extent -> uint8 (n/3, H, W, 3) sequence.

  ``applied``: the intensity map the reader already applied to ``volume`` (uint8), if any."""
  _, height, width = volume.shape
  idx = image_lib.evenly_spaced(extent.first, extent.last, options.stage2_slices)
  x0, y0, x1, y1 = crop_box(extent.box, options.crop_margin, height, width, options.square_crop)
  crop = volume[idx, y0:y1, x0:x1]  # Crop first: only the vertebra's pixels are windowed/resized.
  whole = volume[idx] if options.intensity == "minmax" and applied is None else None
  win = study_lib.windowed(crop, options, applied, whole)
  res = image_lib.resize_slices(win, options.image_size, options.resize == "antialias")
  h, w = options.image_size
  return np.ascontiguousarray(res.reshape(-1, 3, h, w).transpose(0, 2, 3, 1))
