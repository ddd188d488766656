"""DICOM series reader: slice order, Hounsfield units, decoders, bad files.

``read_series(folder)`` turns a folder of single-frame CT DICOM files (``<n>.dcm`` as in RSNA
``train_images/<UID>/``, or scanner files with any names) into a :class:`Series`: an HU volume
ordered head to feet along the slice normal, plus per-slice metadata and the geometry.

Each file is read once (``dcmread``) and its pixels decoded once, straight into one preallocated
float32 volume (rescale applied in the same numpy pass); uncompressed little-endian 16-bit pixels
are taken straight from the file's bytes. ``map_hu=`` (e.g. a window to uint8, or a window and a
resize) is applied to each slice while its HU values are still in cache, so a caller that only
needs the mapped volume never builds the float32 one. There is no thread option: the decoders
of JPEG Lossless / JPEG-LS / JPEG 2000 (pylibjpeg-libjpeg, pyjpegls/CharLS, pylibjpeg-openjpeg)
never release the GIL (their extension modules do not even import PyEval_SaveThread), and on an
idle 2-core machine 2 threads decoded 20 J2K slices x3 in 2.62 s against 2.40 s serially.
Parallelise over studies with processes instead.

Documented choices for imperfect folders (every choice is recorded in ``Series.skipped`` or
``Series.warnings``; nothing is dropped silently):
- Non-DICOM, unreadable, truncated or undecodable files, files without pixel data or position,
  multi-frame or colour images: skipped with the reason.
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
import re
import struct
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import pydicom
import pydicom.errors
from pydicom.multival import MultiValue
import pydicom.pixels
import pydicom.uid

_LOG = logging.getLogger(__name__)

DEFAULT_MIN_SLICES = 2  # Fewer slices cannot give a slice spacing.
DEFAULT_MIN_FRACTION = 0.5  # A study that lost half its slices is not worth training on.
_DUPLICATE_MM = 1e-3  # Positions closer than this along the normal are the same slice.
_SPACING_RTOL = 0.01  # Steps further than 1 % (+ _SPACING_ATOL) from the median are non-uniform.
_SPACING_ATOL = 0.01
_ORIENTATION_DECIMALS = 4  # Cosines equal to 4 decimals count as one orientation.
_NUMERIC_NAME = re.compile(r"^(\d+)(?:\.dcm)?$", re.IGNORECASE)


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
  orientation:     float64 (6,) ImageOrientationPatient (row direction cosines, column direction cosines).
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


def file_number(name: str | os.PathLike[str]) -> int:
  """The number ``n`` of a file named ``<n>.dcm`` (or plain ``<n>``); -1 when not numeric."""
  match = _NUMERIC_NAME.match(pathlib.PurePath(name).name)
  return int(match.group(1)) if match else -1


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


@dataclasses.dataclass
class _Slice:
  """Header facts of one readable image file, kept until its pixels are decoded."""
  name: str
  number: int
  ds: Any  # pydicom Dataset, released after decoding
  position: np.ndarray
  orientation: np.ndarray
  size: tuple[int, int]
  pixel_spacing: tuple[float, float] | None
  series_uid: str
  study_uid: str
  instance_number: int | None
  slope: float
  intercept: float
  transfer_syntax: str
  native: tuple[np.dtype, int] | None = None  # (stored dtype, unused high bits) for the fast path


# Tags read straight from the raw elements: pydicom's value conversion (DS validation, MultiValue)
# cost about 10x the raw parse and made the header the largest overhead over decoding.
_IMAGE_POSITION = 0x00200032
_IMAGE_ORIENTATION = 0x00200037
_PIXEL_SPACING = 0x00280030
_INSTANCE_NUMBER = 0x00200013
_RESCALE_INTERCEPT = 0x00281052
_RESCALE_SLOPE = 0x00281053
_SERIES_UID = 0x0020000E
_STUDY_UID = 0x0020000D
_SAMPLES_PER_PIXEL = 0x00280002
_PHOTOMETRIC = 0x00280004
_NUMBER_OF_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_BITS_ALLOCATED = 0x00280100
_BITS_STORED = 0x00280101
_PIXEL_REPRESENTATION = 0x00280103
_PIXEL_DATA = 0x7FE00010
# Uncompressed little-endian syntaxes: the pixel bytes are the array itself.
_NATIVE_LITTLE_ENDIAN = frozenset([pydicom.uid.ImplicitVRLittleEndian,
                                   pydicom.uid.ExplicitVRLittleEndian])


def _text(ds: Any, tag: int) -> list[str]:
  """The values of a text element (DS, IS, UI are ASCII) as strings; [] when absent or empty."""
  elem = ds.get_item(tag)
  if elem is None:
    return []
  value = elem.value
  if isinstance(value, (bytes, bytearray)):  # Raw, as read from the file.
    text = value.decode("latin-1").strip(" \x00")
    return [v.strip(" \x00") for v in text.split("\\")] if text else []
  if value is None or value == "":
    return []
  items = value if isinstance(value, (list, tuple, MultiValue)) else [value]
  return [str(v) for v in items]


def _floats(ds: Any, tag: int, length: int) -> list[float] | None:
  """``length`` finite numbers from a DS element, or None when absent or malformed."""
  try:
    values = [float(v) for v in _text(ds, tag)]
  except ValueError:
    return None
  if len(values) != length or not all(np.isfinite(values)):
    return None
  return values


def _number(ds: Any, tag: int, default: float | None) -> float | None:
  """A single DS/IS value, or ``default`` when absent; ValueError when malformed."""
  values = _text(ds, tag)
  return float(values[0]) if values else default


def _uid(ds: Any, tag: int) -> str:
  values = _text(ds, tag)
  return values[0] if values else ""


def _ushort(ds: Any, tag: int) -> int | None:
  """A US value (Rows, BitsAllocated, ...) from the raw 2 bytes; None when absent or empty."""
  elem = ds.get_item(tag)
  if elem is None:
    return None
  value = elem.value
  if isinstance(value, (bytes, bytearray)):
    if not value:
      return None
    if len(value) == 2:
      return int.from_bytes(value, "little" if elem.is_little_endian else "big")
    value = ds[tag].value  # Anything unusual: pydicom's conversion (and its errors).
  return None if value is None or value == "" else int(value)


def _native_layout(ds: Any, tsyntax: str, bits_allocated: int | None
                   ) -> tuple[np.dtype, int] | None:
  """(dtype, unused high bits) when the pixels can be read straight from the bytes: uncompressed
  little-endian 16-bit greyscale with the elements pydicom's decoder requires. None: use pydicom."""
  if tsyntax not in _NATIVE_LITTLE_ENDIAN or bits_allocated != 16 or not _text(ds, _PHOTOMETRIC):
    return None
  bits_stored = _ushort(ds, _BITS_STORED)
  representation = _ushort(ds, _PIXEL_REPRESENTATION)
  if bits_stored is None or not 1 <= bits_stored <= 16 or representation not in (0, 1):
    return None
  return np.dtype("<i2" if representation else "<u2"), 16 - bits_stored


