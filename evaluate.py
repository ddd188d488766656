"""Scores predictions with the competition metric and prints evaluation tables.

  python evaluate.py --labels train.csv --predictions PRED.csv [--folds FOLDS.csv] [--subset]
      [--predictions NAME=OTHER.csv ...] [--train_labels TRAIN.csv] [--plot reliability.png]

PRED.csv is wide (StudyInstanceUID, patient_overall, C1..C7) or Kaggle long (row_id, fractured).
Every labelled study must be predicted unless --subset says to score only the predicted ones (the
count left out is printed). Reports print first; the last line is always
``competition_score: <value>`` so scripts can read it with ``tail -n 1``.

The first --predictions is the one scored; more (``NAME=PATH``, e.g. ``"3D CNN=cnn3d_oof.csv"``) join
it in the results table beside the constant-prior baseline (the label means of --train_labels,
default --labels). --plot writes the first predictions' reliability diagram.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable, Sequence

import pandas as pd

from cspine_jax import labels as labels_lib
from cspine_jax import metrics
from cspine_jax.report import tables


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What every report sees: validated labels and predictions (same studies) and optional folds."""
  labels: pd.DataFrame
  predictions: pd.DataFrame
  folds: dict[str, int]
  # All named predictions (the scored one first) and the labels whose means are the prior.
  models: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)
  train_labels: pd.DataFrame | None = None


def _summary(inp: Inputs) -> str:
  positives = inp.labels[list(labels_lib.TARGETS)].sum()
  return (f"studies: {len(inp.labels)}  fractured patients: {int(positives['patient_overall'])}  "
          f"fractured vertebrae: {int(positives[list(labels_lib.VERTEBRAE)].sum())}")


def _scores(inp: Inputs) -> str:
  return tables.format_table(tables.score_table(inp.labels, inp.predictions, inp.folds or None),
                             "Competition metric (overall and per fold)")


def _aucs(inp: Inputs) -> str:
  return tables.format_table(tables.auc_table(inp.labels, inp.predictions), "ROC AUC per target")


def _top_n(inp: Inputs) -> str:
  return tables.format_table(tables.top_n_table(inp.labels, inp.predictions),
                             "patient_overall recomputed as top-N of C1..C7")


def _prior(inp: Inputs) -> str:
  train = inp.labels if inp.train_labels is None else inp.train_labels
  return tables.format_table(tables.prior_table(inp.labels, inp.predictions, train),
                             "Against the constant prior (training label means)")


def _results(inp: Inputs) -> str:
  train = inp.labels if inp.train_labels is None else inp.train_labels
  models = inp.models or {"predictions": inp.predictions}
  return tables.format_table(tables.results_table(inp.labels, models, train),
                             "Results (seed_score: the slides' cross-validation)")


# Reports run in this order, each printing a block before the final score line; add new ones here.
REPORTS: list[Callable[[Inputs], str]] = [_summary, _scores, _aucs, _top_n, _prior, _results]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--labels", required=True,
                      help="train.csv (StudyInstanceUID, patient_overall, C1..C7)")
  parser.add_argument("--predictions", required=True, action="append",
                      help="predictions CSV, wide or Kaggle long, as PATH or NAME=PATH; repeat it "
                      "to compare models (the first is scored)")
  parser.add_argument("--train_labels", help="train.csv whose label means are the prior baseline "
                      "(default: --labels)")
  parser.add_argument("--plot", help="write the reliability diagram of the first predictions here")
  parser.add_argument("--folds", help="CSV with StudyInstanceUID, fold (default: the predictions' "
                      "own fold column, if any)")
  parser.add_argument("--subset", action="store_true",
                      help="score only the labelled studies that were predicted")
  return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> tuple[float, list[str]]:
  """(score, report blocks) for parsed arguments; raises TableError / PredictionError on bad input."""
  labels = labels_lib.read_train_csv(args.labels)
  specs = [args.predictions] if isinstance(args.predictions, str) else list(args.predictions)
  named = [tables.split_named(s, "predictions" if i == 0 else f"model {i + 1}")
           for i, s in enumerate(specs)]
  models = {name: metrics.read_predictions(path) for name, path in named}
  predictions_path = named[0][1]
  predictions = models[named[0][0]]
  train_labels = labels_lib.read_train_csv(args.train_labels) if args.train_labels else None
  blocks = []
  if args.subset:
    predicted = labels["StudyInstanceUID"].isin(set(predictions["StudyInstanceUID"]))
    blocks.append(f"--subset: scoring {int(predicted.sum())} of {len(labels)} labelled studies "
                  f"({int((~predicted).sum())} without predictions left out)")
    labels = labels[predicted].reset_index(drop=True)
  score = metrics.competition_loss(labels, predictions)
  folds = tables.read_folds(args.folds or predictions_path)
  if args.folds and not folds:
    raise labels_lib.TableError(f"{args.folds}: needs StudyInstanceUID and fold columns")
  inp = Inputs(labels, predictions, folds, models, train_labels)
  blocks += [report(inp) for report in REPORTS]
  if args.plot:
    from cspine_jax.report import plots
    lab, pred = tables.aligned(labels, predictions)
    blocks.append(f"reliability diagram: {plots.reliability_plot(lab, pred, args.plot)}")
  return score, blocks


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(argv)
  try:
    score, blocks = evaluate(args)
  except (labels_lib.TableError, metrics.PredictionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for block in blocks:
    print(block)
    print()
  print(f"competition_score: {score:.6f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
