"""Write a synthetic RSNA 2022 format folder (DICOM, NIfTI masks, CSVs, ground_truth.json).

  python -m data_prep.make_synthetic --out DIR --studies N --seed S [--size full|small|tiny]
      [--test T] [--segmented 0.5] [--corrupt K] [--progress]

The same arguments give byte-identical files (``cspine_jax.synthetic.generate``).
"""
import time

from absl import app
from absl import flags

from cspine_jax import cli_setup
from cspine_jax.synthetic import generate
from cspine_jax.synthetic.studies import SIZES

_OUT = flags.DEFINE_string("out", None, "output folder (created)", required=True)
_STUDIES = flags.DEFINE_integer("studies", None, "number of train studies", required=True)
_SEED = flags.DEFINE_integer("seed", 0, "generator seed")
_SIZE = flags.DEFINE_enum("size", "small", sorted(SIZES), "study size")
_TEST = flags.DEFINE_integer("test", None, "test studies (default: studies // 10, at least 1)")
_SEGMENTED = flags.DEFINE_float("segmented", 0.5, "share of train studies with a segmentation "
                                "mask")
_CORRUPT = flags.DEFINE_integer("corrupt", 0, "number of damaged .dcm files")
_PROGRESS = flags.DEFINE_bool("progress", False, "print a line per study")


def main(argv) -> int:
  cli_setup.begin(argv)
  t = time.perf_counter()
  out = generate(_OUT.value, _STUDIES.value, _SEED.value, size=_SIZE.value, num_test=_TEST.value,
                 segmented_fraction=_SEGMENTED.value, corrupt=_CORRUPT.value,
                 progress=_PROGRESS.value)
  print(f"wrote {out} ({_STUDIES.value} train studies, size {_SIZE.value}) in "
        f"{time.perf_counter() - t:.1f} s")
  return 0


if __name__ == "__main__":
  app.run(main)
