"""Scores predictions with the competition metric and builds the evaluation report blocks.

Predictions are wide (StudyInstanceUID, patient_overall, C1..C7) or Kaggle long (row_id,
fractured); so are the labels (train.csv, or a Kaggle answer file of 0/1 rows: `read_labels`). The
first predictions are the ones scored; more (``NAME=PATH``) join them in the results table beside
the constant-prior baseline. Used by ``evaluate.py``.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from cspine_jax import labels as labels_lib
from cspine_jax import metrics
from cspine_jax.report import plots, tables

# What bad input raises (each names the file and the problem).
INPUT_ERRORS = (labels_lib.TableError, metrics.PredictionError)


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
  """Labels as train.csv's wide frame (StudyInstanceUID, patient_overall, C1..C7 int64 0/1) from
  train.csv or from the Kaggle answer format (``row_id,fractured``: ``<UID>_<target>`` rows, 8 per
  study, 0 or 1; other columns such as ``Usage`` are ignored)."""
  try:
    columns = pd.read_csv(path, nrows=0).columns
  except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
    raise labels_lib.TableError(f"{path}: cannot read CSV: {e}") from e
  if not {"row_id", "fractured"} <= set(columns):
    return labels_lib.read_train_csv(path)
  wide = metrics.read_predictions(path)  # the one long -> wide reader (validated, in [0, 1])
  values = wide[list(labels_lib.TARGETS)].to_numpy(np.float64)
  bad = np.argwhere((values != 0) & (values != 1))
  if len(bad):
    i, j = bad[0]
    row_id = f"{wide['StudyInstanceUID'].iloc[i]}_{labels_lib.TARGETS[j]}"
    raise labels_lib.TableError(f"{path}: row_id {row_id}: fractured={values[i, j]:g} is not 0 "
                                "or 1")
  wide[list(labels_lib.TARGETS)] = values.astype(np.int64)
  return wide


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


def prior_source(inp: Inputs) -> tuple[pd.DataFrame, dict[str, int] | None, str]:
  """(labels, folds, what they are) of the constant prior: ``--train_labels`` (another set's
  means), else each study's training folds when the folds are known, else the evaluated labels
  themselves (in sample: that prior has seen the studies it is scored on, and says so)."""
  if inp.train_labels is not None:
    return inp.train_labels, None, "the training labels' means (--train_labels)"
  if inp.folds:
    return inp.labels, inp.folds, "each study's training folds' label means"
  return inp.labels, None, ("the evaluated labels' own means: in sample (give --train_labels or "
                            "folds for an honest prior)")


def _prior(inp: Inputs) -> str:
  train, folds, what = prior_source(inp)
  return tables.format_table(tables.prior_table(inp.labels, inp.predictions, train, folds),
                             f"Against the constant prior ({what})")


def _results(inp: Inputs) -> str:
  train, folds, what = prior_source(inp)
  models = inp.models or {"predictions": inp.predictions}
  return tables.format_table(tables.results_table(inp.labels, models, train, folds),
                             f"Results (seed_score: the slides' cross-validation; prior: {what})")


# Reports run in this order, each giving a block before the final score line; add new ones here.
REPORTS: list[Callable[[Inputs], str]] = [_summary, _scores, _aucs, _top_n, _prior, _results]


def evaluate(labels: str | os.PathLike, predictions: str | Sequence[str], *,
             train_labels: str | os.PathLike | None = None,
             folds: str | os.PathLike | None = None, subset: bool = False,
             plot: str | os.PathLike | None = None) -> tuple[float, list[str]]:
  """(score of the first predictions, report blocks).

  ``labels`` and ``train_labels`` are train.csv or Kaggle answer files (`read_labels`);
  ``predictions`` are paths or ``NAME=PATH``; ``folds`` a CSV with StudyInstanceUID and fold
  (default: the first predictions' own fold column, if any); ``subset`` scores only the labelled
  studies that were predicted; ``plot`` writes the first predictions' reliability diagram.
  Raises one of ``INPUT_ERRORS`` on bad input.
  """
  label_frame = read_labels(labels)
  specs = [predictions] if isinstance(predictions, (str, os.PathLike)) else list(predictions)
  named = [tables.split_named(os.fspath(s), "predictions" if i == 0 else f"model {i + 1}")
           for i, s in enumerate(specs)]
  models = {name: metrics.read_predictions(path) for name, path in named}
  predictions_path = named[0][1]
  scored = models[named[0][0]]
  train_frame = read_labels(train_labels) if train_labels else None
  blocks = []
  if subset:
    predicted = label_frame["StudyInstanceUID"].isin(set(scored["StudyInstanceUID"]))
    blocks.append(f"--subset: scoring {int(predicted.sum())} of {len(label_frame)} labelled "
                  f"studies ({int((~predicted).sum())} without predictions left out)")
    label_frame = label_frame[predicted].reset_index(drop=True)
  score = metrics.competition_loss(label_frame, scored)
  fold_map = tables.read_folds(folds or predictions_path)
  if folds and not fold_map:
    raise labels_lib.TableError(f"{folds}: needs StudyInstanceUID and fold columns")
  inp = Inputs(label_frame, scored, fold_map, models, train_frame)
  blocks += [report(inp) for report in REPORTS]
  if plot:
    lab, pred = tables.aligned(label_frame, scored)
    blocks.append(f"reliability diagram: {plots.reliability_plot(lab, pred, plot)}")
  return score, blocks
