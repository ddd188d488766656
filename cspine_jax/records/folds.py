"""Deterministic stratified K-fold split, grouped by study.

Every record of a study carries the study's fold, so a study never straddles train and validation
(the grouping the method asks for, GroupKFold on StudyInstanceUID). Studies are stratified on
patient_overall so every fold sees the same share of fractured patients. The split depends only on
the set of study ids, their strata, ``num_folds`` and ``seed``: not on row order, not on the library
version (no sklearn shuffling), so every record set of one data folder agrees on the folds.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np


def assign_folds(strata: Mapping[str, int], num_folds: int = 5, seed: int = 0) -> dict[str, int]:
  """``{uid: stratum}`` -> ``{uid: fold in 0..num_folds-1}``.

  Within each stratum the studies are shuffled (seeded) and dealt round-robin; the deal continues
  across strata, so fold sizes differ by at most one and each stratum is spread evenly.
  """
  if num_folds < 1:
    raise ValueError(f"num_folds must be >= 1, got {num_folds}")
  rng = np.random.default_rng(seed)
  folds: dict[str, int] = {}
  position = 0
  for stratum in sorted(set(int(s) for s in strata.values())):
    members = sorted(u for u, s in strata.items() if int(s) == stratum)
    for i in rng.permutation(len(members)):
      folds[members[i]] = position % num_folds
      position += 1
  return folds


def fold_counts(folds: Mapping[str, int], num_folds: int) -> list[int]:
  """Number of studies per fold."""
  return np.bincount(np.asarray(list(folds.values()), np.int64), minlength=num_folds).tolist()
