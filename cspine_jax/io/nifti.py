"""Segmentation masks (NIfTI) mapped onto a DICOM series' voxel grid by geometry.

The NIfTI affine (nibabel's best affine: sform, else qform; RAS mm) and the DICOM geometry of the
series (LPS mm) both place voxels in the patient frame. Every series voxel (s, r, c) sits at

  LPS = positions[s] + c * col_spacing * orientation[:3] + r * row_spacing * orientation[3:]

and RAS = (-x, -y, z); inv(affine) turns that into fractional NIfTI indices. When the two grids
coincide the result is, for each series axis, one NIfTI axis walked forwards or backwards: the mask
is then gathered exactly with a transpose and strided views (a gather only for skipped or sheared
slices), copied once into the uint8 result (an uncompressed .nii is read through a memory map).
Anything else (a voxel landing more than ``tolerance`` voxels from a NIfTI voxel centre, outside the
array, or between axes) is refused with a MaskError; nothing is resampled or guessed, and no flip is
hard-coded.
Slices the reader skipped (corrupt files) simply leave their NIfTI slice unused.
"""
from __future__ import annotations

import os
import pathlib

import nibabel as nib
import numpy as np

from cspine_jax.io.dicom import Series

_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
_BLOCK_VOXELS = 1 << 22  # Voxels converted per block when the stored type is not uint8.


class MaskError(ValueError):
  """A mask that cannot be read or placed on its series; the message names the file and why."""


def _best_affine(img: nib.Nifti1Image, path: pathlib.Path) -> np.ndarray:
  header = img.header
  if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
    # nibabel would fall back to a bare scaling with no orientation: that cannot place the mask.
    raise MaskError(
        f"{path}: NIfTI has neither sform nor qform (both codes 0): no geometry to align by")
  affine = np.asarray(img.affine, np.float64)
  if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise MaskError(f"{path}: NIfTI affine is singular or not finite:\n{affine}")
  return affine


def _series_to_nifti_index(series: Series, affine: np.ndarray):
  """Fractional NIfTI indices of each slice origin (S, 3) and of one row / one column step (3,)."""
  inv = np.linalg.inv(affine)
  rot, shift = inv[:3, :3], inv[:3, 3]
  o = np.asarray(series.orientation, np.float64)
  row_spacing, col_spacing = (float(v) for v in series.pixel_spacing)
  origin = (np.asarray(series.positions, np.float64) * _LPS_TO_RAS) @ rot.T + shift
  col_step = rot @ (o[:3] * col_spacing * _LPS_TO_RAS)
  row_step = rot @ (o[3:] * row_spacing * _LPS_TO_RAS)
  return origin, row_step, col_step


def _axis_of(step: np.ndarray) -> tuple[int, int]:
  """The NIfTI axis a unit step mostly walks along, and its sense (+1 / -1)."""
  k = int(np.argmax(np.abs(step)))
  return k, (1 if step[k] > 0 else -1)


def _mapping_error(path, mask_shape, series_shape, detail: str) -> MaskError:
  return MaskError(f"{path}: mask of shape {tuple(mask_shape)} cannot be placed on the series grid "
                   f"of shape (S, H, W) = {tuple(series_shape)}: {detail}")


def _index_map(series: Series, affine: np.ndarray, mask_shape, path, tolerance: float):
  """Per series axis: the NIfTI axis, and the NIfTI index of every slice / row / column."""
  num_slices, height, width = series.shape
  origin, row_step, col_step = _series_to_nifti_index(series, affine)
  row_axis, row_sign = _axis_of(row_step)
  col_axis, col_sign = _axis_of(col_step)
  row_unit = np.zeros(3)
  row_unit[row_axis] = row_sign
  col_unit = np.zeros(3)
  col_unit[col_axis] = col_sign
  nearest = np.rint(origin)
  # The misfit between exact and integer indices is affine in (r, c) within a slice, so its largest
  # value is reached at one of the slice's four corners.
  corners = np.array([[0, 0], [height - 1, 0], [0, width - 1], [height - 1, width - 1]], np.float64)
  drift = corners[:, :1] * (row_step - row_unit) + corners[:, 1:] * (col_step - col_unit)  # (4, 3)
  misfit = float(np.abs((origin - nearest)[:, None, :] + drift[None]).max())
  if row_axis == col_axis:
    raise _mapping_error(path, mask_shape, series.shape,
                         f"rows and columns both run mostly along NIfTI axis {row_axis}: grids not "
                         f"aligned (misfit {misfit:.3f} voxels)")
  slice_axis = 3 - row_axis - col_axis
  if misfit > tolerance:
    raise _mapping_error(path, mask_shape, series.shape,
                         f"series voxels fall up to {misfit:.3f} voxels from the nearest mask "
                         f"voxel centre (tolerance {tolerance}); grids differ or are not "
                         "axis-aligned")
  nearest = nearest.astype(np.int64)
  slice_idx = nearest[:, slice_axis]
  row_idx = nearest[:, row_axis, None] + row_sign * np.arange(height)  # (S, H)
  col_idx = nearest[:, col_axis, None] + col_sign * np.arange(width)  # (S, W)
  for name, axis, idx in (("slice", slice_axis, slice_idx), ("row", row_axis, row_idx),
                          ("column", col_axis, col_idx)):
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= mask_shape[axis]:
      raise _mapping_error(path, mask_shape, series.shape,
                           f"series {name}s map to NIfTI axis {axis} indices {lo}..{hi}, outside "
                           f"0..{mask_shape[axis] - 1} (misfit {misfit:.3f} voxels)")
  if np.unique(slice_idx).size != num_slices:
    raise _mapping_error(path, mask_shape, series.shape,
                         "several series slices map to the same mask slice")
  return (slice_axis, row_axis, col_axis), slice_idx, row_idx, col_idx


