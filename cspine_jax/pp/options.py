"""The preprocessing options of a record set; the same options preprocess at inference."""
from __future__ import annotations

import dataclasses
from typing import Any
from typing import Mapping

STAGE2_LOCATE = ("mask", "vertebrae")
INTENSITY = ("window", "minmax")
RESIZE = ("antialias", "linear")
SLICE_TARGETS = ("centre", "neighbours")
FOLD_METHODS = ("stratified", "group")
# The record sets a folder can hold (records.pipeline.TASKS; pp sits below records).
TASKS = ("stage1", "stage2", "box_refine", "cnn3d", "slices2d")
# What ``by_task`` may set for one record set: how its pixels and targets are made. The split
# fields stay shared: every set of a folder splits its studies by the same rule.
TASK_FIELDS = ("image_size", "intensity", "window_level", "window_width", "fov_mask", "resize",
               "stage2_slices", "crop_margin", "square_crop", "cube_size", "cnn3d_crop",
               "stage2_locate", "slice_targets")
# Fields added after record sets were first written. At their defaults they are left out of
# :meth:`Options.to_json`, so the identity of a set made before them (options.json, manifest,
# checkpoint meta) is unchanged and it is still resumed and read as it was made.
LATER_FIELDS = ("intensity", "fov_mask", "resize", "square_crop", "slice_targets", "fold_method",
                "by_task")


@dataclasses.dataclass(frozen=True)
class Options:
  """Preprocessing options; every field is part of a record set's identity (see manifest.json).

  image_size:    (H, W) of the 2D images (stage1, stage2, slices2d); paper 224.
  intensity:     how CT values become uint8: "window" (the HU window below) or "minmax" (each
                 slice's own minimum -> 0 and maximum -> 255, truncated; the seed's DICOM loader).
  window_level, window_width: HU window mapped to 0..255 (bone window 400 / 1800).
  fov_mask:      zero the whole-slice images (stage1, slices2d) outside the inscribed circle, the
                 scanner's field of view (the seed's RandomCircularCrop, in training and inference).
  resize:        "antialias" (PIL's bilinear: a triangle widened by the reduction factor) or
                 "linear" (two taps per axis whatever the factor: cv2's INTER_LINEAR, the seed's
                 albumentations Resize). The two agree when enlarging.
  num_folds, fold_seed, fold_method: the split (records.folds). "stratified": one split of every
                 train.csv study on patient_overall (fold_seed), shared by every record set;
                 "group": GroupKFold by study as the seed, made per population: the segmented
                 studies weighted by their slices (stage1, box_refine), every study alike (stage2,
                 cnn3d, slices2d).
  stage2_slices: slices sampled per vertebra (a multiple of 3: stacked 3 by 3 into 2.5D images).
  crop_margin:   margin added on each side of a vertebra's box, as a fraction of its width/height.
  square_crop:   grow a stage-2 crop's shorter side to its longer one about its centre, in pixels,
                 clipped to the image (the seed's square_bbox).
  cube_size:     D = H = W of the cnn3d volume (paper 224; CPU default 64).
  cnn3d_crop:    crop the cnn3d volume to the C1-C7 slices and box (from the mask or the
                 --vertebrae file).
  stage2_locate: where stage-2 crops come from: "mask" (the mask when the study has one, else the
                 --vertebrae file) or "vertebrae" (the --vertebrae file for every study, as the
                 seed method trains stage 2: crops made the way inference makes them).
  slice_targets: a stage-1 record's targets: the "centre" slice's, or over the 2.5D image's
                 three slices ("neighbours", the seed): presence and area their maximum, the box
                 the union of those of them whose largest area ratio exceeds 0.5.
  by_task:       per record set, fields of TASK_FIELDS that differ from the ones above, e.g.
                 {"stage1": {"image_size": (384, 384), "fov_mask": True}}; a record set is made
                 with :meth:`for_task`, so its own options (what inference reads back) hold no
                 by_task.
  """
  image_size: tuple[int, int] = (224, 224)
  intensity: str = "window"
  window_level: float = 400.0
  window_width: float = 1800.0
  fov_mask: bool = False
  resize: str = "antialias"
  num_folds: int = 5
  fold_seed: int = 0
  fold_method: str = "stratified"
  stage2_slices: int = 24
  crop_margin: float = 0.1
  square_crop: bool = False
  cube_size: int = 64
  cnn3d_crop: bool = False
  stage2_locate: str = "mask"
  slice_targets: str = "centre"
  by_task: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

  def __post_init__(self):
    size = tuple(int(s) for s in self.image_size)
    object.__setattr__(self, "image_size", size)
    if len(size) != 2 or min(size) < 1:
      raise ValueError(f"image_size must be two positive ints (H, W), got {self.image_size}")
    for name, allowed in (("intensity", INTENSITY), ("resize", RESIZE),
                          ("slice_targets", SLICE_TARGETS), ("fold_method", FOLD_METHODS),
                          ("stage2_locate", STAGE2_LOCATE)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
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
    object.__setattr__(self, "by_task", _by_task(self.by_task))
    for task in dict(self.by_task):
      self.for_task(task)  # each task's options are checked like these

  def for_task(self, task: str) -> "Options":
    """The options record set ``task`` is made with: these, with its ``by_task`` fields."""
    if task not in TASKS:
      raise ValueError(f"unknown record set {task!r}; expected one of {TASKS}")
    fields = dict(dict(self.by_task).get(task, ()))
    return dataclasses.replace(self, by_task=(), **fields)

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["image_size"] = list(self.image_size)
    out["by_task"] = {task: {k: list(v) if isinstance(v, tuple) else v for k, v in fields}
                      for task, fields in self.by_task}
    defaults = Options.__dataclass_fields__
    for name in LATER_FIELDS:
      default = defaults[name].default
      if out[name] == (default if name != "by_task" else {}):
        del out[name]
    return out

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Options":
    """Inverse of :meth:`to_json` (lists, as JSON gives them, become tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()})


def _by_task(value: Any) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
  """``by_task`` as sorted, hashable pairs, from a mapping (a config, JSON) or pairs."""
  items = value.items() if isinstance(value, Mapping) else (value or ())
  out = []
  for task, fields in items:
    fields = fields.items() if isinstance(fields, Mapping) else fields
    pairs = []
    for name, v in fields:
      if name not in TASK_FIELDS:
        raise ValueError(f"by_task.{task}.{name}: a record set may set only {TASK_FIELDS}")
      pairs.append((name, tuple(v) if isinstance(v, (list, tuple)) else v))
    if pairs:
      out.append((str(task), tuple(sorted(pairs))))
  return tuple(sorted(out))
