"""One study read for preprocessing: its series (and aligned mask), its vertebrae and labels.

A study is read once (``io.dicom.read_series``, plus ``io.nifti.load_mask`` when it has a
segmentation), mapped to uint8 (window or per-slice min-max; and resized) slice by slice as it is
decoded when the options say so
(:func:`load`). Its vertebrae come from the mask, or from the ``--vertebrae`` file's stage-1
predictions (:func:`extents`). Everything a worker process needs travels in a small picklable
:class:`StudyInput`; the arrays never cross process boundaries.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib

import numpy as np

from cspine_jax import labels as labels_lib
from cspine_jax.io import dicom
from cspine_jax.io import vertebrae as vertebrae_lib
from cspine_jax.pp import image as image_lib
from cspine_jax.pp import options as options_lib

NUM_VERTEBRAE = labels_lib.NUM_VERTEBRAE


class StudyError(ValueError):
  """A study that cannot be turned into records; the message names the study and the reason."""


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

  window: the intensity map the reader already applied (``series.volume`` is then uint8): the
  window's (level, width), or "minmax" (:func:`intensity_key`); None when the volume holds HU.
  planes: the (H, W) the reader resized every windowed slice to (``series.volume`` then holds
  :class:`SliceImager`'s uint8 images; ``series.shape`` is still the DICOM grid), or None.
  """
  study: StudyInput
  series: dicom.Series
  mask: np.ndarray | None
  window: tuple[float, float] | str | None = None
  planes: tuple[int, int] | None = None


def intensity_key(options: options_lib.Options) -> tuple[float, float] | str:
  """How ``options`` map CT values to uint8: the window's (level, width), or "minmax"."""
  if options.intensity == "minmax":
    return "minmax"
  return (options.window_level, options.window_width)


def load(study: StudyInput, *, with_mask: bool, options: options_lib.Options | None = None,
         planes: bool = False) -> Loaded:
  """Reads the series (and the mask when ``with_mask`` and the study has one).

  With ``options`` the volume is read already mapped to uint8 (options' window, or each slice's
  min-max), each slice while it is hot in cache: a quarter of the memory and no second pass over a
  float32 volume. With ``planes`` too, each slice is also resized to ``options.image_size`` as it
  is read (:class:`SliceImager`: what :func:`slice_images` needs, a twentieth of the memory).
  """
  win = None if options is None else intensity_key(options)
  if planes and options is None:
    raise ValueError("load(planes=True) needs the options (window and image size)")
  map_hu = None
  if planes:
    map_hu = image_lib.SliceImager(options)
  elif win == "minmax":
    map_hu = image_lib.minmax  # the reader hands one whole slice at a time
  elif win is not None:
    map_hu = functools.partial(image_lib.window, level=win[0], width=win[1])
  series = dicom.read_series(study.image_dir, warn=False, map_hu=map_hu)
  mask = None
  if with_mask and study.mask_path is not None:
    from cspine_jax.io import nifti  # lazy: nibabel costs each worker's start-up; few need it
    mask = nifti.load_mask(study.mask_path, series)
    if mask.shape != series.shape:
      raise StudyError(f"{study.mask_path}: mask shape {mask.shape} differs from the series "
                       f"{series.shape}")
  return Loaded(study, series, mask, win, options.image_size if planes else None)


def windowed(volume: np.ndarray, options: options_lib.Options,
             applied: tuple[float, float] | str | None = None,
             whole: np.ndarray | None = None) -> np.ndarray:
  """``volume`` (or a crop of it) as options' uint8 (window or min-max): mapped here when it holds
  HU (min-max over the slices of ``whole`` when ``volume`` is a crop of them), returned as is when
  ``applied`` (``Loaded.window``) says the reader applied that map."""
  wanted = intensity_key(options)
  if applied is None:
    return image_lib.to_uint8(volume, options, whole)
  if _key(applied) != wanted:
    raise StudyError(f"volume was read in {_describe(applied)}, the options ask for "
                     f"{_describe(wanted)}")
  return volume


def _key(applied: tuple[float, float] | str) -> tuple[float, float] | str:
  return applied if isinstance(applied, str) else tuple(applied)


def _describe(key: tuple[float, float] | str) -> str:
  return "per-slice min-max" if key == "minmax" else f"window {tuple(key)}"


def slice_images(loaded: Loaded, options: options_lib.Options) -> np.ndarray:
  """Every slice of the study as a windowed, resized 2.5D image: uint8 (S, H, W, 3).

  From the images the reader made (``load(..., planes=True)``) or from a HU volume, through the
  same :class:`SliceImager`: the same bytes either way (training records and inference agree).
  """
  volume = loaded.series.volume
  wanted = intensity_key(options)
  if loaded.planes is not None:
    if loaded.window != wanted or tuple(loaded.planes) != options.image_size:
      raise StudyError(f"{loaded.series.folder}: slices were read as {loaded.planes} images in "
                       f"{_describe(loaded.window)}, the options ask for {options.image_size} "
                       f"in {_describe(wanted)}")
    planes = volume
  elif loaded.window is None:
    imager = image_lib.SliceImager(options)
    planes = np.empty((volume.shape[0], *options.image_size), np.uint8)
    for i in range(volume.shape[0]):
      planes[i] = imager(volume[i])
  else:
    raise StudyError(f"{loaded.series.folder}: slice images are made from HU slices (the volume "
                     "was read windowed at full size; load the study with planes=True or without "
                     "options)")
  return image_lib.stack_25d(planes)


# ----------------------------------------------------------------------------- vertebra extents


def extents(loaded: Loaded) -> list[Extent | None]:
  """C1..C7 slice ranges and boxes: from the mask when loaded, else from the --vertebrae entries.

  A vertebra absent from the study is None (never invented). Raises StudyError when the study has
  neither a mask nor stage-1 predictions.
  """
  if loaded.mask is not None:
    return [
        None if e is None else Extent(e.first, e.last, tuple(int(b) for b in e.box))
        for e in labels_lib.vertebra_extents(loaded.mask)
    ]
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


def study_paths(data_dir: str | pathlib.Path, uid: str,
                split: str = "train") -> tuple[str, str | None]:
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
