"""Scores predictions with the competition metric and prints evaluation tables.

  python evaluate.py --labels train.csv --predictions PRED.csv [--folds FOLDS.csv] [--subset]
      [--predictions NAME=OTHER.csv ...] [--train_labels TRAIN.csv] [--plot reliability.png]

PRED.csv is wide (StudyInstanceUID, patient_overall, C1..C7) or Kaggle long (row_id, fractured).
Every labelled study must be predicted unless --subset says to score only the predicted ones (the
count left out is printed). Reports print first; the last line is always
``competition_score: <value>`` so scripts can read it with ``tail -n 1``.

The first --predictions is the one scored; more (``NAME=PATH``, e.g. ``"3D CNN=cnn3d_oof.csv"``) join
it in the results table beside the constant-prior baseline (the label means of --train_labels,
default --labels). --plot writes the first predictions' reliability diagram
(``cspine_jax.report.evaluation``). Exit status 2 on bad input files.
"""
import sys

from absl import app
from absl import flags

from cspine_jax import cli_setup
from cspine_jax.report import evaluation

_LABELS = flags.DEFINE_string("labels", None, "train.csv (StudyInstanceUID, patient_overall, "
                              "C1..C7)", required=True)
_PREDICTIONS = flags.DEFINE_multi_string(
    "predictions", None, "predictions CSV, wide or Kaggle long, as PATH or NAME=PATH; repeat it "
    "to compare models (the first is scored)", required=True)
_TRAIN_LABELS = flags.DEFINE_string("train_labels", None, "train.csv whose label means are the "
                                    "prior baseline (default: --labels)")
_PLOT = flags.DEFINE_string("plot", None, "write the reliability diagram of the first predictions "
                            "here")
_FOLDS = flags.DEFINE_string("folds", None, "CSV with StudyInstanceUID, fold (default: the "
                             "predictions' own fold column, if any)")
_SUBSET = flags.DEFINE_bool("subset", False, "score only the labelled studies that were predicted")


def main(argv) -> int:
  cli_setup.begin(argv)
  try:
    score, blocks = evaluation.evaluate(
        _LABELS.value, _PREDICTIONS.value, train_labels=_TRAIN_LABELS.value, folds=_FOLDS.value,
        subset=_SUBSET.value, plot=_PLOT.value)
  except evaluation.INPUT_ERRORS as e:
    print(f"evaluate: error: {e}", file=sys.stderr)
    return 2
  for block in blocks:
    print(block)
    print()
  print(f"competition_score: {score:.6f}")
  return 0


if __name__ == "__main__":
  app.run(main)
