"""DICOM series reader: slice order, Hounsfield units, decoders, bad files.

(Interface fixed here; implementation in progress.)
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np


class SeriesError(ValueError):
  """A folder that cannot be read as one CT series; the message names the folder and the reason."""


@dataclasses.dataclass
class Series:
  """One CT series, slices ordered head to feet along the slice normal (the RSNA convention).

  The positions' projections on the normal are strictly monotonic along the volume index, in the
  direction in which the patient's superior (LPS +z) coordinate falls: index 0 is the top slice.

  volume:          float32 (S, H, W), Hounsfield units.
  file_names:      S file names (relative to ``folder``) in volume order.
  numbers:         int64 (S,) the file number ``n`` of ``<n>.dcm`` (what train_bounding_boxes.csv's
                   slice_number means), or -1 when the name is not numeric.
  positions:       float64 (S, 3) ImagePositionPatient (LPS, mm) in volume order.
  orientation:     float64 (6,) ImageOrientationPatient (row direction cosines, column direction cosines).
  pixel_spacing:   (row spacing, column spacing) in mm: the distance between rows, between columns.
  slice_spacing:   mm between consecutive slices, from the positions (SliceThickness can be wrong).
  reversed:        True when file numbers increase from feet to head (position rising with n).
  transfer_syntaxes: sorted list of the transfer syntax UIDs met.
  skipped:         list of (file name, reason) for files that were not used.
  study_uid:       StudyInstanceUID ('' when the files leave it empty).
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

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(self.volume.shape)

  @property
  def normal(self) -> np.ndarray:
    """Unit slice normal (row cosines x column cosines)."""
    o = self.orientation
    n = np.cross(o[:3], o[3:])
    return n / np.linalg.norm(n)
