"""Tests for cspine_jax.io.inspect (the logic) and the data_prep.inspect command line (run in a
subprocess: absl flags are process-global)."""
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from cspine_jax.io import dicom
from cspine_jax.io import inspect as inspect_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
JSON_KEYS = {"num_slices", "shape", "pixel_spacing", "slice_spacing", "reversed", "hu_min",
             "hu_max", "skipped", "labels"}
OTHER_SERIES = "1.2.826.0.1.3680043.10009.2"


@pytest.fixture(scope="module")
def real_ct(real_data_dir):
  return real_data_dir / "totalseg_ct"


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "data_prep.inspect", *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def copy_slices(src, dst, count):
  for p in sorted(src.iterdir())[:count]:
    shutil.copy(p, dst / p.name)


def mixed_folder(real_ct, folder):
  """Six slices of the real series and two more of another SeriesInstanceUID."""
  src = real_ct / "dicom_jpeg_lossless"
  copy_slices(src, folder, 6)
  for i, p in enumerate(sorted(src.iterdir())[6:8]):
    ds = pydicom.dcmread(p)
    ds.SeriesInstanceUID = OTHER_SERIES
    ds.save_as(folder / f"other{i}.dcm")


# --- The library ------------------------------------------------------------------------------

def test_text_report(real_ct):
  out = inspect_lib.format_text(inspect_lib.inspect_study(real_ct / "dicom_j2k")) + "\n"
  assert "slices:           20\n" in out
  assert "volume (S,H,W):   20 x 512 x 512\n" in out
  assert "pixel spacing:    0.9765625 x 0.9765625 mm" in out
  assert "slice spacing:    2 mm" in out
  assert "order:            normal (file numbers not numeric)" in out
  assert "HU range:         -1024 .. 1839\n" in out
  assert "1.2.840.10008.1.2.4.90 (JPEG 2000 Image Compression (Lossless Only))" in out
  assert "skipped files:    none" in out
  assert "mask:" not in out


def test_summary_with_skipped_file(real_ct, tmp_path):
  copy_slices(real_ct / "dicom_jpeg_lossless", tmp_path, 6)
  (tmp_path / "junk.txt").write_text("not dicom")
  info = inspect_lib.inspect_study(tmp_path)
  assert JSON_KEYS <= set(info)
  assert info["num_slices"] == 6 and info["shape"] == [6, 512, 512]
  assert info["pixel_spacing"] == [0.9765625, 0.9765625]
  assert info["slice_spacing"] == 2.0 and info["reversed"] is False
  assert info["hu_min"] >= -1024.0 and info["hu_max"] <= 1839.0
  assert info["labels"] == {} and info["bone_hu"] == inspect_lib.BONE_HU
  (skip,) = info["skipped"]
  assert skip["file"] == "junk.txt" and skip["reason"].startswith("not a DICOM file")
  assert [t["uid"] for t in info["transfer_syntaxes"]] == ["1.2.840.10008.1.2.4.70"]
  assert "  junk.txt: not a DICOM file" in inspect_lib.format_text(info)


def test_mask_labels_are_bone_and_tabled(real_ct):
  mask = real_ct / "seg_on_dicom_grid.nii.gz"
  info = inspect_lib.inspect_study(real_ct / "dicom_jpeg_lossless", mask)
  labels = info["labels"]
  assert info["mask"] == str(mask)
  assert labels[32]["voxels"] == 23576 and labels[33]["voxels"] == 9930  # T12, T11.
  assert labels[32]["bone_fraction"] >= 0.7 and labels[33]["bone_fraction"] >= 0.7
  assert labels[1]["bone_fraction"] < 0.05  # Spleen: soft tissue, next to no bone.
  assert "     32       23576   71.4%" in inspect_lib.format_text(info)


def test_mask_stats_exact():
  volume = np.array([[[100.0, 200.0], [300.0, -50.0]]], np.float32)
  mask = np.array([[[1, 1], [2, 0]]], np.uint8)
  assert inspect_lib.mask_stats(volume, mask) == {
      1: {"voxels": 2, "bone_fraction": 0.5}, 2: {"voxels": 1, "bone_fraction": 1.0}}
  with pytest.raises(ValueError, match="mask shape"):
    inspect_lib.mask_stats(volume, mask[:, :1])


def test_reversed_numbered_study(real_ct, tmp_path):
  # The real files are named in head-to-feet order; number them so that n rises from feet to head.
  files = sorted((real_ct / "dicom_jpeg_lossless").iterdir())[:5]
  for n, p in zip(range(41, 36, -1), files):
    shutil.copy(p, tmp_path / f"{n}.dcm")
  info = inspect_lib.inspect_study(tmp_path)
  assert info["reversed"] is True
  assert (info["first_number"], info["last_number"]) == (41, 37)
  assert ("order:            reversed (file numbers 41 (top) .. 37 (bottom))"
          in inspect_lib.format_text(info))


def test_mixed_folder_needs_a_series_or_auto(real_ct, tmp_path):
  mixed_folder(real_ct, tmp_path)
  with pytest.raises(dicom.SeriesError, match="2 series mixed in one folder"):
    inspect_lib.inspect_study(tmp_path)
  info = inspect_lib.inspect_study(tmp_path, series_uid=dicom.AUTO_SERIES)
  assert info["num_slices"] == 6
  assert info["warnings"][0].startswith("2 series in the folder: read ")
  assert f"'{OTHER_SERIES}' (2 axial of 2 slices)" in info["warnings"][0]
  only = inspect_lib.inspect_study(tmp_path, series_uid=OTHER_SERIES)
  assert only["num_slices"] == 2 and only["series_uid"] == OTHER_SERIES


# --- The command line -------------------------------------------------------------------------

def test_cli_text_report(real_ct):
  done = run_cli(real_ct / "dicom_j2k")
  assert done.returncode == 0, done.stderr
  assert "slices:           20\n" in done.stdout
  assert "HU range:         -1024 .. 1839\n" in done.stdout


def test_cli_json_with_mask(real_ct):
  done = run_cli(real_ct / "dicom_jpeg_lossless", "--mask", real_ct / "seg_on_dicom_grid.nii.gz",
                 "--json")
  assert done.returncode == 0, done.stderr
  assert done.stdout.count("\n") == 1  # One JSON object on one line, nothing else on stdout.
  info = json.loads(done.stdout)
  assert JSON_KEYS <= set(info)
  assert info["labels"]["32"]["voxels"] == 23576  # JSON keys are strings.


def test_cli_mixed_folder_with_series_uid(real_ct, tmp_path):
  mixed_folder(real_ct, tmp_path)
  done = run_cli(tmp_path, "--series_uid", "auto", "--json")
  assert done.returncode == 0, done.stderr
  assert json.loads(done.stdout)["num_slices"] == 6


def test_cli_errors_go_to_stderr(real_ct, tmp_path):
  done = run_cli(tmp_path, "--json")
  assert done.returncode == 1
  assert done.stdout == ""
  assert f"error: {tmp_path}: empty folder" in done.stderr
  bad_mask = tmp_path / "mask.nii.gz"
  bad_mask.write_bytes(b"not a nifti")
  done = run_cli(real_ct / "dicom_j2k", "--mask", bad_mask)
  assert done.returncode == 1 and f"error: {bad_mask}: not a readable NIfTI file" in done.stderr
  done = run_cli()  # No STUDY_DIR: a usage error.
  assert done.returncode == 1 and "expected one STUDY_DIR" in done.stderr
