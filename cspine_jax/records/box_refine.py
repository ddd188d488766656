"""box_refine records: per segmented study and vertebra, crops around jittered boxes and the true box.

The crop is the box refiner's input (``pp.refine_input.crop_input``, the same at inference).
Training samples: ``SAMPLES`` per vertebra, the true box with each edge moved by a normal draw of
``BOX_JITTER`` x the box's size, and the range's ends by up to ``RANGE_JITTER`` of its length
(the errors of derived boxes and ranges), drawn from a generator seeded by the study uid, so the
records are the same on every run.

Fields: ``image`` uint8 (H, W, 3), ``box`` f32 (4,) the true box in the crop's normalised
coordinates (x0, y0, x1, y1; may lie partly outside [0, 1]), ``vertebra`` 0..6, ``sample``,
``study_uid``, ``fold``.
"""
from __future__ import annotations

import hashlib
from typing import Any
from typing import Iterator

import numpy as np

from cspine_jax.pp import options as options_lib
from cspine_jax.pp import refine_input
from cspine_jax.pp import study as study_lib

NAME = "box_refine"
KEY_FIELDS = ("study_uid", "vertebra", "sample")
SAMPLES = 16
BOX_JITTER = 0.08
RANGE_JITTER = 0.1


def skip_reason(study: study_lib.StudyInput) -> str | None:
  return None if study.mask_path is not None else "no segmentation"


def features(options: options_lib.Options) -> dict[str, tuple[tuple[int, ...], Any]]:
  h, w = options.image_size
  return {"image": ((h, w, 3), np.uint8), "box": ((4,), np.float32), "vertebra": ((), np.int64),
          "sample": ((), np.int64), "study_uid": ((), np.str_), "fold": ((), np.int64)}


def _rng(uid: str) -> np.random.Generator:
  return np.random.default_rng(int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "little"))


def jittered(extent: study_lib.Extent, rng: np.random.Generator) -> tuple[int, int, np.ndarray]:
  """A derived-box-like error of one true extent: (first, last, pixel box)."""
  box = np.asarray(extent.box, np.float64)
  w, h = box[2] - box[0], box[3] - box[1]
  moved = box + rng.normal(0.0, BOX_JITTER, 4) * np.array([w, h, w, h])
  if moved[2] - moved[0] < 0.5 * w or moved[3] - moved[1] < 0.5 * h:
    moved = box  # a draw that collapses the box is not an error derived boxes make
  length = extent.last - extent.first + 1
  reach = max(1, int(round(RANGE_JITTER * length)))
  first = extent.first + int(rng.integers(-reach, reach + 1))
  last = max(first, extent.last + int(rng.integers(-reach, reach + 1)))
  return first, last, moved


def process(study: study_lib.StudyInput, options: options_lib.Options) -> Iterator[dict[str, Any]]:
  loaded = study_lib.load(study, with_mask=True, options=options)
  if loaded.mask is None:
    raise study_lib.StudyError(f"study {study.uid}: box_refine needs a segmentation, none found")
  extents = study_lib.extents(loaded)
  loaded.mask = None
  volume = study_lib.windowed(loaded.series.volume, options, loaded.window)
  rng = _rng(study.uid)
  for v, extent in enumerate(extents):
    if extent is None:
      continue
    for k in range(SAMPLES):
      first, last, box = jittered(extent, rng)
      image, frame = refine_input.crop_input(volume, first, last, box, options.image_size)
      yield {
          "image": image,
          "box": refine_input.to_crop(extent.box, frame),
          "vertebra": v,
          "sample": k,
          "study_uid": study.uid,
          "fold": study.fold
      }
