"""The whole method end to end on a generated synthetic set (CPU, 2 cores, minutes).

    python launch.py --config=configs/demo.py --workdir=runs/demo
    python launch.py --config=configs/demo.py:tiny --workdir=/tmp/demo   (the test-suite setting)

generate -> records -> stage 1 -> box refiner -> pseudo-labels -> stage 2 -> baselines (3D CNN,
single-head, multi-head) -> out-of-fold evaluation -> the held-out test studies predicted from
their DICOM files (``cspine_jax.pipeline``). Each model is its own ``configs/<name>.py:cpu`` with
the demo's schedule, under ``config.models.<name>`` (``--config.models.stage2.train.epochs=40``).
Why each setting is what it is: docs/EXPERIMENTS.md ("The demo's settings").
"""
from __future__ import annotations

import ml_collections

from configs import box_refine
from configs import cnn3d
from configs import common
from configs import multi_head
from configs import single_head
from configs import stage1
from configs import stage2

VARIANTS = ("", "tiny")
MODELS = {"stage1": stage1, "box_refine": box_refine, "stage2": stage2, "cnn3d": cnn3d,
          "single_head": single_head, "multi_head": multi_head}


def _model(c: ml_collections.ConfigDict, name: str, *, epochs: int, batch_size: int, lr: float,
           max_steps: int = 0, eval_every: int = 1, members: int = 1, loss: dict | None = None,
           augment: dict | None = None) -> ml_collections.ConfigDict:
  """``configs/<name>.py:cpu`` with the demo's schedule; seed, folds and top-N follow the demo's
  own fields (references, so ``--config.seed=1`` reaches every model)."""
  m = MODELS[name].get_config("cpu")
  m.seed = c.get_ref("seed")
  m.fold = c.get_ref("train_fold")
  m.num_folds = c.prepare.get_ref("num_folds")
  for field in c.prepare:
    m.prepare[field] = c.prepare.get_ref(field)
  m.train.update(epochs=epochs, max_steps=max_steps, eval_every=eval_every, members=members,
                 tensorboard=False, async_checkpoints=False)
  m.train.progress = c.get_ref("progress")
  m.input.batch_size = batch_size
  m.input.workers = 0
  m.optimizer.lr = lr
  m.eval.top_n = c.get_ref("top_n")
  m.loss.update(loss or {})
  m.input.augment.update(augment or {})
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, _ = common.parse_arg(arg)
  common.check_variant(variant, VARIANTS, "demo")
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Steps to run now, by name ("stage2,evaluate"; "" = every step not done yet): pipeline.json.
  c.steps = ""
  # None: a synthetic RSNA-format set generated under WORKDIR/data from ``synthetic``.
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.synthetic = ml_collections.ConfigDict(dict(num_studies=96, seed=0, size="small",
                                               segmented_fraction=0.75, difficulty="realistic"))
  # pp.options.Options of every record set (one preprocessing for training and inference).
  c.prepare = common.prepare()
  c.prepare.update(image_size=(64, 64), stage2_slices=24, cube_size=32, num_folds=2,
                   stage2_locate="vertebrae")
  c.workers = 2
  c.train_fold = -1  # -1: every fold (out-of-fold predictions for all studies); k: fold k only
  c.top_n = 7
  # localize.derive.Rules of the pseudo-labels.
  c.pseudo_labels = ml_collections.ConfigDict(dict(threshold=0.5, box_quantile=0.0,
                                                   decode="template", require_all=True,
                                                   calibrate_boxes=True, box_smoothing=0.15))
  c.refine_boxes = True  # a box refiner's second look at each derived box
  c.refine_passes = 2    # at inference too (RUN/inference.json)
  c.progress = True
  c.pngs = 4  # per-study pictures of test studies in the summary
  c.baselines = ("cnn3d", "single_head", "multi_head")
  c.probe = True  # the shortcut probe on stage 2's crops, beside the models
  # Each fold of a model starting from another model's encoder of the same fold ("" = random).
  c.init_from = ml_collections.ConfigDict(dict(stage2="box_refine"))
  # Batch sizes are multiples of 8 so they split over 8 (test-suite) devices too.
  c.models = ml_collections.ConfigDict()
  c.models.stage1 = _model(c, "stage1", epochs=8, batch_size=16, lr=2e-3, max_steps=1600,
                           eval_every=8, loss={"presence_pos_weight": 4.0, "box_weight": 5.0})
  c.models.box_refine = _model(c, "box_refine", epochs=12, batch_size=32, lr=2e-3,
                               max_steps=1500, eval_every=12)
  c.models.stage2 = _model(c, "stage2", epochs=30, batch_size=8, lr=5e-4, eval_every=6,
                           members=3,
                           augment={"max_rotation_deg": 0.0, "coarse_slices_prob": 0.5})
  c.models.cnn3d = _model(c, "cnn3d", epochs=6, batch_size=8, lr=1e-3, eval_every=6)
  c.models.single_head = _model(c, "single_head", epochs=1, batch_size=16, lr=1e-3, max_steps=120)
  c.models.multi_head = _model(c, "multi_head", epochs=1, batch_size=16, lr=1e-3, max_steps=120)
  if variant == "tiny":
    c.synthetic.num_studies = 16  # 8 per fold: one full batch of 8 per model
    c.synthetic.size = "tiny"
    c.prepare.image_size = (32, 32)
    c.prepare.stage2_slices = 6
    c.prepare.cube_size = 16
    c.pngs = 1
    c.progress = False
    c.train_fold = 0  # one model per stage: compiling dominates at this size
    c.baselines = ("cnn3d",)
    for name in MODELS:
      c.models[name].train.epochs = 1
    c.models.stage2.train.members = 1  # one model per fold here (tests/test_train.py covers members)
    c.models.box_refine.train.max_steps = 0  # one epoch (~20 steps)
    c.models.box_refine.train.eval_every = 1
  return c
