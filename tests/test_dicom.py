"""Tests for cspine_jax.io.dicom and dicom_header: real scanner series, every encoding, bad files
and folders."""
import dataclasses
import json
import pathlib
import shutil
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless,
                         RLELossless)

from cspine_jax import synthetic
from cspine_jax.io import dicom, dicom_header
from cspine_jax.pp import image as image_lib
from cspine_jax.synthetic import studies, writers

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def make_slice(pixels, z, *, instance=1, slope=1.0, intercept=0.0, series_uid=SERIES_UID,
               orientation=AXIAL, bits_stored=None, tsyntax=None):
  """A single-frame CT dataset with ``pixels`` (stored values) at height ``z`` (LPS mm)."""
  ds = pydicom.Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
  ds.SOPClassUID = CTImageStorage
  ds.Modality = "CT"
  ds.StudyInstanceUID = STUDY_UID
  ds.SeriesInstanceUID = series_uid
  ds.InstanceNumber = instance
  ds.ImagePositionPatient = [-100.0, -120.0, float(z)]
  ds.ImageOrientationPatient = list(orientation)
  ds.PixelSpacing = [0.5, 0.75]
  ds.SliceThickness = 5.0  # Deliberately wrong: spacing must come from the positions.
  ds.RescaleSlope = slope
  ds.RescaleIntercept = intercept
  bits = bits_stored or 8 * pixels.dtype.itemsize
  ds.set_pixel_data(pixels, "MONOCHROME2", bits)
  ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
  if tsyntax is not None and tsyntax != ExplicitVRLittleEndian:
    ds.compress(tsyntax, generate_instance_uid=False)
  return ds


