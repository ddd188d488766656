"""Per-study picture: sagittal and coronal reformats with vertebra ranges, boxes and probabilities.

Both views pass through the spine's centre (the middle of the stage-1 boxes). Each vertebra is drawn
as its slice range x box extent, coloured by its stage-2 fracture probability (green 0 -> red 1) and
labelled ``C3 0.82``. Slices run top to bottom as in the volume (head up).
"""
from __future__ import annotations

import os
import pathlib
from typing import Container
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patches  # noqa: E402

from cspine_jax import labels as labels_lib  # noqa: E402
from cspine_jax.io import vertebrae as vertebrae_lib  # noqa: E402

# Display window (HU) that shows bone and soft tissue together; a picture only, not a model input.
_DISPLAY_HU = (-400.0, 1400.0)
_SLAB = 2  # half-thickness (pixels) of the maximum-intensity slab around the centre plane
_CMAP = plt.get_cmap("RdYlGn_r")

Range = tuple[int, int] | None
Box = Sequence[float] | None


def spine_centre(shape: tuple[int, int, int], boxes: Sequence[Box]) -> tuple[int, int]:
  """(row, column) of the spine's centre: mean of the boxes' centres, else the image centre."""
  _, h, w = shape
  centres = [((b[1] + b[3]) / 2, (b[0] + b[2]) / 2) for b in boxes if b is not None]
  if not centres:
    return h // 2, w // 2
  r, c = np.mean(centres, axis=0)
  return int(np.clip(round(r), 0, h - 1)), int(np.clip(round(c), 0, w - 1))


def _slab(volume: np.ndarray, axis: int, centre: int) -> np.ndarray:
  lo, hi = max(centre - _SLAB, 0), min(centre + _SLAB + 1, volume.shape[axis])
  return np.take(volume, np.arange(lo, hi), axis=axis).max(axis=axis)


def _zoom(boxes: Sequence[Sequence[float]], a: int, b: int, size: int) -> tuple[float, float]:
  """Horizontal limits: the boxes' union along one axis widened by its own extent on each side
  (so labels fit), at least 40% of the image; the whole image when there are no boxes."""
  if not boxes:
    return -0.5, size - 0.5
  lo, hi = min(bx[a] for bx in boxes), max(bx[b] for bx in boxes)
  half = max(1.5 * (hi - lo), 0.4 * size) / 2
  centre = (lo + hi) / 2
  return max(-0.5, centre - half), min(size - 0.5, centre + half)


