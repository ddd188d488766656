"""From per-vertebra (or per-slice) probabilities to the 8 submission targets.

* Two-stage / multi-head: ``patient_overall = 1 - prod_{k=1..N} (1 - p_k)`` over the N most probable
  vertebrae (the method's cross-validated best is N = 7; N = 1 is the maximum).
* Single-head baseline: ``patient_overall = max_k p_k`` (``top_n_overall(p, 1)``).
* 2D slice baselines: a per-slice fracture probability (S, 7) is pooled to one probability per
  vertebra over the slices that show it (per-slice presence >= ``presence_threshold``) by the max or
  a high quantile (the quantile damps a single noisy slice); when no slice reaches the threshold the
  vertebra's most likely slice stands in, so every vertebra still gets a probability.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from cspine_jax import labels

DEFAULT_TOP_N = 7


def top_n_overall(vertebra_probs: np.ndarray, n: int = DEFAULT_TOP_N) -> np.ndarray:
  """``1 - prod(1 - p)`` over the ``n`` largest of the last axis (7 vertebrae); shape (...,)."""
  p = np.asarray(vertebra_probs, np.float64)
  if p.shape[-1:] != (labels.NUM_VERTEBRAE,):
    raise ValueError(f"vertebra probabilities must end in {labels.NUM_VERTEBRAE}, got {p.shape}")
  if not 1 <= n <= labels.NUM_VERTEBRAE:
    raise ValueError(f"top-N must be in 1..{labels.NUM_VERTEBRAE}, got {n}")
  if np.any((p < 0) | (p > 1)) or not np.all(np.isfinite(p)):
    raise ValueError("vertebra probabilities must be finite and in [0, 1]")
  top = -np.sort(-p, axis=-1)[..., :n]
  return 1.0 - np.prod(1.0 - top, axis=-1)


def max_overall(vertebra_probs: np.ndarray) -> np.ndarray:
  """The single-head baseline's rule: patient_overall = the likeliest vertebra's probability."""
  return top_n_overall(vertebra_probs, 1)


def pool_slices(fracture: np.ndarray, presence: np.ndarray, *, method: str = "max",
                quantile: float = 0.9, presence_threshold: float = 0.5) -> np.ndarray:
  """Per-slice probabilities (S, 7) -> per-vertebra probabilities (7,).

  Args:
    fracture: (S, 7) per-slice fracture probability of each vertebra.
    presence: (S, 7) per-slice probability that the slice shows the vertebra.
    method: "max" or "quantile" (``np.quantile(..., quantile)``, linear interpolation).
    quantile: the quantile for ``method="quantile"``.
    presence_threshold: slices whose presence reaches it count as showing the vertebra.
  """
  fracture = np.asarray(fracture, np.float64)
  presence = np.asarray(presence, np.float64)
  if fracture.ndim != 2 or fracture.shape[1] != labels.NUM_VERTEBRAE or fracture.shape[0] == 0:
    raise ValueError(f"fracture must be (S>0, {labels.NUM_VERTEBRAE}), got {fracture.shape}")
  if presence.shape != fracture.shape:
    raise ValueError(f"presence {presence.shape} and fracture {fracture.shape} differ in shape")
  if method not in ("max", "quantile"):
    raise ValueError(f"unknown slice pooling {method!r}; expected 'max' or 'quantile'")
  out = np.empty(labels.NUM_VERTEBRAE)
  for v in range(labels.NUM_VERTEBRAE):
    shown = presence[:, v] >= presence_threshold
    if not shown.any():  # Nothing confident: the slice most likely to show it stands in.
      shown = np.zeros_like(shown)
      shown[np.argmax(presence[:, v])] = True
    values = fracture[shown, v]
    out[v] = values.max() if method == "max" else np.quantile(values, quantile)
  return out


def wide_frame(uids: Sequence[str], vertebra_probs: np.ndarray, overall: np.ndarray | None = None,
               *, top_n: int = DEFAULT_TOP_N) -> pd.DataFrame:
  """One row per study: StudyInstanceUID, patient_overall, C1..C7.

  ``overall`` defaults to :func:`top_n_overall` of the vertebra probabilities.
  """
  p = np.asarray(vertebra_probs, np.float64).reshape(len(uids), labels.NUM_VERTEBRAE)
  if overall is None:
    overall = top_n_overall(p, top_n)
  df = pd.DataFrame(p, columns=list(labels.VERTEBRAE))
  df.insert(0, "patient_overall", np.asarray(overall, np.float64))
  df.insert(0, "StudyInstanceUID", [labels.check_uid(u) for u in uids])
  return df


def with_top_n(wide: pd.DataFrame, n: int) -> pd.DataFrame:
  """A copy of a wide frame whose patient_overall is recomputed from C1..C7 with top-``n``."""
  out = wide.copy()
  out["patient_overall"] = top_n_overall(wide[list(labels.VERTEBRAE)].to_numpy(np.float64), n)
  return out


def to_long(wide: pd.DataFrame) -> pd.DataFrame:
  """Wide frame -> Kaggle long format: ``row_id`` = ``<UID>_<target>``, ``fractured``.

  Rows come study by study, each as patient_overall, C1..C7 (8 rows per study).
  """
  missing = [c for c in ("StudyInstanceUID",) + labels.TARGETS if c not in wide.columns]
  if missing:
    raise ValueError(f"wide predictions lack columns {missing}")
  values = wide[list(labels.TARGETS)].to_numpy(np.float64)
  if np.any(~np.isfinite(values)) or np.any((values < 0) | (values > 1)):
    raise ValueError("predictions must be finite probabilities in [0, 1]")
  uids = wide["StudyInstanceUID"].astype(str).tolist()
  row_ids = [f"{labels.check_uid(u)}_{t}" for u in uids for t in labels.TARGETS]
  return pd.DataFrame({"row_id": row_ids, "fractured": values.reshape(-1)})


def ensemble_mean(members: Iterable[np.ndarray]) -> np.ndarray:
  """Average of the fold models' probabilities (the method's ensembling rule)."""
  members = [np.asarray(m, np.float64) for m in members]
  if not members:
    raise ValueError("an ensemble needs at least one member")
  shapes = {m.shape for m in members}
  if len(shapes) != 1:
    raise ValueError(f"ensemble members differ in shape: {sorted(shapes)}")
  return np.mean(members, axis=0)