def write_series(folder, stacks, zs, *, names=None, instances=None, **kwargs):
  """Writes one file per slice; returns the paths."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  names = names or [f"{i + 1}.dcm" for i in range(len(zs))]
  instances = instances or list(range(1, len(zs) + 1))
  paths = []
  for pixels, z, name, inst in zip(stacks, zs, names, instances):
    path = folder / name
    make_slice(pixels, z, instance=inst, **kwargs).save_as(path, enforce_file_format=True)
    paths.append(path)
  return paths


def ramp_stack(n, shape=(32, 40), dtype=np.int16, start=-1000, step=37):
  """Distinct stored values per slice: slice k is start + k*1000 + a ramp (J2K needs >= 32 px)."""
  base = (np.arange(shape[0] * shape[1]).reshape(shape) * step) % 900
  return [(base + start + 1000 * k).astype(dtype) for k in range(n)]


def read_quiet(folder, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", dicom.SeriesWarning)
    return dicom.read_series(folder, **kwargs)


# --- Real scanner series -------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_series(real_data_dir):
  root = real_data_dir / "totalseg_ct"
  return {name: dicom.read_series(root / name) for name in ("dicom_j2k", "dicom_jpeg_lossless")}


def test_real_series_geometry_and_hu(real_series):
  for name, s in real_series.items():
    assert s.shape == (20, 512, 512), name
    assert s.volume.dtype == np.float32
    z = s.positions[:, 2]
    assert np.all(np.diff(z) < 0), f"{name}: not head to feet: {z}"
    assert z[0] == pytest.approx(-766.5) and z[-1] == pytest.approx(-804.5)
    assert s.slice_spacing == pytest.approx(2.0)  # SliceThickness says 3.
    assert s.pixel_spacing == pytest.approx((0.9765625, 0.9765625))
    assert s.volume.min() == pytest.approx(-1024.0)
    assert s.volume.max() == pytest.approx(1839.0)
    assert not s.reversed  # InstanceNumber rises from head to feet.
    assert np.all(s.numbers == -1)  # CT.1.3... names are not numeric.
    assert s.skipped == [] and s.resized == [] and s.warnings == []
    np.testing.assert_allclose(s.normal, [0, 0, 1])
  j2k, jll = real_series["dicom_j2k"], real_series["dicom_jpeg_lossless"]
  assert j2k.transfer_syntaxes == ["1.2.840.10008.1.2.4.90"]
  assert jll.transfer_syntaxes == ["1.2.840.10008.1.2.4.70"]
  assert j2k.study_uid == "" and j2k.series_uid == ""  # Empty UIDs: still one series.
  assert jll.study_uid.startswith("1.2.826.0.1.3680043.8.498.")
  assert j2k.file_names == jll.file_names
  np.testing.assert_array_equal(j2k.volume, jll.volume)


def test_real_pixels_reencoded_keep_hu(real_series, tmp_path):
  """Real pixels (a crop) through each pydicom encoder come back as the same HU."""
  real = real_series["dicom_j2k"]
  crop = real.volume[:3, 200:232, 240:280]
  stored = (crop + 1024).astype(np.uint16)  # Slope 1, intercept -1024 as in the scanner files.
  for tsyntax in (ExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless):
    folder = tmp_path / tsyntax.name.replace(" ", "_")
    write_series(folder, stored, real.positions[:3, 2], intercept=-1024.0, bits_stored=12,
                 tsyntax=tsyntax)
    s = dicom.read_series(folder)
    assert s.transfer_syntaxes == [str(tsyntax)]
    np.testing.assert_array_equal(s.volume, crop)


# --- Helpers ---------------------------------------------------------------------------------

def test_file_number():
  assert dicom.file_number("37.dcm") == 37
  assert dicom.file_number("0100.DCM") == 100
  assert dicom.file_number("12") == 12
  assert dicom.file_number(pathlib.Path("/x/y/5.dcm")) == 5
  assert dicom.file_number("CT.1.3.12.2") == -1
  assert dicom.file_number("1.2.3.dcm") == -1
  assert dicom.file_number("a7.dcm") == -1


def test_iter_dicom_files_numeric_order(tmp_path):
  for name in ["100.dcm", "98.dcm", "99.dcm", "CT.b", "CT.a"]:
    (tmp_path / name).write_bytes(b"x")
  (tmp_path / "sub").mkdir()
  assert [p.name for p in dicom.iter_dicom_files(tmp_path)] == [
      "98.dcm", "99.dcm", "100.dcm", "CT.a", "CT.b"]
  with pytest.raises(dicom.SeriesError, match="not a directory"):
    list(dicom.iter_dicom_files(tmp_path / "missing"))


# --- Encodings and HU --------------------------------------------------------------------------

@pytest.mark.parametrize("tsyntax", [ExplicitVRLittleEndian, RLELossless, JPEGLSLossless,
                                     JPEG2000Lossless], ids=lambda u: u.name)
@pytest.mark.parametrize("dtype,slope,intercept", [(np.int16, 1.0, 0.0),
                                                   (np.uint16, 2.0, -1024.0),
                                                   (np.uint16, 0.5, -100.0)])
def test_encodings_exact_hu(tmp_path, tsyntax, dtype, slope, intercept):
  start = -1000 if dtype == np.int16 else 0
  stacks = ramp_stack(3, dtype=dtype, start=start)
  write_series(tmp_path, stacks, [30.0, 27.5, 25.0], slope=slope, intercept=intercept,
               tsyntax=tsyntax)
  s = dicom.read_series(tmp_path)
  assert s.transfer_syntaxes == [str(tsyntax)]
  expected = np.stack(stacks).astype(np.float64) * slope + intercept
  np.testing.assert_array_equal(s.volume, expected.astype(np.float32))
  assert s.slice_spacing == pytest.approx(2.5)
  assert s.pixel_spacing == (0.5, 0.75)
  assert s.study_uid == STUDY_UID and s.series_uid == SERIES_UID


def test_signed_12_bit_negative_values(tmp_path):
  stacks = [np.array([[-2048, -1, 0, 2047]], np.int16).repeat(4, 0)] * 2
  write_series(tmp_path, stacks, [1.0, 0.0], bits_stored=12, tsyntax=JPEGLSLossless)
  np.testing.assert_array_equal(dicom.read_series(tmp_path).volume[0, 0], [-2048, -1, 0, 2047])


# --- Ordering --------------------------------------------------------------------------------

def test_numbering_offset_and_scrambled_instance_numbers(tmp_path):
  # Files 98..103 (string order puts 100 first); InstanceNumber unrelated to position.
  numbers = [98, 99, 100, 101, 102, 103]
  stacks = [np.full((4, 4), n, np.int16) for n in numbers]
  zs = [50.0 - 3.0 * i for i in range(6)]  # File 98 is the top slice.
  write_series(tmp_path, stacks, zs, names=[f"{n}.dcm" for n in numbers],
               instances=[5, 2, 6, 1, 4, 3])
  s = dicom.read_series(tmp_path)
  assert list(s.numbers) == numbers
  assert s.file_names == [f"{n}.dcm" for n in numbers]
  assert list(s.volume[:, 0, 0]) == numbers
  assert not s.reversed
  assert s.slice_spacing == pytest.approx(3.0)


def test_reversed_study_starting_at_37(tmp_path):
  numbers = list(range(37, 43))
  stacks = [np.full((4, 4), n, np.int16) for n in numbers]
  zs = [10.0 + 2.0 * i for i in range(6)]  # Position rises with n: 37 is the bottom slice.
  write_series(tmp_path, stacks, zs, names=[f"{n}.dcm" for n in numbers])
  s = dicom.read_series(tmp_path)
  assert s.reversed
  assert list(s.numbers) == numbers[::-1]
  assert list(s.volume[:, 0, 0]) == numbers[::-1]
  assert np.all(np.diff(s.positions[:, 2]) < 0)


def test_order_by_normal_for_tilted_orientation(tmp_path):
  # Orientation with a normal tilted 30 degrees; positions step along that normal.
  c, sn = np.cos(np.pi / 6), np.sin(np.pi / 6)
  orient = (1.0, 0.0, 0.0, 0.0, c, -sn)
  normal = np.cross(orient[:3], orient[3:])
  folder = tmp_path / "tilt"
  folder.mkdir()
  for k, n in enumerate([3, 1, 2]):  # File n=1 is at the top.
    ds = make_slice(np.full((4, 4), n, np.int16), 0.0, orientation=orient)
    ds.ImagePositionPatient = list(np.array([0.0, 0.0, 0.0]) - normal * 1.5 * (n - 1))
    ds.save_as(folder / f"{n}.dcm", enforce_file_format=True)
  s = dicom.read_series(folder)
  assert list(s.numbers) == [1, 2, 3]
  assert s.slice_spacing == pytest.approx(1.5)
  assert not s.reversed


# --- Imperfect series ------------------------------------------------------------------------

def test_odd_size_slice_is_resized_and_recorded(tmp_path):
  stacks = [np.full((8, 8), 100, np.int16), np.full((6, 5), 200, np.int16),
            np.full((8, 8), 300, np.int16)]
  write_series(tmp_path, stacks, [3.0, 2.0, 1.0])
  with pytest.warns(dicom.SeriesWarning, match=r"resized to the series' 8x8: 2.dcm \(6x5\)"):
    s = dicom.read_series(tmp_path)
  assert s.shape == (3, 8, 8)
  assert s.resized == [("2.dcm", (6, 5))]
  np.testing.assert_array_equal(s.volume[1], np.full((8, 8), 200, np.float32))


def test_resize_slice_bilinear():
  img = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)
  out = dicom.resize_slice(img, (8, 12))
  assert out.shape == (8, 12) and out.dtype == np.float32
  assert img.min() <= out.min() and out.max() <= img.max()


def test_corrupt_and_non_dicom_files_are_skipped(tmp_path):
  paths = write_series(tmp_path, ramp_stack(5), [8.0, 6.0, 4.0, 2.0, 0.0])
  data = paths[1].read_bytes()
  paths[1].write_bytes(data[: len(data) - 60])  # Truncated pixel data.
  paths[3].write_bytes(data[:400])  # Cut inside the header.
  (tmp_path / "notes.txt").write_text("not an image")
  with pytest.warns(dicom.SeriesWarning, match="skipped 3 of 6 files"):
    s = dicom.read_series(tmp_path)
  assert list(s.numbers) == [1, 3, 5]
  reasons = dict(s.skipped)
  assert set(reasons) == {"2.dcm", "4.dcm", "notes.txt"}
  assert reasons["2.dcm"] == "pixel data truncated (2500 of 2560 bytes)"
  assert reasons["4.dcm"] == "no pixel data (not an image, or the file is truncated)"
  assert reasons["notes.txt"].startswith("not a DICOM file")
  assert s.slice_spacing == pytest.approx(4.0)  # Even holes: 8, 4, 0 mm.


def test_corrupt_compressed_file_skipped_at_decode(tmp_path):
  paths = write_series(tmp_path, ramp_stack(5), [4.0, 3.0, 2.0, 1.0, 0.0],
                       tsyntax=JPEG2000Lossless)
  ds = pydicom.dcmread(paths[2])
  frame = bytearray(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1).__next__())
  ds.PixelData = pydicom.encaps.encapsulate([bytes(frame[:40])])  # Codestream cut short.
  ds.save_as(paths[2], enforce_file_format=True)
  s = read_quiet(tmp_path)
  assert list(s.numbers) == [1, 2, 4, 5]
  (name, reason), = s.skipped
  assert name == "3.dcm" and reason.startswith("pixel data cannot be decoded")
  assert s.slice_spacing == pytest.approx(1.0)
  assert any("non-uniform slice spacing" in w for w in s.warnings)


def test_duplicate_position_keeps_lowest_number(tmp_path):
  stacks = [np.full((4, 4), v, np.int16) for v in (1, 2, 3)]
  write_series(tmp_path, stacks, [5.0, 4.0, 4.0])
  s = read_quiet(tmp_path)
  assert list(s.numbers) == [1, 2]
  assert s.skipped == [("3.dcm", "duplicate position of 2.dcm (4.000 mm along the normal)")]


def test_non_uniform_spacing_warns_and_uses_median(tmp_path):
  write_series(tmp_path, ramp_stack(5), [0.0, -1.0, -2.0, -3.0, -5.0])
  with pytest.warns(dicom.SeriesWarning, match=r"non-uniform slice spacing: steps 1.000..2.000 mm"):
    s = dicom.read_series(tmp_path)
  assert s.slice_spacing == pytest.approx(1.0)


def test_scout_with_other_orientation_is_skipped(tmp_path):
  write_series(tmp_path, ramp_stack(3), [2.0, 1.0, 0.0])
  make_slice(np.zeros((32, 40), np.int16), 0.0, orientation=(0, 1, 0, 0, 0, -1)).save_as(
      tmp_path / "scout.dcm", enforce_file_format=True)
  s = read_quiet(tmp_path)
  assert s.shape[0] == 3
  (name, reason), = s.skipped
  assert (name, reason) == ("scout.dcm", "orientation [0.0, 1.0, 0.0, 0.0, 0.0, -1.0] differs from "
                                         "the series' [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]")


def _set_raw(path, keyword, value):
  """Rewrites one element of ``path`` to ``value`` as written (pydicom only warns on odd DS)."""
  ds = pydicom.dcmread(path)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    setattr(ds, keyword, value)
  ds.save_as(path)


@pytest.mark.parametrize("tsyntax", [ExplicitVRLittleEndian, RLELossless], ids=lambda u: u.name)
@pytest.mark.parametrize("keyword,value", [("RescaleSlope", "NaN"), ("RescaleIntercept", "1e999"),
                                           ("RescaleSlope", "-Infinity")])
def test_non_finite_rescale_skips_the_file(tmp_path, tsyntax, keyword, value):
  """A NaN or infinite slope/intercept would turn the slice into NaN/inf HU: the file is skipped
  with its value named, like any unreadable file (fast path and pydicom path alike)."""
  paths = write_series(tmp_path, ramp_stack(4), [3.0, 2.0, 1.0, 0.0], tsyntax=tsyntax)
  _set_raw(paths[1], keyword, value)
  reason = f"{keyword} '{value}' is not a finite number"
  with pytest.warns(dicom.SeriesWarning, match=f"skipped 1 of 4 files: 2.dcm: {reason}"):
    s = dicom.read_series(tmp_path)
  assert s.skipped == [("2.dcm", reason)]
  assert list(s.numbers) == [1, 3, 4] and np.all(np.isfinite(s.volume))
  assert dicom_header.read_header(paths[1]) == reason
  # Too many such files: the series error, as for any lost files.
  for path in paths[2:]:
    _set_raw(path, keyword, value)
  with pytest.raises(dicom.SeriesError, match=r"too few usable slices before decoding: 1 of 4 "
                                              rf"files .*; skipped: 2.dcm: {reason}; 3.dcm"):
    dicom.read_series(tmp_path)


def test_warn_false_records_without_warning(tmp_path):
  write_series(tmp_path, ramp_stack(3), [2.0, 1.0, 0.0])
  (tmp_path / "junk").write_bytes(b"\x00" * 10)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    s = dicom.read_series(tmp_path, warn=False)
  assert s.skipped and s.warnings


# --- Bad folders -----------------------------------------------------------------------------

def test_empty_folder(tmp_path):
  with pytest.raises(dicom.SeriesError, match=f"{tmp_path}: empty folder"):
    dicom.read_series(tmp_path)


def test_missing_folder(tmp_path):
  with pytest.raises(dicom.SeriesError, match="not a directory"):
    dicom.read_series(tmp_path / "nope")


def test_all_corrupt(tmp_path):
  for i in range(3):
    (tmp_path / f"{i}.dcm").write_bytes(b"garbage" * i)
  with pytest.raises(dicom.SeriesError,
                     match=r"no readable DICOM image among 3 files \(0.dcm: not a DICOM file"):
    dicom.read_series(tmp_path)


def test_too_few_usable_slices(tmp_path):
  paths = write_series(tmp_path, ramp_stack(4), [3.0, 2.0, 1.0, 0.0])
  for p in paths[1:3]:
    p.write_bytes(b"broken")
  with pytest.raises(dicom.SeriesError,
                     match=r"too few usable slices before decoding: 2 of 4 files \(need at least 2 "
                           r"and 60%\); skipped: 2.dcm: not a DICOM file"):
    dicom.read_series(tmp_path, min_fraction=0.6)
  assert read_quiet(tmp_path).shape[0] == 2  # Default threshold: half the files.
  with pytest.raises(dicom.SeriesError, match="need at least 3"):
    dicom.read_series(tmp_path, min_slices=3)


def test_mixed_series(tmp_path):
  write_series(tmp_path, ramp_stack(3), [2.0, 1.0, 0.0])
  write_series(tmp_path, ramp_stack(2), [2.0, 1.0], names=["a.dcm", "b.dcm"],
               series_uid="1.2.3.99")
  with pytest.raises(dicom.SeriesError,
                     match=rf"2 series mixed in one folder: '{SERIES_UID}' \(3 slices\), "
                           r"'1.2.3.99' \(2 slices\); pass series_uid= to pick one"):
    dicom.read_series(tmp_path)
  s = read_quiet(tmp_path, series_uid="1.2.3.99")
  assert s.file_names == ["a.dcm", "b.dcm"] and s.series_uid == "1.2.3.99"
  assert dict(s.skipped) == {n: f"other series '{SERIES_UID}' (not selected)"
                             for n in ("1.dcm", "2.dcm", "3.dcm")}
  with pytest.raises(dicom.SeriesError, match="no slice of series '9.9'"):
    dicom.read_series(tmp_path, series_uid="9.9")


def test_mixed_series_auto_reads_the_one_with_most_axial_slices(tmp_path):
  sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
  write_series(tmp_path, ramp_stack(3), [2.0, 1.0, 0.0])
  write_series(tmp_path, ramp_stack(4), [2.0, 1.0, 0.0, -1.0],
               names=[f"s{i}.dcm" for i in range(4)], series_uid="1.2.3.98",
               orientation=sagittal)  # more slices, but a reformat
  s = read_quiet(tmp_path, series_uid=dicom.AUTO_SERIES)
  assert s.series_uid == SERIES_UID and s.shape[0] == 3
  assert s.warnings[0] == (f"2 series in the folder: read '{SERIES_UID}' (3 axial of 3 slices), "
                           "not '1.2.3.98' (0 axial of 4 slices)")
  assert dict(s.skipped)["s0.dcm"] == "other series '1.2.3.98' (not selected)"
  with pytest.warns(dicom.SeriesWarning, match="2 series in the folder"):
    dicom.read_series(tmp_path, series_uid=dicom.AUTO_SERIES)
  # Among axial series the larger one wins; one series alone needs no note.
  write_series(tmp_path, ramp_stack(5), [3.0, 2.0, 1.0, 0.0, -1.0],
               names=[f"t{i}.dcm" for i in range(5)], series_uid="1.2.3.97")
  assert read_quiet(tmp_path, series_uid=dicom.AUTO_SERIES).series_uid == "1.2.3.97"
  one = tmp_path / "one"
  write_series(one, ramp_stack(3), [2.0, 1.0, 0.0])
  assert read_quiet(one, series_uid=dicom.AUTO_SERIES).warnings == []


def test_describe_is_json_ready(real_data_dir, tmp_path):
  src = real_data_dir / "totalseg_ct" / "dicom_jpeg_lossless"
  for p in sorted(src.iterdir())[:4]:
    shutil.copy(p, tmp_path / p.name)
  (tmp_path / "README").write_text("hello")
  d = dicom.describe(read_quiet(tmp_path))
  assert d["num_slices"] == 4 and d["shape"] == [4, 512, 512]
  assert d["transfer_syntaxes"] == [{"uid": "1.2.840.10008.1.2.4.70",
                                     "name": "JPEG Lossless, Non-Hierarchical, First-Order "
                                             "Prediction (Process 14 [Selection Value 1])"}]
  assert d["skipped"][0]["file"] == "README"


# --- Synthetic RSNA-format studies (cspine_jax.synthetic) against their ground truth ---------

# Every storage variant the generator writes, each with a different file numbering and damage.
SYNTHETIC_VARIANTS = [
    dict(transfer_syntax="explicit", reversed=False, first_number=1, instance_mode="match",
         corrupt=()),
    dict(transfer_syntax="implicit", reversed=True, first_number=0, instance_mode="reversed",
         corrupt=("empty",)),
    dict(transfer_syntax="rle", reversed=True, first_number=80, instance_mode="offset",
         signed=False, bits_stored=12, corrupt=("truncated",)),  # Numbers cross 99 -> 100.
    dict(transfer_syntax="jpegls", reversed=False, first_number=37, instance_mode="reversed",
         signed=False, bits_stored=16, corrupt=("garbled", "truncated")),
    dict(transfer_syntax="j2k", reversed=True, first_number=480, instance_mode="match",
         signed=True, intercept=0.0, corrupt=("garbled",)),
]


def check_against_ground_truth(series, entry, expected_hu=None):
  """Compares a read Series with the generator's ground_truth.json entry for its study."""
  assert series.shape == tuple(entry["shape"])
  assert series.reversed == entry["reversed"]
  assert series.transfer_syntaxes == [entry["transfer_syntax"]]
  assert sorted(name for name, _ in series.skipped) == sorted(entry["corrupt_files"])
  numbers = writers.file_numbers(entry["num_files"], entry["first_number"], entry["reversed"])
  np.testing.assert_array_equal(series.numbers, numbers[:entry["num_slices"]])
  assert series.file_names == [f"{n}.dcm" for n in numbers[:entry["num_slices"]]]
  assert series.slice_spacing == pytest.approx(entry["slice_spacing"], abs=1e-5)
  assert series.pixel_spacing == pytest.approx(tuple(entry["pixel_spacing"]))
  np.testing.assert_allclose(series.orientation, entry["orientation"], atol=1e-6)
  assert np.all(np.diff(series.positions @ series.normal) < 0)  # Head to feet.
  for name, v in entry["vertebrae"].items():
    if v is not None:
      assert series.numbers[v["first"]] == v["first_number"], name
      assert series.numbers[v["last"]] == v["last_number"], name
  if expected_hu is not None:
    np.testing.assert_array_equal(series.volume, expected_hu)


