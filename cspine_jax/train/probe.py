"""The shortcut probe: a logistic regression on simple statistics of stage 2's own crops.

A benchmark is only evidence of learning fractures if cues that need no model of a fracture fail
on it. The probe sees the same stage-2 records as stage 2 (a vertebra's 24 windowed slices in its
crop) through hand-made features: the crop's intensity percentiles and histogram, the share of
dark pixels that bone encloses (a cleft or a gap inside a vertebral body) at several thresholds,
edge strength and low percentiles inside bone, per slice and over the vertebra. Fitted per fold on the training folds' vertebrae, it predicts the held-out
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
# uint8 grey levels of the records' bone window (level 400, width 1800 HU): bone from ~180-320
# HU up, "dark" (soft tissue, fat, air, a cleft's blood) below ~-80..+140 HU; several of each, so
# the probe does not hinge on one threshold.
BONE_LEVELS = (96, 106, 116)
DARK_LEVELS = (60, 75, 90)


def enclosed_dark_fraction(slice_u8: np.ndarray, bone_level: int = BONE_LEVELS[1],
                           dark_level: int = DARK_LEVELS[2]) -> float:
  """Share of the pixels inside bone's outline (holes of the bone mask filled) that are dark."""
  bone = slice_u8 >= bone_level
  if not bone.any():
    return 0.0
  filled = ndimage.binary_fill_holes(bone)
  inside = filled & ~bone
  return float((inside & (slice_u8 < dark_level)).sum() / max(filled.sum(), 1))


def slice_features(s: np.ndarray) -> list[float]:
  """One slice: enclosed-dark and enclosed shares at each level pair, the edge strength inside
  bone, and the low percentiles of the pixels inside bone."""
  out = []
  for bone_level in BONE_LEVELS:
    bone = s >= bone_level
    filled = ndimage.binary_fill_holes(bone)
    inside = filled & ~bone
    n = max(int(filled.sum()), 1)
    out += [float((inside & (s < dark)).sum()) / n for dark in DARK_LEVELS]
    out.append(float(inside.sum()) / n)
  bone = ndimage.binary_fill_holes(s >= BONE_LEVELS[1])
  edges = np.hypot(ndimage.sobel(s, 0), ndimage.sobel(s, 1))
  out.append(float(edges[bone].mean()) / 255 if bone.any() else 0.0)
  inside = s[bone]
  out += list(np.percentile(inside, (1, 5, 10)) / 255) if inside.size else [0.0] * 3
  return out


def features(images: np.ndarray, vertebra: int) -> np.ndarray:
  """One stage-2 sample ((T, H, W, 3) uint8, its slices in (T, C) order) -> a feature vector:
  the crop's intensity percentiles and histogram, :func:`slice_features` over its slices
  (mean, max, min, spread) and the vertebra."""
  slices = np.moveaxis(np.asarray(images), -1, 1).reshape(-1, *images.shape[1:3])
  slices = slices.astype(np.float32)
  pixels = slices.reshape(-1)
  hist = np.bincount((pixels * HISTOGRAM_BINS / 256).astype(np.int64),
                     minlength=HISTOGRAM_BINS)[:HISTOGRAM_BINS] / max(len(pixels), 1)
  per = np.array([slice_features(s) for s in slices])
  onehot = np.eye(labels_lib.NUM_VERTEBRAE)[vertebra]
  return np.concatenate([np.percentile(pixels, PERCENTILES) / 255.0, hist, per.mean(0),
                         per.max(0), per.min(0), per.std(0), onehot])


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
