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

from typing import Any
from typing import Iterator

import numpy as np

from cspine_jax.pp import crops as crops_lib
from cspine_jax.pp import options as options_lib
from cspine_jax.pp import study as study_lib

NAME = "stage2"
KEY_FIELDS = ("study_uid", "vertebra")


def skip_reason(study: study_lib.StudyInput) -> str | None:
  return study_lib.unlocated_reason(study)


def features(options: options_lib.Options) -> dict[str, tuple[tuple[int, ...], Any]]:
  h, w = options.image_size
  return {"images": ((options.stage2_slices // 3, h, w, 3), np.uint8), "label": ((), np.float32),
          "vertebra": ((), np.int64), "present": ((), np.bool_), "study_uid": ((), np.str_),
          "fold": ((), np.int64)}


def process(study: study_lib.StudyInput, options: options_lib.Options) -> Iterator[dict[str, Any]]:
  targets = study_lib.require_labels(study)
  loaded = study_lib.load(study, with_mask=options.stage2_locate == "mask", options=options)
  extents = study_lib.extents(loaded)
  loaded.mask = None
  h, w = options.image_size
  for v, extent in enumerate(extents):
    if extent is None:
      images = np.zeros((options.stage2_slices // 3, h, w, 3), np.uint8)
    else:
      images = crops_lib.vertebra_images(loaded.series.volume, extent, options, loaded.window)
    yield {"images": images, "label": np.float32(targets[1 + v]), "vertebra": v,
           "present": extent is not None, "study_uid": study.uid, "fold": study.fold}
