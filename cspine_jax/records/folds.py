"""Deterministic K-fold splits, grouped by study.

Every record of a study carries the study's fold, so a study never straddles train and validation
(the grouping the method asks for, GroupKFold on StudyInstanceUID).

* :func:`assign_folds` (``Options.fold_method="stratified"``): studies stratified on
  patient_overall so every fold sees the same share of fractured patients.
* :func:`group_k_fold` (``"group"``, the seed's): sklearn's ``GroupKFold`` (no shuffle): the
  heaviest study first, each to the fold with the fewest rows so far.

Both depend only on the study ids and their strata or weights, ``num_folds`` (and ``seed``): not
on row order, not on the library version, so the record sets split from the same population agree.
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


def group_k_fold(weights: Mapping[str, int], num_folds: int = 5) -> dict[str, int]:
  """``{uid: rows}`` -> ``{uid: fold}`` as sklearn's GroupKFold(num_folds) splits rows grouped by
  uid: groups by decreasing weight (equal weights: the later uid first, as its stable sort
  reversed), each to the fold holding the fewest rows so far (ties: the lowest fold)."""
  if num_folds < 1:
    raise ValueError(f"num_folds must be >= 1, got {num_folds}")
  uids = sorted(weights)
  if len(uids) < num_folds:
    raise ValueError(f"GroupKFold needs at least {num_folds} studies (one per fold), got "
                     f"{len(uids)}")
  sizes = np.asarray([int(weights[u]) for u in uids], np.int64)
  load = np.zeros(num_folds, np.int64)
  folds: dict[str, int] = {}
  for i in np.argsort(sizes, kind="stable")[::-1]:
    k = int(np.argmin(load))
    load[k] += sizes[i]
    folds[uids[i]] = k
  return folds
