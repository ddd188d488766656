"""Tests for the inspect CLI (data_prep/inspect.py), run in-process."""
import json
import shutil

import numpy as np
import pytest

from data_prep import inspect as inspect_cli

JSON_KEYS = {"num_slices", "shape", "pixel_spacing", "slice_spacing", "reversed", "hu_min",
             "hu_max", "skipped", "labels"}


@pytest.fixture(scope="module")
def real_ct(real_data_dir):
  return real_data_dir / "totalseg_ct"


def run_json(capsys, argv):
  assert inspect_cli.main([*argv, "--json"]) == 0
  out = capsys.readouterr().out
  assert out.count("\n") == 1  # One JSON object on one line, nothing else on stdout.
  return json.loads(out)


def test_text_report(real_ct, capsys):
  assert inspect_cli.main([str(real_ct / "dicom_j2k")]) == 0
  out = capsys.readouterr().out
  assert "slices:           20\n" in out
  assert "volume (S,H,W):   20 x 512 x 512\n" in out
  assert "pixel spacing:    0.9765625 x 0.9765625 mm" in out
  assert "slice spacing:    2 mm" in out
  assert "order:            normal (file numbers not numeric)" in out
  assert "HU range:         -1024 .. 1839\n" in out
  assert "1.2.840.10008.1.2.4.90 (JPEG 2000 Image Compression (Lossless Only))" in out
  assert "skipped files:    none" in out


def test_json_with_skipped_file(real_ct, tmp_path, capsys):
  for p in sorted((real_ct / "dicom_jpeg_lossless").iterdir())[:6]:
    shutil.copy(p, tmp_path / p.name)
  (tmp_path / "junk.txt").write_text("not dicom")
  info = run_json(capsys, [str(tmp_path)])
  assert JSON_KEYS <= set(info)
  assert info["num_slices"] == 6 and info["shape"] == [6, 512, 512]
  assert info["pixel_spacing"] == [0.9765625, 0.9765625]
  assert info["slice_spacing"] == 2.0 and info["reversed"] is False
  assert info["hu_min"] >= -1024.0 and info["hu_max"] <= 1839.0
  assert info["labels"] == {}
  (skip,) = info["skipped"]
  assert skip["file"] == "junk.txt" and skip["reason"].startswith("not a DICOM file")
  assert [t["uid"] for t in info["transfer_syntaxes"]] == ["1.2.840.10008.1.2.4.70"]


def test_json_with_mask_labels_are_bone(real_ct, capsys):
  info = run_json(capsys, [str(real_ct / "dicom_jpeg_lossless"), "--mask",
                           str(real_ct / "seg_on_dicom_grid.nii.gz")])
  labels = info["labels"]
  assert labels["32"]["voxels"] == 23576 and labels["33"]["voxels"] == 9930  # T12, T11.
  assert labels["32"]["bone_fraction"] >= 0.7 and labels["33"]["bone_fraction"] >= 0.7
  assert labels["1"]["bone_fraction"] < 0.05  # Spleen: soft tissue, next to no bone.


def test_mask_text_table(real_ct, capsys):
  assert inspect_cli.main([str(real_ct / "dicom_jpeg_lossless"), "--mask",
                           str(real_ct / "seg_on_dicom_grid.nii.gz")]) == 0
  out = capsys.readouterr().out
  assert "     32       23576   71.4%" in out


def test_mask_stats_exact():
  volume = np.array([[[100.0, 200.0], [300.0, -50.0]]], np.float32)
  mask = np.array([[[1, 1], [2, 0]]], np.uint8)
  assert inspect_cli.mask_stats(volume, mask) == {
      1: {"voxels": 2, "bone_fraction": 0.5}, 2: {"voxels": 1, "bone_fraction": 1.0}}
  with pytest.raises(ValueError, match="mask shape"):
    inspect_cli.mask_stats(volume, mask[:, :1])


def test_errors_go_to_stderr(tmp_path, capsys):
  assert inspect_cli.main([str(tmp_path), "--json"]) == 1
  captured = capsys.readouterr()
  assert captured.out == ""
  assert f"error: {tmp_path}: empty folder" in captured.err


def test_reversed_numbered_study(real_ct, tmp_path, capsys):
  # The real files are named in head-to-feet order; number them so that n rises from feet to head.
  files = sorted((real_ct / "dicom_jpeg_lossless").iterdir())[:5]
  for n, p in zip(range(41, 36, -1), files):
    shutil.copy(p, tmp_path / f"{n}.dcm")
  assert inspect_cli.main([str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "order:            reversed (file numbers 41 (top) .. 37 (bottom))" in out
  info = run_json(capsys, [str(tmp_path)])
  assert info["reversed"] is True
  assert (info["first_number"], info["last_number"]) == (41, 37)


def test_mixed_folder_needs_a_series_or_auto(real_ct, tmp_path, capsys):
  import pydicom
  for p in sorted((real_ct / "dicom_jpeg_lossless").iterdir())[:6]:
    shutil.copy(p, tmp_path / p.name)
  for i, p in enumerate(sorted((real_ct / "dicom_jpeg_lossless").iterdir())[6:8]):
    ds = pydicom.dcmread(p)
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10009.2"
    ds.save_as(tmp_path / f"other{i}.dcm")
  assert inspect_cli.main([str(tmp_path)]) == 1
  assert "2 series mixed in one folder" in capsys.readouterr().err
  info = run_json(capsys, [str(tmp_path), "--series-uid", "auto"])
  assert info["num_slices"] == 6
  assert info["warnings"][0].startswith("2 series in the folder: read ")
  assert "'1.2.826.0.1.3680043.10009.2' (2 axial of 2 slices)" in info["warnings"][0]
