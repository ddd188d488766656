"""Stage-1 pseudo-labels from a trained stage-1 run: the ``--vertebrae`` file for stage-2 records.

    python -m cspine_jax.pseudo_labels --data_dir DATA --records RECORDS --stage1 RUN/stage1 \
        --out RUN/vertebrae.csv --decode template --require_all --calibrate_boxes \
        --box_smoothing 0.15 [--refine RUN/box_refine [--refine_passes 2]] [--workdir RUN]

Reads the fold models under RUN/stage1 and the stage-1 records' preprocessing options and folds
(``cspine_jax.infer.pseudo_labels``), writes the ``--vertebrae`` file for ``data_prep.prepare
--task stage2`` and prints range and box IoU against the masks (ensemble and out of fold); with
``--workdir``, also RUN/inference.json (the rules with what was fitted) for ``cspine_jax.predict``.
Exit status 1 when some studies could not be read, 2 when the run cannot start.
"""
import pathlib
import sys

from absl import app
from absl import flags

from cspine_jax import cli_setup
from cspine_jax import labels as labels_lib
from cspine_jax.infer import pseudo_labels
from cspine_jax.infer import spec
from cspine_jax.localize import derive
from cspine_jax.localize import ranges
from cspine_jax.train import runtime

_DATA_DIR = flags.DEFINE_string("data_dir", None, "RSNA-format folder (train.csv, train_images/)",
                                required=True)
_RECORDS = flags.DEFINE_string("records", None, "records folder holding stage1/ (options, folds)",
                               required=True)
_STAGE1 = flags.DEFINE_string("stage1", None, "stage-1 run folder (fold_*/checkpoints)",
                              required=True)
_OUT = flags.DEFINE_string("out", None, "the --vertebrae CSV to write", required=True)
_REFINE = flags.DEFINE_string(
    "refine", None, "box_refine run folder (fold_*/checkpoints): refine "
    "the boxes (its records under --records/box_refine)")
_REFINE_PASSES = flags.DEFINE_integer(
    "refine_passes", 1, "refiner passes per box, each from the "
    "last one's box (with --refine)")
_WORKDIR = flags.DEFINE_string("workdir", None, "also write WORKDIR/inference.json for "
                               "cspine_jax.predict")
_DECODE = flags.DEFINE_enum("decode", derive.Rules.decode, ranges.DECODERS, "range decoder")
_THRESHOLD = flags.DEFINE_float("threshold", derive.Rules.threshold, "presence threshold")
_BOX_QUANTILE = flags.DEFINE_float("box_quantile", derive.Rules.box_quantile,
                                   "edge quantile of the per-slice boxes (0: their union)")
_BOX_SMOOTHING = flags.DEFINE_float(
    "box_smoothing", derive.Rules.box_smoothing,
    "Gaussian smoothing of the per-slice boxes along the slices, "
    "sigma as a fraction of the C1..C7 span (0: none)")
_REQUIRE_ALL = flags.DEFINE_bool("require_all", False, "every vertebra on >= 1 slice")
_CALIBRATE_BOXES = flags.DEFINE_bool(
    "calibrate_boxes", False, "fit per-vertebra box-edge offsets "
    "on the segmented studies")
_TOP_N = flags.DEFINE_integer("top_n", 7, "written to inference.json")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "images per model call")
_PROGRESS = flags.DEFINE_bool("progress", True, "show progress bars")


def main(argv) -> int:
  cli_setup.begin(argv)
  runtime.start()
  pathlib.Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
  try:
    rules = derive.Rules(threshold=_THRESHOLD.value, box_quantile=_BOX_QUANTILE.value,
                         box_smoothing=_BOX_SMOOTHING.value, decode=_DECODE.value,
                         require_all=_REQUIRE_ALL.value, calibrate_boxes=_CALIBRATE_BOXES.value)
    result = pseudo_labels.label_from_run(_DATA_DIR.value, _STAGE1.value, _RECORDS.value,
                                          _OUT.value, rules=rules, batch_size=_BATCH_SIZE.value,
                                          progress=_PROGRESS.value, refine_dir=_REFINE.value,
                                          refine_passes=_REFINE_PASSES.value)
  except (OSError, ValueError, KeyError) as e:  # missing runs/records, unfittable rules
    print(f"pseudo_labels: error: {e}", file=sys.stderr)
    return 2
  if _WORKDIR.value:
    path = spec.write_spec(_WORKDIR.value, top_n=_TOP_N.value, rules=result["rules"],
                           refine=result["refine_options"] is not None,
                           refine_passes=result["refine_passes"])
    prior = spec.write_prior(pathlib.Path(_WORKDIR.value) / spec.PRIOR,
                             labels_lib.read_train_csv(pathlib.Path(_DATA_DIR.value) / "train.csv"))
    print(f"inference spec -> {path}; prior -> {prior}")
  return 1 if result["failed"] else 0


if __name__ == "__main__":
  app.run(main)
