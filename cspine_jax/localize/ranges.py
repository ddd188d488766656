"""Slice ranges of C1..C7 from per-slice presence probabilities.

* ``ordered``: the vertebrae lie head to feet in order, each on one contiguous run of slices,
  neighbours may share slices. Every slice gets a state "vertebrae a..b shown" (or none, between
  two levels) with a and b never decreasing from head to feet; the sequence with the largest summed
  logit(p) - logit(threshold) over its shown vertebrae (the most likely one for calibrated p and
  threshold 0.5) is found by Viterbi. ``require_all`` puts every vertebra on at least one slice (a
  cervical-spine CT shows all seven), so a weak model still places each level where it is
  relatively most likely instead of calling it absent.
* ``template``: the seven ranges as one rigid layout (the mean relative position of each vertebra
  along the C1..C7 span of segmented training studies, :func:`vertebra_template`), placed by its
  two ends where the same summed logit is largest. A per-slice model confuses C4/C5/C6, whose axial
  slices look alike, but C1/C2 and C7 are distinct and vertebral heights similar, so the
  two-parameter fit places the middle levels better than per-slice evidence.
* ``threshold``: the slices whose probability reaches the threshold; of their contiguous runs the
  longest wins (ties: the larger summed probability), so a stray confident slice cannot stretch
  the range. No slice over the threshold: absent.
* ``rolling`` (the seed's ``window_range``): each vertebra's per-slice value averaged over a
  centred window of 5 slices (at least 3 of them inside the series, pandas' rolling mean); the
  range runs from the first to the last slice whose mean exceeds the threshold (0.3 in the seed,
  on its regressed area ratios). None over it: absent.
"""
from __future__ import annotations

import math
from typing import Iterable
from typing import Sequence

import numpy as np

from cspine_jax import labels as labels_lib

NUM_VERTEBRAE = labels_lib.NUM_VERTEBRAE
DECODERS = ("ordered", "template", "threshold", "rolling")
# A vertebra layout: per vertebra (start, end) as fractions of the C1-top..C7-bottom span.
Template = tuple[tuple[float, float], ...]


def longest_run(mask: np.ndarray, weights: np.ndarray | None = None) -> tuple[int, int] | None:
  """(first, last) inclusive of the longest run of True; ties: the larger sum of ``weights``."""
  mask = np.asarray(mask, bool)
  if not mask.any():
    return None
  edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
  starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
  lengths = ends - starts + 1
  w = np.ones(mask.shape) if weights is None else np.asarray(weights, np.float64)
  sums = np.array([w[a:b + 1].sum() for a, b in zip(starts, ends)])
  best = np.lexsort((-sums, -lengths))[0]  # longest first, then the heaviest
  return int(starts[best]), int(ends[best])


def _states(n: int = NUM_VERTEBRAE) -> np.ndarray:
  """(K, 2) states (a, b): vertebrae a..b (1-based, inclusive) shown; a = b + 1 is the empty gap
  just below vertebra b (b = 0: above the first)."""
  return np.array([(a, b) for b in range(n + 1) for a in range(1, b + 2)], np.int64)


def ordered_ranges(presence: np.ndarray, require_all: bool = False, threshold: float = 0.5,
                   eps: float = 1e-4) -> list[tuple[int, int] | None]:
  """Per vertebra the (first, last) slice range of the best ordered labelling, or None.

  Head to feet the shown vertebrae form a block a..b (or nothing, between two levels) whose ends
  never move up. A labelling scores the sum, over the slices and vertebrae it shows, of
  logit(p) - logit(threshold): with threshold 0.5 the most likely labelling when the slices'
  presences are independent Bernoullis with probabilities p, and the same decision point as the
  threshold rule for one slice (a model trained with up-weighted positives calls p ~ 0.5 too
  often; a higher threshold undoes that). ``require_all``: each vertebra shown on >= 1 slice.
  """
  p = np.clip(np.asarray(presence, np.float64), eps, 1.0 - eps)
  s, n = p.shape
  states = _states(n)
  a, b = states[:, 0], states[:, 1]
  logit = np.log(p) - np.log1p(-p) - math.log(threshold / (1.0 - threshold))
  gain = np.concatenate([np.zeros((s, 1)), np.cumsum(logit, axis=1)], axis=1)
  emit = gain[:, b] - gain[:, a - 1]  # (S, K): the summed logits of the shown vertebrae
  # allowed[i, j]: state i may follow state j.
  allowed = (a[:, None] >= a[None, :]) & (b[:, None] >= b[None, :])
  start = np.ones(len(states), bool)
  end = np.ones(len(states), bool)
  if require_all:  # no level may be skipped: start at C1 or above it, end at the last or below it
    allowed &= a[:, None] <= b[None, :] + 1
    start, end = a == 1, b == n
  penalty = np.where(allowed, 0.0, -np.inf)
  score = np.where(start, emit[0], -np.inf)
  back = np.zeros((s, len(states)), np.int64)
  for t in range(1, s):
    cand = score[None, :] + penalty  # (next state, previous state)
    back[t] = np.argmax(cand, axis=1)
    score = cand[np.arange(len(states)), back[t]] + emit[t]
  path = np.empty(s, np.int64)
  path[-1] = int(np.argmax(np.where(end, score, -np.inf)))
  for t in range(s - 1, 0, -1):
    path[t - 1] = back[t, path[t]]
  out: list[tuple[int, int] | None] = []
  for v in range(1, n + 1):
    shown = np.flatnonzero((a[path] <= v) & (v <= b[path]))
    out.append((int(shown[0]), int(shown[-1])) if len(shown) else None)
  return out


