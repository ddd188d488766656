"""Fields shared by every training config (big_vision style: ``get_config(arg)`` per file).

Every field can be overridden on the command line, e.g. ``--config.optimizer.lr=3e-4``.
"""
from __future__ import annotations

import ml_collections


def prepare() -> ml_collections.ConfigDict:
  """``pp.options.Options`` of the record sets (part of each set's identity), every field."""
  return ml_collections.ConfigDict(dict(
      image_size=(224, 224), window_level=400.0, window_width=1800.0, num_folds=5, fold_seed=0,
      stage2_slices=24, crop_margin=0.1, cube_size=64, cnn3d_crop=False, stage2_locate="mask",
      intensity="window", fov_mask=False, resize="antialias", fold_method="stratified",
      square_crop=False, slice_targets="centre"))


def base(task: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task
  c.seed = 0
  # Data: data_dir None => a synthetic RSNA-format set generated and prepared once beside workdir;
  # records_dir None => records under workdir/records (prepared when missing).
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.records_dir = ml_collections.FieldReference(None, field_type=str)
  c.vertebrae_file = ml_collections.FieldReference(None, field_type=str)  # stage-1 output for stage 2
  c.fold = 0          # -1 = every fold in one command (workdir/fold_k)
  c.num_folds = 5
  # Every synthetic study gets a mask so stage 2 finds its vertebrae without a stage-1 run.
  # difficulty: cspine_jax/synthetic/difficulty.py ("easy" = the original generator).
  c.synthetic = ml_collections.ConfigDict(dict(num_studies=40, seed=0, size="small",
                                               segmented_fraction=1.0, difficulty="realistic"))
  c.prepare = prepare()
  c.prepare.num_folds = c.get_ref("num_folds")

  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32"  # compute dtype ("bfloat16": bf16 compute, float32 params)
  # Encoder weights: a local timm file or a `python -m cspine_jax.weights import` folder (None:
  # random init). Nothing is downloaded.
  c.model.pretrained = ml_collections.config_dict.placeholder(str)

  # schedule: "warmup_cosine" (warmup_*, end_factor) or "cosine_restarts" (restart_epochs, min_lr;
  # per_epoch holds each epoch's rate): train.steps.make_schedule.
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, weight_decay=1e-5, b1=0.9, b2=0.999, clip_norm=1.0,
      warmup_steps=-1, warmup_fraction=0.05, end_factor=0.0, schedule="warmup_cosine",
      restart_epochs=5, min_lr=1e-6, per_epoch=True))

  c.input = ml_collections.ConfigDict(dict(batch_size=8, workers=2))
  # coarse_slices_prob / coarse_slices: inputs.augment.AugmentOptions (thick-slice re-sampling;
  # off here); the seed's albumentations transforms, each off at probability 0, and fov_mask.
  c.input.augment = ml_collections.ConfigDict(dict(
      enabled=True, max_rotation_deg=10.0, flip_prob=0.5, coarse_slices_prob=0.0,
      coarse_slices=(4, 12), brightness=0.2, contrast=0.2, brightness_contrast_prob=0.0,
      hue=40.0, saturation=40.0, value=0.0, hsv_prob=0.0, shift=0.2, scale=0.3,
      ssr_rotation_deg=30.0, ssr_prob=0.0, cutout_holes=4, cutout_size=0.2, cutout_prob=0.0,
      fov_mask=False))

  # ratio_weight: the seed head's ratio L1 (stage 1, model.head="ratio"); positive_weight: stage
  # 2's weight of a fractured vertebra (None: the metric's 2).
  c.loss = ml_collections.ConfigDict(dict(box="smooth_l1", box_weight=1.0, ratio_weight=0.5))
  c.loss.positive_weight = ml_collections.config_dict.placeholder(float)
  c.eval = ml_collections.ConfigDict(dict(overall="top_n", top_n=7))

  # members: models per fold, each from its own seed (fold_k, fold_k_member_1, ...); their
  # probabilities are averaged out-of-fold and at inference. select: the checkpoint that stands
  # for a model, "last" (fixed in advance) or "best" (lowest select_by on the validation fold,
  # which is then scored on the data that chose it); select_by: a validation figure ("score" is
  # the competition metric, or the loss for the localisers; "val_loss" the loss).
  c.train = ml_collections.ConfigDict(dict(
      epochs=20, max_steps=0, stop_at_step=0, eval_every=1, log_every=10, checkpoint_every=0,
      checkpoint_keep=2, keep_best=1, async_checkpoints=True, param_sharding="replicated",
      progress=True, tensorboard=True, members=1, select="last", select_by="score"))
  return c


def cpu(c: ml_collections.ConfigDict, image_size: int = 64) -> ml_collections.ConfigDict:
  """Shrinks a config to run on a laptop CPU: small images, small synthetic set, few epochs."""
  c.prepare.image_size = (image_size, image_size)
  c.synthetic.num_studies = 20
  # In-process reading (grain's read threads): on a few cores a worker process's per-batch
  # hand-over costs more than reading these small records.
  c.input.workers = 0
  c.train.epochs = 2
  c.train.log_every = 5
  c.optimizer.lr = 3e-4
  return c


def parse_arg(arg: str | None) -> tuple[str, dict[str, str]]:
  """``"cpu,epochs=3"`` -> ("cpu", {"epochs": "3"}); the variant is the first bare word."""
  variant, kv = "", {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      k, v = part.split("=", 1)
      kv[k.strip()] = v.strip()
    elif not variant:
      variant = part
    else:
      raise ValueError(f"config argument {arg!r}: more than one variant ({variant!r}, {part!r})")
  return variant, kv


def check_variant(variant: str, known: tuple[str, ...], name: str) -> None:
  if variant not in known:
    raise ValueError(f"{name}: unknown variant {variant!r}; choose one of {known}")
