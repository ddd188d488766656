"""The shortcut probe: a logistic regression on simple statistics of stage 2's own crops.

A benchmark is only evidence of learning fractures if cues that need no model of a fracture fail
on it. The probe sees the same stage-2 records as stage 2 (a vertebra's 24 windowed slices in its
crop) through a few hand-made features: the crop's intensity percentiles and histogram, and the
share of dark pixels that bone encloses (a cleft or a gap inside a vertebral body), per slice and
over the vertebra. Fitted per fold on the training folds' vertebrae, it predicts the held-out
fold's, and patient_overall follows as for stage 2 (top-N), so its out-of-fold metric sits in the
results table beside the models'. A benchmark level is honest when the probe stays near the
prior while the method does clearly better.
"""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn import linear_model
from sklearn import pipeline as sk_pipeline
from sklearn import preprocessing

from cspine_jax import aggregate
from cspine_jax import labels as labels_lib
from cspine_jax.inputs import loader as loader_lib

NAME = "Shortcut probe (crop statistics)"
PERCENTILES = (5, 25, 50, 75, 95, 99)
HISTOGRAM_BINS = 16
# uint8 grey levels of the records' bone window (level 400, width 1800 HU): bone above ~250 HU,
# "dark" (soft tissue, fat, air) below ~100 HU.
BONE_LEVEL = 106
DARK_LEVEL = 85


def enclosed_dark_fraction(slice_u8: np.ndarray) -> float:
  """Share of the pixels inside bone's outline (holes of the bone mask filled) that are dark."""
  bone = slice_u8 >= BONE_LEVEL
  if not bone.any():
    return 0.0
  filled = ndimage.binary_fill_holes(bone)
  inside = filled & ~bone
  return float((inside & (slice_u8 < DARK_LEVEL)).sum() / max(filled.sum(), 1))


def features(images: np.ndarray, vertebra: int) -> np.ndarray:
  """One stage-2 sample ((T, H, W, 3) uint8, its slices in (T, C) order) -> a feature vector."""
  slices = np.moveaxis(np.asarray(images), -1, 1).reshape(-1, *images.shape[1:3])
  pixels = slices.reshape(-1).astype(np.float32)
  hist = np.bincount((pixels * HISTOGRAM_BINS / 256).astype(np.int64),
                     minlength=HISTOGRAM_BINS)[:HISTOGRAM_BINS] / max(len(pixels), 1)
  dark = np.array([enclosed_dark_fraction(s) for s in slices])
  onehot = np.eye(labels_lib.NUM_VERTEBRAE)[vertebra]
  return np.concatenate([np.percentile(pixels, PERCENTILES) / 255.0, hist,
                         [dark.mean(), dark.max(), np.percentile(dark, 90)], onehot])


def read_features(records_dir: str | pathlib.Path) -> pd.DataFrame:
  """Per stage-2 record: study, fold, vertebra, label, present and its feature vector."""
  index = loader_lib.record_index(records_dir, "stage2")
  source = index.source()
  rows = []
  for i in range(len(source)):
    r = source[i]
    rows.append({"StudyInstanceUID": str(index.study_uid[i]), "fold": int(index.fold[i]),
                 "vertebra": int(r["vertebra"]), "label": float(r["label"]),
                 "present": bool(r["present"]),
                 "x": features(r["images"], int(r["vertebra"]))})
  return pd.DataFrame(rows)


def _model() -> Any:
  return sk_pipeline.make_pipeline(
      preprocessing.StandardScaler(),
      linear_model.LogisticRegression(C=1.0, max_iter=2000))


def fit_out_of_fold(table: pd.DataFrame, top_n: int = aggregate.DEFAULT_TOP_N) -> pd.DataFrame:
  """Out-of-fold wide predictions (StudyInstanceUID, patient_overall, C1..C7, fold): per fold k
  a model fitted on the other folds' vertebrae predicts fold k's."""
  x = np.stack(table["x"].to_numpy())
  y = table["label"].to_numpy()
  out = []
  for k in sorted(table["fold"].unique()):
    train, held = (table["fold"] != k).to_numpy(), (table["fold"] == k).to_numpy()
    if len(np.unique(y[train])) < 2:  # one class only: the training fraction stands in
      p = np.full(held.sum(), y[train].mean() if train.any() else 0.5)
    else:
      p = _model().fit(x[train], y[train]).predict_proba(x[held])[:, 1]
    part = table.loc[held, ["StudyInstanceUID", "vertebra"]].assign(p=p)
    wide = part.pivot(index="StudyInstanceUID", columns="vertebra", values="p")
    wide = wide.reindex(columns=range(labels_lib.NUM_VERTEBRAE))
    wide = wide.fillna(wide.mean()).fillna(0.5)  # a vertebra without a record: its column's mean
    probs = wide.to_numpy(np.float64)
    frame = aggregate.wide_frame(list(wide.index), probs,
                                 aggregate.top_n_overall(probs, top_n))
    out.append(frame.assign(fold=int(k)))
  return pd.concat(out, ignore_index=True)
