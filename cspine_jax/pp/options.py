"""The preprocessing options of a record set; the same options preprocess at inference."""
from __future__ import annotations

import dataclasses
from typing import Any
from typing import Mapping

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
