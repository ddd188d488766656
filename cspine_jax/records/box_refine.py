"""box_refine records: per segmented study and vertebra, crops around jittered boxes and the true box.

Stage 1 boxes a vertebra from per-slice regressions on the whole 64 px slice (out-of-fold box IoU
about 0.85 on the demo set); stage 2 depends on box precision (crops by the mask boxes scored about
half the metric). The box refiner looks again, closer: around a vertebra's derived box (grown by
``MARGIN`` on each side) it sees three maximum-intensity projections, of the top, middle and bottom
third of the vertebra's slice range, and says where the vertebra's box is in that crop. A
projection shows the vertebra's whole outline, which no single axial slice does.

One function, :func:`crop_input`, makes that input for training records and at inference.
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
from typing import Any, Iterator, Sequence

import numpy as np

from cspine_jax.records import study as study_lib

NAME = "box_refine"
KEY_FIELDS = ("study_uid", "vertebra", "sample")
MARGIN = 0.4  # the crop: the box grown by this fraction of its width / height on each side
SAMPLES = 16
BOX_JITTER = 0.08
RANGE_JITTER = 0.1
# A box in its own crop frame's normalised coordinates: where a refiner that changes nothing
# answers (x0, y0, x1, y1).
_INNER = MARGIN / (1 + 2 * MARGIN)
INNER_BOX = (_INNER, _INNER, 1 - _INNER, 1 - _INNER)

# A crop frame: (x0, y0, width, height) in pixels of the series' slices.
Frame = tuple[float, float, float, float]


def skip_reason(study: study_lib.StudyInput) -> str | None:
  return None if study.mask_path is not None else "no segmentation"


def features(options: study_lib.Options) -> dict[str, tuple[tuple[int, ...], Any]]:
  h, w = options.image_size
  return {"image": ((h, w, 3), np.uint8), "box": ((4,), np.float32), "vertebra": ((), np.int64),
          "sample": ((), np.int64), "study_uid": ((), np.str_), "fold": ((), np.int64)}


def crop_frame(box: Sequence[float], margin: float = MARGIN) -> Frame:
  """The crop around a pixel box (x0, y0, x1, y1): the box grown by ``margin`` x its size."""
  x0, y0, x1, y1 = (float(b) for b in box)
  w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
  return x0 - margin * w, y0 - margin * h, w * (1 + 2 * margin), h * (1 + 2 * margin)


def to_crop(box: Sequence[float], frame: Frame) -> np.ndarray:
  """Pixel box -> the crop's normalised coordinates."""
  fx, fy, fw, fh = frame
  x0, y0, x1, y1 = (float(b) for b in box)
  return np.array([(x0 - fx) / fw, (y0 - fy) / fh, (x1 - fx) / fw, (y1 - fy) / fh], np.float32)


def from_crop(box: Sequence[float], frame: Frame) -> tuple[float, float, float, float]:
  """The crop's normalised coordinates -> pixel box (inverse of :func:`to_crop`)."""
  fx, fy, fw, fh = frame
  x0, y0, x1, y1 = (float(b) for b in box)
  return fx + x0 * fw, fy + y0 * fh, fx + x1 * fw, fy + y1 * fh


def _sample_plane(plane: np.ndarray, frame: Frame, size: tuple[int, int]) -> np.ndarray:
  """Bilinear samples of ``plane`` (H, W) on a size grid over the frame (pixel centres; edges
  clamped, so a frame reaching past the image repeats its border)."""
  fx, fy, fw, fh = frame
  out_h, out_w = size
  height, width = plane.shape
  ys = np.clip(fy + (np.arange(out_h) + 0.5) * fh / out_h - 0.5, 0, height - 1)
  xs = np.clip(fx + (np.arange(out_w) + 0.5) * fw / out_w - 0.5, 0, width - 1)
  y0 = np.minimum(ys.astype(np.int64), max(height - 2, 0))
  x0 = np.minimum(xs.astype(np.int64), max(width - 2, 0))
  y1, x1 = np.minimum(y0 + 1, height - 1), np.minimum(x0 + 1, width - 1)
  wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
  p = plane.astype(np.float32)
  top = p[y0][:, x0] * (1 - wx) + p[y0][:, x1] * wx
  bottom = p[y1][:, x0] * (1 - wx) + p[y1][:, x1] * wx
  return top * (1 - wy) + bottom * wy


def crop_input(volume: np.ndarray, first: int, last: int, box: Sequence[float],
               size: tuple[int, int], margin: float = MARGIN,
               window: tuple[float, float] | None = None) -> tuple[np.ndarray, Frame]:
  """The refiner's input for one vertebra: (S, H0, W0) volume, its slice range (inclusive,
  clipped to the volume) and pixel box -> (uint8 (H, W, 3) maximum-intensity projections of the
  range's top / middle / bottom third inside the crop frame, the frame).

  ``volume`` is uint8 windowed, or HU with ``window`` = (level, width): then only the block the
  frame covers is windowed (the same pixels as windowing the whole volume first)."""
  n, height, width = volume.shape
  first, last = max(0, int(first)), min(n - 1, int(last))
  if last < first:
    raise study_lib.StudyError(f"empty slice range {first}..{last} of a {n}-slice volume")
  frame = crop_frame(box, margin)
  # The rows / columns the bilinear samples can touch (edges clamped as in _sample_plane).
  fx, fy, fw, fh = frame
  r0 = int(np.clip(np.floor(fy - 1), 0, height - 1))
  r1 = int(np.clip(np.ceil(fy + fh + 1), r0 + 1, height))
  c0 = int(np.clip(np.floor(fx - 1), 0, width - 1))
  c1 = int(np.clip(np.ceil(fx + fw + 1), c0 + 1, width))
  block = volume[first:last + 1, r0:r1, c0:c1]
  if window is not None:
    block = study_lib.window(block, *window)
  local = (fx - c0, fy - r0, fw, fh)
  thirds = [t if len(t) else np.arange(len(block)) for t in np.array_split(np.arange(len(block)), 3)]
  planes = [_sample_plane(block[t].max(axis=0), local, size) for t in thirds]
  image = np.clip(np.rint(np.stack(planes, axis=-1)), 0, 255).astype(np.uint8)
  return image, frame


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


def process(study: study_lib.StudyInput, options: study_lib.Options) -> Iterator[dict[str, Any]]:
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
      image, frame = crop_input(volume, first, last, box, options.image_size)
      yield {"image": image, "box": to_crop(extent.box, frame), "vertebra": v, "sample": k,
             "study_uid": study.uid, "fold": study.fold}