# ------------------------------------------------------------------ fast path for plain files
# An uncompressed little-endian file (the RSNA's most common kind) is walked directly: tag, VR and
# length headers, each value kept as its raw bytes, the pixel bytes a view on the file's. That is
# what dcmread + the raw-element helpers above extract, at about a tenth of dcmread's Python cost.
# Anything out of the ordinary (no 'DICM', another transfer syntax, an undefined length, a VR
# that does not match the syntax, a value running past the end, an unusual header) sends the file
# to pydicom, which also words the skip reason: the fast path never decides that a file is bad.
_VRS = frozenset(v.encode() for v in (
    "AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR "
    "US UT UV").split())
_LONG_VRS = frozenset(v.encode() for v in "OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_EXPLICIT_HEAD = struct.Struct("<HH2sH")
_IMPLICIT_HEAD = struct.Struct("<HHI")
_UINT32 = struct.Struct("<I")
_TRANSFER_SYNTAX = 0x00020010


class _RawElement:
  """A value's raw bytes (what _text, _ushort and _decode_into read); always little endian."""
  __slots__ = ("value",)
  is_little_endian = True

  def __init__(self, value):
    self.value = value


class _RawDataset:
  """The elements of a plain file as raw bytes: the fast path's stand-in for a pydicom Dataset
  (``in``, ``get_item`` and ``file_meta.get('TransferSyntaxUID')`` only)."""

  def __init__(self, elements: dict[int, Any], transfer_syntax: str):
    self._elements = elements
    self.file_meta = {"TransferSyntaxUID": pydicom.uid.UID(transfer_syntax)}

  def __contains__(self, tag: int) -> bool:
    return tag in self._elements

  def get_item(self, tag: int) -> _RawElement | None:
    value = self._elements.get(tag)
    return None if value is None else _RawElement(value)


def _walk(buf: bytes, pos: int, explicit: bool, stop_group: int | None = None
          ) -> tuple[dict[int, Any], int] | None:
  """Elements from ``pos`` (to the end, or until a group other than ``stop_group``); None when
  the file is not plain."""
  view = memoryview(buf)
  size = len(buf)
  elements: dict[int, Any] = {}
  while pos < size:
    if pos + 8 > size:
      return None
    if explicit:
      group, elem, vr, length = _EXPLICIT_HEAD.unpack_from(buf, pos)
      if stop_group is not None and group != stop_group:
        break
      if vr not in _VRS:
        return None
      if vr in _LONG_VRS:
        if pos + 12 > size:
          return None
        length = _UINT32.unpack_from(buf, pos + 8)[0]
        pos += 12
      else:
        pos += 8
    else:
      group, elem, length = _IMPLICIT_HEAD.unpack_from(buf, pos)
      pos += 8
    if length == 0xFFFFFFFF or pos + length > size:
      return None
    tag = (group << 16) | elem
    # Pixel bytes stay a view on the file's; the small values become bytes, like pydicom's raw.
    elements[tag] = view[pos:pos + length] if tag == _PIXEL_DATA else buf[pos:pos + length]
    pos += length
  return elements, pos


def _read_plain(path: pathlib.Path) -> _RawDataset | None:
  """The raw elements of an uncompressed little-endian DICOM file, or None (use pydicom)."""
  try:
    with open(path, "rb") as f:
      buf = f.read()
  except OSError:
    return None
  if len(buf) < 132 or buf[128:132] != b"DICM":
    return None
  meta = _walk(buf, 132, explicit=True, stop_group=0x0002)
  if meta is None or _TRANSFER_SYNTAX not in meta[0]:
    return None
  tsyntax = bytes(meta[0][_TRANSFER_SYNTAX]).decode("latin-1").strip(" \x00")
  if tsyntax not in _NATIVE_LITTLE_ENDIAN:
    return None
  explicit = tsyntax == pydicom.uid.ExplicitVRLittleEndian
  pos = meta[1]
  # pydicom follows the data when its VR layout contradicts the syntax; leave such files to it.
  if pos + 6 <= len(buf) and (buf[pos + 4:pos + 6] in _VRS) != explicit:
    return None
  body = _walk(buf, pos, explicit)
  return None if body is None else _RawDataset(body[0], tsyntax)


def _read_header(path: pathlib.Path) -> _Slice | str:
  """Reads one file; returns its _Slice, or the reason it cannot be used."""
  plain = _read_plain(path)
  if plain is not None:
    result = _header(path, plain)
    if isinstance(result, _Slice) and result.native is not None:
      return result
  try:
    ds = pydicom.dcmread(path)
  except pydicom.errors.InvalidDicomError as e:
    return f"not a DICOM file ({e})"
  except Exception as e:  # noqa: BLE001 - truncated/garbled files raise many kinds of errors.
    return f"unreadable DICOM ({type(e).__name__}: {e})"
  return _header(path, ds)


def _header(path: pathlib.Path, ds: Any) -> _Slice | str:
  """The _Slice of a read file (pydicom Dataset or _RawDataset), or the reason it is unusable."""
  try:
    if _PIXEL_DATA not in ds:
      return "no pixel data (not an image, or the file is truncated)"
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if not tsyntax:
      return "no transfer syntax in the file meta header"
    frames = _number(ds, _NUMBER_OF_FRAMES, 1) or 1
    if frames > 1:
      return f"multi-frame image ({frames:g} frames) is not supported"
    samples = _ushort(ds, _SAMPLES_PER_PIXEL)
    if samples is not None and samples != 1:
      return f"not a greyscale image (SamplesPerPixel {samples})"
    rows, cols = _ushort(ds, _ROWS), _ushort(ds, _COLUMNS)
    if not rows or not cols:
      return "missing Rows/Columns"
    position = _floats(ds, _IMAGE_POSITION, 3)
    if position is None:
      return "missing or invalid ImagePositionPatient"
    orientation = _floats(ds, _IMAGE_ORIENTATION, 6)
    if orientation is None:
      return "missing or invalid ImageOrientationPatient"
    bits_allocated = _ushort(ds, _BITS_ALLOCATED)
    if not pydicom.uid.UID(tsyntax).is_compressed:
      # A truncated uncompressed file can still parse; catch it here, before decoding.
      expected = rows * cols * (((bits_allocated or 16) + 7) // 8)
      stored = len(ds.get_item(_PIXEL_DATA).value or b"")
      if stored < expected:
        return f"pixel data truncated ({stored} of {expected} bytes)"
    spacing = _floats(ds, _PIXEL_SPACING, 2)
    try:  # Only a fallback for `reversed`; a malformed one must not cost the slice.
      instance = _number(ds, _INSTANCE_NUMBER, None)
    except ValueError:
      instance = None
    return _Slice(
        name=path.name, number=file_number(path.name), ds=ds,
        position=np.asarray(position, np.float64), orientation=np.asarray(orientation, np.float64),
        size=(rows, cols), pixel_spacing=tuple(spacing) if spacing else None,
        series_uid=_uid(ds, _SERIES_UID), study_uid=_uid(ds, _STUDY_UID),
        instance_number=int(instance) if instance is not None else None,
        slope=_number(ds, _RESCALE_SLOPE, 1.0), intercept=_number(ds, _RESCALE_INTERCEPT, 0.0),
        transfer_syntax=str(tsyntax), native=_native_layout(ds, tsyntax, bits_allocated))
  except Exception as e:  # noqa: BLE001 - malformed element values.
    return f"invalid header ({type(e).__name__}: {e})"


def _majority(values: list[Any]) -> Any:
  """Most common value; ties go to the value met first."""
  return collections.Counter(values).most_common(1)[0][0]


def _decode_into(sl: _Slice, out: np.ndarray) -> None:
  """Decodes ``sl``'s pixels as HU into ``out`` (float32 (H, W)), resizing when sizes differ."""
  if sl.native is not None:
    # What pydicom's native decoder returns, without its per-call setup (about a third of the
    # decode time of a 512 x 512 slice): the bytes as the stored dtype, unused high bits cleared
    # (unsigned) or sign-extended (signed) by the same shift pair.
    dtype, shift = sl.native
    arr = np.frombuffer(sl.ds.get_item(_PIXEL_DATA).value, dtype, count=sl.size[0] * sl.size[1])
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
  import scipy.ndimage  # Only needed for the rare odd-size slice.
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


AUTO_SERIES = "auto"  # read_series(series_uid=AUTO_SERIES): the series with most axial slices
_AXIAL_MIN_COS = 0.7  # a slice is axial when its normal is within ~45 degrees of the body axis


def _unit_normal(orientation: np.ndarray) -> np.ndarray | None:
  """The slice plane's unit normal from ImageOrientationPatient (None when degenerate)."""
  normal = np.cross(orientation[:3], orientation[3:])
  norm = np.linalg.norm(normal)
  return normal / norm if norm >= 1e-3 else None


def _axial(orientation: np.ndarray) -> bool:
  normal = _unit_normal(orientation)
  return normal is not None and abs(normal[2]) >= _AXIAL_MIN_COS


def _auto_series(slices: list["_Slice"]) -> tuple[str, str]:
  """(the UID of the series with the most axial slices, a note naming the choice and the
  others); ties go to the series with more slices, then the smaller UID."""
  axial = collections.Counter(s.series_uid for s in slices if _axial(s.orientation))
  total = collections.Counter(s.series_uid for s in slices)
  ranked = sorted(total, key=lambda u: (-axial[u], -total[u], u))
  describe = lambda u: f"{u!r} ({axial[u]} axial of {total[u]} slices)"  # noqa: E731
  return ranked[0], (f"{len(total)} series in the folder: read {describe(ranked[0])}, not "
                     + ", ".join(describe(u) for u in ranked[1:]))


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
  slices: list[_Slice] = []
  for path in paths:
    result = _read_header(path)
    if isinstance(result, str):
      skipped.append((path.name, result))
    else:
      slices.append(result)
  if not slices:
    raise SeriesError(f"{folder}: no readable DICOM image among {len(paths)} files "
                      f"({_describe_skips(skipped)})")

  # One series per call: mixed folders need an explicit choice.
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

  # Orientation: the majority's; other planes (scouts) do not belong in the volume.
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
  slices = kept
  orientation = np.mean([s.orientation for s in slices], axis=0)
  normal = _unit_normal(orientation)
  if normal is None:
    raise SeriesError(f"{folder}: degenerate ImageOrientationPatient {list(orientation)}")

  # Head to feet: order by the projection on the normal, falling in the superior (+z) sense.
  sense = -1.0 if normal[2] >= 0 else 1.0
  proj = np.array([s.position @ normal for s in slices])
  tie = [(s.number if s.number >= 0 else np.iinfo(np.int64).max, s.name) for s in slices]
  order = sorted(range(len(slices)), key=lambda i: (sense * proj[i], tie[i]))
  ordered: list[_Slice] = []
  last = None
  for i in order:
    if last is not None and abs(proj[i] - proj[last]) < _DUPLICATE_MM:
      skipped.append((slices[i].name, f"duplicate position of {slices[last].name} "
                                      f"({proj[i]:.3f} mm along the normal)"))
      continue
    ordered.append(slices[i])
    last = i
  slices = ordered

  def check_count(stage: str) -> None:
    total = len(paths) - other_series
    if len(slices) < min_slices or len(slices) < min_fraction * total:
      raise SeriesError(
          f"{folder}: too few usable slices {stage}: {len(slices)} of {total} files "
          f"(need at least {min_slices} and {min_fraction:.0%}); "
          f"skipped: {_describe_skips(skipped)}")
  check_count("before decoding")

  # Decode straight into one preallocated volume, in volume order (with map_hu: through one
  # reused HU slice, mapped while it is in cache).
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
    check_count("after decoding")

  if resized:
    notes.append(f"{len(resized)} slice(s) resized to the series' {height}x{width}: "
                 + ", ".join(f"{n} ({r}x{c})" for n, (r, c) in resized))
  if skipped:
    notes.append(f"skipped {len(skipped)} of {len(paths)} files: {_describe_skips(skipped)}")

  positions = np.stack([s.position for s in slices])
  steps = np.abs(np.diff(positions @ normal))
  slice_spacing = float(np.median(steps))
  if np.any(np.abs(steps - slice_spacing) > _SPACING_ATOL + _SPACING_RTOL * slice_spacing):
    notes.append(f"non-uniform slice spacing: steps {steps.min():.3f}..{steps.max():.3f} mm; "
                 f"using the median {slice_spacing:.3f} mm")

  spacings = [s.pixel_spacing for s in slices if s.pixel_spacing is not None]
  if not spacings:
    raise SeriesError(f"{folder}: no slice carries PixelSpacing")
  pixel_spacing = _majority(spacings)

  numbers = np.array([s.number for s in slices], np.int64)
  if np.all(numbers >= 0):
    rank = numbers
  elif all(s.instance_number is not None for s in slices):
    rank = np.array([s.instance_number for s in slices], np.int64)
  else:
    rank = np.zeros(len(slices), np.int64)
  reversed_ = bool(np.sum(np.sign(np.diff(rank))) < 0)

  for note in notes:
    _LOG.info("%s: %s", folder, note)
    if warn:
      warnings.warn(f"{folder}: {note}", SeriesWarning, stacklevel=2)

  return Series(
      folder=folder, volume=volume, file_names=[s.name for s in slices], numbers=numbers,
      positions=positions, orientation=orientation,
      pixel_spacing=(float(pixel_spacing[0]), float(pixel_spacing[1])),
      slice_spacing=slice_spacing, reversed=reversed_,
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
