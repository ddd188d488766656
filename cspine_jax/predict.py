"""Predicts studies from their DICOM files with a trained run folder: the Kaggle submission.

    python -m cspine_jax.predict --studies DIR --workdir RUN --out submission.csv
        [--prior train.csv|prior.json] [--top_n 7] [--json_dir D] [--png_dir D] [--batch_size 32]
        [--decode_workers N] [--series auto|strict|UID] [--noresume] [--noprogress]

DIR is a ``test_images/`` folder of study folders or one study folder. Writes the long-format
submission (``row_id,fractured``; 8 rows per study), one JSON per study (probabilities, ranges,
boxes), ``<out>.errors.json`` listing every study that fell back to the prior (with the reason)
and, with ``--png_dir``, a picture per study (``cspine_jax.infer.predict``). Exit status 2 when
the run cannot start (no studies, a bad run folder or prior).

Killed and started again with the same command, it goes on after the studies it finished: their
JSON files hold their results and the run folder's fingerprint (RUN/inference.json, the
checkpoints, top-N, the prior, --series), and a study whose JSON is missing, unreadable or from
another run folder is predicted again; the submission is the one an unbroken run writes.
"""
import pathlib
import sys

from absl import app
from absl import flags

# Only what the spawned decoder processes need when they re-import this module: no JAX.
from cspine_jax import cli_setup
from cspine_jax import labels as labels_lib
from cspine_jax.io import dicom

_STUDIES = flags.DEFINE_string("studies",
                               None,
                               "test_images/ folder, or one study folder",
                               required=True)
_WORKDIR = flags.DEFINE_string("workdir",
                               None,
                               "run folder: stage1/, stage2/, inference.json",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "submission CSV (row_id,fractured)", required=True)
_PRIOR = flags.DEFINE_string("prior", None, "train.csv or prior.json for fallbacks (default "
                             "RUN/prior.json)")
_TOP_N = flags.DEFINE_integer("top_n", None, "patient_overall over the top-N vertebrae (default: "
                              "the run's)")
_JSON_DIR = flags.DEFINE_string("json_dir", None, "per-study JSON folder (default: "
                                "<out>_studies/)")
_PNG_DIR = flags.DEFINE_string("png_dir", None, "write a per-study PNG here")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "images per model call")
_DECODE_WORKERS = flags.DEFINE_integer(
    "decode_workers", None, "processes decoding studies ahead (default: half the CPU cores on "
    "machines with 4 or more; 0: one reader thread)")
_STUDIES_PER_BATCH = flags.DEFINE_integer("studies_per_batch", 4, "studies per stage-2 call")
_SERIES = flags.DEFINE_string(
    "series", dicom.AUTO_SERIES, "a folder with several series: 'auto' reads the one with the "
    "most axial slices (noted in the study's JSON), 'strict' lets such a study fall back, or a "
    "SeriesInstanceUID")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")
_RESUME = flags.DEFINE_bool("resume", True, "take the studies whose JSON in --json_dir this run "
                            "folder and these options already wrote as done (--noresume: "
                            "predict every study again)")


def main(argv) -> int:
  cli_setup.begin(argv)
  from cspine_jax.infer import ensemble  # lazy: decoder processes re-import this module
  from cspine_jax.infer import predict  # lazy: decoder processes re-import this module
  from cspine_jax.infer import spec  # lazy: decoder processes re-import this module
  from cspine_jax.report import study_png  # lazy: decoder processes re-import this module
  from cspine_jax.train import runtime  # lazy: decoder processes re-import this module
  runtime.start()
  out = pathlib.Path(_OUT.value)
  run_dir = pathlib.Path(_WORKDIR.value)
  try:
    folders = predict.find_studies(_STUDIES.value)
    prior = spec.load_prior(_PRIOR.value or run_dir / spec.PRIOR)
    models = spec.load_models(run_dir, _TOP_N.value)
  except (ensemble.PredictError, labels_lib.TableError) as e:
    print(f"predict: error: {e}", file=sys.stderr)
    return 2
  json_dir = _JSON_DIR.value or out.with_name(out.stem + "_studies")
  series_uid = None if _SERIES.value == "strict" else _SERIES.value
  fingerprint = predict.run_fingerprint(run_dir, top_n=models.top_n, prior=prior,
                                        series_uid=series_uid)
  done = predict.finished(folders, json_dir, fingerprint) if _RESUME.value else {}
  if done:
    print(f"predict: resuming: {len(done)} of {len(folders)} studies already predicted with "
          f"this run folder (their JSON in {json_dir}); predicting the other "
          f"{len(folders) - len(done)}")
  writers = [predict.json_writer(json_dir, fingerprint)]
  if _PNG_DIR.value:
    writers.append(study_png.png_writer(_PNG_DIR.value))
  workers = _DECODE_WORKERS.value
  result = predict.run(
      folders,
      models,
      prior,
      batch_size=_BATCH_SIZE.value,
      studies_per_batch=_STUDIES_PER_BATCH.value,
      decode_workers=predict.default_decode_workers() if workers is None else workers,
      on_study=lambda res, series: [w(res, series) for w in writers],
      progress=_PROGRESS.value,
      series_uid=series_uid,
      done=done)
  paths = predict.write_outputs(result, out)
  unnamed = sum(r.uid is None for r in result.results)
  twice = sum(r.duplicate_of is not None for r in result.results)
  fallback = sum(r.status == "fallback" and r.uid is not None for r in result.results)
  per = {k: v / max(len(folders) - len(done), 1) for k, v in result.seconds.items()}
  print(f"predict: {len(folders)} studies ({fallback} fell back to the prior" +
        (f", {unnamed} without a StudyInstanceUID have no rows" if unnamed else "") +
        (f", {twice} repeating an earlier folder's StudyInstanceUID have no rows" if twice
         else "") +
        f") -> {paths['submission']}; errors -> {paths['errors']}; per-study JSON -> {json_dir}")
  print("seconds per study: " + ", ".join(f"{k} {v:.3f}" for k, v in per.items()))
  return 0


if __name__ == "__main__":
  app.run(main)
