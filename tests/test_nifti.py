"""Tests for cspine_jax.io.nifti.load_mask: geometry-driven alignment of masks to a series grid."""
import itertools
import pathlib

import nibabel as nib
import numpy as np
import pydicom
import pytest

from cspine_jax.io import dicom
from cspine_jax.io import nifti

_F = np.diag([-1.0, -1.0, 1.0])  # LPS <-> RAS


def _series(shape, *, orientation=(1, 0, 0, 0, 1, 0), spacing=(0.8, 0.7), slice_step=None,
            origin=(-100.0, -120.0, 50.0)) -> dicom.Series:
  """A Series with the given geometry; slices go head to feet (falling z) unless slice_step says."""
  s, h, w = shape
  o = np.asarray(orientation, np.float64)
  if slice_step is None:
    normal = np.cross(o[:3], o[3:])
    slice_step = -2.5 * normal * np.sign(normal[2])  # towards the feet
  positions = np.asarray(origin) + np.arange(s)[:, None] * np.asarray(slice_step, np.float64)
  return dicom.Series(folder=pathlib.Path("/nowhere"), volume=np.zeros(shape, np.float32),
                      file_names=[f"{i}.dcm" for i in range(s)], numbers=np.arange(s),
                      positions=positions, orientation=o, pixel_spacing=spacing,
                      slice_spacing=2.5, reversed=False, transfer_syntaxes=[], skipped=[])


def _grid_affine(series: dicom.Series) -> np.ndarray:
  """4x4: series index (s, r, c, 1) -> RAS mm."""
  o = series.orientation
  rs, cs = series.pixel_spacing
  g = np.eye(4)
  g[:3, 0] = _F @ (series.positions[1] - series.positions[0])
  g[:3, 1] = _F @ (o[3:] * rs)
  g[:3, 2] = _F @ (o[:3] * cs)
  g[:3, 3] = _F @ series.positions[0]
  return g


def _write_mask(path, labels, series, perm=(0, 1, 2), flips=(False, False, False), dtype=np.uint8,
                grid=None):
  """Stores ``labels`` (S, H, W on the series grid) as NIfTI with axes permuted/flipped, and the
  affine that keeps every voxel where it was."""
  grid = _grid_affine(series) if grid is None else grid
  to_series = np.zeros((4, 4))  # NIfTI index -> series index
  to_series[3, 3] = 1
  data = np.transpose(labels, perm)
  for k, (axis, flip) in enumerate(zip(perm, flips)):
    if flip:
      data = np.flip(data, k)
      to_series[axis, k] = -1
      to_series[axis, 3] = labels.shape[axis] - 1
    else:
      to_series[axis, k] = 1
  img = nib.Nifti1Image(np.ascontiguousarray(data).astype(dtype), grid @ to_series)
  nib.save(img, str(path))
  return path


def _labels(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 8, shape).astype(np.uint8)


def test_every_axis_permutation_and_flip(tmp_path):
  series = _series((5, 6, 7))
  labels = _labels(series.shape)
  combos = list(itertools.product(itertools.permutations(range(3)),
                                  itertools.product((False, True), repeat=3)))
  assert len(combos) == 48
  for n, (perm, flips) in enumerate(combos):
    ext = ".nii.gz" if n % 2 else ".nii"
    dtype = (np.uint8, np.float32, np.int16, np.float64)[n % 4]
    path = _write_mask(tmp_path / f"m{n}{ext}", labels, series, perm, flips, dtype)
    out = nifti.load_mask(path, series)
    assert out.dtype == np.uint8 and out.shape == series.shape
    np.testing.assert_array_equal(out, labels, err_msg=f"perm={perm} flips={flips} {ext} {dtype}")


def test_rsna_layout_float_whs(tmp_path):
  """RSNA masks: (W, H, S) float with rows and slices stored opposite to the DICOM volume."""
  series = _series((9, 8, 10), spacing=(0.5, 0.5))
  labels = _labels(series.shape, 1)
  path = _write_mask(tmp_path / "rsna.nii", labels, series, (2, 1, 0), (False, True, True),
                     np.float64)
  img = nib.load(str(path))
  stored = np.asarray(img.dataobj)
  assert stored.shape == (10, 8, 9) and stored.dtype == np.float64
  # The Kaggle notebooks' hard-coded flip agrees here, but load_mask got it from the affine.
  np.testing.assert_array_equal(stored[:, ::-1, ::-1].transpose(2, 1, 0), labels)
  np.testing.assert_array_equal(nifti.load_mask(path, series), labels)


@pytest.mark.parametrize("towards_head", [False, True])
def test_oblique_series_and_reversed_normal(tmp_path, towards_head):
  # Rows/columns rotated 30 degrees in-plane and tilted; slices stepping against or along the normal.
  a, b = np.deg2rad(30), np.deg2rad(10)
  row = np.array([np.cos(a), np.sin(a), 0.0])
  col = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), -np.sin(b)])
  normal = np.cross(row, col)
  step = 1.25 * normal * (1 if (normal[2] > 0) == towards_head else -1)
  series = _series((6, 7, 8), orientation=np.concatenate([row, col]), slice_step=step)
  labels = _labels(series.shape, 2)
  path = _write_mask(tmp_path / "oblique.nii.gz", labels, series, (2, 0, 1), (True, False, True),
                     np.float32)
  np.testing.assert_array_equal(nifti.load_mask(path, series), labels)