@pytest.mark.parametrize("index,variant", list(enumerate(SYNTHETIC_VARIANTS)),
                         ids=[v["transfer_syntax"] for v in SYNTHETIC_VARIANTS])
def test_synthetic_variants_match_ground_truth(tmp_path, index, variant):
  variant = dict(variant)
  corrupt = variant.pop("corrupt")
  spec = studies.sample_study(7, index, "tiny", **variant)
  spec = dataclasses.replace(spec, corrupt=corrupt)
  phantom = studies.make_study(spec)
  entry, _ = studies.write_study(spec, tmp_path, phantom)
  assert entry["corrupt_files"] or not corrupt
  readable = entry["num_slices"]
  # Lossless storage: HU = stored + intercept, exactly (the writer clips to the stored range).
  stored = writers.stored_values(phantom.hu[:readable], spec.options)
  expected = (stored.astype(np.float32) + np.float32(spec.options.intercept))
  s = read_quiet(tmp_path / "train_images" / spec.uid)
  check_against_ground_truth(s, entry, expected)
  assert s.study_uid == spec.uid
  reasons = dict(s.skipped)
  for name, mode in zip(entry["corrupt_files"], corrupt):
    if mode in ("garbled", "empty"):
      assert reasons[name].startswith("not a DICOM file"), reasons[name]
    else:
      assert reasons[name].startswith(("pixel data truncated", "pixel data cannot be decoded",
                                       "no pixel data")), reasons[name]


