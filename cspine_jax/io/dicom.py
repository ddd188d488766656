"""DICOM series reader: slice order, Hounsfield units, decoders, bad files.

``read_series(folder)`` turns a folder of single-frame CT DICOM files (``<n>.dcm`` as in RSNA
``train_images/<UID>/``, or scanner files with any names) into a :class:`Series`: an HU volume
ordered head to feet along the slice normal, plus per-slice metadata and the geometry.

Each file is read once (its header by :mod:`cspine_jax.io.dicom_header`) and its pixels decoded
once, straight into one preallocated float32 volume (rescale applied in the same numpy pass);
uncompressed little-endian 16-bit pixels are taken straight from the file's bytes. ``map_hu=``
(e.g. a window to uint8, or a window and a resize) is applied to each slice while its HU values
are still in cache, so a caller that only needs the mapped volume never builds the float32 one.
There is no thread option: the decoders of JPEG Lossless / JPEG-LS / JPEG 2000
(pylibjpeg-libjpeg, pyjpegls/CharLS, pylibjpeg-openjpeg) never release the GIL, so threads cannot
decode in parallel. Parallelise over studies with processes instead.

Documented choices for imperfect folders (every choice is recorded in ``Series.skipped`` or
``Series.warnings``; nothing is dropped silently):
- Non-DICOM, unreadable, truncated or undecodable files, files without pixel data or position,
  with a NaN or infinite RescaleSlope / RescaleIntercept, multi-frame or colour images: skipped
  with the reason.
- Several SeriesInstanceUIDs in one folder: :class:`SeriesError` listing each UID and its slice
  count, unless ``series_uid=`` picks one (the others are then skipped as "other series"), or is
  ``AUTO_SERIES``: the series with the most axial slices (a scanner's export of one study often
  holds scouts, reformats and a second kernel beside the axial series), the choice and the
  others noted in ``Series.warnings``. An empty or missing SeriesInstanceUID is a series of its
  own (``''``), as in real anonymised data.
- Slices whose orientation differs from the majority (e.g. a scout image): skipped.
- Several slices at the same position (within ``_DUPLICATE_MM``): the one with the lowest file
  number (then name) is kept, the others skipped as duplicates.
- A slice whose Rows x Columns differ from the majority: resized (bilinear) to the majority size,
  listed in ``Series.resized`` and warned about.
- Non-uniform steps between slices (e.g. a missing slice): warned; ``slice_spacing`` is the median.
- Too few usable slices: fewer than ``min_slices``, or less than ``min_fraction`` of the files that
  belonged to the series -> :class:`SeriesError` naming the folder and the skip reasons.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pathlib
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import pydicom.pixels
import pydicom.uid

from cspine_jax.io import dicom_header
from cspine_jax.io.dicom_header import SliceHeader

_LOG = logging.getLogger(__name__)

DEFAULT_MIN_SLICES = 2  # Fewer slices cannot give a slice spacing.
DEFAULT_MIN_FRACTION = 0.5  # A study that lost half its slices is not worth training on.
_DUPLICATE_MM = 1e-3  # Positions closer than this along the normal are the same slice.
_SPACING_RTOL = 0.01  # Steps further than 1 % (+ _SPACING_ATOL) from the median are non-uniform.
_SPACING_ATOL = 0.01
_ORIENTATION_DECIMALS = 4  # Cosines equal to 4 decimals count as one orientation.
AUTO_SERIES = "auto"  # read_series(series_uid=AUTO_SERIES): the series with most axial slices
_AXIAL_MIN_COS = 0.7  # a slice is axial when its normal is within ~45 degrees of the body axis

file_number = dicom_header.file_number  # Callers name it dicom.file_number.


class SeriesError(ValueError):
  """A folder that cannot be read as one CT series; the message names the folder and the reason."""


class SeriesWarning(UserWarning):
  """Something odd but survivable in a series (resized slice, uneven spacing, skipped files)."""


@dataclasses.dataclass
class Series:
  """One CT series, slices ordered head to feet along the slice normal (the RSNA convention).

  The positions' projections on the normal are strictly monotonic along the volume index, in the
  direction in which the patient's superior (LPS +z) coordinate falls: index 0 is the top slice.

  volume:          float32 (S, H, W), Hounsfield units (``read_series(map_hu=f)``: f(HU) instead).
  file_names:      S file names (relative to ``folder``) in volume order.
  numbers:         int64 (S,) the file number ``n`` of ``<n>.dcm`` (what train_bounding_boxes.csv's
                   slice_number means), or -1 when the name is not numeric.
  positions:       float64 (S, 3) ImagePositionPatient (LPS, mm) in volume order.
  orientation:     float64 (6,) ImageOrientationPatient (row direction cosines, column direction
                   cosines).
  pixel_spacing:   (row spacing, column spacing) in mm: the distance between rows, between columns.
  slice_spacing:   mm between consecutive slices, from the positions (SliceThickness can be wrong).
  reversed:        True when file numbers increase from feet to head (position rising with n). When
                   the names are not numeric, InstanceNumber stands in for n (False if absent).
  transfer_syntaxes: sorted list of the transfer syntax UIDs met.
  skipped:         list of (file name, reason) for files that were not used.
  study_uid:       StudyInstanceUID ('' when the files leave it empty).
  series_uid:      SeriesInstanceUID ('' when the files leave it empty).
  resized:         list of (file name, (rows, columns) as stored) for slices resized to (H, W).
  warnings:        human-readable notes on everything odd met (also issued as SeriesWarning).
  slice_shape:     (H, W) of the images, which ``read_series(map_hu=f)`` may have mapped to
                   another shape (``volume`` is then (S, *f's output shape)); None: volume's.
  """
  folder: pathlib.Path
  volume: np.ndarray
  file_names: list[str]
  numbers: np.ndarray
  positions: np.ndarray
  orientation: np.ndarray
  pixel_spacing: tuple[float, float]
  slice_spacing: float
  reversed: bool
  transfer_syntaxes: list[str]
  skipped: list[tuple[str, str]]
  study_uid: str = ""
  series_uid: str = ""
  resized: list[tuple[str, tuple[int, int]]] = dataclasses.field(default_factory=list)
  warnings: list[str] = dataclasses.field(default_factory=list)
  slice_shape: tuple[int, int] | None = None

  @property
  def shape(self) -> tuple[int, int, int]:
    """(S, H, W) of the series' images (the grid masks and boxes refer to), whatever map_hu made
    of ``volume``."""
    if self.slice_shape is None:
      return tuple(int(v) for v in self.volume.shape)
    return (int(self.volume.shape[0]), *(int(v) for v in self.slice_shape))

  @property
  def normal(self) -> np.ndarray:
    """Unit slice normal (row cosines x column cosines)."""
    o = self.orientation
    n = np.cross(o[:3], o[3:])
    return n / np.linalg.norm(n)


def iter_dicom_files(folder: str | os.PathLike[str]) -> Iterator[pathlib.Path]:
  """Yields the regular files directly in ``folder`` (any name: scanner files often have no
  extension), numeric names first in numeric order, then the rest by name.

  Nothing is filtered by content; :func:`read_series` reports non-DICOM files as skipped.
  Raises SeriesError when ``folder`` is not a directory.
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise SeriesError(f"{folder}: not a directory")
  paths = [p for p in folder.iterdir() if p.is_file()]
  def key(p: pathlib.Path) -> tuple[int, int, str]:
    n = file_number(p.name)
    return (0, n, p.name) if n >= 0 else (1, 0, p.name)
  yield from sorted(paths, key=key)


def _majority(values: list[Any]) -> Any:
  """Most common value; ties go to the value met first."""
  return collections.Counter(values).most_common(1)[0][0]


def _decode_into(sl: SliceHeader, out: np.ndarray) -> None:
  """Decodes ``sl``'s pixels as HU into ``out`` (float32 (H, W)), resizing when sizes differ."""
  if sl.native is not None:
    # What pydicom's native decoder returns, without its per-call setup (a large share of a plain
    # slice's decode time): the bytes as the stored dtype, unused high bits cleared (unsigned) or
    # sign-extended (signed) by the same shift pair.
    dtype, shift = sl.native
    arr = np.frombuffer(sl.ds.get_item(dicom_header.PIXEL_DATA).value, dtype,
                        count=sl.size[0] * sl.size[1])
    arr = arr.reshape(sl.size)
    if shift:
      arr = np.left_shift(arr, shift)
      arr >>= shift
  else:
    arr = pydicom.pixels.pixel_array(sl.ds, view_only=True)  # Read-only is enough: we copy it.
    if arr.ndim != 2:
      raise ValueError(f"decoded pixel array has shape {arr.shape}, expected 2-D")
    if arr.shape != sl.size:
      raise ValueError(f"decoded shape {arr.shape} differs from Rows x Columns {sl.size}")
  target = out if arr.shape == out.shape else np.empty(arr.shape, np.float32)
  # One fused cast+scale pass (float32 loop), then the offset in place.
  if sl.slope == 1.0:
    np.add(arr, np.float32(sl.intercept), out=target, dtype=np.float32)
  else:
    np.multiply(arr, np.float32(sl.slope), out=target, dtype=np.float32)
    if sl.intercept:
      target += np.float32(sl.intercept)
  if target is not out:
    out[...] = resize_slice(target, out.shape)


def resize_slice(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a 2-D float image to ``shape`` (pixel-area aligned corners)."""
  import scipy.ndimage  # lazy: slow import, needed only for odd-size slices (decoder start-up)
  zoom = (shape[0] / image.shape[0], shape[1] / image.shape[1])
  out = scipy.ndimage.zoom(image, zoom, order=1, mode="nearest", grid_mode=True)
  if out.shape != tuple(shape):  # Rounding in zoom's output size; crop/pad by edge values.
    out = np.pad(out[:shape[0], :shape[1]],
                 [(0, max(0, shape[0] - out.shape[0])), (0, max(0, shape[1] - out.shape[1]))],
                 mode="edge")
  return out.astype(np.float32, copy=False)


def _describe_skips(skipped: list[tuple[str, str]], limit: int = 5) -> str:
  text = "; ".join(f"{name}: {reason}" for name, reason in skipped[:limit])
  if len(skipped) > limit:
    text += f"; ... ({len(skipped) - limit} more)"
  return text


def _unit_normal(orientation: np.ndarray) -> np.ndarray | None:
  """The slice plane's unit normal from ImageOrientationPatient (None when degenerate)."""
  normal = np.cross(orientation[:3], orientation[3:])
  norm = np.linalg.norm(normal)
  return normal / norm if norm >= 1e-3 else None


def _axial(orientation: np.ndarray) -> bool:
  normal = _unit_normal(orientation)
  return normal is not None and abs(normal[2]) >= _AXIAL_MIN_COS


def _auto_series(slices: list[SliceHeader]) -> tuple[str, str]:
  """(the UID of the series with the most axial slices, a note naming the choice and the
  others); ties go to the series with more slices, then the smaller UID."""
  axial = collections.Counter(s.series_uid for s in slices if _axial(s.orientation))
  total = collections.Counter(s.series_uid for s in slices)
  ranked = sorted(total, key=lambda u: (-axial[u], -total[u], u))
  describe = lambda u: f"{u!r} ({axial[u]} axial of {total[u]} slices)"  # noqa: E731
  return ranked[0], (f"{len(total)} series in the folder: read {describe(ranked[0])}, not "
                     + ", ".join(describe(u) for u in ranked[1:]))


# ------------------------------------------------------------------ the steps of read_series
# Each step appends the files it leaves out to ``skipped`` (name, reason) and its remarks to
# ``notes``, in the order read_series reports them.

def _read_headers(folder: pathlib.Path, paths: list[pathlib.Path],
                  skipped: list[tuple[str, str]]) -> list[SliceHeader]:
  """The header of every readable image file; the others go to ``skipped``."""
  slices: list[SliceHeader] = []
  for path in paths:
    result = dicom_header.read_header(path)
    if isinstance(result, str):
      skipped.append((path.name, result))
    else:
      slices.append(result)
  if not slices:
    raise SeriesError(f"{folder}: no readable DICOM image among {len(paths)} files "
                      f"({_describe_skips(skipped)})")
  return slices


def _choose_series(folder: pathlib.Path, slices: list[SliceHeader], series_uid: str | None,
                   skipped: list[tuple[str, str]], notes: list[str]
                   ) -> tuple[list[SliceHeader], int]:
  """The slices of one series (mixed folders need an explicit choice), and how many slices of
  other series were left out."""
  by_series = collections.Counter(s.series_uid for s in slices)
  other_series = 0
  if series_uid == AUTO_SERIES:
    series_uid = None
    if len(by_series) > 1:
      series_uid, note = _auto_series(slices)
      notes.append(note)
  if series_uid is not None:
    if series_uid not in by_series:
      raise SeriesError(f"{folder}: no slice of series {series_uid!r}; found "
                        + ", ".join(f"{u!r} ({c} slices)" for u, c in by_series.most_common()))
    for s in slices:
      if s.series_uid != series_uid:
        skipped.append((s.name, f"other series {s.series_uid!r} (not selected)"))
        other_series += 1
    slices = [s for s in slices if s.series_uid == series_uid]
  elif len(by_series) > 1:
    raise SeriesError(f"{folder}: {len(by_series)} series mixed in one folder: "
                      + ", ".join(f"{u!r} ({c} slices)" for u, c in by_series.most_common())
                      + "; pass series_uid= to pick one")
  return slices, other_series


def _keep_main_orientation(folder: pathlib.Path, slices: list[SliceHeader],
                           skipped: list[tuple[str, str]]
                           ) -> tuple[list[SliceHeader], np.ndarray, np.ndarray]:
  """The slices in the majority's plane (other planes, e.g. scouts, do not belong in the volume),
  their mean orientation and its unit normal."""
  orient_key = [tuple(round(float(v), _ORIENTATION_DECIMALS) + 0.0 for v in s.orientation)
                for s in slices]
  main_orient = _majority(orient_key)
  kept = []
  for s, key in zip(slices, orient_key):
    if key == main_orient:
      kept.append(s)
    else:
      skipped.append(
          (s.name, f"orientation {list(key)} differs from the series' {list(main_orient)}"))
  orientation = np.mean([s.orientation for s in kept], axis=0)
  normal = _unit_normal(orientation)
  if normal is None:
    raise SeriesError(f"{folder}: degenerate ImageOrientationPatient {list(orientation)}")
  return kept, orientation, normal


def _order_head_to_feet(slices: list[SliceHeader], normal: np.ndarray,
                        skipped: list[tuple[str, str]]) -> list[SliceHeader]:
  """The slices ordered by their projection on the normal, falling in the superior (+z) sense;
  of several at one position the lowest file number (then name) is kept."""
  sense = -1.0 if normal[2] >= 0 else 1.0
  proj = np.array([s.position @ normal for s in slices])
  tie = [(s.number if s.number >= 0 else np.iinfo(np.int64).max, s.name) for s in slices]
  order = sorted(range(len(slices)), key=lambda i: (sense * proj[i], tie[i]))
  ordered: list[SliceHeader] = []
  last = None
  for i in order:
    if last is not None and abs(proj[i] - proj[last]) < _DUPLICATE_MM:
      skipped.append((slices[i].name, f"duplicate position of {slices[last].name} "
                                      f"({proj[i]:.3f} mm along the normal)"))
      continue
    ordered.append(slices[i])
    last = i
  return ordered


def _check_count(folder: pathlib.Path, stage: str, usable: int, total: int, min_slices: int,
                 min_fraction: float, skipped: list[tuple[str, str]]) -> None:
  """Raises SeriesError when ``usable`` of the series' ``total`` files are too few."""
  if usable < min_slices or usable < min_fraction * total:
    raise SeriesError(
        f"{folder}: too few usable slices {stage}: {usable} of {total} files "
        f"(need at least {min_slices} and {min_fraction:.0%}); "
        f"skipped: {_describe_skips(skipped)}")


def _decode_volume(slices: list[SliceHeader], map_hu: Callable[[np.ndarray], np.ndarray] | None,
                   skipped: list[tuple[str, str]]
                   ) -> tuple[np.ndarray, list[SliceHeader], list[tuple[str, tuple[int, int]]],
                              tuple[int, int]]:
  """Decodes the slices, in order, straight into one preallocated volume (with ``map_hu``:
  through one reused HU slice, mapped while it is in cache).

  Returns the volume and the slices that decoded (the others go to ``skipped``), the resized
  slices (name, stored size), and the majority's (H, W) that every slice now has.
  """
  height, width = _majority([s.size for s in slices])
  hu = None
  out_shape, dtype = (height, width), np.float32
  if map_hu is not None:
    hu = np.zeros((height, width), np.float32)
    probe = np.asarray(map_hu(hu))  # Its output's shape and dtype.
    out_shape, dtype = probe.shape, probe.dtype
  volume = np.empty((len(slices), *out_shape), dtype)
  ok = np.ones(len(slices), bool)
  resized: list[tuple[str, tuple[int, int]]] = []
  for i, s in enumerate(slices):
    try:
      _decode_into(s, volume[i] if hu is None else hu)
    except Exception as e:  # noqa: BLE001 - decoders raise many kinds of errors on bad data.
      skipped.append((s.name, f"pixel data cannot be decoded ({type(e).__name__}: {e})"))
      ok[i] = False
    else:
      if hu is not None:
        volume[i] = map_hu(hu)
      if s.size != (height, width):
        resized.append((s.name, s.size))
    s.ds = None  # Free the encoded pixels as we go.
  if not ok.all():
    volume = volume[ok]
    slices = [s for s, good in zip(slices, ok) if good]
  return volume, slices, resized, (height, width)


def _slice_spacing(positions: np.ndarray, normal: np.ndarray, notes: list[str]) -> float:
  """The median step between slices along the normal (uneven steps are noted)."""
  steps = np.abs(np.diff(positions @ normal))
  slice_spacing = float(np.median(steps))
  if np.any(np.abs(steps - slice_spacing) > _SPACING_ATOL + _SPACING_RTOL * slice_spacing):
    notes.append(f"non-uniform slice spacing: steps {steps.min():.3f}..{steps.max():.3f} mm; "
                 f"using the median {slice_spacing:.3f} mm")
  return slice_spacing


def _numbers_reversed(slices: list[SliceHeader], numbers: np.ndarray) -> bool:
  """Whether the file numbers (else InstanceNumbers) mostly fall along the head-to-feet order."""
  if np.all(numbers >= 0):
    rank = numbers
  elif all(s.instance_number is not None for s in slices):
    rank = np.array([s.instance_number for s in slices], np.int64)
  else:
    rank = np.zeros(len(slices), np.int64)
  return bool(np.sum(np.sign(np.diff(rank))) < 0)


def read_series(folder: str | os.PathLike[str], *, series_uid: str | None = None,
                min_slices: int = DEFAULT_MIN_SLICES, min_fraction: float = DEFAULT_MIN_FRACTION,
                warn: bool = True,
                map_hu: Callable[[np.ndarray], np.ndarray] | None = None) -> Series:
  """Reads one CT series from a folder of single-frame DICOM files.

  Args:
    folder: the folder (``train_images/<UID>/`` or any folder of scanner files).
    series_uid: picks one SeriesInstanceUID when the folder mixes several ('' = the series whose
      files leave it empty; ``AUTO_SERIES``: the one with the most axial slices, noted in
      ``warnings``); without it a mixed folder raises SeriesError.
    min_slices: the fewest usable slices accepted.
    min_fraction: the smallest share of the series' files (all files met, less those of other
      series) that must be usable.
    warn: issue each note in ``Series.warnings`` as a SeriesWarning (they are recorded either way).
    map_hu: a function of a float32 (H, W) HU slice returning an array of one fixed shape and
      dtype (e.g. a window to uint8, or a window and a resize); the volume then holds its outputs
      (S, *shape), slice by slice, and no HU volume is kept (``Series.shape`` stays the images'
      (S, H, W)). The slice it gets is a buffer that the next slice overwrites: it must not keep it.

  Returns:
    The Series, volume float32 (S, H, W) in HU (or map_hu's outputs) ordered head to feet.

  Raises:
    SeriesError: the folder is missing or empty, holds no usable image, mixes series without
      ``series_uid``, or keeps too few usable slices; the message names the folder and the reason.
  """
  folder = pathlib.Path(folder)
  paths = list(iter_dicom_files(folder))
  if not paths:
    raise SeriesError(f"{folder}: empty folder, no files to read")
  skipped: list[tuple[str, str]] = []
  notes: list[str] = []
  slices = _read_headers(folder, paths, skipped)
  slices, other_series = _choose_series(folder, slices, series_uid, skipped, notes)
  slices, orientation, normal = _keep_main_orientation(folder, slices, skipped)
  slices = _order_head_to_feet(slices, normal, skipped)
  total = len(paths) - other_series
  _check_count(folder, "before decoding", len(slices), total, min_slices, min_fraction, skipped)
  ordered = len(slices)
  volume, slices, resized, (height, width) = _decode_volume(slices, map_hu, skipped)
  if len(slices) < ordered:
    _check_count(folder, "after decoding", len(slices), total, min_slices, min_fraction, skipped)

  if resized:
    notes.append(f"{len(resized)} slice(s) resized to the series' {height}x{width}: "
                 + ", ".join(f"{n} ({r}x{c})" for n, (r, c) in resized))
  if skipped:
    notes.append(f"skipped {len(skipped)} of {len(paths)} files: {_describe_skips(skipped)}")
  positions = np.stack([s.position for s in slices])
  slice_spacing = _slice_spacing(positions, normal, notes)
  spacings = [s.pixel_spacing for s in slices if s.pixel_spacing is not None]
  if not spacings:
    raise SeriesError(f"{folder}: no slice carries PixelSpacing")
  pixel_spacing = _majority(spacings)
  numbers = np.array([s.number for s in slices], np.int64)

  for note in notes:
    _LOG.info("%s: %s", folder, note)
    if warn:
      warnings.warn(f"{folder}: {note}", SeriesWarning, stacklevel=2)

  return Series(
      folder=folder, volume=volume, file_names=[s.name for s in slices], numbers=numbers,
      positions=positions, orientation=orientation,
      pixel_spacing=(float(pixel_spacing[0]), float(pixel_spacing[1])),
      slice_spacing=slice_spacing, reversed=_numbers_reversed(slices, numbers),
      transfer_syntaxes=sorted({s.transfer_syntax for s in slices}), skipped=skipped,
      study_uid=_majority([s.study_uid for s in slices]), series_uid=slices[0].series_uid,
      resized=resized, warnings=notes, slice_shape=(int(height), int(width)))


def describe(series: Series) -> dict[str, Any]:
  """A JSON-ready summary of what was read (used by ``data_prep.inspect``)."""
  return {
      "folder": str(series.folder),
      "study_uid": series.study_uid,
      "series_uid": series.series_uid,
      "num_slices": int(series.volume.shape[0]),
      "shape": [int(v) for v in series.shape],
      "pixel_spacing": [float(v) for v in series.pixel_spacing],
      "slice_spacing": float(series.slice_spacing),
      "reversed": bool(series.reversed),
      "first_number": int(series.numbers[0]),
      "last_number": int(series.numbers[-1]),
      "hu_min": float(series.volume.min()),
      "hu_max": float(series.volume.max()),
      "transfer_syntaxes": [
          {"uid": uid, "name": pydicom.uid.UID(uid).name} for uid in series.transfer_syntaxes],
      "skipped": [{"file": name, "reason": reason} for name, reason in series.skipped],
      "resized": [{"file": name, "shape": list(shape)} for name, shape in series.resized],
      "warnings": list(series.warnings),
  }
