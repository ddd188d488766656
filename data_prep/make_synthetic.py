"""Write a synthetic RSNA 2022 format folder (DICOM, NIfTI masks, CSVs, ground_truth.json).

  python -m data_prep.make_synthetic --out DIR --studies N --seed S [--size full|small|tiny]
      [--difficulty easy|realistic|hard] [--test T] [--segmented F] [--corrupt K] [--workers W]
      [--progress]

The same arguments give byte-identical files (``cspine_jax.synthetic.generate``); --difficulty easy
gives the files of the original generator. --segmented defaults to the difficulty's share of
studies with a mask (easy 0.5; realistic and hard 87 of 2,019, as in the RSNA set).
"""
import time

from absl import app
from absl import flags

from cspine_jax import cli_setup
from cspine_jax.synthetic import generate
from cspine_jax.synthetic.difficulty import DEFAULT as DEFAULT_DIFFICULTY
from cspine_jax.synthetic.difficulty import LEVELS
from cspine_jax.synthetic.studies import SIZES

_OUT = flags.DEFINE_string("out", None, "output folder (created)", required=True)
_STUDIES = flags.DEFINE_integer("studies", None, "number of train studies", required=True)
_SEED = flags.DEFINE_integer("seed", 0, "generator seed")
_SIZE = flags.DEFINE_enum("size", "small", sorted(SIZES), "study size")
_DIFFICULTY = flags.DEFINE_enum("difficulty", DEFAULT_DIFFICULTY, list(LEVELS),
                                "generator level (cspine_jax/synthetic/difficulty.py)")
_TEST = flags.DEFINE_integer("test", None, "test studies (default: studies // 10, at least 1)")
_SEGMENTED = flags.DEFINE_float("segmented", None, "share of train studies with a segmentation "
                                "mask (default: the difficulty's)")
_CORRUPT = flags.DEFINE_integer("corrupt", 0, "number of damaged .dcm files")
_WORKERS = flags.DEFINE_integer("workers", 1, "processes writing studies (same files for any count)")
_PROGRESS = flags.DEFINE_bool("progress", False, "print a line per study")


def main(argv) -> int:
  cli_setup.begin(argv)
  t = time.perf_counter()
  out = generate(_OUT.value, _STUDIES.value, _SEED.value, size=_SIZE.value, num_test=_TEST.value,
                 segmented_fraction=_SEGMENTED.value, corrupt=_CORRUPT.value,
                 progress=_PROGRESS.value, workers=_WORKERS.value, difficulty=_DIFFICULTY.value)
  print(f"wrote {out} ({_STUDIES.value} train studies, size {_SIZE.value}, difficulty "
        f"{_DIFFICULTY.value}) in {time.perf_counter() - t:.1f} s")
  return 0


if __name__ == "__main__":
  app.run(main)
