"""The box refiner's second look: each located vertebra's box replaced by the refiner's.

The refiner sees projections of the vertebra's slice range in a crop around its derived box
(``pp.refine_input``) and says where the vertebra's box lies in that crop. Derived boxes come from
per-slice regressions on the whole slice; the refiner looks at the vertebra alone, closer. With
several passes each crop is made around the last pass's box.
"""
from __future__ import annotations

import dataclasses
from typing import Any
from typing import Callable
from typing import Sequence

import numpy as np

from cspine_jax import labels as labels_lib
from cspine_jax.io import vertebrae as vertebrae_lib
from cspine_jax.pp import refine_input

# A box refiner: uint8 crop images (N, H, W, 3) of pp.refine_input.crop_input -> boxes
# (N, 7, 4) in the crops' normalised coordinates (one row per vertebra; a crop's own row counts).
RefineFn = Callable[[np.ndarray], np.ndarray]

NUM_VERTEBRAE = labels_lib.NUM_VERTEBRAE


def refine(preds: Sequence[vertebrae_lib.VertebraPrediction], volume: np.ndarray, refiner: RefineFn,
           size: tuple[int, int], window: tuple[float, float] | None = None,
           passes: int = 1) -> tuple[vertebrae_lib.VertebraPrediction, ...]:
  """Each located vertebra's box replaced by the refiner's (module docstring).

  ``volume``: the study's (S, H, W) series, the slices the predictions index, uint8 windowed or HU
  with ``window`` (level, width); ``size``: the refiner's input (H, W). A refined box that comes
  out empty keeps the derived one. ``passes`` > 1: the refiner looks again at a crop around its
  own box, each pass starting where the last one ended.
  """
  for _ in range(check_refine_passes(passes)):
    preds = _refine_once(preds, volume, refiner, size, window)
  return tuple(preds)


def check_refine_passes(passes: Any) -> int:
  """``passes`` as the int :func:`refine` takes; ValueError unless it is a whole number >= 1.
  Checked where a run starts (pseudo-labels, the inference spec), not per study."""
  if isinstance(passes, bool) or not isinstance(passes, (int, np.integer)) or passes < 1:
    raise ValueError(f"refine passes must be >= 1 (a whole number); got {passes!r}")
  return int(passes)


def _refine_once(preds, volume, refiner, size, window):

  _, h, w = volume.shape
  scale = np.array([w, h, w, h], np.float64)
  todo = [(v, p) for v, p in enumerate(preds) if p.present]
  if not todo:
    return tuple(preds)
  crops = [
      refine_input.crop_input(volume, p.first_index, p.last_index,
                              np.asarray(p.box, np.float64) * scale, size, window=window)
      for _, p in todo
  ]
  images = np.stack([image for image, _ in crops])
  # Always 7 rows (the last repeated): a jitted refiner sees one shape, whatever was located.
  pad = np.repeat(images[-1:], NUM_VERTEBRAE - len(images), axis=0)
  boxes = np.asarray(refiner(np.concatenate([images, pad])))[:len(todo)]
  if boxes.shape != (len(todo), NUM_VERTEBRAE, 4):
    raise ValueError(f"box refiner returned shape {boxes.shape}, expected ({len(todo)}, 7, 4)")
  out = list(preds)
  for (v, p), (_, frame), rows in zip(todo, crops, boxes):
    box = np.clip(np.asarray(refine_input.from_crop(rows[v], frame)) / scale, 0.0, 1.0)
    if box[2] > box[0] and box[3] > box[1]:
      out[v] = dataclasses.replace(p, box=tuple(float(b) for b in box))
  return tuple(out)
