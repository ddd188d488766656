"""Per-study processing shared by every record set (stage1, stage2, cnn3d, slices2d).

One study is read once (``io.dicom.read_series``, plus ``io.nifti.load_mask`` when it has a
segmentation) and turned into uint8 images with a few vectorised steps:

- :func:`window`: HU -> uint8 through a level/width window (bone window 400/1800 by default), one
  fused numpy pass per slice block. The tasks have the reader apply it to each slice as it is
  decoded (``load(..., options=)``): no float32 HU volume is built, and windowing the whole
  volume first gives the same pixels as windowing a crop, since the window is elementwise.
- :func:`resize_plane` / :func:`resize_slices`: antialiased bilinear resampling (PIL's BILINEAR
  filter) as two banded matrix products per slice (:func:`resize_weights`), float32 inside.
- :class:`SliceImager`: a HU slice -> the uint8 (H, W) image of stage1 / slices2d: the window's
  clip at full resolution, the resize, then the window's affine part on the small image. The
  reader applies it to every slice as it is decoded (``load(..., planes=True)``), so each slice
  is resized once, while hot in cache, and no full-size volume is kept; inference applies the
  same object to its HU volume (:func:`slice_images`), so both get the same bytes.
- :func:`stack_25d`: slices i-1, i, i+1 into channels 0, 1, 2 (edges repeat the end slice). The
  2.5D images are gathered from the resized slices, so no slice is resized 3 times.
- :func:`crop_box` crops before resizing (stage2), so only the vertebra's pixels are resampled.

Everything a worker needs travels in a small picklable :class:`StudyInput`; the arrays never cross
process boundaries.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
from cspine_jax import labels as labels_lib
from cspine_jax.io import dicom
from cspine_jax.records import vertebrae as vertebrae_lib

NUM_VERTEBRAE = labels_lib.NUM_VERTEBRAE
# Bumped whenever image bytes change for the same options (a restart must not mix the two).
# 2: banded antialiased bilinear resize of each windowed slice once (1 was PIL per image).
PIXELS_VERSION = 2


class StudyError(ValueError):
  """A study that cannot be turned into records; the message names the study and the reason."""


STAGE2_LOCATE = ("mask", "vertebrae")


@dataclasses.dataclass(frozen=True)
class Options:
  """Preprocessing options; every field is part of a record set's identity (see manifest.json).

  image_size:    (H, W) of the 2D images (stage1, stage2, slices2d); paper 224.
  window_level, window_width: HU window mapped to 0..255 (bone window 400 / 1800).
  num_folds, fold_seed: the stratified split (folds.assign_folds).
  stage2_slices: slices sampled per vertebra (a multiple of 3: stacked 3 by 3 into 2.5D images).
  crop_margin:   margin added on each side of a vertebra's box, as a fraction of its width/height.
  cube_size:     D = H = W of the cnn3d volume (paper 224; CPU default 64).
  cnn3d_crop:    crop the cnn3d volume to the C1-C7 slices and box (from the mask or the
                 --vertebrae file).
  stage2_locate: where stage-2 crops come from: "mask" (the mask when the study has one, else the
                 --vertebrae file) or "vertebrae" (the --vertebrae file for every study, as the
                 seed method trains stage 2: crops made the way inference makes them).
  """
  image_size: tuple[int, int] = (224, 224)
  window_level: float = 400.0
  window_width: float = 1800.0
  num_folds: int = 5
  fold_seed: int = 0
  stage2_slices: int = 24
  crop_margin: float = 0.1
  cube_size: int = 64
  cnn3d_crop: bool = False
  stage2_locate: str = "mask"

  def __post_init__(self):
    size = tuple(int(s) for s in self.image_size)
    object.__setattr__(self, "image_size", size)
    if len(size) != 2 or min(size) < 1:
      raise ValueError(f"image_size must be two positive ints (H, W), got {self.image_size}")
    if self.window_width <= 0:
      raise ValueError(f"window_width must be positive, got {self.window_width}")
    if self.num_folds < 1:
      raise ValueError(f"num_folds must be >= 1, got {self.num_folds}")
    if self.stage2_slices < 3 or self.stage2_slices % 3:
      raise ValueError(f"stage2_slices must be a positive multiple of 3, got {self.stage2_slices}")
    if self.crop_margin < 0:
      raise ValueError(f"crop_margin must be >= 0, got {self.crop_margin}")
    if self.cube_size < 2:
      raise ValueError(f"cube_size must be >= 2, got {self.cube_size}")
    if self.stage2_locate not in STAGE2_LOCATE:
      raise ValueError(f"stage2_locate must be one of {STAGE2_LOCATE}, got {self.stage2_locate!r}")

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["image_size"] = list(self.image_size)
    return out

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Options":
    """Inverse of :meth:`to_json` (lists, as JSON gives them, become tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class StudyInput:
  """What a worker needs to process one study (small and picklable).

  labels:           the 8 targets (patient_overall, C1..C7) from train.csv, or None (test study).
  vertebrae:        the 7 stage-1 predictions for this study from a --vertebrae file, or None.
  fracture_numbers: file numbers of the slices listed in train_bounding_boxes.csv.
  """
  uid: str
  image_dir: str
  mask_path: str | None
  fold: int
  labels: tuple[int, ...] | None = None
  vertebrae: tuple[vertebrae_lib.VertebraPrediction, ...] | None = None
  fracture_numbers: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Extent:
  """A vertebra's inclusive sorted-index slice range and pixel box (x0, y0, x1, y1)."""
  first: int
  last: int
  box: tuple[int, int, int, int]


@dataclasses.dataclass
class Loaded:
  """A study read from disk: the series and, when requested and available, its aligned mask.

  window: the (level, width) the reader already applied (``series.volume`` is then uint8), or
  None when the volume holds HU.
  planes: the (H, W) the reader resized every windowed slice to (``series.volume`` then holds
  :class:`SliceImager`'s uint8 images; ``series.shape`` is still the DICOM grid), or None.
  """
  study: StudyInput
  series: dicom.Series
  mask: np.ndarray | None
  window: tuple[float, float] | None = None
  planes: tuple[int, int] | None = None


def load(study: StudyInput, *, with_mask: bool, options: Options | None = None,
         planes: bool = False) -> Loaded:
  """Reads the series (and the mask when ``with_mask`` and the study has one).

  With ``options`` the volume is read already windowed (uint8, options' window), each slice while
  it is hot in cache: a quarter of the memory and no second pass over a float32 volume. With
  ``planes`` too, each slice is also resized to ``options.image_size`` as it is read
  (:class:`SliceImager`: what :func:`slice_images` needs, a twentieth of the memory).
  """
  win = None if options is None else (options.window_level, options.window_width)
  if planes and options is None:
    raise ValueError("load(planes=True) needs the options (window and image size)")
  map_hu = None
  if planes:
    map_hu = SliceImager(options)
  elif win is not None:
    map_hu = functools.partial(window, level=win[0], width=win[1])
  series = dicom.read_series(study.image_dir, warn=False, map_hu=map_hu)
  mask = None
  if with_mask and study.mask_path is not None:
    from cspine_jax.io import nifti  # nibabel is only imported by workers that need masks.
    mask = nifti.load_mask(study.mask_path, series)
    if mask.shape != series.shape:
      raise StudyError(f"{study.mask_path}: mask shape {mask.shape} differs from the series "
                       f"{series.shape}")
  return Loaded(study, series, mask, win, options.image_size if planes else None)


# ----------------------------------------------------------------------------- image helpers


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
  """HU (any shape) -> uint8: level - width/2 -> 0, level + width/2 -> 255, rounded, clipped."""
  scale = np.float32(255.0 / width)
  # (hu - lo) * scale + 0.5 folded into one multiply-add: 4 passes over each block instead of 5.
  offset = np.float32(0.5 - (level - width / 2) * 255.0 / width)
  out = np.empty(hu.shape, np.uint8)
  # Blocks of slices keep the float temporaries small (cache friendly, bounded memory).
  flat_in = hu.reshape(-1, *hu.shape[-2:]) if hu.ndim >= 2 else hu.reshape(1, 1, -1)
  flat_out = out.reshape(flat_in.shape)
  block = max(1, (1 << 20) // max(1, flat_in[0].size))
  for s in range(0, flat_in.shape[0], block):
    t = np.multiply(flat_in[s:s + block], scale, dtype=np.float32)
    t += offset
    np.clip(t, 0, 255, out=t)
    flat_out[s:s + block] = t  # Truncation after +0.5 rounds to nearest.
  return out


# Antialiased bilinear resampling as banded matrix products. Each output row (column) reads only
# about twice the reduction factor of input rows (columns), so the weight matrix is cut into blocks
# of _BAND outputs and the input span they read, and each block is one small BLAS product: ~14
# MFLOP for a 512^2 -> 224^2 slice, a few times less CPU than PIL's per-slice C loop.
_BAND = 16


@functools.lru_cache(maxsize=512)
def resize_weights(n_in: int, n_out: int) -> np.ndarray:
  """float32 (n_out, n_in) resampling weights, rows summing to 1 (read-only, cached).

  PIL's Image.BILINEAR filter: output j is centred on input (j + 0.5) * n_in / n_out - 0.5, a
  triangle whose support grows with the reduction factor when shrinking (antialiasing), its taps
  cut at the borders and renormalised.
  """
  if n_in < 1 or n_out < 1:
    raise ValueError(f"cannot resample {n_in} -> {n_out} samples")
  scale = n_in / n_out
  support = max(scale, 1.0)
  centers = (np.arange(n_out) + 0.5) * scale
  first = np.maximum(np.trunc(centers - support + 0.5), 0)[:, None]  # PIL's int() truncation.
  stop = np.minimum(np.trunc(centers + support + 0.5), n_in)[:, None]
  x = np.arange(n_in, dtype=np.float64)[None, :]
  w = np.maximum(0.0, 1.0 - np.abs((x - centers[:, None] + 0.5) / support))
  w[(x < first) | (x >= stop)] = 0.0
  w /= w.sum(1, keepdims=True)
  out = w.astype(np.float32)
  out.setflags(write=False)
  return out


@functools.lru_cache(maxsize=512)
def _bands(n_in: int, n_out: int) -> tuple[tuple[slice, slice, np.ndarray, np.ndarray], ...]:
  """(outputs, inputs they read, block, block transposed) for blocks of _BAND outputs."""
  w = resize_weights(n_in, n_out)
  bands = []
  for o0 in range(0, n_out, _BAND):
    o1 = min(o0 + _BAND, n_out)
    used = np.flatnonzero(w[o0:o1].any(0))
    i0, i1 = int(used[0]), int(used[-1]) + 1
    block = np.ascontiguousarray(w[o0:o1, i0:i1])
    bands.append((slice(o0, o1), slice(i0, i1), block, np.ascontiguousarray(block.T)))
  return tuple(bands)


def resize_plane(image: np.ndarray, size: tuple[int, int], out: np.ndarray | None = None
                 ) -> np.ndarray:
  """float32 (h, w) -> float32 (H, W) by :func:`resize_weights` (rows, then columns).

  A convex combination of the inputs: the output stays within the input's range.
  """
  height, width = size
  h, w = image.shape
  if out is None:
    out = np.empty((height, width), np.float32)
  rows = image
  if h != height:
    rows = np.empty((height, w), np.float32)
    for o, i, block, _ in _bands(h, height):
      np.matmul(block, image[i], out=rows[o])
  if w == width:
    out[...] = rows
    return out
  for o, i, _, block_t in _bands(w, width):
    np.matmul(rows[:, i], block_t, out=out[:, o])
  return out


def resize_slices(slices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 (N, h, w) -> uint8 (N, H, W), :func:`resize_plane` of each slice, rounded."""
  height, width = size
  n = slices.shape[0]
  if slices.shape[1:] == (height, width):
    return np.ascontiguousarray(slices)
  out = np.empty((n, height, width), np.uint8)
  plane = np.empty(slices.shape[1:], np.float32)
  res = np.empty((height, width), np.float32)
  for i in range(n):
    plane[...] = slices[i]
    resize_plane(plane, size, res)
    res += 0.5  # Within 0..255 (a convex combination): truncation rounds to nearest.
    out[i] = res
  return out


class SliceImager:
  """A HU slice (float32 (h, w)) -> its uint8 (H, W) image: the window, then the resize.

  The window's clip is applied at full resolution (so, as when windowing to uint8 first, a pixel
  beyond the window cannot bleed into its neighbours), its affine part after the resize, on the
  small image (the weights sum to 1, so the two commute). Rounded to nearest. Buffers are kept
  between calls: the reader calls it on every slice (``read_series(map_hu=)``). One object per
  thread.
  """

  def __init__(self, options: Options):
    self.size = options.image_size
    self.lo = options.window_level - options.window_width / 2
    self.hi = options.window_level + options.window_width / 2
    self.scale = np.float32(255.0 / options.window_width)
    self.offset = np.float32(0.5 - self.lo * 255.0 / options.window_width)
    self._clipped: np.ndarray | None = None
    self._resized = np.empty(self.size, np.float32)

  def __call__(self, hu: np.ndarray) -> np.ndarray:
    if self._clipped is None or self._clipped.shape != hu.shape:
      self._clipped = np.empty(hu.shape, np.float32)
    np.clip(hu, self.lo, self.hi, out=self._clipped)
    res = resize_plane(self._clipped, self.size, self._resized)
    res *= self.scale
    res += self.offset  # In 0.5..255.5: truncation rounds to nearest.
    return res.astype(np.uint8)


def neighbour_indices(centers: np.ndarray, num_slices: int) -> np.ndarray:
  """(N,) slice indices -> (N, 3) indices i-1, i, i+1 clipped to the volume (edges repeat)."""
  centers = np.asarray(centers, np.int64)
  return np.clip(centers[:, None] + np.array([-1, 0, 1]), 0, num_slices - 1)


def stack_25d(slices: np.ndarray, centers: Sequence[int] | None = None) -> np.ndarray:
  """(S, H, W) -> (N, H, W, 3): 2.5D images centred on ``centers`` (default: every slice)."""
  if centers is None:
    # Every slice: three shifted copies straight into the channels, no gathered temporaries.
    out = np.empty(slices.shape + (3,), slices.dtype)
    out[..., 1] = slices
    out[1:, ..., 0] = slices[:-1]
    out[:1, ..., 0] = slices[:1]
    out[:-1, ..., 2] = slices[1:]
    out[-1:, ..., 2] = slices[-1:]
    return out
  idx = neighbour_indices(np.asarray(centers), slices.shape[0])
  return np.stack([slices[idx[:, c]] for c in range(3)], axis=-1)


def evenly_spaced(first: int, last: int, n: int) -> np.ndarray:
  """``n`` indices spread evenly over first..last inclusive (np.linspace, rounded)."""
  return np.round(np.linspace(first, last, n)).astype(np.int64)


def crop_box(box: Sequence[float], margin: float, height: int, width: int
             ) -> tuple[int, int, int, int]:
  """Pixel box grown by ``margin`` x its size on each side, clipped to the image, >= 1 pixel."""
  x0, y0, x1, y1 = (float(b) for b in box)
  mx, my = margin * (x1 - x0), margin * (y1 - y0)
  cx0 = max(0, int(math.floor(x0 - mx)))
  cy0 = max(0, int(math.floor(y0 - my)))
  cx1 = min(width, int(math.ceil(x1 + mx)))
  cy1 = min(height, int(math.ceil(y1 + my)))
  if cx1 <= cx0 or cy1 <= cy0:
    raise StudyError(f"empty crop for box {tuple(box)} on a {height}x{width} image")
  return cx0, cy0, cx1, cy1


def windowed(volume: np.ndarray, options: Options,
             applied: tuple[float, float] | None = None) -> np.ndarray:
  """``volume`` (or a crop of it) in options' window as uint8: windowed here when it holds HU,
  returned as is when ``applied`` (``Loaded.window``) says the reader applied that window."""
  wanted = (options.window_level, options.window_width)
  if applied is None:
    return window(volume, *wanted)
  if tuple(applied) != wanted:
    raise StudyError(f"volume was read in window {tuple(applied)}, the options ask for {wanted}")
  return volume


def slice_images(loaded: Loaded, options: Options) -> np.ndarray:
  """Every slice of the study as a windowed, resized 2.5D image: uint8 (S, H, W, 3).

  From the images the reader made (``load(..., planes=True)``) or from a HU volume, through the
  same :class:`SliceImager`: the same bytes either way (training records and inference agree).
  """
  volume = loaded.series.volume
  wanted = (options.window_level, options.window_width)
  if loaded.planes is not None:
    if loaded.window != wanted or tuple(loaded.planes) != options.image_size:
      raise StudyError(f"{loaded.series.folder}: slices were read as {loaded.planes} images in "
                       f"window {loaded.window}, the options ask for {options.image_size} in "
                       f"window {wanted}")
    planes = volume
  elif loaded.window is None:
    imager = SliceImager(options)
    planes = np.empty((volume.shape[0], *options.image_size), np.uint8)
    for i in range(volume.shape[0]):
      planes[i] = imager(volume[i])
  else:
    raise StudyError(f"{loaded.series.folder}: slice images are made from HU slices (the volume "
                     "was read windowed at full size; load the study with planes=True or without "
                     "options)")
  return stack_25d(planes)


# ----------------------------------------------------------------------------- vertebra extents


def extents(loaded: Loaded) -> list[Extent | None]:
  """C1..C7 slice ranges and boxes: from the mask when loaded, else from the --vertebrae entries.

  A vertebra absent from the study is None (never invented). Raises StudyError when the study has
  neither a mask nor stage-1 predictions.
  """
  if loaded.mask is not None:
    return [None if e is None else Extent(e.first, e.last, tuple(int(b) for b in e.box))
            for e in labels_lib.vertebra_extents(loaded.mask)]
  study = loaded.study
  if study.vertebrae is None:
    used = "no segmentation" if study.mask_path is None else "its segmentation not used"
    raise StudyError(f"study {study.uid}: {used} and no entry in the --vertebrae file, so its "
                     "vertebrae cannot be located")
  out: list[Extent | None] = []
  for v, pred in enumerate(study.vertebrae):
    span = vertebrae_lib.resolve(pred, loaded.series.numbers, loaded.series.shape)
    if span is None:
      out.append(None)
    else:
      first, last, box = span
      out.append(Extent(first, last, box))
  return out


def presence(loaded: Loaded, ext: list[Extent | None] | None = None) -> np.ndarray:
  """bool (S, 7): from the mask's pixels when loaded, else from the extents' slice ranges."""
  if loaded.mask is not None:
    return labels_lib.slice_labels(loaded.mask).presence
  ext = extents(loaded) if ext is None else ext
  out = np.zeros((loaded.series.volume.shape[0], NUM_VERTEBRAE), bool)
  for v, e in enumerate(ext):
    if e is not None:
      out[e.first:e.last + 1, v] = True
  return out


def unlocated_reason(study: StudyInput) -> str | None:
  """Why a study's vertebrae cannot be located (no labels / no mask and no --vertebrae entry)."""
  if study.labels is None:
    return "no train.csv labels"
  if study.mask_path is None and study.vertebrae is None:
    return "no segmentation and no entry in the --vertebrae file"
  return None


def require_labels(study: StudyInput) -> np.ndarray:
  """The study's 8 targets as float32, or StudyError for a study without train.csv labels."""
  if study.labels is None:
    raise StudyError(f"study {study.uid}: no row in train.csv, so no targets")
  return np.asarray(study.labels, np.float32)


def study_paths(data_dir: str | pathlib.Path, uid: str, split: str = "train"
                ) -> tuple[str, str | None]:
  """(image folder, mask path or None) of a study; the uid is validated before it becomes a path."""
  labels_lib.check_uid(uid)
  data_dir = pathlib.Path(data_dir)
  image_dir = data_dir / f"{split}_images" / uid
  mask = None
  for name in (f"{uid}.nii", f"{uid}.nii.gz"):
    if (data_dir / "segmentations" / name).is_file():
      mask = str(data_dir / "segmentations" / name)
      break
  return str(image_dir), mask
