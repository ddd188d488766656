"""stage1 records: every slice of every segmented study, with vertebra presence, area and box.

Fields: ``image`` uint8 (H, W, 3) 2.5D, ``presence`` f32 (7,), ``area`` f32 (7,) (pixels / the
vertebra's largest slice), ``box`` f32 (4,) the box of the visible C1-C7 normalised by (W, H, W, H)
(zeros when none), ``study_uid``, ``index`` (sorted), ``number`` (file number), ``fold``.

With ``Options.slice_targets="neighbours"`` (the seed) the targets are those of the image's three
slices i-1, i, i+1: presence and area their maximum, the box the union of the boxes of those
whose largest area ratio exceeds 0.5 (the centre slice's box when none does), which is what the
seed's loss regresses.
"""
from __future__ import annotations

from typing import Any
from typing import Iterator

import numpy as np

from cspine_jax import labels as labels_lib
from cspine_jax.pp import image as image_lib
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
  presence = targets.presence.astype(np.float32)
  area = targets.area_ratio.astype(np.float32)
  if options.slice_targets == "neighbours":
    presence, area, boxes = neighbour_targets(presence, area, boxes)
  images = study_lib.slice_images(loaded, options)
  for i in range(num_slices):
    yield {"image": images[i], "presence": presence[i], "area": area[i], "box": boxes[i],
           "study_uid": study.uid, "index": i, "number": int(loaded.series.numbers[i]),
           "fold": study.fold}


# A slice whose largest vertebra area ratio exceeds this shows a vertebra well enough for its box
# to count (the seed's BoxLoss: ``(targets[..., 4:] > 0.5).any()``).
BOX_RATIO = 0.5


def neighbour_targets(presence: np.ndarray, area: np.ndarray,
                      boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-slice (S, 7), (S, 7), (S, 4) targets -> those of the 2.5D images centred on each slice
  (edges repeat): presence and area the maximum over slices i-1, i, i+1; the box the union of the
  boxes of those slices whose largest area exceeds :data:`BOX_RATIO`, else slice i's own."""
  idx = image_lib.neighbour_indices(np.arange(len(presence)), len(presence))  # (S, 3)
  counted = area[idx].max(axis=-1) > BOX_RATIO  # (S, 3)
  nb = boxes[idx]  # (S, 3, 4)
  lo = np.where(counted[..., None], nb[..., :2], np.inf).min(axis=1)
  hi = np.where(counted[..., None], nb[..., 2:], -np.inf).max(axis=1)
  union = np.concatenate([lo, hi], axis=-1).astype(np.float32)
  out_boxes = np.where(counted.any(axis=1)[:, None], union, boxes).astype(np.float32)
  return presence[idx].max(axis=1), area[idx].max(axis=1), out_boxes
