"""Write a synthetic RSNA 2022 format folder (DICOM, NIfTI masks, CSVs, ground_truth.json).

  python -m data_prep.make_synthetic --out DIR --studies N --seed S [--size full|small|tiny]
      [--test T] [--segmented 0.5] [--corrupt K] [--progress]

The same arguments give byte-identical files.
"""
from __future__ import annotations

import argparse
import sys
import time

from cspine_jax.synthetic import generate
from cspine_jax.synthetic.studies import SIZES


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output folder (created)")
  p.add_argument("--studies", type=int, required=True, help="number of train studies")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--size", choices=sorted(SIZES), default="small")
  p.add_argument("--test", type=int, default=None,
                 help="test studies (default: studies // 10, at least 1)")
  p.add_argument("--segmented", type=float, default=0.5,
                 help="share of train studies with a segmentation mask")
  p.add_argument("--corrupt", type=int, default=0, help="number of damaged .dcm files")
  p.add_argument("--progress", action="store_true", help="print a line per study")
  args = p.parse_args(argv)
  t = time.perf_counter()
  out = generate(args.out, args.studies, args.seed, size=args.size, num_test=args.test,
                 segmented_fraction=args.segmented, corrupt=args.corrupt, progress=args.progress)
  print(f"wrote {out} ({args.studies} train studies, size {args.size}) in "
        f"{time.perf_counter() - t:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
