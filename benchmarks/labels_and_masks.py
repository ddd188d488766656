"""Mask loading and per-slice labels against plain baselines measured in the same run.

    python benchmarks/labels_and_masks.py [--slices 300] [--size 512] [--repeats 3]

On one full-size synthetic mask stored like the RSNA masks (uint8 NIfTI, (X, Y, Z) with rows and
slices stored opposite to the DICOM volume), it prints seconds and the ratio baseline / ours for:
- io.nifti.load_mask vs plain nibabel ``get_fdata()`` + the Kaggle flip/transpose (what notebooks
  do; float64), both ending in the same uint8 (S, H, W) array;
- labels.slice_labels vs a naive loop (per slice: one ``==`` per vertebra, counts, box);
- labels.vertebra_extents vs a naive loop (per vertebra: np.nonzero over the whole volume).
Each result is checked against its baseline before timing. Best of --repeats runs each.
"""
from __future__ import annotations

import pathlib
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from cspine_jax import cli_setup
from cspine_jax import labels as labels_lib  # noqa: E402
from cspine_jax.io import dicom  # noqa: E402
from cspine_jax.io import nifti  # noqa: E402

_SLICES = flags.DEFINE_integer("slices", 300, "slices of the synthetic mask")
_SIZE = flags.DEFINE_integer("size", 512, "rows and columns of the synthetic mask")
_REPEATS = flags.DEFINE_integer("repeats", 3, "runs of each; the best is kept")


def make_mask(num_slices: int, size: int, seed: int = 0) -> np.ndarray:
  """Seven stacked vertebra-like blobs (C1..C7) plus a few thoracic labels, on (S, H, W)."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((num_slices, size, size), np.uint8)
  yy, xx = np.mgrid[:size, :size]
  cy, cx = size * 0.55, size * 0.5
  per = num_slices // 12
  for v in range(1, 11):  # 8..10: thoracic labels (ignored by the labels, not by the block).
    r = size * (0.05 + 0.01 * rng.random())
    disk = (yy - cy) ** 2 + (xx - cx - 4 * v) ** 2 < r * r
    mask[per * (v + 1):per * (v + 2)][:, disk] = v
  return mask


def series_for(shape: tuple[int, int, int]) -> dicom.Series:
  s, h, w = shape
  positions = np.array([[-100.0, -120.0, 50.0 - 1.25 * k] for k in range(s)])
  return dicom.Series(folder=pathlib.Path("/benchmark"), volume=np.zeros((0,), np.float32),
                      file_names=[f"{k}.dcm" for k in range(s)], numbers=np.arange(s),
                      positions=positions, orientation=np.array([1.0, 0, 0, 0, 1.0, 0]),
                      pixel_spacing=(0.5, 0.5), slice_spacing=1.25, reversed=False,
                      transfer_syntaxes=[], skipped=[])


def write_rsna_style(path: pathlib.Path, mask: np.ndarray, series: dicom.Series) -> None:
  """(X, Y, Z) uint8 with rows and slices reversed, and the affine that says so."""
  s, h, w = mask.shape
  rs, cs = series.pixel_spacing
  # NIfTI index (i=column, j=reversed row, k=reversed slice) -> RAS mm.
  affine = np.eye(4)
  origin = series.positions[0] * np.array([-1.0, -1.0, 1.0])
  affine[:3, 0] = [-cs, 0, 0]
  affine[:3, 1] = [0, rs, 0]  # Row index reversed: +j walks anterior in RAS.
  affine[:3, 2] = [0, 0, 1.25]  # Slice index reversed: +k walks towards the head.
  affine[:3, 3] = origin + np.array([0, -rs * (h - 1), -1.25 * (s - 1)])
  data = np.ascontiguousarray(mask[::-1, ::-1, :].transpose(2, 1, 0))
  nib.save(nib.Nifti1Image(data, affine), str(path))


def notebook_load(path: pathlib.Path) -> np.ndarray:
  data = nib.load(str(path)).get_fdata()  # float64, as the notebooks do
  return data[:, ::-1, ::-1].transpose(2, 1, 0).astype(np.uint8)


def naive_slice_labels(mask: np.ndarray):
  counts = np.zeros((len(mask), 7), np.int64)
  box = np.zeros((len(mask), 4), np.float32)
  for s, sl in enumerate(mask):
    fg = np.zeros(sl.shape, bool)
    for v in range(7):
      hit = sl == v + 1
      counts[s, v] = hit.sum()
      fg |= hit
    if fg.any():
      ys, xs = np.nonzero(fg)
      box[s] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
  peak = counts.max(0)
  area = np.divide(counts, peak, out=np.zeros(counts.shape), where=peak > 0).astype(np.float32)
  return counts > 0, area, box


def naive_extents(mask: np.ndarray):
  out = []
  for v in range(7):
    zz, yy, xx = np.nonzero(mask == v + 1)
    out.append(None if zz.size == 0 else labels_lib.VertebraExtent(
        int(zz.min()), int(zz.max()), (int(xx.min()), int(yy.min()), int(xx.max()) + 1,
                                       int(yy.max()) + 1)))
  return out


def best_of(repeats: int, fn) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def main(argv) -> int:
  cli_setup.begin(argv)
  repeats = _REPEATS.value
  mask = make_mask(_SLICES.value, _SIZE.value)
  series = series_for(mask.shape)
  series.volume = np.zeros(mask.shape, np.uint8)  # Only its shape is used by load_mask.
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "mask.nii"
    write_rsna_style(path, mask, series)
    np.testing.assert_array_equal(nifti.load_mask(path, series), mask)
    np.testing.assert_array_equal(notebook_load(path), mask)
    rows = [("load_mask vs nibabel get_fdata + flip",
             best_of(repeats, lambda: nifti.load_mask(path, series)),
             best_of(repeats, lambda: notebook_load(path)))]
  ours = labels_lib.slice_labels(mask)
  presence, area, box = naive_slice_labels(mask)
  np.testing.assert_array_equal(ours.presence, presence)
  np.testing.assert_allclose(ours.area_ratio, area, rtol=1e-6)
  np.testing.assert_array_equal(ours.box, box)
  assert labels_lib.vertebra_extents(mask) == naive_extents(mask)
  rows.append(("slice_labels vs per-slice loop",
               best_of(repeats, lambda: labels_lib.slice_labels(mask)),
               best_of(repeats, lambda: naive_slice_labels(mask))))
  rows.append(("vertebra_extents vs np.nonzero per vertebra",
               best_of(repeats, lambda: labels_lib.vertebra_extents(mask)),
               best_of(repeats, lambda: naive_extents(mask))))
  print(f"mask {mask.shape} uint8, best of {repeats}")
  for name, ours_s, base_s in rows:
    print(f"{name:44s} ours {ours_s * 1e3:8.1f} ms  baseline {base_s * 1e3:8.1f} ms  "
          f"speed-up {base_s / ours_s:6.1f}x")
  return 0


if __name__ == "__main__":
  app.run(main)
