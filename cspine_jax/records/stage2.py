"""stage2 records: per study and vertebra, a sequence of 8 2.5D crops and its fracture label.

For each of C1..C7: ``stage2_slices`` (24) slices spread evenly over the vertebra's slice range
(np.linspace over first..last, rounded), each cropped to the vertebra's box plus a margin (before
any resampling), windowed, resized to ``image_size`` and stacked 3 by 3 -> ``images`` uint8
(8, H, W, 3). Ranges and boxes come from the mask when the study has one, else from the --vertebrae
file; with ``Options.stage2_locate="vertebrae"`` from the --vertebrae file for every study. A
vertebra absent from the study gives ``present=False`` and all-zero images: no crop is invented.
Fields: ``images``, ``label`` f32 (), ``vertebra`` 0..6, ``present``, ``study_uid``, ``fold``.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from cspine_jax.records import study as study_lib

NAME = "stage2"
KEY_FIELDS = ("study_uid", "vertebra")


def skip_reason(study: study_lib.StudyInput) -> str | None:
  return study_lib.unlocated_reason(study)


def features(options: study_lib.Options) -> dict[str, tuple[tuple[int, ...], Any]]:
  h, w = options.image_size
  return {"images": ((options.stage2_slices // 3, h, w, 3), np.uint8), "label": ((), np.float32),
          "vertebra": ((), np.int64), "present": ((), np.bool_), "study_uid": ((), np.str_),
          "fold": ((), np.int64)}


def vertebra_images(volume: np.ndarray, extent: study_lib.Extent, options: study_lib.Options,
                    applied: tuple[float, float] | None = None) -> np.ndarray:
  """(S, H0, W0) HU volume + one vertebra's extent -> uint8 (n/3, H, W, 3) sequence.

  ``applied``: the window the reader already applied to ``volume`` (uint8), if any."""
  _, height, width = volume.shape
  idx = study_lib.evenly_spaced(extent.first, extent.last, options.stage2_slices)
  x0, y0, x1, y1 = study_lib.crop_box(extent.box, options.crop_margin, height, width)
  crop = volume[idx, y0:y1, x0:x1]  # Crop first: only the vertebra's pixels are windowed/resized.
  win = study_lib.windowed(crop, options, applied)
  res = study_lib.resize_slices(win, options.image_size)
  h, w = options.image_size
  return np.ascontiguousarray(res.reshape(-1, 3, h, w).transpose(0, 2, 3, 1))


def process(study: study_lib.StudyInput, options: study_lib.Options) -> Iterator[dict[str, Any]]:
  targets = study_lib.require_labels(study)
  loaded = study_lib.load(study, with_mask=options.stage2_locate == "mask", options=options)
  extents = study_lib.extents(loaded)
  loaded.mask = None
  h, w = options.image_size
  for v, extent in enumerate(extents):
    if extent is None:
      images = np.zeros((options.stage2_slices // 3, h, w, 3), np.uint8)
    else:
      images = vertebra_images(loaded.series.volume, extent, options, loaded.window)
    yield {"images": images, "label": np.float32(targets[1 + v]), "vertebra": v,
           "present": extent is not None, "study_uid": study.uid, "fold": study.fold}
