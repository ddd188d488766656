"""2D multi-head baseline: EfficientNetV2-S encoder, two parallel FC heads (presence, fracture).

Per study: patient_overall = 1 - prod(1 - p) over the vertebrae. ``:cpu`` uses a tiny encoder at
64 px.
"""
from configs import common

VARIANTS = ("", "cpu")


def get_config(arg: str | None = None):
  variant, _ = common.parse_arg(arg)
  common.check_variant(variant, VARIANTS, "multi_head")
  c = common.base("slices2d")
  c.model.name = "multi_head"
  c.model.encoder = "efficientnet_v2_s"
  c.model.head_hidden = 512
  c.model.drop_path_rate = 0.1
  c.eval.overall = "top_n"
  c.input.batch_size = 32
  c.train.epochs = 5
  if variant == "cpu":
    common.cpu(c, 64)
    c.model.encoder = "efficientnet_v2_test"
    c.model.head_hidden = 64
    c.model.drop_path_rate = 0.0
    c.input.batch_size = 16
  return c