def test_synthetic_generate_folder(tmp_path):
  """generate() output (RSNA layout + ground_truth.json), damaged files included."""
  root = synthetic.generate(tmp_path, 3, seed=3, size="tiny", num_test=1, corrupt=3)
  truth = json.loads((root / "ground_truth.json").read_text())
  assert truth["version"] == 1 and len(truth["studies"]) == 4
  assert sum(len(e["corrupt_files"]) for e in truth["studies"].values()) == 3
  for uid, entry in truth["studies"].items():
    check_against_ground_truth(read_quiet(root / f"{entry['split']}_images" / uid), entry)


# --- Direct reader for uncompressed files: the same values as pydicom ------------------------

def _pydicom_hu(path):
  ds = pydicom.dcmread(path)
  return (ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope)
          + float(ds.RescaleIntercept)).astype(np.float32)


def _write_plain(path, pixels, tsyntax, z=1.0, **kwargs):
  """One uncompressed file of ``pixels`` (stored values) in ``tsyntax`` (any byte order)."""
  ds = make_slice(pixels, z, **kwargs)
  ds.file_meta.TransferSyntaxUID = tsyntax
  if tsyntax == pydicom.uid.ExplicitVRBigEndian:
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
  ds.save_as(path, enforce_file_format=True)
  return path


