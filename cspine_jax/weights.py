"""Pretrained encoder weights: a sub-command word, then its flags.

    python -m cspine_jax.weights import --source PATH --model convnext_tiny --out DIR [--in_chans 3]

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
                             "efficientnet_v2_tf_s")
_OUT = flags.DEFINE_string("out", None, "output folder (must not hold params/ yet)")
_IN_CHANS = flags.DEFINE_integer("in_chans", 3, "input channels of the encoder (stem adapted as "
                                 "timm does)")
flags.DEFINE_alias("in-chans", "in_chans")  # the spelling of the argparse version


def _require(command: str, *holders: flags.FlagHolder) -> None:
  missing = [f"--{h.name}" for h in holders if h.value is None]
  if missing:
    raise app.UsageError(f"{command} needs {', '.join(missing)}")


def _import() -> int:
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


# Sub-commands by their word (argv[1]).
_COMMANDS: dict[str, Callable[[], int]] = {"import": _import}


def main(argv) -> int:
  if len(argv) < 2 or argv[1] not in _COMMANDS:
    got = f"unknown command {argv[1]!r}" if len(argv) > 1 else "no command"
    raise app.UsageError(f"{got}; expected one of: {', '.join(_COMMANDS)}")
  if len(argv) > 2:
    raise app.UsageError(f"unexpected arguments: {argv[2:]}")
  cli_setup.quiet_library_logs()
  return _COMMANDS[argv[1]]()


if __name__ == "__main__":
  app.run(main)
