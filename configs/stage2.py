"""Stage 2: ConvNeXt encoder per 2.5D image + BiLSTM + attention over 8 images of one vertebra.

Paper settings: ConvNeXt-Tiny, 224 px, AdamW lr 1e-4, weight decay 1e-5, cosine, batch 8, 20 epochs.
Variants: ``configs/stage2.py`` (paper), ``configs/stage2.py:cpu`` (convnext_atto-sized test
encoder at 64 px, a small synthetic set: well under a second per step on 2 CPU cores).
"""
from ml_collections import config_dict

from configs import common

VARIANTS = ("", "cpu")


def get_config(arg: str | None = None):
  variant, _ = common.parse_arg(arg)
  common.check_variant(variant, VARIANTS, "stage2")
  c = common.base("stage2")
  c.model.name = "stage2"
  c.model.encoder = "convnext_tiny"
  # None = the encoder's width (768 for Tiny), the seed method's default; typed for CLI overrides.
  c.model.lstm_hidden = config_dict.placeholder(int)
  c.model.vertebra_embedding = 0
  c.model.dropout = 0.1
  c.model.drop_path_rate = 0.1
  c.train.epochs = 20
  if variant == "cpu":
    common.cpu(c, 64)
    c.model.encoder = "convnext_test"
    c.model.lstm_hidden = 32
    c.model.drop_path_rate = 0.0
    c.prepare.stage2_slices = 24
  return c
