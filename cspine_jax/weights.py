"""Pretrained encoder weights: a sub-command word, then its arguments and flags.

    python -m cspine_jax.weights fetch TAG [TAG ...] [--model NAME] [--out DIR]
    python -m cspine_jax.weights import --source PATH --model convnext_tiny --out DIR [--in_chans 3]

``fetch`` takes timm tags (``convnext_tiny.fb_in22k_ft_in1k``,
``tf_efficientnetv2_s.in21k_ft_in1k``): it downloads ``model.safetensors`` of the Hugging Face
repository ``timm/TAG`` through huggingface_hub into the Hugging Face cache (``HF_HOME`` /
``HF_HUB_CACHE``; with ``HF_HUB_OFFLINE=1`` it only looks there) and converts it for the tag's
encoder (``convnext_tiny``, ``efficientnet_v2_tf_s``; ``--model`` overrides) into ``DIR``
(default ``$CSPINE_JAX_WEIGHTS/TAG``, ``~/.cache/cspine_jax/weights/TAG``).
``config.model.pretrained = "timm:TAG"`` then finds it (or the file in the Hugging Face cache)
when a model is built; training never downloads. A tag already converted is left as it is.

``import`` converts a timm state dict file (``.safetensors``; ``.pth``/``.pt``/``.bin`` need torch)
once and saves the Flax parameters and BatchNorm statistics with orbax in ``DIR/params`` plus
``DIR/encoder.json`` (model name, variant, in_chans, source, shapes); ``config.model.pretrained =
DIR`` then loads it (``cspine_jax.models.pretrained``). Model names are ``<family>_<variant>``:
``convnext_{atto,femto,pico,nano,tiny,small,test}``, ``efficientnet_v2_{s,tf_s,test,tf_test}``
(timm's ``tf_efficientnetv2_s.*`` weights need ``efficientnet_v2_tf_s``). ``--in_chans`` other
than 3 adapts the RGB stem as timm does. Exit status 1 when the weights cannot be read or do not
fit the encoder (every missing, unexpected or wrongly shaped tensor is named).
"""
import sys
from collections.abc import Callable

from absl import app
from absl import flags

from cspine_jax import cli_setup
from cspine_jax.models import pretrained

_SOURCE = flags.DEFINE_string("source", None, "import: timm .safetensors / .pth / .bin file")
_MODEL = flags.DEFINE_string("model", None, "encoder name, e.g. convnext_tiny, "
                             "efficientnet_v2_tf_s (fetch: default from the tag)")
_OUT = flags.DEFINE_string("out", None, "output folder (import: must not hold params/ yet; "
                           "fetch: default the weights cache)")
_IN_CHANS = flags.DEFINE_integer("in_chans", 3, "input channels of the encoder (stem adapted as "
                                 "timm does)")
flags.DEFINE_alias("in-chans", "in_chans")  # the spelling of the argparse version


def _require(command: str, *holders: flags.FlagHolder) -> None:
  missing = [f"--{h.name}" for h in holders if h.value is None]
  if missing:
    raise app.UsageError(f"{command} needs {', '.join(missing)}")


def _fetch(tags: list[str]) -> int:
  if not tags:
    raise app.UsageError("fetch needs a timm tag, e.g. convnext_tiny.fb_in22k_ft_in1k")
  if len(tags) > 1 and _OUT.value is not None:
    raise app.UsageError("fetch --out takes one tag")
  for tag in tags:
    try:
      done = pretrained.fetch_timm(tag, model=_MODEL.value, out=_OUT.value)
    except pretrained.WeightsError as e:
      print(f"weights: error: {e}", file=sys.stderr)
      return 1
    what = (f"converted {done.num_tensors} tensors as {done.model}" if done.converted else
            f"already converted as {done.model}")
    print(f"{tag}: {done.hub_file} -> {done.folder} ({what}); use "
          f"model.pretrained='{pretrained.TIMM_SCHEME}{tag}'")
  return 0


def _import(args: list[str]) -> int:
  if args:
    raise app.UsageError(f"unexpected arguments: {args}")
  _require("import", _SOURCE, _MODEL, _OUT)
  try:
    out, report = pretrained.import_timm(_SOURCE.value, _MODEL.value, _OUT.value,
                                         in_chans=_IN_CHANS.value)
  except pretrained.WeightsError as e:
    print(f"weights: error: {e}", file=sys.stderr)
    return 1
  adapted = (f", stem adapted from {report.stem_adapted_from} to {_IN_CHANS.value} channels"
             if report.stem_adapted_from else "")
  print(f"imported {report.num_tensors} tensors from {_SOURCE.value} as {_MODEL.value}"
        f"{adapted} -> {out}")
  return 0


# Sub-commands by their word (argv[1]); each gets the arguments after it.
_COMMANDS: dict[str, Callable[[list[str]], int]] = {"fetch": _fetch, "import": _import}


def main(argv) -> int:
  if len(argv) < 2 or argv[1] not in _COMMANDS:
    got = f"unknown command {argv[1]!r}" if len(argv) > 1 else "no command"
    raise app.UsageError(f"{got}; expected one of: {', '.join(_COMMANDS)}")
  cli_setup.quiet_library_logs()
  return _COMMANDS[argv[1]](list(argv[2:]))


if __name__ == "__main__":
  app.run(main)