def test_skipped_slice_leaves_its_mask_slice_unused(tmp_path):
  full = _series((6, 5, 4))
  labels = _labels(full.shape, 3)
  path = _write_mask(tmp_path / "m.nii.gz", labels, full, (2, 1, 0), (False, True, True))
  keep = [0, 1, 3, 4, 5]  # slice 2 was a corrupt file
  series = _series((5, 5, 4))
  series.positions = full.positions[keep]
  np.testing.assert_array_equal(nifti.load_mask(path, series), labels[keep])


def test_in_plane_shift_per_slice_uses_the_gather(tmp_path):
  # Mask on a plain grid; the series' slices each start one column further (a sheared stack).
  big = _series((4, 5, 9))
  labels = _labels(big.shape, 4)
  path = _write_mask(tmp_path / "m.nii", labels, big)
  series = _series((4, 5, 6))
  series.positions = big.positions + np.arange(4)[:, None] * np.array([0.7, 0.0, 0.0])
  expected = np.stack([labels[s, :, s:s + 6] for s in range(4)])
  np.testing.assert_array_equal(nifti.load_mask(path, series), expected)


def test_mask_shape_that_cannot_fit(tmp_path):
  series = _series((5, 6, 7))
  small = _series((5, 5, 7))  # one row short
  path = _write_mask(tmp_path / "short.nii.gz", _labels(small.shape), small, (2, 1, 0))
  with pytest.raises(nifti.MaskError) as e:
    nifti.load_mask(path, series)
  text = str(e.value)
  assert "short.nii.gz" in text
  assert "mask of shape (7, 5, 5)" in text and "(S, H, W) = (5, 6, 7)" in text
  assert "indices 0..5, outside 0..4" in text and "misfit 0.000 voxels" in text


def test_half_voxel_shift_is_refused(tmp_path):
  series = _series((5, 6, 7))
  grid = _grid_affine(series)
  grid[:3, 3] += grid[:3, 2] * 0.5  # half a column
  path = _write_mask(tmp_path / "shifted.nii", _labels(series.shape), series, grid=grid)
  with pytest.raises(nifti.MaskError, match=r"shifted.nii: mask of shape \(5, 6, 7\) .*up to "
                     r"0.500 voxels"):
    nifti.load_mask(path, series)
  # Within tolerance, the nearest voxel is used.
  grid = _grid_affine(series)
  grid[:3, 3] += grid[:3, 2] * 0.1
  path = _write_mask(tmp_path / "nudged.nii", _labels(series.shape), series, grid=grid)
  np.testing.assert_array_equal(nifti.load_mask(path, series), _labels(series.shape))


def test_rotated_or_rescaled_grid_is_refused(tmp_path):
  series = _series((5, 6, 7))
  rot = np.eye(4)
  c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
  rot[:2, :2] = [[c, -s], [s, c]]
  path = _write_mask(tmp_path / "rot.nii", _labels(series.shape), series,
                     grid=rot @ _grid_affine(series))
  with pytest.raises(nifti.MaskError, match="rot.nii: .*(not aligned|not axis-aligned)"):
    nifti.load_mask(path, series)
  grid = _grid_affine(series)
  grid[:3, 1] *= 2  # mask rows twice as far apart
  path = _write_mask(tmp_path / "coarse.nii", _labels(series.shape), series, grid=grid)
  with pytest.raises(nifti.MaskError, match=r"coarse.nii: .*up to 2.500 voxels"):
    nifti.load_mask(path, series)


def test_bad_files(tmp_path):
  series = _series((5, 6, 7))
  with pytest.raises(nifti.MaskError, match="absent.nii: mask file not found"):
    nifti.load_mask(tmp_path / "absent.nii", series)
  junk = tmp_path / "junk.nii"
  junk.write_bytes(b"not a nifti file at all" * 20)
  with pytest.raises(nifti.MaskError, match="junk.nii: not a readable NIfTI"):
    nifti.load_mask(junk, series)
  frac = _labels(series.shape).astype(np.float32) + 0.5
  path = _write_mask(tmp_path / "frac.nii", frac, series, dtype=np.float32)
  with pytest.raises(nifti.MaskError, match="frac.nii: mask values are not whole-number labels"):
    nifti.load_mask(path, series)
  path = _write_mask(tmp_path / "neg.nii", _labels(series.shape).astype(np.int16) - 3, series,
                     dtype=np.int16)
  with pytest.raises(nifti.MaskError, match=r"neg.nii: labels span -3..4, outside 0..255"):
    nifti.load_mask(path, series)
  nib.save(nib.Nifti1Image(_labels(series.shape), None), str(tmp_path / "nogeo.nii"))
  with pytest.raises(nifti.MaskError, match="nogeo.nii: NIfTI has neither sform nor qform"):
    nifti.load_mask(tmp_path / "nogeo.nii", series)
  nib.save(nib.Nifti1Image(np.zeros((6, 7), np.uint8), np.eye(4)), str(tmp_path / "flat.nii"))
  with pytest.raises(nifti.MaskError, match=r"flat.nii: mask must be 3-D, got shape \(6, 7\)"):
    nifti.load_mask(tmp_path / "flat.nii", series)


