"""slices2d records: every slice of every training study, for the 2D single/multi-head baselines.

Targets per slice:
- ``presence`` f32 (7,): the vertebrae the slice shows, from the mask's pixels (>= 1 pixel, the
  method's rule) where a segmentation exists, else from the --vertebrae file's slice ranges.
- ``fracture`` f32 (7,): the fractured vertebrae (train.csv) the slice shows. When
  train_bounding_boxes.csv marks slices of this study that show a fractured vertebra, that
  vertebra's fracture target is narrowed to the marked slices (the fracture is visible there);
  a fractured vertebra without any marked slice keeps all the slices that show it.
Fields: ``image`` uint8 (H, W, 3), ``presence``, ``fracture``, ``study_uid``, ``index``, ``fold``.
"""
from __future__ import annotations

from typing import Any
from typing import Iterator

import numpy as np

from cspine_jax.pp import options as options_lib
from cspine_jax.pp import study as study_lib

NAME = "slices2d"
KEY_FIELDS = ("study_uid", "index")


def skip_reason(study: study_lib.StudyInput) -> str | None:
  return study_lib.unlocated_reason(study)


def features(options: options_lib.Options) -> dict[str, tuple[tuple[int, ...], Any]]:
  h, w = options.image_size
  return {"image": ((h, w, 3), np.uint8), "presence": ((7,), np.float32),
          "fracture": ((7,), np.float32), "study_uid": ((), np.str_), "index": ((), np.int64),
          "fold": ((), np.int64)}


def fracture_targets(presence: np.ndarray, fractured: np.ndarray, numbers: np.ndarray,
                     box_numbers: tuple[int, ...]) -> np.ndarray:
  """bool (S, 7) per-slice fracture targets (rule in the module docstring)."""
  fracture = presence & fractured[None, :]
  if box_numbers:
    marked = np.isin(numbers, np.asarray(box_numbers, np.int64))
    for v in np.flatnonzero(fractured):
      narrowed = presence[:, v] & marked
      if narrowed.any():
        fracture[:, v] = narrowed
  return fracture


def process(study: study_lib.StudyInput, options: options_lib.Options) -> Iterator[dict[str, Any]]:
  targets = study_lib.require_labels(study)
  loaded = study_lib.load(study, with_mask=True, options=options, planes=True)
  presence = study_lib.presence(loaded)
  loaded.mask = None
  fracture = fracture_targets(presence, targets[1:] > 0, loaded.series.numbers,
                              study.fracture_numbers)
  images = study_lib.slice_images(loaded, options)
  for i in range(images.shape[0]):
    yield {"image": images[i], "presence": presence[i].astype(np.float32),
           "fracture": fracture[i].astype(np.float32), "study_uid": study.uid, "index": i,
           "fold": study.fold}
