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


def box_iou(a, b) -> np.ndarray:
  """IoU of (..., 4) boxes (x0, y0, x1, y1) in the same units, broadcast row by row; 0 where the
  union is empty."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = iw * ih
  area = lambda r: np.clip(r[..., 2] - r[..., 0], 0, None) * np.clip(r[..., 3] - r[..., 1], 0, None)
  union = area(a) + area(b) - inter
  return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _check_mask(mask: np.ndarray) -> np.ndarray:
  """The mask as uint8 labels (S, H, W); other integer types are clipped to 0..8 (8 = ignored)."""
  mask = np.asarray(mask)
  if mask.ndim != 3:
    raise ValueError(f"mask must be (S, H, W), got shape {mask.shape}")
  if not np.issubdtype(mask.dtype, np.integer):
    raise ValueError(f"mask must hold integer labels, got dtype {mask.dtype}")
  if mask.dtype != np.uint8:  # Negative -> 0 (background), > 7 -> 8 (ignored): counts unchanged.
    mask = np.clip(mask, 0, NUM_VERTEBRAE + 1).astype(np.uint8)
  return mask


@dataclasses.dataclass
class _Region:
  """The smallest block of a uint8 mask holding every nonzero voxel, and where it starts.

  Most of a neck CT mask is background: two max-reductions along contiguous memory (one per
  slice, then one over the slab of nonzero slices) find the block, and all the per-label work is
  done on it (about a tenth of the voxels).
  """
  block: np.ndarray  # uint8 (s, h, w) view of the mask
  start: tuple[int, int, int]  # (slice, row, column) of block[0, 0, 0]
  shape: tuple[int, int, int]  # of the whole mask


def _region(mask: np.ndarray) -> _Region | None:
  """The nonzero block of a uint8 mask, or None when the mask is all zeros."""
  if mask.size == 0:
    return None
  per_slice = mask.max(axis=(1, 2)) if not mask.flags.c_contiguous else (
      mask.reshape(mask.shape[0], -1).max(axis=1))
  slices = np.flatnonzero(per_slice)
  if slices.size == 0:
    return None
  s0, s1 = int(slices[0]), int(slices[-1]) + 1
  plane = mask[s0:s1].max(axis=0)  # (H, W): the slab's footprint, vectorised over each plane.
  rows, cols = np.flatnonzero(plane.any(1)), np.flatnonzero(plane.any(0))
  r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
  return _Region(mask[s0:s1, r0:r1, c0:c1], (s0, r0, c0), mask.shape)


def _box_from_any(rows: np.ndarray, cols: np.ndarray, y_off: int = 0, x_off: int = 0
                  ) -> np.ndarray:
  """Boxes (..., 4) from bool row/col occupancy (..., H), (..., W), shifted by the offsets; zeros
  where nothing is set."""
  has = rows.any(-1)
  h, w = rows.shape[-1], cols.shape[-1]
  y0 = rows.argmax(-1) + y_off
  y1 = h - rows[..., ::-1].argmax(-1) + y_off
  x0 = cols.argmax(-1) + x_off
  x1 = w - cols[..., ::-1].argmax(-1) + x_off
  box = np.stack([x0, y0, x1, y1], -1)
  return np.where(has[..., None], box, 0)


@dataclasses.dataclass
class _Labelled:
  """Per slice of a region's block: C1-C7 row/column occupancy, box (block coordinates) and
  pixel count of each vertebra."""
  rows: np.ndarray  # bool (s, h)
  cols: np.ndarray  # bool (s, w)
  box: np.ndarray  # int (s, 4), zeros where no C1-C7 pixel
  counts: np.ndarray  # int64 (s, 7)


def _labelled(region: _Region) -> _Labelled:
  """One pass for the C1-C7 occupancy of every slice; then each slice's counts by one bincount
  of the pixels inside its C1-C7 box only (all its C1-C7 pixels lie there), exact."""
  block = region.block
  fg = (block - np.uint8(1)) < NUM_VERTEBRAE  # Labels 1..7 (uint8 wraps 0 to 255).
  rows, cols = fg.any(2), fg.any(1)
  box = _box_from_any(rows, cols)
  counts = np.zeros((block.shape[0], NUM_VERTEBRAE), np.int64)
  for i in np.flatnonzero(rows.any(1)):
    x0, y0, x1, y1 = box[i]
    counts[i] = np.bincount(block[i, y0:y1, x0:x1].ravel(), minlength=256)[1:NUM_VERTEBRAE + 1]
  return _Labelled(rows, cols, box, counts)


def slice_labels(mask: np.ndarray) -> SliceLabels:
  """Presence, area ratio and C1-C7 box of every slice of a (S, H, W) mask."""
  mask = _check_mask(mask)
  num_slices = mask.shape[0]
  counts = np.zeros((num_slices, NUM_VERTEBRAE), np.int64)
  box = np.zeros((num_slices, 4), np.float32)
  region = _region(mask)
  if region is not None:
    s0, r0, c0 = region.start
    s1 = s0 + region.block.shape[0]
    lab = _labelled(region)
    counts[s0:s1] = lab.counts
    box[s0:s1] = np.where(lab.rows.any(1)[:, None], lab.box + np.array([c0, r0, c0, r0]), 0)
  peak = counts.max(0, initial=0)
  area = np.divide(counts, peak, out=np.zeros(counts.shape, np.float64), where=peak > 0)
  return SliceLabels(presence=counts > 0, area_ratio=area.astype(np.float32), box=box)


def vertebra_extents(mask: np.ndarray) -> list[VertebraExtent | None]:
  """For C1..C7: first/last slice index (inclusive) and pixel box, or None when absent."""
  mask = _check_mask(mask)
  region = _region(mask)
  if region is None:
    return [None] * NUM_VERTEBRAE
  s0, r0, c0 = region.start
  lab = _labelled(region)
  present = lab.counts > 0
  extents: list[VertebraExtent | None] = []
  for v in range(NUM_VERTEBRAE):
    idx = np.flatnonzero(present[:, v])
    if idx.size == 0:
      extents.append(None)
      continue
    first, last = int(idx[0]), int(idx[-1])
    # Only the vertebra's own slab, inside the union of its slices' C1-C7 boxes, is scanned.
    ys = np.flatnonzero(lab.rows[first:last + 1].any(0))
    xs = np.flatnonzero(lab.cols[first:last + 1].any(0))
    y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    footprint = (region.block[first:last + 1, y0:y1, x0:x1] == v + 1).any(0)
    box = _box_from_any(footprint.any(1), footprint.any(0), r0 + y0, c0 + x0)
    extents.append(VertebraExtent(first + s0, last + s0, tuple(int(b) for b in box)))
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
