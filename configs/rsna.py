"""The whole method on the real RSNA 2022 data at paper size: the project's choices, or the seed's.

    python launch.py --config=configs/rsna.py --config.data_dir=/data/rsna --workdir=runs/rsna
    python launch.py --config=configs/rsna.py:seed --config.data_dir=/data/rsna --workdir=runs/seed
    python launch.py --config=configs/rsna.py:tiny --workdir=/tmp/rsna      (a tiny generated set)
    python launch.py --config=configs/rsna.py:seed_tiny --workdir=/tmp/seed

The seed is the authors' published code (trantuan4132/kaggle-RSNA-Fracture-Detection: its README
reports CV 0.3349, private LB 0.3302): ConvNeXt-Tiny, stage 1 at 384 px (box + area ratios, L1),
stage 2 at 320 px, per-slice min-max intensities, the albumentations pipeline, cosine with warm
restarts, the best checkpoint by validation loss, GroupKFold. :data:`DIFFERENCES` lists every
field where the project's method differs from it, with both values: ``""`` sets the project's,
``"seed"`` the seed's, so either side of any difference is one override away
(``--config.prepare.intensity=window`` on the seed). Both start the ConvNeXt encoders from
ImageNet (``model.pretrained="timm:<tag>"``) and compute in bfloat16 with float32 parameters, 5
folds, the test prediction on DATA_DIR/test_images. The tiny variants (tests) shrink everything to
a generated set of 16 studies and test encoders.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from configs import box_refine
from configs import cnn3d
from configs import common
from configs import multi_head
from configs import single_head
from configs import stage1
from configs import stage2

VARIANTS = ("", "seed", "tiny", "seed_tiny")
MODELS = {"stage1": stage1, "box_refine": box_refine, "stage2": stage2, "cnn3d": cnn3d,
          "single_head": single_head, "multi_head": multi_head}
CONVNEXT_TINY = "timm:convnext_tiny.fb_in22k_ft_in1k"
EFFICIENTNET_V2_S = "timm:tf_efficientnetv2_s.in21k_ft_in1k"

# (field, the project's value, the seed's value): every place the two methods differ.
DIFFERENCES: tuple[tuple[str, Any, Any], ...] = (
    # Preprocessing (pp.options.Options; by_task: one record set's own).
    ("prepare.by_task.stage1.image_size", (224, 224), (384, 384)),
    ("prepare.by_task.stage2.image_size", (224, 224), (320, 320)),
    ("prepare.intensity", "window", "minmax"),
    ("prepare.resize", "antialias", "linear"),
    ("prepare.by_task.stage1.fov_mask", False, True),
    ("models.stage1.input.augment.fov_mask", False, True),
    ("prepare.by_task.stage1.slice_targets", "centre", "neighbours"),
    ("prepare.by_task.stage2.crop_margin", 0.1, 0.0),
    ("prepare.by_task.stage2.square_crop", False, True),
    ("prepare.fold_method", "stratified", "group"),
    # Stage 1.
    ("models.stage1.model.head", "presence", "ratio"),
    ("models.stage1.loss.box", "smooth_l1", "l1"),
    ("models.stage1.loss.box_weight", 5.0, 0.5),
    ("models.stage1.loss.presence_pos_weight", 4.0, 1.0),
    ("models.stage1.train.epochs", 10, 15),
    ("models.stage1.input.batch_size", 32, 64),
    # Pseudo-labels (localize.derive.Rules) and the box refiner.
    ("pseudo_labels.decode", "template", "rolling"),
    ("pseudo_labels.threshold", 0.5, 0.3),
    ("pseudo_labels.require_all", True, False),
    ("pseudo_labels.calibrate_boxes", True, False),
    ("pseudo_labels.box_smoothing", 0.15, 0.0),
    ("pseudo_labels.box_rule", "vertebra", "study"),
    ("refine_boxes", True, False),
    # Stage 2.
    ("models.stage2.loss.positive_weight", None, 1.0),
    ("models.stage2.model.dropout", 0.1, 0.0),
    ("models.stage2.input.augment.coarse_slices_prob", 0.5, 0.0),
    # Schedule, clipping, checkpoint and augmentation of both stages.
    *((f"models.{m}.{field}", ours, seed) for m in ("stage1", "stage2") for field, ours, seed in (
        ("optimizer.schedule", "warmup_cosine", "cosine_restarts"),
        ("optimizer.clip_norm", 1.0, 0.0),
        ("train.select", "last", "best"),
        ("train.select_by", "score", "val_loss"),
        ("input.augment.brightness_contrast_prob", 0.0, 0.5),
        ("input.augment.hsv_prob", 0.0, 0.5),
        ("input.augment.ssr_prob", 0.0, 0.5),
        ("input.augment.cutout_prob", 0.0, 0.5),
    )),
    ("models.stage1.input.augment.max_rotation_deg", 10.0, 0.0),
)


def _set(c: ml_collections.ConfigDict, path: str, value: Any) -> None:
  *parents, name = path.split(".")
  for p in parents:
    c = c[p]
  c[name] = value


def _get(c: ml_collections.ConfigDict, path: str) -> Any:
  for p in path.split("."):
    c = c[p]
  return c


def _model(c: ml_collections.ConfigDict, name: str, tiny: bool) -> ml_collections.ConfigDict:
  """``configs/<name>.py`` (``:cpu`` when tiny) whose seed, folds, preprocessing and top-N follow
  the method's own fields (references, so ``--config.seed=1`` reaches every model)."""
  m = MODELS[name].get_config("cpu" if tiny else None)
  m.seed = c.get_ref("seed")
  m.fold = c.get_ref("train_fold")
  m.num_folds = c.prepare.get_ref("num_folds")
  for field in c.prepare:
    m.prepare[field] = c.prepare.get_ref(field)
  m.eval.top_n = c.get_ref("top_n")
  m.train.progress = c.get_ref("progress")
  m.train.update(members=1, tensorboard=not tiny, async_checkpoints=not tiny)
  if tiny:
    m.input.workers = 0
    m.train.epochs = 1
    m.model.dtype = "float32"
    m.model.pretrained = None
  else:
    m.input.workers = 12  # grain worker processes: a 16-core GPU host
    m.model.dtype = "bfloat16"
    if name != "cnn3d":
      m.model.pretrained = EFFICIENTNET_V2_S if name == "multi_head" else CONVNEXT_TINY
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, _ = common.parse_arg(arg)
  common.check_variant(variant, VARIANTS, "rsna")
  tiny = variant in ("tiny", "seed_tiny")
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Steps to run now, by name ("stage2,evaluate"; "" = every step not done yet): pipeline.json.
  c.steps = ""
  # The RSNA 2022 folder (train.csv, train_images/, segmentations/, test_images/); None: a
  # synthetic RSNA-format set generated under WORKDIR/data from ``synthetic``.
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.synthetic = ml_collections.ConfigDict(dict(num_studies=96, seed=0, size="small",
                                               segmented_fraction=0.75))
  c.prepare = common.prepare()
  c.prepare.update(stage2_locate="vertebrae", cube_size=224)
  # The box refiner's inputs are windowed where inference makes them, whatever stage 1 reads.
  c.prepare.by_task = ml_collections.ConfigDict(dict(
      stage1=dict(image_size=(224, 224), fov_mask=False, slice_targets="centre"),
      stage2=dict(image_size=(224, 224), crop_margin=0.1, square_crop=False),
      box_refine=dict(intensity="window")))
  c.workers = 14  # record-writing processes
  c.train_fold = -1  # every fold: out-of-fold predictions for all studies
  c.top_n = 7
  c.pseudo_labels = ml_collections.ConfigDict(dict(
      threshold=0.5, box_quantile=0.0, decode="template", require_all=True, calibrate_boxes=True,
      box_smoothing=0.15, box_rule="vertebra", rolling_window=5, rolling_min_periods=3))
  c.refine_boxes = True
  c.refine_passes = 2
  c.progress = True
  c.pngs = 4
  c.baselines = ("cnn3d", "single_head", "multi_head")
  c.probe = True
  # Both start stage 2 from ImageNet; "box_refine" (the demo's offline start) is one override away.
  c.init_from = ml_collections.ConfigDict(dict(stage2=""))
  c.models = ml_collections.ConfigDict({name: _model(c, name, tiny) for name in MODELS})
  c.models.stage1.model.head = "presence"
  c.models.stage2.input.augment.max_rotation_deg = 0.0
  for path, ours, seed in DIFFERENCES:
    _set(c, path, seed if variant.startswith("seed") else ours)
  if tiny:
    c.synthetic.update(num_studies=16, size="tiny")
    c.prepare.update(image_size=(32, 32), stage2_slices=6, cube_size=16, num_folds=2)
    sizes = ((48, 48), (40, 40)) if variant == "seed_tiny" else ((32, 32), (32, 32))
    c.prepare.by_task.stage1.image_size, c.prepare.by_task.stage2.image_size = sizes
    c.workers = 2
    c.train_fold = 0
    c.pngs = 1
    c.progress = False
    c.refine_passes = 1
    c.baselines = ()
    for name in MODELS:
      c.models[name].input.batch_size = 8
      c.models[name].train.epochs = 1
    c.models.box_refine.train.max_steps = 20
  return c