@pytest.mark.parametrize("tsyntax", [ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian,
                                     pydicom.uid.ExplicitVRBigEndian], ids=lambda u: u.name)
@pytest.mark.parametrize("dtype,bits,slope,intercept,shape", [
    (np.int16, 16, 1.0, 0.0, (7, 5)),
    (np.int16, 12, 1.0, -1024.0, (13, 11)),
    (np.uint16, 16, 2.0, -1024.0, (9, 10)),
    (np.uint16, 12, 0.5, -100.0, (3, 17)),
])
def test_direct_reader_equals_pydicom(tmp_path, tsyntax, dtype, bits, slope, intercept, shape):
  """Little-endian files are walked directly (big endian goes to pydicom); either way the volume
  is pydicom's pixel_array x slope + intercept, and map_hu sees exactly those HU."""
  rng = np.random.default_rng(bits + shape[0])
  lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if dtype == np.int16 else (0, 1 << bits)
  stacks = [rng.integers(lo, hi, shape).astype(dtype) for _ in range(3)]
  folder = tmp_path / "s"
  folder.mkdir()
  for k, px in enumerate(stacks):
    _write_plain(folder / f"{k + 1}.dcm", px, tsyntax, z=-2.0 * k, slope=slope,
                 intercept=intercept, bits_stored=bits)
    ds = pydicom.dcmread(folder / f"{k + 1}.dcm")
    np.testing.assert_array_equal(ds.pixel_array, px)  # The file holds what we meant.
  direct = dicom_header.read_plain(folder / "1.dcm")
  assert (direct is not None) == (tsyntax != pydicom.uid.ExplicitVRBigEndian)
  if direct is not None:
    sl = dicom_header.read_header(folder / "1.dcm")
    assert sl.native == (np.dtype("<i2" if dtype == np.int16 else "<u2"), 16 - bits)
  s = dicom.read_series(folder)
  expected = np.stack([_pydicom_hu(folder / f"{k + 1}.dcm") for k in range(3)])
  np.testing.assert_array_equal(s.volume, expected)
  win = dicom.read_series(folder, map_hu=lambda h: np.clip(np.floor(h), -300, 300).astype(np.int16))
  np.testing.assert_array_equal(win.volume, np.clip(np.floor(expected), -300, 300))