@pytest.mark.parametrize("dtype", [np.float64, np.int16, np.uint8])
def test_blocks_of_slices_assemble(tmp_path, monkeypatch, dtype):
  """Conversion a few slices at a time (skipped and sheared slices too) equals the whole gather."""
  monkeypatch.setattr(nifti, "_BLOCK_VOXELS", 2 * 5 * 9)  # Two planes per block.
  big = _series((7, 5, 9))
  labels = _labels(big.shape, 5)
  path = _write_mask(tmp_path / "m.nii", labels, big, (2, 1, 0), (False, True, True), dtype)
  keep = [0, 1, 3, 4, 5, 6]
  series = _series((6, 5, 9))
  series.positions = big.positions[keep]
  np.testing.assert_array_equal(nifti.load_mask(path, series), labels[keep])
  sheared = _series((7, 5, 6))
  sheared.positions = big.positions + (np.arange(7) // 2)[:, None] * np.array([0.7, 0.0, 0.0])
  expected = np.stack([labels[s, :, s // 2:s // 2 + 6] for s in range(7)])
  np.testing.assert_array_equal(nifti.load_mask(path, sheared), expected)


def test_full_size_rsna_layout_mask(tmp_path):
  """A full-size uint8 mask in the RSNA layout (memory-mapped, reversed rows and slices).

  Its speed is measured by benchmarks/labels_and_masks.py, not here."""
  series = _series((200, 512, 512), spacing=(0.6, 0.6))
  labels = np.zeros(series.shape, np.uint8)
  labels[20:180, 200:300, 220:300] = 3
  labels[5, 0, 511] = 7  # Corners catch an off-by-one in the reversed views.
  labels[199, 511, 0] = 1
  path = _write_mask(tmp_path / "big.nii", labels, series, (2, 1, 0), (False, True, True),
                     np.uint8)
  out = nifti.load_mask(path, series)
  assert out.flags.c_contiguous and out.dtype == np.uint8
  np.testing.assert_array_equal(out, labels)


# ---- Real scanner data: TotalSegmentator's label map on its own DICOM series. ----

REAL_SEG = "totalseg_ct/seg_on_dicom_grid.nii.gz"


@pytest.fixture(scope="module", params=["dicom_j2k", "dicom_jpeg_lossless"])
def real_series(request, real_data_dir):
  return dicom.read_series(real_data_dir / "totalseg_ct" / request.param)


def _bone_share(mask: np.ndarray, series: dicom.Series) -> float:
  """Share of the T11/T12 voxels (labels 32, 33) above 150 HU."""
  vertebrae = np.isin(mask, (32, 33))
  assert vertebrae.sum() == 23576 + 9930
  return float((series.volume[vertebrae] > 150).mean())


def test_real_mask_lands_on_bone(real_data_dir, real_series):
  mask = nifti.load_mask(real_data_dir / REAL_SEG, real_series)
  assert mask.shape == real_series.shape == (20, 512, 512)
  assert _bone_share(mask, real_series) >= 0.70


@pytest.mark.parametrize("axis", [0, 1])
def test_real_mask_flipped_in_plane_misses_bone(real_data_dir, real_series, tmp_path, axis):
  img = nib.load(str(real_data_dir / REAL_SEG))
  data = np.flip(np.asarray(img.dataobj), axis)  # NIfTI axes 0, 1 are the in-plane ones here
  path = tmp_path / f"flipped{axis}.nii.gz"
  nib.save(nib.Nifti1Image(np.ascontiguousarray(data), img.affine, img.header), str(path))
  mask = nifti.load_mask(path, real_series)  # geometry still fits: only the content is wrong
  assert _bone_share(mask, real_series) < 0.70


def test_real_mask_with_hand_built_series(real_data_dir, real_series):
  """The same alignment from a Series built from pydicom headers alone (no reader involved)."""
  folder = real_data_dir / "totalseg_ct" / "dicom_jpeg_lossless"
  headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
  headers.sort(key=lambda d: -float(d.ImagePositionPatient[2]))  # axial: head = highest z
  first = headers[0]
  series = dicom.Series(
      folder=folder, volume=np.zeros((len(headers), first.Rows, first.Columns), np.float32),
      file_names=[], numbers=np.full(len(headers), -1), positions=np.array(
          [[float(v) for v in d.ImagePositionPatient] for d in headers]),
      orientation=np.array([float(v) for v in first.ImageOrientationPatient]),
      pixel_spacing=tuple(float(v) for v in first.PixelSpacing), slice_spacing=2.0,
      reversed=False, transfer_syntaxes=[], skipped=[])
  np.testing.assert_array_equal(nifti.load_mask(real_data_dir / REAL_SEG, series),
                                nifti.load_mask(real_data_dir / REAL_SEG, real_series))
