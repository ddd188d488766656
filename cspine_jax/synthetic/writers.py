"""Writers for the RSNA layout: CT DICOM series, NIfTI masks, CSV tables, damaged files.

Everything written is a pure function of its inputs (no clocks, no random UIDs), so the same seed
gives byte-identical files.
"""
from __future__ import annotations

import csv
import dataclasses
import pathlib

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom import uid as dcm_uid
from pydicom.encaps import encapsulate
import pydicom.pixels

from cspine_jax.synthetic.geometry import Geometry, to_nifti_layout

UID_ROOT = "1.2.826.0.1.3680043"  # the root of the RSNA 2022 study UIDs
IMPLEMENTATION_UID = UID_ROOT + ".8.498.1"  # fixed, so files do not depend on the pydicom version

# Short names for the transfer syntaxes the generator writes (pydicom cannot encode JPEG Lossless .70).
TRANSFER_SYNTAXES = {
    "explicit": dcm_uid.ExplicitVRLittleEndian,
    "implicit": dcm_uid.ImplicitVRLittleEndian,
    "rle": dcm_uid.RLELossless,
    "jpegls": dcm_uid.JPEGLSLossless,
    "j2k": dcm_uid.JPEG2000Lossless,
}
_COMPRESSED = {dcm_uid.RLELossless, dcm_uid.JPEGLSLossless, dcm_uid.JPEG2000Lossless}


@dataclasses.dataclass(frozen=True)
class SeriesOptions:
  """How one series is stored.

  study_uid:       StudyInstanceUID (also the folder name); series and SOP UIDs derive from it.
  transfer_syntax: a key of TRANSFER_SYNTAXES.
  signed:          PixelRepresentation 1 (int16) or 0 (uint16).
  intercept:       RescaleIntercept (stored = HU - intercept, slope 1).
  bits_stored:     BitsStored (12 or 16).
  reversed:        file numbers increase from feet to head (ImagePositionPatient z rising with n).
  first_number:    the smallest file number n of <n>.dcm.
  instance_mode:   InstanceNumber: "match" (= n), "reversed" (counts the other way), "offset" (n + 1000).
  slice_thickness: the SliceThickness tag (mm; may disagree with the position spacing).
  """
  study_uid: str
  transfer_syntax: str = "explicit"
  signed: bool = True
  intercept: float = -1024.0
  bits_stored: int = 16
  reversed: bool = False
  first_number: int = 1
  instance_mode: str = "match"
  slice_thickness: float | None = None


def file_numbers(num_slices: int, first_number: int, reversed_: bool) -> np.ndarray:
  """File number n of each sorted slice (index 0 = top)."""
  n = first_number + np.arange(num_slices)
  return n[::-1].copy() if reversed_ else n


def _ds_number(x: float) -> str:
  """A DICOM DS string (at most 16 characters) that reads back as exactly the float we hold."""
  s = f"{x:.6f}".rstrip("0").rstrip(".")
  return "0" if s in ("-0", "") else s


def stored_values(hu: np.ndarray, opts: SeriesOptions) -> np.ndarray:
  """HU -> stored pixel values for the options (clipped to the representable range)."""
  v = hu.astype(np.int32) - int(round(opts.intercept))
  if opts.signed:
    lo, hi = -(1 << (opts.bits_stored - 1)), (1 << (opts.bits_stored - 1)) - 1
    return np.clip(v, lo, hi).astype(np.int16)
  return np.clip(v, 0, (1 << opts.bits_stored) - 1).astype(np.uint16)


