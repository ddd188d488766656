"""Evaluation tables for out-of-fold (or test) predictions.

Every score here comes from :mod:`cspine_jax.metrics` (one implementation of the competition
metric);
AUCs from scikit-learn. Frames are wide (StudyInstanceUID, patient_overall, C1..C7).
"""
from __future__ import annotations

import os
from typing import Mapping
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn import metrics as sk_metrics

from cspine_jax import aggregate
from cspine_jax import labels as labels_lib
from cspine_jax import metrics

# The seed's results table, in its order (slides: 3D CNN 0.6048, single-head 0.5813, multi-head
# 0.5019, two-stage 0.3691 on its cross-validation).
SEED_MODELS = ("3D CNN", "Single-head", "Multi-head", "Two-stage")
SEED_SCORES = {"3D CNN": 0.6048, "Single-head": 0.5813, "Multi-head": 0.5019, "Two-stage": 0.3691}


def _subset(df: pd.DataFrame, uids: Sequence[str]) -> pd.DataFrame:
  return df.set_index("StudyInstanceUID").loc[list(uids)].reset_index()


def aligned(labels: pd.DataFrame, predictions: pd.DataFrame
            ) -> tuple[pd.DataFrame, pd.DataFrame]:
  """Validated frames restricted to the labelled studies, in the labels' order."""
  pred = metrics.read_predictions(predictions)
  lab = labels[labels["StudyInstanceUID"].astype(str).isin(set(pred["StudyInstanceUID"]))]
  if lab.empty:
    raise metrics.PredictionError("predictions share no study with the labels")
  lab = lab.reset_index(drop=True)
  return lab, _subset(pred, lab["StudyInstanceUID"].astype(str))


PRIOR = "Prior (train means)"
FOLD_PRIOR = "Prior (training folds' means)"


def prior_predictions(train_labels: pd.DataFrame, uids: Sequence[str],
                      folds: Mapping[str, int] | None = None) -> pd.DataFrame:
  """The constant-prior baseline: every study gets the training label means; with ``folds``
  (uid -> fold), a study of fold k gets the means of the labelled studies outside fold k (a
  prior that, like the models, never saw the study it predicts)."""
  cols = list(labels_lib.TARGETS)
  y = train_labels[cols].to_numpy(np.float64)
  train_uids = train_labels["StudyInstanceUID"].astype(str).to_numpy()
  rows = []
  for u in (str(u) for u in uids):
    if folds is None or u not in folds:
      rows.append(y.mean(0))
      continue
    outside = np.array([folds.get(t, -1) != folds[u] for t in train_uids])
    if not outside.any():
      raise ValueError(f"study {u}: no labelled study outside its fold {folds[u]} for a prior")
    rows.append(y[outside].mean(0))
  df = pd.DataFrame(np.array(rows).reshape(-1, len(cols)), columns=cols)
  df.insert(0, "StudyInstanceUID", [str(u) for u in uids])
  return df


def score_table(labels: pd.DataFrame, predictions: pd.DataFrame,
                folds: Mapping[str, int] | None = None) -> pd.DataFrame:
  """Competition metric overall and per fold: columns (split, studies, score)."""
  lab, pred = aligned(labels, predictions)
  rows = [{"split": "all", "studies": len(lab), "score": metrics.competition_loss(lab, pred)}]
  if folds:
    uid = lab["StudyInstanceUID"].astype(str)
    fold_of = uid.map(lambda u: folds.get(u, -1))
    for f in sorted(set(fold_of) - {-1}):
      ids = uid[fold_of == f].tolist()
      rows.append({"split": f"fold {f}", "studies": len(ids),
                   "score": metrics.competition_loss(_subset(lab, ids), _subset(pred, ids))})
  return pd.DataFrame(rows)


