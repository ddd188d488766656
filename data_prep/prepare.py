"""Turns an RSNA-format folder into one ArrayRecord record set.

    python -m data_prep.prepare --data_dir DIR --out OUT --task {stage1,stage2,cnn3d,slices2d}
        [--workers N] [--vertebrae FILE] [--image_size 224 [224]] [--num_folds 5] [--fold_seed 0]
        [--window_level 400] [--window_width 1800] [--stage2_slices 24] [--crop_margin 0.1]
        [--cube_size 64] [--cnn3d_crop] [--start_method auto] [--no_progress]

Writes OUT/TASK/<StudyInstanceUID>.array_record (one shard per study) and OUT/TASK/manifest.json.
Re-running the same command after a crash finishes the set; other arguments on the same OUT/TASK
are refused. Exit status 0 on success (bad studies are listed in the manifest and on stderr), 2 on
bad arguments or data that stops the whole run.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from cspine_jax.records import pipeline
from cspine_jax.pp import options as options_lib


def options_parser() -> argparse.ArgumentParser:
  """The preprocessing options shared by this command and the TFDS/Beam entry point."""
  d = options_lib.Options()
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument("--image_size", type=int, nargs="+", default=list(d.image_size),
                 help="H [W] of 2D images (paper 224)")
  p.add_argument("--window_level", type=float, default=d.window_level)
  p.add_argument("--window_width", type=float, default=d.window_width)
  p.add_argument("--num_folds", type=int, default=d.num_folds)
  p.add_argument("--fold_seed", type=int, default=d.fold_seed)
  p.add_argument("--stage2_slices", type=int, default=d.stage2_slices)
  p.add_argument("--crop_margin", type=float, default=d.crop_margin)
  p.add_argument("--cube_size", type=int, default=d.cube_size, help="cnn3d cube edge (paper 224)")
  p.add_argument("--cnn3d_crop", action="store_true", help="cnn3d: crop to C1-C7 first")
  p.add_argument("--stage2_locate", choices=options_lib.STAGE2_LOCATE, default=d.stage2_locate,
                 help="stage-2 crops from the mask where there is one, or from --vertebrae always")
  return p


def options_from_args(args: argparse.Namespace) -> options_lib.Options:
  size = args.image_size
  if len(size) not in (1, 2):
    raise ValueError(f"--image_size takes H or H W, got {size}")
  return options_lib.Options(
      image_size=(size[0], size[-1]), window_level=args.window_level,
      window_width=args.window_width, num_folds=args.num_folds, fold_seed=args.fold_seed,
      stage2_slices=args.stage2_slices, crop_margin=args.crop_margin, cube_size=args.cube_size,
      cnn3d_crop=args.cnn3d_crop, stage2_locate=args.stage2_locate)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data_prep.prepare", parents=[options_parser()],
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", required=True, help="RSNA-format folder (train.csv, ...)")
  parser.add_argument("--out", required=True, help="output root; writes OUT/TASK/")
  parser.add_argument("--task", required=True, choices=sorted(pipeline.TASKS))
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--vertebrae", default=None,
                      help="stage-1 predictions CSV (records/vertebrae.py) for unsegmented studies")
  parser.add_argument("--start_method", default="auto",
                      choices=["auto", "spawn", "forkserver", "fork"],
                      help="worker start; auto = fork when safe (no threads, no JAX), else spawn")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  try:
    options = options_from_args(args)
    manifest = pipeline.prepare(args.data_dir, args.out, args.task, options,
                                vertebrae_file=args.vertebrae, workers=args.workers,
                                progress=not args.no_progress, start_method=args.start_method)
  except (ValueError, OSError) as e:
    print(f"prepare: error: {e}", file=sys.stderr)
    return 2
  if manifest["skipped_studies"]:
    reasons = sorted({s["reason"] for s in manifest["skipped_studies"]})
    print(f"prepare: {len(manifest['skipped_studies'])} studies not used by {args.task}: "
          f"{'; '.join(reasons)}", file=sys.stderr)
  for bad in manifest["bad_studies"]:
    print(f"prepare: bad study {bad['study_uid']}: {bad['reason']}", file=sys.stderr)
  print(f"{args.task}: {manifest['num_records']} records from {manifest['num_studies']} studies "
        f"({len(manifest['bad_studies'])} bad) -> {os.path.join(args.out, args.task)}; "
        f"records per fold {manifest['records_per_fold']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
