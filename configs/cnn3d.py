"""3D CNN baseline: 3 blocks (conv, activation, pooling, normalisation) + fully connected -> 8 targets.

Paper: 224^3 volumes, random rotation + horizontal flip, AdamW + cosine annealing. ``:cpu`` uses
32^3 volumes and narrow blocks.
"""
from configs import common

VARIANTS = ("", "cpu")


def get_config(arg: str | None = None):
  variant, _ = common.parse_arg(arg)
  common.check_variant(variant, VARIANTS, "cnn3d")
  c = common.base("cnn3d")
  c.model.name = "cnn3d"
  c.model.channels = (32, 64, 128)
  c.model.hidden = (256,)
  c.model.dropout = 0.3
  c.prepare.cube_size = 224
  c.input.batch_size = 8
  c.train.epochs = 20
  if variant == "cpu":
    common.cpu(c, 64)
    c.prepare.cube_size = 32
    c.model.channels = (8, 16, 32)
    c.model.hidden = (64,)
  return c