def auc_table(labels: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
  """ROC AUC per target (NaN where the labels hold one class only) plus the positives count."""
  lab, pred = aligned(labels, predictions)
  rows = []
  for t in labels_lib.TARGETS:
    y = lab[t].to_numpy(np.float64)
    p = pred[t].to_numpy(np.float64)
    auc = sk_metrics.roc_auc_score(y, p) if 0 < y.sum() < len(y) else float("nan")
    rows.append({"target": t, "positives": int(y.sum()), "auc": auc})
  y = lab[list(labels_lib.VERTEBRAE)].to_numpy(np.float64).ravel()
  p = pred[list(labels_lib.VERTEBRAE)].to_numpy(np.float64).ravel()
  pooled = sk_metrics.roc_auc_score(y, p) if 0 < y.sum() < len(y) else float("nan")
  rows.append({"target": "vertebrae (pooled)", "positives": int(y.sum()), "auc": pooled})
  return pd.DataFrame(rows)


def top_n_table(labels: pd.DataFrame, predictions: pd.DataFrame,
                ns: Sequence[int] = tuple(range(1, 8))) -> pd.DataFrame:
  """Metric with patient_overall recomputed from C1..C7 by top-N, N = 1..7 (N=1 is the max)."""
  lab, pred = aligned(labels, predictions)
  return pd.DataFrame([{"N": n,
                        "score": metrics.competition_loss(lab, aggregate.with_top_n(pred, n))}
                       for n in ns])


def results_table(labels: pd.DataFrame, models: Mapping[str, pd.DataFrame],
                  train_labels: pd.DataFrame | None = None,
                  folds: Mapping[str, int] | None = None) -> pd.DataFrame:
  """Several models side by side (seed order first), plus the prior baseline when given
  (``train_labels``' means; with ``folds``, per study those of its training folds).

  Columns: model, studies, score, patient_auc, vertebra_auc (pooled), seed_score (the slides').
  Each model is scored on the studies it predicted.
  """
  order = [m for m in SEED_MODELS if m in models] + [m for m in models if m not in SEED_MODELS]
  entries = [(name, models[name]) for name in order]
  if train_labels is not None:  # scored on the studies every model predicted
    uids = set(labels["StudyInstanceUID"].astype(str))
    for pred in models.values():
      uids &= set(metrics.read_predictions(pred)["StudyInstanceUID"])
    uids = [u for u in labels["StudyInstanceUID"].astype(str) if u in uids]
    entries.append((FOLD_PRIOR if folds else PRIOR, prior_predictions(train_labels, uids, folds)))
  rows = []
  for name, pred in entries:
    lab, got = aligned(labels, pred)
    aucs = auc_table(lab, got).set_index("target")["auc"]
    rows.append({"model": name, "studies": len(lab),
                 "score": metrics.competition_loss(lab, got),
                 "patient_auc": aucs["patient_overall"], "vertebra_auc": aucs["vertebrae (pooled)"],
                 "seed_score": SEED_SCORES.get(name, float("nan"))})
  return pd.DataFrame(rows)


def read_folds(path: str | os.PathLike) -> dict[str, int]:
  """A CSV with StudyInstanceUID and fold columns (e.g. predictions written with their fold)."""
  try:
    df = pd.read_csv(path, dtype={"StudyInstanceUID": str})
  except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
    raise metrics.PredictionError(f"{path}: cannot read CSV: {e}") from e
  if not {"StudyInstanceUID", "fold"} <= set(df.columns):
    return {}
  folds = pd.to_numeric(df["fold"], errors="coerce")
  if folds.isna().any():
    row = int(np.flatnonzero(folds.isna().to_numpy())[0])
    raise metrics.PredictionError(f"{path}: row {row} (line {row + 2}): fold is not an integer")
  return dict(zip(df["StudyInstanceUID"].astype(str), folds.astype(int)))


def format_table(df: pd.DataFrame, title: str = "") -> str:
  """Fixed-width text with 4-decimal floats (what the CLIs print)."""
  body = df.to_string(index=False, float_format=lambda x: f"{x:.4f}", na_rep="-")
  return f"{title}\n{body}" if title else body


def prior_table(labels: pd.DataFrame, predictions: pd.DataFrame, train_labels: pd.DataFrame,
                folds: Mapping[str, int] | None = None) -> pd.DataFrame:
  """The model's metric beside the constant prior's on the same studies, and their ratio."""
  lab, pred = aligned(labels, predictions)
  model = metrics.competition_loss(lab, pred)
  prior = metrics.competition_loss(
      lab, prior_predictions(train_labels, lab["StudyInstanceUID"].astype(str).tolist(), folds))
  return pd.DataFrame([{"model": model, "prior": prior, "model / prior": model / prior}])


def split_named(spec: str, default_name: str) -> tuple[str, str]:
  """``NAME=PATH`` -> (NAME, PATH); a plain PATH (or one whose prefix holds a path separator)
  -> (default_name, PATH)."""
  name, sep, path = spec.partition("=")
  if not sep or not name or os.sep in name or (os.altsep and os.altsep in name) or not path:
    return default_name, spec
  return name, path
