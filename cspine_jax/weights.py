"""timm -> Flax NNX weight conversion for the image encoders (ConvNeXt, EfficientNetV2).

Two entry points:

* `load_pretrained(encoder, path)` copies pretrained weights into an existing encoder
  (`models.convnext.ConvNeXt` or `models.efficientnet_v2.EfficientNetV2`) in place. `path` is a
  timm state dict file (`.safetensors`; `.pth`/`.pt`/`.bin` need torch and are read with
  `torch.load(weights_only=True)`), or a folder written by the importer below. This is what
  `config.model.pretrained = PATH` calls right after the encoder is built; it raises
  `WeightsError` naming the file and every missing / unexpected / wrongly shaped tensor, so a
  partial load never passes silently. An encoder with `in_chans != 3` gets timm's
  `adapt_input_conv` of the RGB stem (1 channel: sum over RGB; C > 3: RGB repeated ceil(C/3)
  times, cut to C, times 3/C).
* `python -m cspine_jax.weights import --source PATH --model convnext_tiny --out DIR` converts a
  timm file once and saves the Flax parameters and BatchNorm statistics with orbax in
  `DIR/params` plus `DIR/encoder.json` (model name, variant, in_chans, source, shapes).

Model names are `<family>_<variant>`: `convnext_{atto,femto,pico,nano,tiny,small,test}`,
`efficientnet_v2_{s,tf_s,test,tf_test}`. timm's `tf_efficientnetv2_s.*` weights need
`efficientnet_v2_tf_s` (TF "SAME" padding, BN eps 1e-3); `efficientnetv2_s` ones need
`efficientnet_v2_s`.

Each family has ONE mapping table (`CONVNEXT_RULES`, `EFFNET_RULES`): a full-match regex over the
cleaned timm key, the Flax parameter path it becomes, and the layout change ("conv": torch
(O, I, kh, kw) -> Flax (kh, kw, I, O), which also maps depthwise (C, 1, kh, kw) to
`layers.DepthwiseConv2d`'s (kh, kw, 1, C); "linear": torch (out, in) -> (in, out), also for
timm's conv_mlp 1x1 convs (out, in, 1, 1); "copy"). Norm leaves map weight/bias/running_mean/
running_var -> scale/bias/mean/var. Classifier heads and `num_batches_tracked` are dropped.
Wrapper dicts (`state_dict`, `model`, `module`, `state_dict_ema`) and key prefixes (`module.`,
`model.`, `_orig_mod.`) are stripped first.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


from cspine_jax.models import pretrained


def main(argv: Sequence[str] | None = None,
         print_fn: Callable[[str], None] = print) -> int:
  parser = argparse.ArgumentParser(prog="python -m cspine_jax.weights", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="convert a timm weights file into an orbax folder")
  imp.add_argument("--source", required=True, help="timm .safetensors / .pth / .bin file")
  imp.add_argument("--model", required=True,
                   help="encoder name, e.g. convnext_tiny, efficientnet_v2_tf_s")
  imp.add_argument("--out", required=True, help="output folder (must not hold params/ yet)")
  imp.add_argument("--in-chans", type=int, default=3,
                   help="input channels of the encoder (stem adapted as timm does)")
  args = parser.parse_args(argv)
  try:
    out, report = pretrained.import_timm(args.source, args.model, args.out, in_chans=args.in_chans)
  except pretrained.WeightsError as e:
    print_fn(f"error: {e}")
    return 1
  adapted = (f", stem adapted from {report.stem_adapted_from} to {args.in_chans} channels"
             if report.stem_adapted_from else "")
  print_fn(f"imported {report.num_tensors} tensors from {args.source} as {args.model}"
           f"{adapted} -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
