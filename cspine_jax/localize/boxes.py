"""One box per vertebra from stage 1's per-slice boxes: union, smoothing, calibration offsets.

The per-slice boxes are smoothed along the slices (:func:`smooth_boxes`; the regression is noisy
from slice to slice and a union keeps the extremes), combined over the chosen slices
(:func:`combine_boxes`: union, or quantiles of the edges to damp outliers) and, with calibration,
moved by per-vertebra edge offsets fitted on segmented studies (:func:`fit_box_offsets`): the
per-slice box covers every vertebra shown, so the derived boxes err the same way in every study
(C1 too narrow, C2 too wide, C7 too short).
"""
from __future__ import annotations

from typing import Iterable
from typing import Sequence

import numpy as np
from scipy import ndimage

from cspine_jax import labels as labels_lib

# Per vertebra, how far each box edge (x0, y0, x1, y1) moves, in fractions of the box's size.
BoxOffsets = tuple[tuple[float, float, float, float], ...]
# Offsets beyond this (a box shifted by more than its own size) mean a fit gone wrong.
MAX_BOX_OFFSET = 1.0

NUM_VERTEBRAE = labels_lib.NUM_VERTEBRAE


def check_box_offsets(offsets) -> BoxOffsets:
  """7 x 4 finite edge offsets, each within +-MAX_BOX_OFFSET, as nested tuples."""
  o = np.asarray(offsets, np.float64)
  if (o.shape != (NUM_VERTEBRAE, 4) or not np.isfinite(o).all() or
      np.abs(o).max() > MAX_BOX_OFFSET):
    raise ValueError(f"box offsets are 7 x (x0, y0, x1, y1) fractions within +-{MAX_BOX_OFFSET}, "
                     f"got {offsets!r}")
  return tuple(tuple(float(x) for x in row) for row in o)


def fit_box_offsets(
    pairs: Iterable[Sequence[tuple[Sequence[float], Sequence[float]] | None]]) -> BoxOffsets:
  """Per study, 7 (derived box, mask box) pairs in the same units (None: not both present) ->
  per vertebra the median of (mask - derived) / derived width or height, edge by edge."""
  rel: list[list[np.ndarray]] = [[] for _ in range(NUM_VERTEBRAE)]
  for study in pairs:
    for v, pair in enumerate(study):
      if pair is None:
        continue
      got, truth = (np.asarray(b, np.float64) for b in pair)
      w, h = got[2] - got[0], got[3] - got[1]
      if w > 0 and h > 0:
        rel[v].append((truth - got) / np.array([w, h, w, h]))
  missing = [labels_lib.VERTEBRAE[v] for v in range(NUM_VERTEBRAE) if not rel[v]]
  if missing:
    raise ValueError(f"no segmented study locates {', '.join(missing)}: cannot fit box offsets")
  offsets = np.stack([np.median(r, axis=0) for r in rel])
  return check_box_offsets(np.clip(offsets, -MAX_BOX_OFFSET, MAX_BOX_OFFSET))


def offset_box(box: Sequence[float], offsets: Sequence[float]) -> tuple[float, float, float, float]:
  """A normalised box with its edges moved by ``offsets`` x its width / height, kept in [0, 1]."""
  x0, y0, x1, y1 = box
  w, h = x1 - x0, y1 - y0
  d = np.asarray(offsets, np.float64) * np.array([w, h, w, h])
  nx0, ny0 = max(0.0, x0 + d[0]), max(0.0, y0 + d[1])
  nx1, ny1 = min(1.0, x1 + d[2]), min(1.0, y1 + d[3])
  if nx1 <= nx0 or ny1 <= ny0:  # cannot happen within MAX_BOX_OFFSET unless clipped away
    return (float(x0), float(y0), float(x1), float(y1))
  return float(nx0), float(ny0), float(nx1), float(ny1)


def valid_boxes(boxes: np.ndarray) -> np.ndarray:
  return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def combine_boxes(boxes: np.ndarray, quantile: float = 0.0) -> tuple[float, float, float, float]:
  """Normalised (N, 4) boxes -> one box: union (q=0) or q / 1-q quantiles of low / high edges."""
  boxes = np.clip(np.asarray(boxes, np.float64).reshape(-1, 4), 0.0, 1.0)
  boxes = boxes[valid_boxes(boxes)]
  if len(boxes) == 0:
    return (0.0, 0.0, 1.0, 1.0)
  lo = np.quantile(boxes[:, :2], quantile, axis=0)
  hi = np.quantile(boxes[:, 2:], 1.0 - quantile, axis=0)
  x0, y0 = lo
  x1, y1 = np.maximum(hi, lo + 1e-6)
  return float(x0), float(y0), float(min(x1, 1.0)), float(min(y1, 1.0))


def smooth_boxes(boxes: np.ndarray, sigma: float) -> np.ndarray:
  """(S, 4) normalised per-slice boxes smoothed along the slices by a Gaussian of ``sigma``
  slices. Only valid boxes enter (a normalised convolution), and invalid ones stay as they are."""
  boxes = np.asarray(boxes, np.float64)
  if sigma <= 0 or len(boxes) == 0:
    return boxes
  valid = valid_boxes(np.clip(boxes, 0.0, 1.0)).astype(np.float64)
  total = ndimage.gaussian_filter1d(boxes * valid[:, None], sigma, axis=0, mode="nearest")
  weight = ndimage.gaussian_filter1d(valid, sigma, axis=0, mode="nearest")
  smoothed = total / np.maximum(weight, 1e-12)[:, None]
  return np.where(valid[:, None] > 0, smoothed, boxes)
