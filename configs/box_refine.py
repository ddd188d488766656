"""Box refiner: per vertebra, its box in a crop of projections around stage 1's derived box.

Trained on the segmented studies (as stage 1), on crops around jittered true boxes
(``records.box_refine``); the pseudo-labels and ``cspine_jax.predict`` use it after stage 1 when
the run folder holds it. Paper-size counterpart of stage 1: ConvNeXt-Tiny at 224 px. ``:cpu``
uses a tiny encoder at 64 px. Flips only: a rotated crop's box is not the vertebra's box.
"""
from configs import common

VARIANTS = ("", "cpu")


def get_config(arg: str | None = None):
  variant, _ = common.parse_arg(arg)
  common.check_variant(variant, VARIANTS, "box_refine")
  c = common.base("box_refine")
  c.model.name = "box_refine"
  c.model.encoder = "convnext_tiny"
  c.model.drop_path_rate = 0.1
  c.train.epochs = 10
  c.input.batch_size = 32
  c.input.augment.max_rotation_deg = 0.0
  if variant == "cpu":
    common.cpu(c, 64)
    c.model.encoder = "convnext_test"
    c.model.drop_path_rate = 0.0
    c.input.batch_size = 32
  return c