def render_study(volume: np.ndarray, path: str | os.PathLike, *, ranges: Sequence[Range],
                 boxes: Sequence[Box], probs: Sequence[float] | None = None,
                 overall: float | None = None, pixel_spacing: tuple[float, float] = (1.0, 1.0),
                 slice_spacing: float = 1.0, title: str = "") -> pathlib.Path:
  """Writes the study's PNG.

  Args:
    volume: (S, H, W) HU volume (head to feet).
    path: output PNG.
    ranges: 7 entries (first, last) inclusive slice indices, or None for a vertebra not found.
    boxes: 7 pixel boxes (x0, y0, x1, y1) on the volume's grid, or None.
    probs: 7 fracture probabilities (None: ranges drawn in one colour, no numbers).
    overall: patient_overall probability for the title.
    pixel_spacing: (row, column) mm; slice_spacing: mm; they set the views' aspect ratio.
  """
  volume = np.asarray(volume, np.float32)
  if volume.ndim != 3:
    raise ValueError(f"volume must be (S, H, W), got {volume.shape}")
  if len(ranges) != labels_lib.NUM_VERTEBRAE or len(boxes) != labels_lib.NUM_VERTEBRAE:
    raise ValueError(f"need {labels_lib.NUM_VERTEBRAE} ranges and boxes, got {len(ranges)}, "
                     f"{len(boxes)}")
  if probs is not None and len(probs) != labels_lib.NUM_VERTEBRAE:
    raise ValueError(f"need {labels_lib.NUM_VERTEBRAE} probabilities, got {len(probs)}")
  s, h, w = volume.shape
  row_c, col_c = spine_centre(volume.shape, boxes)
  lo, hi = _DISPLAY_HU
  sagittal = np.clip((_slab(volume, 2, col_c) - lo) / (hi - lo), 0, 1)  # (S, H)
  coronal = np.clip((_slab(volume, 1, row_c) - lo) / (hi - lo), 0, 1)  # (S, W)
  views = (("sagittal (column %d)" % col_c, sagittal, 1, 3, slice_spacing / pixel_spacing[0]),
           ("coronal (row %d)" % row_c, coronal, 0, 2, slice_spacing / pixel_spacing[1]))

  # Height from the views' physical proportions so the figure has no empty bands.
  present = [bx for bx in boxes if bx is not None]
  tall = max(s * aspect / np.subtract(*_zoom(present, a, b, image.shape[1])[::-1])
             for _, image, a, b, aspect in views)
  fig, axes = plt.subplots(1, 2, figsize=(10, float(np.clip(4.3 * tall + 1.2, 3.5, 12))),
                           layout="constrained")
  for ax, (name, image, a, b, aspect) in zip(axes, views):
    ax.imshow(image, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="bilinear")
    for v in range(labels_lib.NUM_VERTEBRAE):
      if ranges[v] is None:
        continue
      first, last = ranges[v]
      box = boxes[v]
      x0, x1 = (box[a], box[b]) if box is not None else (0, image.shape[1])
      p = None if probs is None else float(probs[v])
      color = "deepskyblue" if p is None else _CMAP(p)
      ax.add_patch(patches.Rectangle((x0 - 0.5, first - 0.5), x1 - x0, last - first + 1,
                                     fill=False, lw=1.6, ec=color))
      text = labels_lib.VERTEBRAE[v] + ("" if p is None else f" {p:.2f}")
      # Label right of the box, or inside its right edge when the box reaches the image border.
      inside = x1 + 2 > image.shape[1] * 0.8
      ax.text(x1 - 2 if inside else x1 + 2, (first + last) / 2, text, color=color, fontsize=8,
              va="center", ha="right" if inside else "left",
              fontweight="bold", bbox=dict(fc="black", ec="none", alpha=0.55, pad=1))
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("row (anterior -> posterior)" if a == 1 else "column")
    ax.set_ylabel("slice index (head -> feet)")
    ax.set_xlim(*_zoom([bx for bx in boxes if bx is not None], a, b, image.shape[1]))
    ax.set_ylim(s - 0.5, -0.5)
  head = title or "study"
  if overall is not None:
    head += f"   patient_overall {overall:.3f}"
  fig.suptitle(head, fontsize=11)
  if probs is not None:
    sm = plt.cm.ScalarMappable(cmap=_CMAP, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=axes, fraction=0.025, pad=0.01, label="fracture probability")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path


def png_writer(png_dir: str | os.PathLike, only: Container[str] | None = None):
  """A callback for ``infer.predict.run``: each predicted study's picture as soon as it is known
  (studies that fell back are not drawn; ``only``: the study names to draw)."""
  png_dir = pathlib.Path(png_dir)
  png_dir.mkdir(parents=True, exist_ok=True)

  def write(res, series) -> None:
    name = res.uid or pathlib.Path(res.folder).name
    if series is None or res.vertebrae is None or res.error or (only is not None and
                                                                name not in only):
      return
    spans = [vertebrae_lib.resolve(p, series.numbers, series.volume.shape) for p in res.vertebrae]
    render_study(series.volume,
                 png_dir / f"{name}.png",
                 ranges=[None if s is None else s[:2] for s in spans],
                 boxes=[None if s is None else s[2] for s in spans],
                 probs=res.probs[1:],
                 overall=float(res.probs[0]),
                 pixel_spacing=series.pixel_spacing,
                 slice_spacing=series.slice_spacing,
                 title=name)

  return write
