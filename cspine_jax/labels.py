"""Labels derived from segmentation masks, and the RSNA CSV tables.

Masks are uint8 (S, H, W) volumes on the series grid (slice head to feet) holding 1..7 = C1..C7; other
values (0 background, > 7 anything else) are ignored. A slice shows a vertebra when at least one of its
pixels carries that vertebra's label (the method's rule). Boxes are pixel boxes (x0, y0, x1, y1) with
x = column, y = row, x1/y1 exclusive.
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pandas as pd

VERTEBRAE = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
TARGETS = ("patient_overall",) + VERTEBRAE
NUM_VERTEBRAE = len(VERTEBRAE)

# Digits separated by single dots: no '/', no '..', nothing a path could abuse.
_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_UID_MAX_LEN = 64


class TableError(ValueError):
  """A CSV table that is malformed; the message names the file, the row and the problem."""


def check_uid(uid: str) -> str:
  """Returns ``uid`` when it is a valid DICOM UID (digits and dots, <= 64 chars); else ValueError."""
  if not isinstance(uid, str) or len(uid) > _UID_MAX_LEN or not _UID_RE.fullmatch(uid):
    raise ValueError(
        f"invalid StudyInstanceUID {uid!r}: expected digits separated by single dots, "
        f"at most {_UID_MAX_LEN} characters")
  return uid


@dataclasses.dataclass
class SliceLabels:
  """Per-slice labels of a (S, H, W) mask.

  presence:   bool (S, 7), vertebra visible in the slice (>= 1 pixel).
  area_ratio: float32 (S, 7), pixel count in the slice / the vertebra's largest per-slice count.
  box:        float32 (S, 4), pixel box of all visible C1-C7 in the slice; zeros when none.
  """
  presence: np.ndarray
  area_ratio: np.ndarray
  box: np.ndarray


@dataclasses.dataclass(frozen=True)
class VertebraExtent:
  """Where one vertebra lies: inclusive sorted slice indices and its pixel box over all its slices."""
  first: int
  last: int
  box: tuple[int, int, int, int]


def _check_mask(mask: np.ndarray) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.ndim != 3:
    raise ValueError(f"mask must be (S, H, W), got shape {mask.shape}")
  if not np.issubdtype(mask.dtype, np.integer):
    raise ValueError(f"mask must hold integer labels, got dtype {mask.dtype}")
  return mask


def _vertebra_voxels(mask: np.ndarray) -> np.ndarray:
  """Bool mask of voxels labelled 1..7 (one pass; uint8 wraps 0 to 255)."""
  if mask.dtype == np.uint8:
    return (mask - np.uint8(1)) < NUM_VERTEBRAE
  return (mask >= 1) & (mask <= NUM_VERTEBRAE)


def _slice_counts(mask: np.ndarray) -> np.ndarray:
  """int64 (S, 7): pixels of each vertebra per slice, by one bincount per slice."""
  counts = np.zeros((mask.shape[0], NUM_VERTEBRAE), np.int64)
  for s, sl in enumerate(mask):
    flat = sl.ravel()
    if flat.dtype != np.uint8:  # bincount needs non-negative intp; clip others out of 1..7.
      flat = np.clip(flat, 0, NUM_VERTEBRAE + 1).astype(np.intp)
    counts[s] = np.bincount(flat, minlength=NUM_VERTEBRAE + 1)[1:NUM_VERTEBRAE + 1]
  return counts


def _box_from_any(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """Boxes (..., 4) from bool row/col occupancy (..., H), (..., W); zeros where nothing is set."""
  has = rows.any(-1)
  h, w = rows.shape[-1], cols.shape[-1]
  y0 = rows.argmax(-1)
  y1 = h - rows[..., ::-1].argmax(-1)
  x0 = cols.argmax(-1)
  x1 = w - cols[..., ::-1].argmax(-1)
  box = np.stack([x0, y0, x1, y1], -1)
  return np.where(has[..., None], box, 0)


def slice_labels(mask: np.ndarray) -> SliceLabels:
  """Presence, area ratio and C1-C7 box of every slice of a (S, H, W) mask."""
  mask = _check_mask(mask)
  counts = _slice_counts(mask)
  peak = counts.max(0)
  area = np.divide(counts, peak, out=np.zeros(counts.shape, np.float64), where=peak > 0)
  fg = _vertebra_voxels(mask)
  box = _box_from_any(fg.any(2), fg.any(1))
  return SliceLabels(presence=counts > 0, area_ratio=area.astype(np.float32),
                     box=box.astype(np.float32))


def vertebra_extents(mask: np.ndarray) -> list[VertebraExtent | None]:
  """For C1..C7: first/last slice index (inclusive) and pixel box, or None when absent."""
  mask = _check_mask(mask)
  present = _slice_counts(mask) > 0
  extents: list[VertebraExtent | None] = []
  for v in range(NUM_VERTEBRAE):
    idx = np.flatnonzero(present[:, v])
    if idx.size == 0:
      extents.append(None)
      continue
    first, last = int(idx[0]), int(idx[-1])
    # Only the vertebra's own slab is scanned, so all seven cost about one pass over the volume.
    footprint = (mask[first:last + 1] == v + 1).any(0)
    box = _box_from_any(footprint.any(1), footprint.any(0))
    extents.append(VertebraExtent(first, last, tuple(int(b) for b in box)))
  return extents


def _read_csv(path: str | os.PathLike, columns: tuple[str, ...]) -> pd.DataFrame:
  try:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
  except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
    raise TableError(f"{path}: cannot read CSV: {e}") from e
  missing = [c for c in columns if c not in df.columns]
  if missing:
    raise TableError(f"{path}: missing columns {missing}; found {list(df.columns)}")
  df = df[list(columns)].copy()
  for row, uid in enumerate(df["StudyInstanceUID"]):
    try:
      check_uid(uid)
    except ValueError as e:
      raise TableError(f"{path}: row {row} (line {row + 2}): {e}") from None
  return df


def _to_numbers(df: pd.DataFrame, path, column: str, allowed: str) -> np.ndarray:
  """Column as float64; TableError naming the first row that is not a finite number."""
  values = pd.to_numeric(df[column], errors="coerce").to_numpy(np.float64)
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    row = int(bad[0])
    raise TableError(f"{path}: row {row} (line {row + 2}): {column}={df[column].iloc[row]!r} "
                     f"is not {allowed}")
  return values


def read_train_csv(path: str | os.PathLike) -> pd.DataFrame:
  """train.csv -> DataFrame (StudyInstanceUID str, patient_overall, C1..C7 int64 0/1)."""
  df = _read_csv(path, ("StudyInstanceUID",) + TARGETS)
  for t in TARGETS:
    values = _to_numbers(df, path, t, "0 or 1")
    bad = np.flatnonzero((values != 0) & (values != 1))
    if bad.size:
      row = int(bad[0])
      raise TableError(f"{path}: row {row} (line {row + 2}): {t}={df[t].iloc[row]!r} is not 0 or 1")
    df[t] = values.astype(np.int64)
  dup = df["StudyInstanceUID"].duplicated()
  if dup.any():
    row = int(np.flatnonzero(dup.to_numpy())[0])
    raise TableError(f"{path}: row {row} (line {row + 2}): duplicate StudyInstanceUID "
                     f"{df['StudyInstanceUID'].iloc[row]}")
  return df.reset_index(drop=True)


def read_bounding_boxes(path: str | os.PathLike) -> pd.DataFrame:
  """train_bounding_boxes.csv -> DataFrame (StudyInstanceUID, x, y, width, height float64,
  slice_number int64: the file number n of <n>.dcm)."""
  df = _read_csv(path, ("StudyInstanceUID", "x", "y", "width", "height", "slice_number"))
  for c in ("x", "y"):
    df[c] = _to_numbers(df, path, c, "a number")
  for c in ("width", "height"):
    values = _to_numbers(df, path, c, "a positive number")
    bad = np.flatnonzero(values <= 0)
    if bad.size:
      row = int(bad[0])
      raise TableError(f"{path}: row {row} (line {row + 2}): {c}={values[row]} is not positive")
    df[c] = values
  numbers = _to_numbers(df, path, "slice_number", "a non-negative integer")
  bad = np.flatnonzero((numbers < 0) | (numbers != np.round(numbers)))
  if bad.size:
    row = int(bad[0])
    raise TableError(f"{path}: row {row} (line {row + 2}): slice_number="
                     f"{df['slice_number'].iloc[row]!r} is not a non-negative integer")
  df["slice_number"] = numbers.astype(np.int64)
  return df.reset_index(drop=True)
