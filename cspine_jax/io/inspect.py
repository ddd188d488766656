"""What the reader makes of one study folder (and, optionally, its mask), for ``data_prep.inspect``.

``inspect_study`` returns ``dicom.describe`` of the series plus, with a mask, each label's voxel
count on the series grid and the share of its voxels above ``BONE_HU`` (bone): a quick check that a
mask is aligned, since a vertebra label on the right voxels is mostly bone. ``format_text`` words
that summary for a terminal.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from cspine_jax.io import dicom, nifti

BONE_HU = 150.0  # Above this a voxel counts as bone (cortical and most cancellous bone).


def mask_stats(volume: np.ndarray, mask: np.ndarray, bone_hu: float = BONE_HU) -> dict[int, dict]:
  """Per non-zero label of ``mask`` (same shape as ``volume``): its voxel count and the share of
  those voxels whose HU exceeds ``bone_hu``."""
  if mask.shape != volume.shape:
    raise ValueError(f"mask shape {mask.shape} differs from volume shape {volume.shape}")
  flat = mask.ravel().astype(np.intp, copy=False)
  counts = np.bincount(flat)
  bone = np.bincount(flat, weights=(volume.ravel() > bone_hu), minlength=len(counts))
  return {int(label): {"voxels": int(counts[label]),
                       "bone_fraction": float(bone[label] / counts[label])}
          for label in np.nonzero(counts)[0] if label != 0}


def inspect_study(study_dir: str | os.PathLike[str],
                  mask_path: str | os.PathLike[str] | None = None, *,
                  series_uid: str | None = None) -> dict[str, Any]:
  """Reads the study (and mask) and returns ``dicom.describe`` plus ``labels`` and ``bone_hu``
  (and ``mask``, the mask's path, when one is given).

  Raises dicom.SeriesError, or nifti.MaskError when the mask cannot be fitted.
  """
  series = dicom.read_series(study_dir, series_uid=series_uid, warn=False)
  info = dicom.describe(series)
  info["bone_hu"] = BONE_HU
  info["labels"] = {}
  if mask_path is not None:
    info["mask"] = str(mask_path)
    info["labels"] = mask_stats(series.volume, nifti.load_mask(mask_path, series))
  return info


def format_text(info: dict[str, Any]) -> str:
  """The human-readable report of an ``inspect_study`` result."""
  numbers = ("not numeric" if info["first_number"] < 0
             else f"{info['first_number']} (top) .. {info['last_number']} (bottom)")
  lines = [
      f"study folder:     {info['folder']}",
      f"study / series:   {info['study_uid'] or '(empty)'} / {info['series_uid'] or '(empty)'}",
      f"slices:           {info['num_slices']}",
      f"volume (S,H,W):   {' x '.join(map(str, info['shape']))}",
      f"pixel spacing:    {info['pixel_spacing'][0]:.7g} x {info['pixel_spacing'][1]:.7g} mm "
      "(between rows, between columns)",
      f"slice spacing:    {info['slice_spacing']:g} mm (from positions)",
      f"order:            {'reversed' if info['reversed'] else 'normal'} "
      f"(file numbers {numbers})",
      f"HU range:         {info['hu_min']:g} .. {info['hu_max']:g}",
      "transfer syntax:  " + "; ".join(f"{t['uid']} ({t['name']})"
                                       for t in info["transfer_syntaxes"]),
      f"skipped files:    {len(info['skipped']) or 'none'}",
  ]
  lines += [f"  {s['file']}: {s['reason']}" for s in info["skipped"]]
  if info["resized"]:
    lines.append(f"resized slices:   {len(info['resized'])}")
    lines += [f"  {r['file']}: stored {r['shape'][0]}x{r['shape'][1]}" for r in info["resized"]]
  lines += [f"warning: {w}" for w in info["warnings"]]
  if "mask" in info:
    lines.append(f"mask:             {info['mask']}")
    lines.append(f"  {'label':>5}  {'voxels':>10}  > {info['bone_hu']:g} HU")
    lines += [f"  {label:>5}  {s['voxels']:>10}  {s['bone_fraction']:6.1%}"
              for label, s in sorted(info["labels"].items())]
    if not info["labels"]:
      lines.append("  (no labelled voxels)")
  return "\n".join(lines)
