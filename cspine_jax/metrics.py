"""The RSNA 2022 competition metric: one definition for evaluation and for training losses.

For each study i and target j in (patient_overall, C1..C7):

  L_ij = -w_ij * [y_ij * log(p_ij) + (1 - y_ij) * log(1 - p_ij)]
  w_ij = 1 / 2 for a negative / positive vertebra, 7 / 14 for a negative / positive patient_overall

the study's loss is sum_j L_ij / sum_j w_ij and the score is the mean over studies. Probabilities are
clipped to [eps, 1 - eps] with eps = EPS = 1e-7 unless told otherwise, so a confident miss costs
-log(1e-7) ~ 16.1 rather than infinity.

The array functions (`target_weights`, `weighted_mean`, `weighted_log_loss`) use only array-API
operations, so they run unchanged on numpy arrays and on jax arrays (also under jit); training losses
built on logits can call `weighted_mean` with their own per-target cross-entropy.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import pandas as pd

from cspine_jax import labels as labels_lib

TARGETS = labels_lib.TARGETS
EPS = 1e-7
# Weights per target (patient_overall first), for a negative and a positive label.
NEGATIVE_WEIGHTS = np.array([7.0] + [1.0] * 7, np.float32)
POSITIVE_WEIGHTS = np.array([14.0] + [2.0] * 7, np.float32)

_LONG_ROW_RE = re.compile(r"(.+)_(patient_overall|C[1-7])")


class PredictionError(ValueError):
  """Predictions that cannot be scored: missing/unknown study or target, NaN, value outside [0, 1]."""


def _xp(x: Any):
  """The array namespace of ``x`` (jax.numpy for jax arrays and tracers, else numpy)."""
  ns = getattr(x, "__array_namespace__", None)
  return ns() if ns is not None else np


def target_weights(y):
  """(..., 8) labels ordered like TARGETS -> (..., 8) metric weights (soft labels interpolate)."""
  return y * POSITIVE_WEIGHTS + (1 - y) * NEGATIVE_WEIGHTS


def weighted_mean(y, losses):
  """Per-study weighted mean of per-target losses: sum(w * losses, -1) / sum(w, -1)."""
  w = target_weights(y)
  return (w * losses).sum(-1) / w.sum(-1)


def weighted_log_loss(y, p, eps: float = EPS):
  """Per-study competition loss (N,) from labels y (N, 8) and probabilities p (N, 8)."""
  xp = _xp(p)
  p = xp.clip(p, eps, 1 - eps)
  log_loss = -(y * xp.log(p) + (1 - y) * xp.log(1 - p))
  return weighted_mean(y, log_loss)


def _validate_wide(df: pd.DataFrame, what: str) -> pd.DataFrame:
  """Wide frame (StudyInstanceUID + TARGETS) with valid ids, numbers in [0, 1], one row per study."""
  missing = [c for c in ("StudyInstanceUID",) + TARGETS if c not in df.columns]
  if missing:
    raise PredictionError(f"{what}: missing columns {missing}; found {list(df.columns)}")
  df = df[["StudyInstanceUID", *TARGETS]].copy()
  df["StudyInstanceUID"] = df["StudyInstanceUID"].astype(str)
  for uid in df["StudyInstanceUID"]:
    try:
      labels_lib.check_uid(uid)
    except ValueError as e:
      raise PredictionError(f"{what}: {e}") from None
  dup = df["StudyInstanceUID"][df["StudyInstanceUID"].duplicated()]
  if len(dup):
    raise PredictionError(f"{what}: study {dup.iloc[0]} appears more than once")
  values = df[list(TARGETS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
  bad = np.argwhere(~np.isfinite(values) | (values < 0) | (values > 1))
  if len(bad):
    i, j = bad[0]
    raw = df[TARGETS[j]].iloc[i]
    if pd.isna(raw):
      problem = "is missing (NaN)"
    elif not np.isfinite(values[i, j]):
      problem = "is not a finite number"
    else:
      problem = "is not in [0, 1]"
    shown = repr(raw) if isinstance(raw, str) else str(raw)
    raise PredictionError(f"{what}: study {df['StudyInstanceUID'].iloc[i]} target {TARGETS[j]} "
                          f"= {shown} {problem}")
  df[list(TARGETS)] = values
  return df.reset_index(drop=True)


def _long_to_wide(df: pd.DataFrame, what: str) -> pd.DataFrame:
  """Kaggle long format (row_id = <UID>_<target>, fractured) -> wide frame."""
  row_ids = df["row_id"].astype(str)
  parts = row_ids.str.fullmatch(_LONG_ROW_RE.pattern)
  if not parts.all():
    bad = row_ids[~parts].iloc[0]
    raise PredictionError(
        f"{what}: row_id {bad!r} is not <StudyInstanceUID>_<patient_overall|C1..C7>")
  split = row_ids.str.extract(_LONG_ROW_RE.pattern)
  dup = row_ids[row_ids.duplicated()]
  if len(dup):
    raise PredictionError(f"{what}: row_id {dup.iloc[0]} appears more than once")
  long = pd.DataFrame({"StudyInstanceUID": split[0], "target": split[1],
                       "fractured": df["fractured"].to_numpy()})
  wide = long.pivot(index="StudyInstanceUID", columns="target", values="fractured")
  wide = wide.reindex(columns=list(TARGETS))
  holes = np.argwhere(wide.isna().to_numpy() & ~_present(long, wide))
  if len(holes):
    i, j = holes[0]
    raise PredictionError(f"{what}: no row for {wide.index[i]}_{TARGETS[j]} (study {wide.index[i]} "
                          f"target {TARGETS[j]} missing)")
  wide = wide.reset_index()
  wide.columns.name = None
  return wide


def _present(long: pd.DataFrame, wide: pd.DataFrame) -> np.ndarray:
  """Bool (studies, 8): whether a row existed (a NaN value in a present row is reported later)."""
  have = pd.crosstab(long["StudyInstanceUID"], long["target"]) > 0
  return have.reindex(index=wide.index, columns=list(TARGETS), fill_value=False).to_numpy()


def read_predictions(path_or_df: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
  """Predictions in wide (StudyInstanceUID, patient_overall, C1..C7) or Kaggle long (row_id,
  fractured) format -> validated wide frame with float64 probabilities."""
  if isinstance(path_or_df, pd.DataFrame):
    df, what = path_or_df, "predictions"
  else:
    what = str(path_or_df)
    try:
      df = pd.read_csv(path_or_df, dtype={"StudyInstanceUID": str, "row_id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
      raise PredictionError(f"{what}: cannot read CSV: {e}") from e
  if "row_id" in df.columns and "fractured" in df.columns:
    df = _long_to_wide(df, what)
  return _validate_wide(df, what)


def _align(labels: pd.DataFrame,
           predictions: pd.DataFrame) -> tuple[pd.Index, np.ndarray, np.ndarray]:
  """(uids, y (N, 8), p (N, 8)) in the labels' order; every labelled study must be predicted."""
  lab = _validate_wide(labels, "labels")
  pred = read_predictions(predictions)
  lab_ids = pd.Index(lab["StudyInstanceUID"])
  pred = pred.set_index("StudyInstanceUID")
  missing = lab_ids.difference(pred.index, sort=False)
  if len(missing):
    raise PredictionError(f"predictions: {len(missing)} labelled studies have no prediction, e.g. "
                          f"{', '.join(missing[:5])}")
  unknown = pred.index.difference(lab_ids, sort=False)
  if len(unknown):
    raise PredictionError(f"predictions: {len(unknown)} studies are not in the labels, e.g. "
                          f"{', '.join(unknown[:5])}")
  y = lab[list(TARGETS)].to_numpy(np.float64)
  p = pred.loc[lab_ids, list(TARGETS)].to_numpy(np.float64)
  return lab_ids, y, p


def per_study_loss(labels: pd.DataFrame, predictions: pd.DataFrame | str | os.PathLike,
                   eps: float = EPS) -> pd.Series:
  """Competition loss of every labelled study (Series indexed by StudyInstanceUID)."""
  uids, y, p = _align(labels, predictions)
  return pd.Series(weighted_log_loss(y, p, eps), index=uids, name="loss")


def competition_loss(labels: pd.DataFrame, predictions: pd.DataFrame | str | os.PathLike,
                     eps: float = EPS) -> float:
  """The competition score: mean over studies of the per-study weighted log loss."""
  return float(per_study_loss(labels, predictions, eps).mean())