def write_series(folder: pathlib.Path | str, hu: np.ndarray, geometry: Geometry,
                 opts: SeriesOptions) -> list[str]:
  """Write an (S, H, W) HU volume (sorted, head to feet) as <n>.dcm files; returns the file names in
  sorted order."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  if opts.transfer_syntax not in TRANSFER_SYNTAXES:
    raise ValueError(f"{folder}: unknown transfer syntax {opts.transfer_syntax!r}")
  ts = TRANSFER_SYNTAXES[opts.transfer_syntax]
  s_total, h, w = hu.shape
  if (s_total, h, w) != tuple(geometry.shape):
    raise ValueError(f"{folder}: volume {hu.shape} does not match geometry {geometry.shape}")
  numbers = file_numbers(s_total, opts.first_number, opts.reversed)
  series_uid = f"{opts.study_uid}.1"
  thickness = opts.slice_thickness or geometry.slice_spacing
  stored = stored_values(hu, opts)
  # One dataset for the series; only the per-slice elements change (building each anew costs more
  # than encoding the pixels of a tiny study).
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = dcm_uid.CTImageStorage
  meta.TransferSyntaxUID = ts
  meta.ImplementationClassUID = IMPLEMENTATION_UID
  meta.ImplementationVersionName = "CSPINE_JAX_SYN"
  ds = Dataset()
  ds.file_meta = meta
  ds.SpecificCharacterSet = "ISO_IR 100"
  ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
  ds.SOPClassUID = dcm_uid.CTImageStorage
  ds.StudyDate = "20220727"
  ds.Modality = "CT"
  ds.Manufacturer = "cspine_jax synthetic"
  ds.PatientName = opts.study_uid.rsplit(".", 1)[-1]
  ds.PatientID = opts.study_uid.rsplit(".", 1)[-1]
  ds.BodyPartExamined = "CSPINE"
  ds.SliceThickness = _ds_number(thickness)
  ds.KVP = "120"
  ds.PatientPosition = "HFS"
  ds.StudyInstanceUID = opts.study_uid
  ds.SeriesInstanceUID = series_uid
  ds.SeriesNumber = 1
  ds.ImageOrientationPatient = [_ds_number(x) for x in geometry.orientation]
  ds.FrameOfReferenceUID = f"{opts.study_uid}.2"
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.Rows = h
  ds.Columns = w
  ds.PixelSpacing = [_ds_number(x) for x in geometry.pixel_spacing]
  ds.BitsAllocated = 16
  ds.BitsStored = opts.bits_stored
  ds.HighBit = opts.bits_stored - 1
  ds.PixelRepresentation = 1 if opts.signed else 0
  ds.WindowCenter = "400"
  ds.WindowWidth = "1800"
  ds.RescaleIntercept = _ds_number(opts.intercept)
  ds.RescaleSlope = "1"
  ds.RescaleType = "HU"
  encoder = pydicom.pixels.get_encoder(ts) if ts in _COMPRESSED else None
  names = []
  for s in range(s_total):
    n = int(numbers[s])
    if opts.instance_mode == "reversed":
      inst = int(numbers.max() + numbers.min() - n)
    elif opts.instance_mode == "offset":
      inst = n + 1000
    else:
      inst = n
    sop = f"{series_uid}.{n}"
    meta.MediaStorageSOPInstanceUID = sop
    ds.SOPInstanceUID = sop
    ds.InstanceNumber = inst
    ds.ImagePositionPatient = [_ds_number(x) for x in geometry.positions[s]]
    ds.SliceLocation = _ds_number(geometry.positions[s, 2])
    arr = np.ascontiguousarray(stored[s])
    if encoder is not None:
      frame = encoder.encode(arr, rows=h, columns=w, samples_per_pixel=1, number_of_frames=1,
                             bits_allocated=16, bits_stored=opts.bits_stored,
                             pixel_representation=ds.PixelRepresentation,
                             photometric_interpretation="MONOCHROME2")
      ds.PixelData = encapsulate([frame])
      ds["PixelData"].VR = "OB"
    else:
      ds.PixelData = arr.tobytes()
      ds["PixelData"].VR = "OW"
    name = f"{n}.dcm"
    ds.save_as(folder / name, enforce_file_format=True)
    names.append(name)
  return names


def write_nifti(path: pathlib.Path | str, labels: np.ndarray, geometry: Geometry) -> None:
  """Write an (S, H, W) sorted label volume in the RSNA mask layout with the geometry's affine."""
  affine = geometry.nifti_affine()
  img = nib.Nifti1Image(to_nifti_layout(labels.astype(np.uint8)), affine)
  img.header.set_xyzt_units("mm")
  img.set_sform(affine, code=1)
  img.set_qform(affine, code=1)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(img, str(path))


CORRUPTIONS = ("truncated", "garbled", "empty")


def corrupt_file(path: pathlib.Path | str, mode: str, rng: np.random.Generator) -> None:
  """Damage a written file the way broken transfers do: cut it, overwrite its header, or empty it."""
  path = pathlib.Path(path)
  data = path.read_bytes()
  if mode == "truncated":
    path.write_bytes(data[: max(len(data) // 3, 200)])
  elif mode == "garbled":
    junk = rng.integers(0, 256, size=min(len(data), 600), dtype=np.uint8).tobytes()
    path.write_bytes(junk + data[len(junk):])
  elif mode == "empty":
    path.write_bytes(b"")
  else:
    raise ValueError(f"{path}: unknown corruption {mode!r}")


TRAIN_COLUMNS = ("StudyInstanceUID", "patient_overall", "C1", "C2", "C3", "C4", "C5", "C6", "C7")
BOX_COLUMNS = ("StudyInstanceUID", "x", "y", "width", "height", "slice_number")


def write_csv(path: pathlib.Path | str, columns: tuple[str, ...], rows: list[tuple]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)

