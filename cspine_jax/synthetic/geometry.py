"""Scanner geometry of a synthetic axial CT series, and the RSNA NIfTI layout derived from it.

Coordinates are DICOM patient coordinates (LPS, mm). A series is a stack of S axial slices of H rows
and W columns, stored here in sorted order (index 0 = the top, most superior slice). Voxel (s, r, c)
lies at ``positions[s] + c * col_spacing * row_cosines + r * row_spacing * col_cosines``.

The RSNA segmentation masks hold the array as (X = column, Y = row, Z = slice) with rows and slices
stored in the opposite sense to the sorted volume: ``nii[i, j, k] = mask[S-1-k, H-1-j, i]``. The NIfTI
affine (RAS) is derived from the DICOM geometry for exactly that layout, never hard-coded, so other
orientations stay consistent.
"""
from __future__ import annotations

import dataclasses

import numpy as np

# DICOM LPS -> NIfTI RAS flips the first two axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Geometry of one series in sorted (head to feet) order.

  shape:          (S, H, W).
  pixel_spacing:  (row spacing, column spacing) in mm, as DICOM PixelSpacing.
  orientation:    (6,) ImageOrientationPatient: row direction cosines, column direction cosines.
  positions:      (S, 3) ImagePositionPatient (LPS) of each sorted slice.
  """
  shape: tuple[int, int, int]
  pixel_spacing: tuple[float, float]
  orientation: np.ndarray
  positions: np.ndarray

  @property
  def row_cosines(self) -> np.ndarray:
    return np.asarray(self.orientation[:3], np.float64)

  @property
  def col_cosines(self) -> np.ndarray:
    return np.asarray(self.orientation[3:], np.float64)

  @property
  def normal(self) -> np.ndarray:
    n = np.cross(self.row_cosines, self.col_cosines)
    return n / np.linalg.norm(n)

  @property
  def slice_step(self) -> np.ndarray:
    """LPS vector from one sorted slice to the next (points to the feet)."""
    if self.shape[0] < 2:
      return -self.normal
    return (self.positions[-1] - self.positions[0]) / (self.shape[0] - 1)

  @property
  def slice_spacing(self) -> float:
    return float(np.linalg.norm(self.slice_step))

  def in_plane_xy(self) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) float32 LPS x and y of every pixel relative to the slice position (axial slices)."""
    h, w = self.shape[1:]
    dr, dc = self.pixel_spacing
    r = np.arange(h, dtype=np.float64)[:, None] * dr
    c = np.arange(w, dtype=np.float64)[None, :] * dc
    x = c * self.row_cosines[0] + r * self.col_cosines[0]
    y = c * self.row_cosines[1] + r * self.col_cosines[1]
    return x.astype(np.float32), y.astype(np.float32)

  def to_index(self, points: np.ndarray) -> np.ndarray:
    """(..., 3) LPS points -> (..., 3) fractional (s, r, c) indices (uniform slice step assumed)."""
    d = np.asarray(points, np.float64) - self.positions[0]
    step = self.slice_step
    s = d @ step / float(step @ step)
    r = d @ self.col_cosines / self.pixel_spacing[0]
    c = d @ self.row_cosines / self.pixel_spacing[1]
    return np.stack([s, r, c], axis=-1)

  def nifti_affine(self) -> np.ndarray:
    """4x4 RAS affine of the RSNA mask layout ``nii[i, j, k] = mask[S-1-k, H-1-j, i]``.

    LPS of voxel (i, j, k) = P[S-1] + i * dc * row_cos + (H-1-j) * dr * col_cos  (slice S-1-k sits at
    P[S-1] - k * step), so the columns are dc * row_cos, -dr * col_cos, -step and the origin is
    P[S-1] + (H-1) * dr * col_cos, all flipped to RAS.
    """
    s, h, _ = self.shape
    dr, dc = self.pixel_spacing
    cols = np.stack([dc * self.row_cosines, -dr * self.col_cosines, -self.slice_step], axis=1)
    origin = self.positions[s - 1] + (h - 1) * dr * self.col_cosines
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ cols
    affine[:3, 3] = LPS_TO_RAS @ origin
    return affine


def axial_geometry(shape: tuple[int, int, int], pixel_spacing: tuple[float, float],
                   slice_spacing: float, center: tuple[float, float], z_top: float,
                   angle_deg: float = 0.0) -> Geometry:
  """Axial slices centred on (x, y) = center, the first at z = z_top, stepping down by slice_spacing.

  angle_deg rotates the image plane about the z axis (ImageOrientationPatient stays axial).
  """
  s, h, w = shape
  t = np.deg2rad(angle_deg)
  row = np.array([np.cos(t), np.sin(t), 0.0])
  col = np.array([-np.sin(t), np.cos(t), 0.0])
  dr, dc = pixel_spacing
  # Top-left pixel so that the image centre lands on `center`.
  corner = (np.array([center[0], center[1], 0.0]) - (w - 1) / 2 * dc * row
            - (h - 1) / 2 * dr * col)
  positions = np.repeat(corner[None], s, axis=0)
  positions[:, 2] = z_top - np.arange(s) * slice_spacing
  # Round like a scanner writing DS values, so written and in-memory geometry agree exactly.
  positions = np.round(positions, 4)
  orientation = np.round(np.concatenate([row, col]), 6)
  return Geometry(shape=(s, h, w), pixel_spacing=(float(dr), float(dc)), orientation=orientation,
                  positions=positions)


def to_nifti_layout(mask: np.ndarray) -> np.ndarray:
  """(S, H, W) sorted volume -> the RSNA NIfTI array (W, H, S) with rows and slices reversed."""
  return np.ascontiguousarray(mask[::-1, ::-1, :].transpose(2, 1, 0))


def from_nifti_layout(data: np.ndarray) -> np.ndarray:
  """Inverse of to_nifti_layout (the Kaggle notebooks' data[:, ::-1, ::-1].transpose(2, 1, 0))."""
  return np.ascontiguousarray(data[:, ::-1, ::-1].transpose(2, 1, 0))
