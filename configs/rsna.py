"""The whole method on the real RSNA 2022 data at paper size: the project's choices, or the seed's.

    python -m cspine_jax.weights fetch convnext_tiny.fb_in22k_ft_in1k
    python launch.py --config=configs/rsna.py --config.data_dir=/data/rsna --workdir=runs/rsna
    python launch.py --config=configs/rsna.py:seed --config.data_dir=/data/rsna --workdir=runs/seed
    python launch.py --config=configs/rsna.py --config.data_dir=/data/rsna --workdir=runs/rsna \
        --config.steps=stage2,evaluate
    python launch.py --config=configs/rsna.py:tiny --workdir=/tmp/rsna      (a tiny generated set)
    python launch.py --config=configs/rsna.py:seed_tiny --workdir=/tmp/seed

The seed is the authors' published code (trantuan4132/kaggle-RSNA-Fracture-Detection: its README
reports CV 0.3349, private LB 0.3302): ConvNeXt-Tiny, stage 1 at 384 px (box + area ratios, L1),
stage 2 at 320 px, per-slice min-max intensities, the albumentations pipeline, cosine with warm
restarts, the best checkpoint by validation loss, GroupKFold per stage. :data:`DIFFERENCES` lists
every point where the project's method differs from it, its fields and both values (the README's
table is :func:`markdown_table`): ``""`` sets the project's, ``"seed"`` the seed's, so either side
of any difference is one override away (``--config.prepare.intensity=window`` on the seed). Both
start the full-size encoders from ImageNet (``model.pretrained="timm:<tag>"``, fetched once with
``python -m cspine_jax.weights fetch <tag>``; ``require_pretrained`` refuses a random start unless
``--config.models.<name>.model.pretrained=none``) and compute in bfloat16 with float32 parameters
(the seed's mixed precision); 5 folds; the test prediction on DATA_DIR/test_images. The tiny
variants (tests) shrink everything to a generated set of 16 studies and test-size encoders.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from configs import box_refine
from configs import cnn3d
from configs import common
from configs import multi_head
from configs import single_head
from configs import stage1
from configs import stage2
from cspine_jax.models import pretrained

VARIANTS = ("", "seed", "tiny", "seed_tiny")
MODELS = {"stage1": stage1, "box_refine": box_refine, "stage2": stage2, "cnn3d": cnn3d,
          "single_head": single_head, "multi_head": multi_head}
# The full-size encoders: timm publishes EfficientNetV2-S's ImageNet weights for its TF form only.
ENCODERS = {"multi_head": "efficientnet_v2_tf_s"}
BOTH_STAGES = ("stage1", "stage2")


@dataclasses.dataclass(frozen=True)
class Difference:
  """One point where the project's method differs from the seed's: ``fields`` (config paths, all
  set alike) hold ``seed`` in ``:seed`` and ``project`` in the default variant."""
  what: str
  fields: tuple[str, ...]
  seed: Any
  project: Any
  why: str


def _both(what: str, field: str, seed: Any, project: Any, why: str) -> Difference:
  return Difference(what, tuple(f"models.{m}.{field}" for m in BOTH_STAGES), seed, project, why)


# Every place the two methods differ (the README's table is :func:`markdown_table`).
DIFFERENCES: tuple[Difference, ...] = (
    # Preprocessing (pp.options.Options; by_task: one record set's own).
    Difference("Stage-1 image size", ("prepare.by_task.stage1.image_size",), (384, 384),
               (224, 224), "the paper's size (the slide deck's 224 px); 384 px costs 2.9x the "
               "compute per slice"),
    Difference("Stage-2 image size", ("prepare.by_task.stage2.image_size",), (320, 320),
               (224, 224), "the paper's size; 320 px costs 2x the compute per image"),
    Difference("Intensities", ("prepare.intensity",), "minmax", "window",
               "a fixed bone window (level 400, width 1800 HU) gives a tissue the same grey in "
               "every slice; per-slice min-max moves with whatever else the slice holds"),
    Difference("Downsizing", ("prepare.resize",), "linear", "antialias",
               "area-weighted (PIL bilinear) keeps what two-tap sampling skips when shrinking "
               "512 px slices; the two agree when enlarging"),
    Difference("Circular field-of-view mask (stage 1)",
               ("prepare.by_task.stage1.fov_mask", "models.stage1.input.augment.fov_mask"), True,
               False, "the window already maps the padding outside the reconstruction circle to "
               "black; the project's stage 1 was measured without it"),
    Difference("Stage-1 targets of a 2.5D image", ("prepare.by_task.stage1.slice_targets",),
               "neighbours", "centre", "the centre slice's own presence and box: the decoders "
               "read one value per slice"),
    Difference("Stage-2 crop margin", ("prepare.by_task.stage2.crop_margin",), 0.0, 0.1,
               "per-vertebra boxes are tight; 10% keeps the edges (on the demo 0.2 was mixed, 0.3 "
               "worse)"),
    Difference("Square stage-2 crops", ("prepare.by_task.stage2.square_crop",), True, False,
               "a per-vertebra box is resized as it is; the seed's study box is squared"),
    Difference("Folds", ("prepare.fold_method",), "group", "stratified",
               "one split for every record set, stratified on patient_overall: each fold has the "
               "same share of fractured patients; the seed's GroupKFold splits each stage apart"),
    # Stage 1.
    Difference("Stage-1 head", ("models.stage1.model.head",), "ratio", "presence",
               "presence as a probability (BCE) for the decoders, box and area beside it; the "
               "seed regresses seven area ratios (L1) and thresholds them"),
    Difference("Stage-1 box loss", ("models.stage1.loss.box",), "l1", "smooth_l1",
               "smooth L1 on the normalised box"),
    Difference("Stage-1 box loss weight", ("models.stage1.loss.box_weight",), 0.5, 5.0,
               "with the presence BCE, x5 raised the out-of-fold pseudo-label box IoU 0.781 -> "
               "0.816 on the demo"),
    Difference("Stage-1 positive presence weight", ("models.stage1.loss.presence_pos_weight",),
               1.0, 4.0, "a vertebra shows on ~1/9 of the slices; unweighted, a small model "
               "first learns 'all absent' (unused by the seed's head)"),
    Difference("Stage-1 epochs", ("models.stage1.train.epochs",), 15, 10,
               "the project's schedule (one cosine); the seed's 15 are three restarts of 5"),
    Difference("Stage-1 batch", ("models.stage1.input.batch_size",), 64, 32,
               "the project's stage-1 setting at 224 px"),
    Difference("Stage-1 rotation", ("models.stage1.input.augment.max_rotation_deg",), 0.0, 10.0,
               "the project's own +-10 degree rotation (the seed rotates in shift-scale-rotate)"),
    # Pseudo-labels (localize.derive.Rules) and the box refiner.
    Difference("Slice-range decoding", ("pseudo_labels.decode",), "rolling", "template",
               "the masks' mean vertebra layout placed by its two ends: out-of-fold slice-range "
               "IoU 0.86 vs 0.71 for per-slice decoding on the demo (C4-C6 look alike)"),
    Difference("Presence threshold", ("pseudo_labels.threshold",), 0.3, 0.5,
               "a probability from the presence head (the seed's 0.3 is on a regressed ratio)"),
    Difference("All seven placed", ("pseudo_labels.require_all",), False, True,
               "the template places all seven in every study; a study with none found gets the "
               "prior at inference"),
    Difference("Box calibration", ("pseudo_labels.calibrate_boxes",), False, True,
               "per-vertebra edge offsets fitted on the masks: box IoU 0.75 -> 0.83; stage 2 "
               "scored 0.26 on mask-box crops against 0.51 on uncalibrated ones"),
    Difference("Box smoothing along the slices", ("pseudo_labels.box_smoothing",), 0.0, 0.15,
               "the per-slice boxes are noisy and a union keeps the extremes: box IoU 0.823 -> "
               "0.854"),
    Difference("Boxes", ("pseudo_labels.box_rule",), "study", "vertebra",
               "each vertebra cropped by its own box: more of the crop is that vertebra"),
    Difference("Box refiner", ("refine_boxes",), False, True,
               "a second look at each box: out-of-fold box IoU 0.854 -> 0.916, two-stage OOF "
               "0.451 -> 0.350 on the demo"),
    # Stage 2.
    Difference("Stage-2 positive weight", ("models.stage2.loss.positive_weight",), 1.0, None,
               "the metric's weight of a fractured vertebra (2; None); the seed's weighted BCE "
               "normalises one target by its own weight: plain BCE"),
    Difference("Stage-2 dropout", ("models.stage2.model.dropout",), 0.0, 0.1,
               "the project's stage-2 setting (stage 2 overfits its small demo folds)"),
    Difference("Coarse-slice augmentation", ("models.stage2.input.augment.coarse_slices_prob",),
               0.0, 0.5, "a vertebra re-sampled as if cut from 4-12 slices, as thick-slice "
               "studies give it: stage 2 alone, mean -0.007 over four demo record sets"),
    # Schedule, clipping, checkpoint and augmentation of both stages.
    _both("Learning-rate schedule", "optimizer.schedule", "cosine_restarts", "warmup_cosine",
          "one warmup and cosine to 0 over the run: the last checkpoint is the settled one"),
    _both("Gradient clipping", "optimizer.clip_norm", 0.0, 1.0,
          "the project's default for every model (global norm 1)"),
    _both("Checkpoint", "train.select", "best", "last",
          "a rule fixed in advance: the best-on-fold checkpoint is scored on the studies that "
          "chose it, so its out-of-fold figure is optimistic"),
    _both("Checkpoint figure", "train.select_by", "val_loss", "score",
          "the competition metric (the loss for the localisers), used where select='best'"),
    _both("Brightness/contrast +-0.2", "input.augment.brightness_contrast_prob", 0.5, 0.0,
          "the HU window fixes the grey levels the model sees; not measured here"),
    _both("HSV (hue, saturation +-40)", "input.augment.hsv_prob", 0.5, 0.0,
          "the three channels are neighbouring slices, not colours: a hue shift mixes them"),
    _both("Shift-scale-rotate (0.2, 0.3, 30 deg)", "input.augment.ssr_prob", 0.5, 0.0,
          "zoom +-10% and shift +-5% alone raised stage 2's demo loss 0.2854 -> 0.3467"),
    _both("Cutout (4 holes of 20%)", "input.augment.cutout_prob", 0.5, 0.0,
          "a hole can cover the fracture a positive label is about; not measured here"),
)


def markdown_table() -> str:
  """The README's table of :data:`DIFFERENCES` (what, field, seed's value, project's, why)."""
  def value(v: Any) -> str:
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)

  rows = ["| What | Field | Seed | Project | Why |", "|---|---|---|---|---|"]
  for d in DIFFERENCES:
    fields = "<br>".join(f"`{f}`" for f in d.fields)
    rows.append(f"| {d.what} | {fields} | `{value(d.seed)}` | `{value(d.project)}` | {d.why} |")
  return "\n".join(rows)


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
    m.model.dtype = "bfloat16"  # mixed precision: bfloat16 compute, float32 parameters
    if name in ENCODERS:
      m.model.encoder = ENCODERS[name]
    if m.model.get("encoder") in pretrained.SEED_TAGS:
      m.model.pretrained = pretrained.TIMM_SCHEME + pretrained.SEED_TAGS[m.model.encoder]
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
  # A full-size encoder starts from ImageNet weights, or model.pretrained="none" says it need not.
  c.require_pretrained = not tiny
  # Both start stage 2 from ImageNet; "box_refine" (the demo's offline start) is one override away.
  c.init_from = ml_collections.ConfigDict(dict(stage2=""))
  c.models = ml_collections.ConfigDict({name: _model(c, name, tiny) for name in MODELS})
  c.models.stage1.model.head = "presence"
  c.models.stage2.input.augment.max_rotation_deg = 0.0
  for d in DIFFERENCES:
    for path in d.fields:
      _set(c, path, d.seed if variant.startswith("seed") else d.project)
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