def _voxels(img: nib.Nifti1Image, path) -> np.ndarray:
  """The stored voxel array (a memory map for an uncompressed, unscaled .nii: nothing is copied)."""
  try:
    data = np.asanyarray(img.dataobj)
  except Exception as e:  # nibabel raises several types for truncated/corrupt payloads.
    raise MaskError(f"{path}: cannot read NIfTI voxel data: {e}") from e
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if not (np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.integer)
          or data.dtype == bool):
    raise MaskError(f"{path}: unsupported mask dtype {data.dtype}")
  return data


def _to_labels(block: np.ndarray, out: np.ndarray, path) -> None:
  """Copies ``block`` into the uint8 ``out``; floats must hold whole numbers, all values 0..255."""
  if block.dtype in (np.uint8, np.bool_):  # Nothing to check: one strided copy.
    out[...] = block
    return
  if np.issubdtype(block.dtype, np.floating):
    if not np.all(np.isfinite(block)):
      raise MaskError(f"{path}: mask holds NaN or infinite values")
    rounded = np.rint(block)
    if np.abs(block - rounded).max(initial=0.0) > 1e-3:
      raise MaskError(f"{path}: mask values are not whole-number labels")
    block = rounded
  if block.size:
    lo, hi = block.min(), block.max()
    if lo < 0 or hi > 255:
      raise MaskError(f"{path}: labels span {lo:g}..{hi:g}, outside 0..255")
  out[...] = block


def _step_slice(idx: np.ndarray) -> slice | None:
  """A slice walking ``idx`` when its indices are consecutive (step +1 or -1), else None."""
  if len(idx) == 1:
    return slice(int(idx[0]), int(idx[0]) + 1)
  step = int(idx[1] - idx[0])
  if step not in (1, -1) or not np.all(np.diff(idx) == step):
    return None
  stop = int(idx[-1]) + step
  return slice(int(idx[0]), None if stop < 0 else stop, step)


def load_mask(nii_path: str | os.PathLike, series: Series, *,
              tolerance: float = 0.25) -> np.ndarray:
  """Reads a NIfTI label map (.nii / .nii.gz) and returns it as uint8 (S, H, W) on ``series``' grid.

  ``tolerance`` is the largest distance (in mask voxels, any axis) allowed between a series voxel
  centre and the mask voxel it takes its label from. Raises MaskError when it cannot fit.
  """
  path = pathlib.Path(nii_path)
  if not path.is_file():
    raise MaskError(f"{path}: mask file not found")
  try:
    img = nib.load(str(path))
  except Exception as e:  # nibabel's errors for non-NIfTI input are not one type.
    raise MaskError(f"{path}: not a readable NIfTI file: {e}") from e
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise MaskError(f"{path}: expected a NIfTI image, got {type(img).__name__}")
  shape = tuple(int(n) for n in img.shape)
  if len(shape) == 4 and shape[3] == 1:
    shape = shape[:3]
  if len(shape) != 3:
    raise MaskError(f"{path}: mask must be 3-D, got shape {tuple(img.shape)} for series shape "
                    f"{tuple(series.shape)}")
  affine = _best_affine(img, path)
  # Geometry is checked from the header first, so a misfit costs no voxel decoding.
  axes, slice_idx, row_idx, col_idx = _index_map(series, affine, shape, path, tolerance)
  # (slice, row, column) view of the stored array: for the usual (X, Y, Z) Fortran-ordered NIfTI
  # it is C-contiguous, so the one copy below reads the file in order.
  data = np.transpose(_voxels(img, path), axes)
  out = np.empty(series.shape, np.uint8)
  same_plane = (row_idx == row_idx[:1]).all() and (col_idx == col_idx[:1]).all()
  if same_plane:  # Usual case: the same in-plane offset for every slice -> two strided views.
    rows, cols = _step_slice(row_idx[0]), _step_slice(col_idx[0])
  # Converted a block of slices at a time: a float64 RSNA mask is ~600 MB, its temporaries need
  # not be. Only the voxels the series uses are read and checked.
  block = max(1, _BLOCK_VOXELS // max(1, data.shape[1] * data.shape[2]))
  whole = _step_slice(slice_idx) if data.dtype in (np.uint8, np.bool_) else None
  if whole is not None and same_plane:  # uint8 on consecutive slices: one view, one copy.
    _to_labels(data[whole, rows, cols], out, path)
    return out
  for j in range(0, len(slice_idx), block):
    planes = data[slice_idx[j:j + block]]
    if same_plane:
      src = planes[:, rows, cols]
    else:  # Slices shifted in-plane (sheared stack): gather per slice.
      s = np.arange(len(planes))[:, None, None]
      src = planes[s, row_idx[j:j + block, :, None], col_idx[j:j + block, None, :]]
    _to_labels(src, out[j:j + block], path)
  return out


