"""Turns an RSNA-format folder into one ArrayRecord record set.

    python -m data_prep.prepare --data_dir DIR --out OUT
        --task {stage1,box_refine,stage2,cnn3d,slices2d} [--workers N] [--vertebrae FILE]
        [--image_size 224[,224]] [--num_folds 5] [--fold_seed 0] [--window_level 400]
        [--window_width 1800] [--stage2_slices 24] [--crop_margin 0.1] [--cube_size 64]
        [--cnn3d_crop] [--stage2_locate mask|vertebrae] [--start_method auto] [--noprogress]

Writes OUT/TASK/<StudyInstanceUID>.array_record (one shard per study) and OUT/TASK/manifest.json
(``cspine_jax.records.pipeline.prepare``). Re-running the same command after a crash finishes the
set; other options on the same OUT/TASK are refused. Exit status 0 on success (bad studies are
listed in the manifest and on stderr), 1 on a flag error, 2 on bad options or data that stops the
whole run.
"""
import os
import sys

from absl import app
from absl import flags

from cspine_jax import cli_setup
from cspine_jax.records import pipeline
from data_prep import pp_flags

_DATA_DIR = flags.DEFINE_string("data_dir", None, "RSNA-format folder (train.csv, ...)",
                                required=True)
_OUT = flags.DEFINE_string("out", None, "output root; writes OUT/TASK/", required=True)
_TASK = flags.DEFINE_enum("task", None, sorted(pipeline.TASKS), "record set to write",
                          required=True)
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "worker processes")
_VERTEBRAE = flags.DEFINE_string("vertebrae", None, "stage-1 predictions CSV (io/vertebrae.py) "
                                 "for unsegmented studies")
_START_METHOD = flags.DEFINE_enum("start_method", "auto", ["auto", "spawn", "forkserver", "fork"],
                                  "worker start; auto = fork when safe (no threads, no JAX), "
                                  "else spawn")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")
flags.adopt_module_key_flags(pp_flags)  # listed by --help, not only --helpfull


def main(argv) -> int:
  cli_setup.begin(argv)
  task = _TASK.value
  try:
    manifest = pipeline.prepare(_DATA_DIR.value, _OUT.value, task, pp_flags.options(),
                                vertebrae_file=_VERTEBRAE.value, workers=_WORKERS.value,
                                progress=_PROGRESS.value, start_method=_START_METHOD.value)
  except (ValueError, OSError) as e:
    print(f"prepare: error: {e}", file=sys.stderr)
    return 2
  if manifest["skipped_studies"]:
    reasons = sorted({s["reason"] for s in manifest["skipped_studies"]})
    print(f"prepare: {len(manifest['skipped_studies'])} studies not used by {task}: "
          f"{'; '.join(reasons)}", file=sys.stderr)
  for bad in manifest["bad_studies"]:
    print(f"prepare: bad study {bad['study_uid']}: {bad['reason']}", file=sys.stderr)
  print(f"{task}: {manifest['num_records']} records from {manifest['num_studies']} studies "
        f"({len(manifest['bad_studies'])} bad) -> {os.path.join(_OUT.value, task)}; "
        f"records per fold {manifest['records_per_fold']}")
  return 0


if __name__ == "__main__":
  app.run(main)
