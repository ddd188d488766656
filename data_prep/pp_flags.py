"""The preprocessing-option flags of data_prep.prepare and data_prep.build_tfds (one definition).

Defined when a command imports this module; :func:`options` turns their values into the record
set's ``cspine_jax.pp.options.Options``.
"""
from absl import flags

from cspine_jax.pp import options as options_lib

_D = options_lib.Options()
_IMAGE_SIZE = flags.DEFINE_list("image_size", [str(s) for s in _D.image_size],
                                "H[,W] of 2D images (paper 224)")
_WINDOW_LEVEL = flags.DEFINE_float("window_level", _D.window_level, "HU window centre")
_WINDOW_WIDTH = flags.DEFINE_float("window_width", _D.window_width, "HU window width")
_NUM_FOLDS = flags.DEFINE_integer("num_folds", _D.num_folds, "cross-validation folds")
_FOLD_SEED = flags.DEFINE_integer("fold_seed", _D.fold_seed, "seed of the stratified fold split")
_STAGE2_SLICES = flags.DEFINE_integer("stage2_slices", _D.stage2_slices,
                                      "slices sampled per vertebra (a multiple of 3)")
_CROP_MARGIN = flags.DEFINE_float("crop_margin", _D.crop_margin,
                                  "margin around a vertebra's box, a fraction of its size")
_CUBE_SIZE = flags.DEFINE_integer("cube_size", _D.cube_size, "cnn3d cube edge (paper 224)")
_CNN3D_CROP = flags.DEFINE_bool("cnn3d_crop", _D.cnn3d_crop, "cnn3d: crop to C1-C7 first")
_STAGE2_LOCATE = flags.DEFINE_enum(
    "stage2_locate", _D.stage2_locate, options_lib.STAGE2_LOCATE,
    "stage-2 crops from the mask where there is one, or from --vertebrae always")


def options() -> options_lib.Options:
  """The options the flags give; ValueError names the bad one."""
  size = _IMAGE_SIZE.value
  try:
    hw = [int(s) for s in size]
  except ValueError as e:
    raise ValueError(f"--image_size takes H or H,W (integers), got {','.join(size)}") from e
  if len(hw) not in (1, 2):
    raise ValueError(f"--image_size takes H or H,W, got {','.join(size)}")
  return options_lib.Options(
      image_size=(hw[0], hw[-1]), window_level=_WINDOW_LEVEL.value,
      window_width=_WINDOW_WIDTH.value, num_folds=_NUM_FOLDS.value, fold_seed=_FOLD_SEED.value,
      stage2_slices=_STAGE2_SLICES.value, crop_margin=_CROP_MARGIN.value,
      cube_size=_CUBE_SIZE.value, cnn3d_crop=_CNN3D_CROP.value,
      stage2_locate=_STAGE2_LOCATE.value)
