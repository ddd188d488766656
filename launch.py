"""Entry point: python launch.py --config=configs/<name>.py[:variant] [--workdir=DIR] [--config.x=y].

One config, one run (``cspine_jax.pipeline.runner``): a model config trains that model, e.g.

  python launch.py --config=configs/stage2.py:cpu --workdir=runs/stage2_cpu
  python launch.py --config=configs/stage2.py --config.data_dir=/data/rsna --config.fold=-1 \
      --config.optimizer.lr=3e-4 --workdir=runs/stage2

and a method config runs the whole method: ``configs/demo.py`` ends with the results table and
the two-stage and prior metrics (figures in WORKDIR/results.json). Every config field can be
overridden with ``--config.<field>=<value>``; a rerun skips the steps that finished and resumes
the one that was stopped (WORKDIR/pipeline.json).
All work happens under ``if __name__ == "__main__"``: grain worker processes re-import this module.
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from cspine_jax import cli_setup

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with a variant: configs/stage2.py:cpu",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, logs, predictions); "
                               "default runs/<config name>")


def default_workdir(config_path: str) -> str:
  """runs/<file stem>[_<variant>] for ``configs/stage2.py:cpu`` -> runs/stage2_cpu."""
  path, _, variant = config_path.partition(":")
  stem = path.rsplit("/", 1)[-1].removesuffix(".py")
  return f"runs/{stem}_{variant.split(',')[0]}" if variant else f"runs/{stem}"


def main(argv) -> int:
  cli_setup.begin(argv)
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/stage2.py:cpu")
  workdir = _WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS["config"]))
  from cspine_jax.pipeline import runner  # lazy: grain worker processes re-import this module
  runner.run(config, workdir)
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
