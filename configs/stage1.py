"""Stage 1: per 2.5D slice, which of C1..C7 it shows (presence, area) and their box.

Paper settings: ConvNeXt-Tiny at 224 px on the studies with segmentation masks, AdamW lr 1e-4,
weight decay 1e-5, cosine, batch 8. ``:cpu`` uses a tiny encoder at 64 px.
"""
from configs import common

VARIANTS = ("", "cpu")


def get_config(arg: str | None = None):
  variant, _ = common.parse_arg(arg)
  common.check_variant(variant, VARIANTS, "stage1")
  c = common.base("stage1")
  c.model.name = "stage1"
  c.model.encoder = "convnext_tiny"
  c.model.drop_path_rate = 0.1
  c.train.epochs = 10
  c.input.batch_size = 32
  # Weight of the positive presence targets in the BCE (1 = plain BCE, the paper's loss).
  c.loss.presence_pos_weight = 1.0
  if variant == "cpu":
    common.cpu(c, 64)
    c.model.encoder = "convnext_test"
    c.model.drop_path_rate = 0.0
    c.input.batch_size = 16
  return c
