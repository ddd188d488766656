"""One DICOM file's header, read into the per-slice record that series assembly works from.

``read_header(path)`` returns a :class:`SliceHeader` (position, orientation, size, spacing, UIDs,
rescale, transfer syntax, and the dataset kept until its pixels are decoded), or the reason the
file cannot be used; it never raises for a bad file. Values are read from the elements' raw bytes
rather than through pydicom's value conversion. An uncompressed little-endian file is walked
directly (``read_plain``) without ``dcmread``; anything else goes through pydicom.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
import struct
from typing import Any

import numpy as np
import pydicom
import pydicom.errors
import pydicom.uid
from pydicom.multival import MultiValue

_NUMERIC_NAME = re.compile(r"^(\d+)(?:\.dcm)?$", re.IGNORECASE)


def file_number(name: str | os.PathLike[str]) -> int:
  """The number ``n`` of a file named ``<n>.dcm`` (or plain ``<n>``); -1 when not numeric."""
  match = _NUMERIC_NAME.match(pathlib.PurePath(name).name)
  return int(match.group(1)) if match else -1


@dataclasses.dataclass
class SliceHeader:
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
# costs far more than the raw parse, and would make the header the main cost beside decoding.
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
PIXEL_DATA = 0x7FE00010
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
# what dcmread + the raw-element helpers above extract, without dcmread's per-element Python work.
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
  """A value's raw bytes (what _text, _ushort and the pixel decoder read); always little endian."""
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
    elements[tag] = view[pos:pos + length] if tag == PIXEL_DATA else buf[pos:pos + length]
    pos += length
  return elements, pos


def read_plain(path: pathlib.Path) -> _RawDataset | None:
  """The raw elements of an uncompressed little-endian DICOM file, or None (use pydicom).

  The result answers ``in``, ``get_item`` and ``file_meta`` like the pydicom Dataset it replaces.
  """
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


def read_header(path: pathlib.Path) -> SliceHeader | str:
  """Reads one file; returns its SliceHeader, or the reason it cannot be used (never raises)."""
  plain = read_plain(path)
  if plain is not None:
    result = _header(path, plain)
    if isinstance(result, SliceHeader) and result.native is not None:
      return result
  try:
    ds = pydicom.dcmread(path)
  except pydicom.errors.InvalidDicomError as e:
    return f"not a DICOM file ({e})"
  except Exception as e:  # noqa: BLE001 - truncated/garbled files raise many kinds of errors.
    return f"unreadable DICOM ({type(e).__name__}: {e})"
  return _header(path, ds)


def _header(path: pathlib.Path, ds: Any) -> SliceHeader | str:
  """The SliceHeader of a read file (pydicom Dataset or _RawDataset), or why it is unusable."""
  try:
    if PIXEL_DATA not in ds:
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
      stored = len(ds.get_item(PIXEL_DATA).value or b"")
      if stored < expected:
        return f"pixel data truncated ({stored} of {expected} bytes)"
    slope = _number(ds, _RESCALE_SLOPE, 1.0)
    intercept = _number(ds, _RESCALE_INTERCEPT, 0.0)
    for name, tag, value in (("RescaleSlope", _RESCALE_SLOPE, slope),
                             ("RescaleIntercept", _RESCALE_INTERCEPT, intercept)):
      if not math.isfinite(value):  # It would turn the whole slice into NaN or infinite HU.
        return f"{name} {_text(ds, tag)[0]!r} is not a finite number"
    spacing = _floats(ds, _PIXEL_SPACING, 2)
    try:  # Only a fallback for `reversed`; a malformed one must not cost the slice.
      instance = _number(ds, _INSTANCE_NUMBER, None)
    except ValueError:
      instance = None
    return SliceHeader(
        name=path.name, number=file_number(path.name), ds=ds,
        position=np.asarray(position, np.float64), orientation=np.asarray(orientation, np.float64),
        size=(rows, cols), pixel_spacing=tuple(spacing) if spacing else None,
        series_uid=_uid(ds, _SERIES_UID), study_uid=_uid(ds, _STUDY_UID),
        instance_number=int(instance) if instance is not None else None,
        slope=slope, intercept=intercept,
        transfer_syntax=str(tsyntax), native=_native_layout(ds, tsyntax, bits_allocated))
  except Exception as e:  # noqa: BLE001 - malformed element values.
    return f"invalid header ({type(e).__name__}: {e})"
