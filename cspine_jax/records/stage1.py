"""stage1 records: every slice of every segmented study, with vertebra presence, area and box.

Fields: ``image`` uint8 (H, W, 3) 2.5D, ``presence`` f32 (7,), ``area`` f32 (7,) (pixels / the
vertebra's largest slice), ``box`` f32 (4,) the box of the visible C1-C7 normalised by (W, H, W, H)
(zeros when none), ``study_uid``, ``index`` (sorted), ``number`` (file number), ``fold``.
"""
from __future__ import annotations

from typing import Any
from typing import Iterator

import numpy as np

from cspine_jax import labels as labels_lib
from cspine_jax.pp import options as options_lib
from cspine_jax.pp import study as study_lib

NAME = "stage1"
KEY_FIELDS = ("study_uid", "index")


def skip_reason(study: study_lib.StudyInput) -> str | None:
  """Only the studies with a segmentation have stage-1 targets."""
  return None if study.mask_path is not None else "no segmentation"


def features(options: options_lib.Options) -> dict[str, tuple[tuple[int, ...], Any]]:
  h, w = options.image_size
  return {"image": ((h, w, 3), np.uint8), "presence": ((7,), np.float32),
          "area": ((7,), np.float32), "box": ((4,), np.float32), "study_uid": ((), np.str_),
          "index": ((), np.int64), "number": ((), np.int64), "fold": ((), np.int64)}


def process(study: study_lib.StudyInput, options: options_lib.Options) -> Iterator[dict[str, Any]]:
  # Each slice windowed and resized as it is decoded: only the small images are kept.
  loaded = study_lib.load(study, with_mask=True, options=options, planes=True)
  if loaded.mask is None:
    raise study_lib.StudyError(f"study {study.uid}: stage1 needs a segmentation, none found")
  targets = labels_lib.slice_labels(loaded.mask)
  loaded.mask = None  # Free it before the images are built.
  num_slices, height, width = loaded.series.shape
  boxes = (targets.box / np.array([width, height, width, height], np.float32)).astype(np.float32)
  images = study_lib.slice_images(loaded, options)
  for i in range(num_slices):
    yield {"image": images[i], "presence": targets.presence[i].astype(np.float32),
           "area": targets.area_ratio[i].astype(np.float32), "box": boxes[i],
           "study_uid": study.uid, "index": i, "number": int(loaded.series.numbers[i]),
           "fold": study.fold}