def test_direct_reader_window_figures(tmp_path):
  """A bone window (level 400, width 1800) applied by the reader, on known HU."""
  hu = np.array([[-3000, -500, 400, 1300, 3000, -1024, 0, 1000]], np.int16).repeat(3, 0)
  write_series(tmp_path, [hu, hu], [1.0, 0.0])
  s = dicom.read_series(tmp_path, map_hu=lambda h: image_lib.window(h, 400, 1800))
  assert s.volume.dtype == np.uint8 and s.shape == (2, 3, 8)
  # (hu + 500) * 255 / 1800, rounded half up, clipped: 0 -> 71 (70.8), 1000 -> 213 (212.5).
  np.testing.assert_array_equal(s.volume[0, 0], [0, 0, 128, 255, 255, 0, 71, 213])


def test_direct_reader_on_real_pixels(real_data_dir, tmp_path):
  """The real scanner files are JPEG 2000; decompressed by pydicom and saved uncompressed in both
  little-endian syntaxes, they are read directly to exactly pydicom's values."""
  src = sorted((real_data_dir / "totalseg_ct" / "dicom_j2k").iterdir())[:4]
  for tsyntax in (ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian):
    folder = tmp_path / tsyntax.name.replace(" ", "_")
    folder.mkdir()
    for path in src:
      ds = pydicom.dcmread(path)
      ds.decompress()
      ds.file_meta.TransferSyntaxUID = tsyntax
      ds.save_as(folder / path.name, enforce_file_format=True)
      assert dicom_header.read_plain(folder / path.name) is not None
    s = dicom.read_series(folder)
    ref = dicom.read_series(real_data_dir / "totalseg_ct" / "dicom_j2k")
    assert s.transfer_syntaxes == [str(tsyntax)]
    for name, vol in zip(s.file_names, s.volume):
      np.testing.assert_array_equal(vol, _pydicom_hu(folder / name))
      np.testing.assert_array_equal(vol, ref.volume[ref.file_names.index(name)])
