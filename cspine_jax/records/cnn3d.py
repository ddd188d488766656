"""cnn3d records: the neck volume resampled to a cube, with the 8 study targets.

The windowed volume is resized in-plane slice by slice (antialiased, uint8) and then linearly
interpolated along the slice axis to ``cube_size`` slices, so the cost is one pass over the study.
With ``cnn3d_crop`` the volume is first cut to the C1-C7 slices and box (mask or --vertebrae file).
Fields: ``volume`` uint8 (D, D, D, 1), ``labels`` f32 (8,) (patient_overall, C1..C7),
``study_uid``, ``fold``.
"""
from __future__ import annotations

from typing import Any
from typing import Iterator

import numpy as np

from cspine_jax.pp import crops as crops_lib
from cspine_jax.pp import image as image_lib
from cspine_jax.pp import options as options_lib
from cspine_jax.pp import study as study_lib

NAME = "cnn3d"
KEY_FIELDS = ("study_uid",)


def skip_reason(study: study_lib.StudyInput) -> str | None:
  return None if study.labels is not None else "no train.csv labels"


def features(options: options_lib.Options) -> dict[str, tuple[tuple[int, ...], Any]]:
  d = options.cube_size
  return {"volume": ((d, d, d, 1), np.uint8), "labels": ((8,), np.float32),
          "study_uid": ((), np.str_), "fold": ((), np.int64)}


def resample_depth(slices: np.ndarray, depth: int) -> np.ndarray:
  """uint8 (S, H, W) -> (depth, H, W), linear interpolation along the slice axis."""
  s = slices.shape[0]
  z = np.linspace(0, s - 1, depth)
  lo = np.floor(z).astype(np.int64)
  hi = np.minimum(lo + 1, s - 1)
  frac = (z - lo).astype(np.float32)[:, None, None]
  out = slices[lo] * (1 - frac) + slices[hi] * frac
  return (out + 0.5).astype(np.uint8)


def cube(loaded: study_lib.Loaded, options: options_lib.Options) -> np.ndarray:
  volume = loaded.series.volume
  if options.cnn3d_crop:
    present = [e for e in study_lib.extents(loaded) if e is not None]
    if not present:
      raise study_lib.StudyError(f"study {loaded.study.uid}: no vertebra located, cannot crop")
    first, last = min(e.first for e in present), max(e.last for e in present)
    box = (min(e.box[0] for e in present), min(e.box[1] for e in present),
           max(e.box[2] for e in present), max(e.box[3] for e in present))
    x0, y0, x1, y1 = crops_lib.crop_box(box, options.crop_margin, *volume.shape[1:])
    volume = volume[first:last + 1, y0:y1, x0:x1]
  d = options.cube_size
  win = study_lib.windowed(volume, options, loaded.window)
  return resample_depth(image_lib.resize_slices(win, (d, d)), d)[..., None]


def process(study: study_lib.StudyInput, options: options_lib.Options) -> Iterator[dict[str, Any]]:
  targets = study_lib.require_labels(study)
  loaded = study_lib.load(study, with_mask=options.cnn3d_crop, options=options)
  yield {"volume": cube(loaded, options), "labels": targets, "study_uid": study.uid,
         "fold": study.fold}
