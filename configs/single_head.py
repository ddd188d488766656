"""2D single-head baseline: ConvNeXt-Tiny per slice -> 14 logits (7 presence + 7 fracture).

Per study: per-vertebra probability pooled over the slices that show it, patient_overall = max.
``:cpu`` uses a tiny encoder at 64 px.
"""
from configs import common

VARIANTS = ("", "cpu")


def get_config(arg: str | None = None):
  variant, _ = common.parse_arg(arg)
  common.check_variant(variant, VARIANTS, "single_head")
  c = common.base("slices2d")
  c.model.name = "single_head"
  c.model.encoder = "convnext_tiny"
  c.model.drop_path_rate = 0.1
  c.eval.overall = "max"
  c.input.batch_size = 32
  c.train.epochs = 5
  if variant == "cpu":
    common.cpu(c, 64)
    c.model.encoder = "convnext_test"
    c.model.drop_path_rate = 0.0
    c.input.batch_size = 16
  return c
