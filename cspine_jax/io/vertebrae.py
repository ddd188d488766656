"""The stage-1 predictions file: where each vertebra lies in each study (CSV, one row per vertebra).

Written by stage-1 inference (``write_vertebrae``), read by ``data_prep.prepare --vertebrae FILE``
(``read_vertebrae``) for studies without a segmentation. Columns, one row per (study, vertebra),
all 7 vertebrae of a study present:

  StudyInstanceUID  validated by labels.check_uid
  vertebra          C1..C7
  present           1 / 0; a row with 0 leaves the range and box columns empty
  first_index, last_index     inclusive slice range as sorted (head-to-feet) volume indices
  first_number, last_number   the same slices as file numbers n of <n>.dcm (-1 if unknown)
  x0, y0, x1, y1    box over the vertebra's slices, normalised to [0, 1] (x by width, y by height)
  confidence        the model's confidence in the call, in [0, 1]

File numbers survive a skipped (corrupt) file, sorted indices do not, so ``resolve`` maps the
numbers onto the series and falls back to the indices only when the numbers are unknown.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Mapping, Sequence

import numpy as np

from cspine_jax import labels as labels_lib
from cspine_jax.io import files

COLUMNS = ("StudyInstanceUID", "vertebra", "present", "first_index", "last_index", "first_number",
           "last_number", "x0", "y0", "x1", "y1", "confidence")


_ROUND_TOL = 1e-3  # Pixels; far above the 1e-8 of the written fractions, far below a pixel.


class VertebraeFileError(ValueError):
  """A malformed predictions file; the message names the file, the line and the problem."""


@dataclasses.dataclass(frozen=True)
class VertebraPrediction:
  """One vertebra of one study as located by stage 1 (``present=False``: not in the study)."""
  present: bool
  first_index: int = -1
  last_index: int = -1
  first_number: int = -1
  last_number: int = -1
  box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
  confidence: float = 1.0


def absent(confidence: float = 1.0) -> VertebraPrediction:
  return VertebraPrediction(present=False, confidence=confidence)


def write_vertebrae(path: str | os.PathLike, predictions: Mapping[str, Sequence[VertebraPrediction]]
                    ) -> None:
  """Writes ``{uid: 7 predictions (C1..C7)}`` atomically (temporary name, then rename)."""
  with files.replacing(path, newline="") as f:
    w = csv.writer(f)
    w.writerow(COLUMNS)
    for uid in sorted(predictions):
      labels_lib.check_uid(uid)
      preds = predictions[uid]
      if len(preds) != labels_lib.NUM_VERTEBRAE:
        raise ValueError(f"study {uid}: {len(preds)} predictions, expected 7 (C1..C7)")
      for name, p in zip(labels_lib.VERTEBRAE, preds):
        if p.present:
          w.writerow([uid, name, 1, p.first_index, p.last_index, p.first_number, p.last_number,
                      *(f"{b:.8f}" for b in p.box), f"{p.confidence:.6f}"])
        else:
          w.writerow([uid, name, 0, "", "", "", "", "", "", "", "", f"{p.confidence:.6f}"])


def read_vertebrae(path: str | os.PathLike) -> dict[str, tuple[VertebraPrediction, ...]]:
  """Reads a predictions file -> ``{uid: (C1..C7 predictions)}``; VertebraeFileError on bad rows."""
  out: dict[str, list[VertebraPrediction | None]] = {}
  try:
    f = open(path, newline="")
  except OSError as e:
    raise VertebraeFileError(f"{path}: cannot open: {e}") from e
  with f:
    reader = csv.DictReader(f)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise VertebraeFileError(f"{path}: missing columns {missing}; found {reader.fieldnames}")
    for line, row in enumerate(reader, start=2):
      where = f"{path}: line {line}"
      try:
        uid = labels_lib.check_uid(row["StudyInstanceUID"])
        name = row["vertebra"]
        if name not in labels_lib.VERTEBRAE:
          raise ValueError(f"vertebra {name!r} is not one of {labels_lib.VERTEBRAE}")
        pred = _parse_row(row)
      except ValueError as e:
        raise VertebraeFileError(f"{where}: {e}") from None
      slots = out.setdefault(uid, [None] * labels_lib.NUM_VERTEBRAE)
      v = labels_lib.VERTEBRAE.index(name)
      if slots[v] is not None:
        raise VertebraeFileError(f"{where}: duplicate row for study {uid} {name}")
      slots[v] = pred
  result = {}
  for uid, slots in out.items():
    lost = [labels_lib.VERTEBRAE[v] for v, p in enumerate(slots) if p is None]
    if lost:
      raise VertebraeFileError(f"{path}: study {uid} has no row for {lost} (all 7 are required)")
    result[uid] = tuple(slots)
  return result


def _parse_row(row: Mapping[str, str]) -> VertebraPrediction:
  present = row["present"].strip()
  if present not in ("0", "1"):
    raise ValueError(f"present={present!r} is not 0 or 1")
  confidence = float(row["confidence"])
  if not 0.0 <= confidence <= 1.0:
    raise ValueError(f"confidence={confidence} is outside [0, 1]")
  if present == "0":
    return absent(confidence)
  ints = {c: int(row[c]) for c in ("first_index", "last_index", "first_number", "last_number")}
  if not 0 <= ints["first_index"] <= ints["last_index"]:
    raise ValueError(f"slice indices {ints['first_index']}..{ints['last_index']} are not an "
                     "increasing non-negative range")
  box = tuple(float(row[c]) for c in ("x0", "y0", "x1", "y1"))
  if not (all(math.isfinite(b) for b in box) and 0 <= box[0] < box[2] <= 1
          and 0 <= box[1] < box[3] <= 1):
    raise ValueError(f"box {box} is not a normalised box (0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1)")
  return VertebraPrediction(True, box=box, confidence=confidence, **ints)


def resolve(pred: VertebraPrediction, numbers: np.ndarray, shape: Sequence[int]
            ) -> tuple[int, int, tuple[int, int, int, int]] | None:
  """Maps a prediction onto a series: (first, last sorted indices, pixel box) or None if absent.

  ``numbers`` are the series' file numbers in volume order and ``shape`` its (S, H, W). File
  numbers are used when both ends are found in the series, else the sorted indices.
  """
  if not pred.present:
    return None
  num_slices, height, width = shape
  pos = {int(n): i for i, n in enumerate(numbers) if n >= 0}
  if pred.first_number in pos and pred.last_number in pos:
    a, b = pos[pred.first_number], pos[pred.last_number]
    first, last = min(a, b), max(a, b)
  else:
    first, last = pred.first_index, pred.last_index
    if last >= num_slices:
      raise ValueError(f"predicted slices {first}..{last} lie outside a series of {num_slices} "
                       f"slices, and file numbers {pred.first_number}..{pred.last_number} are not "
                       "in the series")
  # Outward rounding, with a tolerance so that a pixel box written as fractions comes back exact.
  x0 = min(int(math.floor(pred.box[0] * width + _ROUND_TOL)), width - 1)
  y0 = min(int(math.floor(pred.box[1] * height + _ROUND_TOL)), height - 1)
  x1 = min(max(int(math.ceil(pred.box[2] * width - _ROUND_TOL)), x0 + 1), width)
  y1 = min(max(int(math.ceil(pred.box[3] * height - _ROUND_TOL)), y0 + 1), height)
  return first, last, (x0, y0, x1, y1)