def check_template(template) -> Template:
  """Validates a layout: 7 (start, end) fractions with 0 <= start <= end <= 1."""
  t = np.asarray(template, np.float64)
  if t.shape != (NUM_VERTEBRAE, 2) or not np.all(np.isfinite(t)) or np.any(t < 0) or np.any(
      t > 1) or np.any(t[:, 0] > t[:, 1]):
    raise ValueError(f"a vertebra template is 7 (start, end) fractions in [0, 1], got {template!r}")
  return tuple((float(a), float(b)) for a, b in t)


def vertebra_template(ranges: Iterable[Sequence[tuple[int, int] | None]]) -> Template:
  """Mean relative layout of studies' true ranges (each: 7 inclusive (first, last) slice ranges,
  from ``labels.vertebra_extents``); studies missing a vertebra are skipped."""
  rel = []
  for r in ranges:
    if any(x is None for x in r):
      continue
    lo, hi = r[0][0], r[-1][1]
    if hi <= lo:
      continue
    rel.append([((a - lo) / (hi - lo), (b - lo) / (hi - lo)) for a, b in r])
  if not rel:
    raise ValueError("no study shows all seven vertebrae: cannot fit a vertebra template")
  return check_template(np.mean(rel, axis=0))


def template_ranges(presence: np.ndarray, template: Template, threshold: float = 0.5,
                    eps: float = 1e-4) -> list[tuple[int, int]]:
  """The layout placed where it best fits the presences (module docstring, ``template``).

  Every (top, bottom) slice pair with at least one slice per vertebra is scored (one vector pass
  per top slice, so memory stays O(S)): the ranges are rounded fractions of the span, their logit
  sums read from cumulative sums.
  """
  p = np.clip(np.asarray(presence, np.float64), eps, 1.0 - eps)
  s, n = p.shape
  t = np.asarray(check_template(template))
  logit = np.log(p) - np.log1p(-p) - math.log(threshold / (1.0 - threshold))
  cum = np.concatenate([np.zeros((1, n)), np.cumsum(logit, axis=0)])  # (S + 1, 7)
  cols = np.arange(n)[None, :]
  best_score, best = -np.inf, None
  for top in range(s):
    span = np.arange(min(n, s) - 1, s - top, dtype=np.float64)[:, None]  # bottom - top
    if span.size == 0:
      break
    first = np.clip(np.rint(top + t[None, :, 0] * span), 0, s - 1).astype(np.int64)
    last = np.clip(np.rint(top + t[None, :, 1] * span), 0, s - 1).astype(np.int64)
    score = (cum[last + 1, cols] - cum[first, cols]).sum(axis=1)
    i = int(np.argmax(score))
    if score[i] > best_score:
      best_score, best = float(score[i]), (first[i], last[i])
  return [(int(a), int(b)) for a, b in zip(*best)]


def rolling_mean(values: np.ndarray, window: int = 5, min_periods: int = 3) -> np.ndarray:
  """(S, ...) -> the centred rolling mean along axis 0 as pandas' ``rolling(window,
  min_periods, center=True).mean()``: slices i - window // 2 .. + window - 1, those inside the
  series averaged, NaN where fewer than ``min_periods`` are."""
  v = np.asarray(values, np.float64)
  s = v.shape[0]
  cum = np.concatenate([np.zeros((1,) + v.shape[1:]), np.cumsum(v, axis=0)])
  lo = np.clip(np.arange(s) - window // 2, 0, s)
  hi = np.clip(np.arange(s) - window // 2 + window, 0, s)
  count = (hi - lo).reshape((s,) + (1,) * (v.ndim - 1))
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = (cum[hi] - cum[lo]) / count
  return np.where(count >= min_periods, mean, np.nan)


def rolling_ranges(presence: np.ndarray, threshold: float = 0.3, window: int = 5,
                   min_periods: int = 3) -> list[tuple[int, int] | None]:
  """Per vertebra (first, last) of the slices whose :func:`rolling_mean` exceeds ``threshold``
  (module docstring, ``rolling``), or None."""
  mean = rolling_mean(presence, window, min_periods)
  out: list[tuple[int, int] | None] = []
  for v in range(mean.shape[1]):
    over = np.flatnonzero(np.nan_to_num(mean[:, v], nan=-np.inf) > threshold)
    out.append((int(over[0]), int(over[-1])) if len(over) else None)
  return out
