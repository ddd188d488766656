"""Entry point: python launch.py --config=configs/stage2.py[:variant] [--workdir=DIR] [--config.x=y].

Trains the configured model (``cspine_jax.train.loop.train_and_evaluate``): e.g.

  python launch.py --config=configs/stage2.py:cpu --workdir=runs/stage2_cpu
  python launch.py --config=configs/stage2.py --config.data_dir=/data/rsna --config.fold=-1 \
      --config.optimizer.lr=3e-4 --workdir=runs/stage2

``configs/demo.py`` runs the whole demo pipeline instead (``cspine_jax.demo.run_demo``); its
output ends with the results table and the two-stage and prior metrics (figures in
WORKDIR/results.json). A training run writes its summary to WORKDIR/result.json.
Every config field can be overridden with ``--config.<field>=<value>``. With no data_dir a small
synthetic RSNA-format set is generated and prepared once beside the workdir.
All work happens under ``if __name__ == "__main__"``: grain worker processes re-import this module.
"""
import json
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, optionally with a variant: configs/stage2.py:cpu",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, logs, predictions); "
                               "default runs/<config name>")


RESULT = "result.json"  # WORKDIR/result.json: what train_and_evaluate returned (training runs)


def default_workdir(config_path: str) -> str:
  """runs/<file stem>[_<variant>] for ``configs/stage2.py:cpu`` -> runs/stage2_cpu."""
  path, _, variant = config_path.partition(":")
  stem = path.rsplit("/", 1)[-1].removesuffix(".py")
  return f"runs/{stem}_{variant.split(',')[0]}" if variant else f"runs/{stem}"


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/stage2.py:cpu")
  workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
  # Library INFO records (orbax's per-checkpoint lines) would bury the progress and the tables;
  # an explicit --verbosity wins.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  # Imports after flag parsing (and only in the main process: grain workers re-import this file).
  if config.get("demo"):  # configs/demo.py: the whole pipeline, not one model
    from cspine_jax import demo  # pylint: disable=g-import-not-at-top
    # Its figures go to WORKDIR/results.json; the output ends with the results table and metrics.
    demo.run_demo(config, workdir)
    return 0
  from cspine_jax.train import loop  # pylint: disable=g-import-not-at-top
  result = loop.train_and_evaluate(config, workdir)
  path = pathlib.Path(workdir) / RESULT
  path.write_text(json.dumps(result, indent=1, default=str) + "\n")
  print(f"result: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
