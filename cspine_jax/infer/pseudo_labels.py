"""Stage-1 pseudo-labels: where each vertebra lies in every study (the ``--vertebrae`` file).

The stage-1 fold ensemble (probabilities averaged over the folds' models) scores every slice of a
study: per-slice presence probabilities of C1..C7 and one normalised box of the visible vertebrae.
From them, per vertebra (documented rules, tested exactly with an oracle model):

* Range, ``decode="ordered"`` (default): the vertebrae lie head to feet in order, each on one
  contiguous run of slices, neighbours may share slices. Every slice gets a state "vertebrae a..b
  shown" (or none, between two levels) with a and b never decreasing from head to feet; the
  sequence with the largest summed logit(p) - logit(``threshold``) over its shown vertebrae (the
  most likely one for calibrated p and threshold 0.5) is found by Viterbi, and each vertebra's
  range is where it is in the state. ``require_all`` forces every
  vertebra onto at least one slice (a cervical-spine CT shows all seven), so a weak model still
  places each level where it is relatively most likely instead of calling it absent.
* Range, ``decode="template"``: the seven ranges as one rigid layout, the mean relative
  position of each vertebra along the C1..C7 span in the segmented training studies
  (``vertebra_template``), placed by its two ends: the (top, bottom) slices that maximise the same
  summed logit(p) - logit(``threshold``) over the layout's ranges. A per-slice model mistakes
  C4/C5/C6 for their neighbours (their axial slices look alike), but C1/C2 and C7 are distinct and
  the vertebral heights are similar, so the two-parameter fit places the middle levels far better
  than per-slice evidence (out-of-fold slice-range IoU 0.76 -> 0.86 on the demo set).
* Range, ``decode="threshold"``: the slices whose presence probability reaches ``threshold`` (0.5);
  of their contiguous runs the longest one wins (ties: the larger summed probability), so a stray
  confident slice far away cannot stretch the range. No slice over the threshold -> absent.
* Box: the per-slice boxes over the range, restricted to the slices where no vertebra above this
  one is called present. The per-slice box covers every visible vertebra: the vertebra above
  reaches down into this one's top slices with its arch and spinous process and would widen it,
  while the one below starts inside this one's outline (C2's dens within C1's ring; a body under
  a body), so dropping the shared bottom slices too only lost width (out-of-fold box IoU on the
  demo set: 0.711 this way, 0.677 with slices shared with neither neighbour, C1 0.63 vs 0.39; when
  every slice is shared with the one above, all the range's slices are used). The box is
  the union of those boxes (``box_quantile=0``) or, to damp outliers, the ``q`` / ``1 - q``
  quantiles of their low / high edges. Degenerate (empty) per-slice boxes are ignored; when none is
  left the whole image stands in.
* Box smoothing, ``box_smoothing=f`` > 0: before that, the per-slice boxes are smoothed along
  the slices by a Gaussian of sigma ``f`` x the located C1..C7 span (in slices, so the same
  fraction suits any slice spacing), over the valid boxes only. The per-slice box regression is
  noisy from slice to slice and a union keeps the extremes; on the demo set f = 0.15 raised the
  calibrated out-of-fold box IoU 0.823 -> 0.854 and 0.780 -> 0.809 (two stage-1 runs), while the
  unsmoothed boxes of C1, whose outline differs most from its neighbour's, lost a little.
* Box calibration, ``calibrate_boxes=True``: each vertebra's box edges then move by fixed fractions
  of its width / height (``box_offsets``, 7 x (x0, y0, x1, y1)), the median of (mask box - derived
  box) / derived size over the segmented training studies (``fit_box_offsets``). The per-slice box
  is the box of every vertebra shown, so the derived boxes err the same way study after study: C1's
  comes out too narrow (its ring is wider than the slices the rule keeps), C2's too wide, C7's
  too short (its long spinous process). On the demo set the median offsets raised the box IoU
  0.75 -> 0.83, and stage 2 trained on crops by the mask boxes scored 0.26 against 0.51 by the
  derived ones, so box precision is what stage 2 needs most.
* Box refinement (optional, a trained ``box_refine`` run): each located vertebra's box is then
  replaced by the refiner's box, predicted from projections of the vertebra's slice range in a
  crop around the derived box (``records.box_refine``; :func:`refine`). Derived boxes come from
  per-slice regressions on the whole 64 px slice; the refiner looks at the vertebra alone, closer.
  On the demo set: out-of-fold box IoU about 0.85 derived -> 0.93 refined.
* Confidence: the mean presence probability over the range (absent: 1 - the peak probability).
* Found or only placed: ``require_all`` and the template place all seven vertebrae in any series,
  a chest CT included. A study is *found* when some located vertebra's confidence reaches
  ``threshold`` (:func:`check_found`); ``predict`` gives a study where none is found the prior's
  probabilities and an error entry instead of stage 2's answer about the wrong anatomy (the demo's
  models called every vertebra of a real abdominal CT fractured, p 0.91, with the best vertebra at
  confidence 0.10, where every demo study's best is 0.83 or more), and ``label_dataset`` lists such
  studies.

On studies with a segmentation :func:`compare_with_masks` reports the slice-range IoU and the box
IoU against ``labels.vertebra_extents`` of the aligned mask.

From a trained stage-1 run (the demo does the same)::

    python -m cspine_jax.infer.pseudo_labels --data_dir DATA --records RECORDS \
        --stage1 RUN/stage1 --out RUN/vertebrae.csv --decode template --require_all \
        --calibrate_boxes --box_smoothing 0.15 --workdir RUN

reads the fold models under RUN/stage1, the stage-1 records' preprocessing options and folds,
writes the ``--vertebrae`` file for ``data_prep.prepare --task stage2`` and, with ``--workdir``,
RUN/inference.json (the rules with what was fitted, for ``cspine_jax.predict``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from cspine_jax import labels as labels_lib
from cspine_jax.records import vertebrae as vertebrae_lib

NUM_VERTEBRAE = labels_lib.NUM_VERTEBRAE
# A stage-1 scorer: uint8 2.5D images (N, H, W, 3) -> (presence probabilities (N, 7), boxes (N, 4)
# normalised x0, y0, x1, y1). Models, fold ensembles and test oracles all fit this shape.
Stage1Fn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
DECODERS = ("ordered", "template", "threshold")
# A vertebra layout: per vertebra (start, end) as fractions of the C1-top..C7-bottom span.
Template = tuple[tuple[float, float], ...]
# label_dataset keeps the studies' windowed volumes for the box refiner up to this many bytes
# (the demo set's 96 studies: 0.2 GB); beyond it, the refiner's pass reads the files again.
KEEP_VOLUME_BYTES = 2 << 30

# A box refiner: uint8 crop images (N, H, W, 3) of records.box_refine.crop_input -> boxes
# (N, 7, 4) in the crops' normalised coordinates (one row per vertebra; a crop's own row counts).
RefineFn = Callable[[np.ndarray], np.ndarray]

# Per vertebra, how far each box edge (x0, y0, x1, y1) moves, in fractions of the box's width/height.
BoxOffsets = tuple[tuple[float, float, float, float], ...]
# Offsets beyond this (a box shifted by more than its own size) mean a fit gone wrong.
MAX_BOX_OFFSET = 1.0


@dataclasses.dataclass(frozen=True)
class Rules:
  """The derivation's knobs (see the module docstring)."""
  threshold: float = 0.5
  box_quantile: float = 0.0
  decode: str = "ordered"
  require_all: bool = False
  # decode="template": the layout; None until ``label_dataset`` fits it from the masks.
  template: Template | None = None
  # calibrate_boxes: the per-vertebra edge offsets; None until ``label_dataset`` fits them.
  calibrate_boxes: bool = False
  box_offsets: BoxOffsets | None = None
  # Gaussian smoothing of the per-slice boxes along the slices, sigma = this x the C1..C7 span.
  box_smoothing: float = 0.0

  def __post_init__(self):
    if self.decode not in DECODERS:
      raise ValueError(f"decode must be one of {DECODERS}, got {self.decode!r}")
    if self.template is not None:  # JSON gives lists; keep the dataclass hashable and checked
      object.__setattr__(self, "template", check_template(self.template))
    if self.box_offsets is not None:
      if not self.calibrate_boxes:
        raise ValueError("box_offsets given but calibrate_boxes is False")
      object.__setattr__(self, "box_offsets", check_box_offsets(self.box_offsets))
    if not 0.0 < self.threshold < 1.0:
      raise ValueError(f"presence threshold must be in (0, 1), got {self.threshold}")
    if not 0.0 <= self.box_quantile < 0.5:
      raise ValueError(f"box_quantile must be in [0, 0.5), got {self.box_quantile}")
    if not 0.0 <= self.box_smoothing <= 1.0:
      raise ValueError(f"box_smoothing must be in [0, 1] (of the C1..C7 span), got "
                       f"{self.box_smoothing}")


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


def check_box_offsets(offsets) -> BoxOffsets:
  """7 x 4 finite edge offsets, each within +-MAX_BOX_OFFSET, as nested tuples."""
  o = np.asarray(offsets, np.float64)
  if (o.shape != (NUM_VERTEBRAE, 4) or not np.isfinite(o).all()
      or np.abs(o).max() > MAX_BOX_OFFSET):
    raise ValueError(f"box offsets are 7 x (x0, y0, x1, y1) fractions within +-{MAX_BOX_OFFSET}, "
                     f"got {offsets!r}")
  return tuple(tuple(float(x) for x in row) for row in o)


def fit_box_offsets(pairs: Iterable[Sequence[tuple[Sequence[float], Sequence[float]] | None]]
                    ) -> BoxOffsets:
  """Per study, 7 (derived box, mask box) pairs in the same units (None: not both present) ->
  per vertebra the median of (mask - derived) / derived width or height, edge by edge."""
  rel: list[list[np.ndarray]] = [[] for _ in range(NUM_VERTEBRAE)]
  for study in pairs:
    for v, pair in enumerate(study):
      if pair is None:
        continue
      got, truth = (np.asarray(b, np.float64) for b in pair)
      w, h = got[2] - got[0], got[3] - got[1]
      if w > 0 and h > 0:
        rel[v].append((truth - got) / np.array([w, h, w, h]))
  missing = [labels_lib.VERTEBRAE[v] for v in range(NUM_VERTEBRAE) if not rel[v]]
  if missing:
    raise ValueError(f"no segmented study locates {', '.join(missing)}: cannot fit box offsets")
  offsets = np.stack([np.median(r, axis=0) for r in rel])
  return check_box_offsets(np.clip(offsets, -MAX_BOX_OFFSET, MAX_BOX_OFFSET))


def offset_box(box: Sequence[float], offsets: Sequence[float]) -> tuple[float, float, float, float]:
  """A normalised box with its edges moved by ``offsets`` x its width / height, kept in [0, 1]."""
  x0, y0, x1, y1 = box
  w, h = x1 - x0, y1 - y0
  d = np.asarray(offsets, np.float64) * np.array([w, h, w, h])
  nx0, ny0 = max(0.0, x0 + d[0]), max(0.0, y0 + d[1])
  nx1, ny1 = min(1.0, x1 + d[2]), min(1.0, y1 + d[3])
  if nx1 <= nx0 or ny1 <= ny0:  # cannot happen within MAX_BOX_OFFSET unless clipped away
    return (float(x0), float(y0), float(x1), float(y1))
  return float(nx0), float(ny0), float(nx1), float(ny1)


def _valid_boxes(boxes: np.ndarray) -> np.ndarray:
  return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def combine_boxes(boxes: np.ndarray, quantile: float = 0.0) -> tuple[float, float, float, float]:
  """Normalised (N, 4) boxes -> one box: union (q=0) or q / 1-q quantiles of low / high edges."""
  boxes = np.clip(np.asarray(boxes, np.float64).reshape(-1, 4), 0.0, 1.0)
  boxes = boxes[_valid_boxes(boxes)]
  if len(boxes) == 0:
    return (0.0, 0.0, 1.0, 1.0)
  lo = np.quantile(boxes[:, :2], quantile, axis=0)
  hi = np.quantile(boxes[:, 2:], 1.0 - quantile, axis=0)
  x0, y0 = lo
  x1, y1 = np.maximum(hi, lo + 1e-6)
  return float(x0), float(y0), float(min(x1, 1.0)), float(min(y1, 1.0))


def smooth_boxes(boxes: np.ndarray, sigma: float) -> np.ndarray:
  """(S, 4) normalised per-slice boxes smoothed along the slices by a Gaussian of ``sigma``
  slices. Only valid boxes enter (a normalised convolution), and invalid ones stay as they are."""
  from scipy import ndimage
  boxes = np.asarray(boxes, np.float64)
  if sigma <= 0 or len(boxes) == 0:
    return boxes
  valid = _valid_boxes(np.clip(boxes, 0.0, 1.0)).astype(np.float64)
  total = ndimage.gaussian_filter1d(boxes * valid[:, None], sigma, axis=0, mode="nearest")
  weight = ndimage.gaussian_filter1d(valid, sigma, axis=0, mode="nearest")
  smoothed = total / np.maximum(weight, 1e-12)[:, None]
  return np.where(valid[:, None] > 0, smoothed, boxes)


def derive(presence: np.ndarray, boxes: np.ndarray, numbers: Sequence[int] | None = None,
           rules: Rules = Rules()) -> tuple[vertebrae_lib.VertebraPrediction, ...]:
  """Per-slice stage-1 outputs of one study -> the 7 vertebra predictions (module docstring rules).

  Args:
    presence: (S, 7) presence probabilities, slices in sorted (head-to-feet) order.
    boxes: (S, 4) normalised per-slice boxes.
    numbers: the series' file numbers (``Series.numbers``) so ranges survive skipped files.
    rules: threshold, box quantile and smoothing, decode, and the box offsets when
      ``calibrate_boxes``.
  """
  presence = np.asarray(presence, np.float64)
  boxes = np.asarray(boxes, np.float64)
  s = presence.shape[0]
  if presence.shape != (s, NUM_VERTEBRAE) or boxes.shape != (s, 4) or s == 0:
    raise ValueError(f"expected presence (S, 7) and boxes (S, 4) with S > 0, got {presence.shape}, "
                     f"{boxes.shape}")
  numbers = np.full(s, -1, np.int64) if numbers is None else np.asarray(numbers, np.int64)
  if numbers.shape != (s,):
    raise ValueError(f"{numbers.shape[0]} file numbers for {s} slices")
  if rules.calibrate_boxes and rules.box_offsets is None:
    raise ValueError("calibrate_boxes needs Rules.box_offsets (label_dataset fits them from masks)")
  called = presence >= rules.threshold
  if rules.decode == "ordered":
    runs = ordered_ranges(presence, rules.require_all, rules.threshold)
  elif rules.decode == "template":
    if rules.template is None:
      raise ValueError('decode="template" needs Rules.template (label_dataset fits it from masks)')
    runs = template_ranges(presence, rules.template, rules.threshold)
  else:
    runs = [longest_run(called[:, v], presence[:, v]) for v in range(NUM_VERTEBRAE)]
  if rules.decode != "threshold":
    called = np.zeros_like(called)
    for v, run in enumerate(runs):
      if run is not None:
        called[run[0]:run[1] + 1, v] = True
  located = [r for r in runs if r is not None]
  if rules.box_smoothing > 0 and located:
    span = max(r[1] for r in located) - min(r[0] for r in located) + 1
    boxes = smooth_boxes(boxes, rules.box_smoothing * span)
  out = []
  for v in range(NUM_VERTEBRAE):
    run = runs[v]
    if run is None:
      out.append(vertebrae_lib.absent(confidence=float(1.0 - presence[:, v].max())))
      continue
    first, last = run
    span = slice(first, last + 1)
    below_nothing_above = ~called[span, :v].any(axis=1)
    chosen = boxes[span][below_nothing_above] if below_nothing_above.any() else boxes[span]
    if not _valid_boxes(np.clip(chosen, 0, 1)).any():
      chosen = boxes[span]
    box = combine_boxes(chosen, rules.box_quantile)
    if rules.box_offsets is not None:
      box = offset_box(box, rules.box_offsets[v])
    out.append(vertebrae_lib.VertebraPrediction(
        present=True, first_index=first, last_index=last, first_number=int(numbers[first]),
        last_number=int(numbers[last]), box=box, confidence=float(presence[span, v].mean())))
  return tuple(out)


class NoVertebraFound(ValueError):
  """Stage 1 finds no cervical vertebra in a series (:func:`check_found`)."""


def found_confidence(preds: Sequence[vertebrae_lib.VertebraPrediction]) -> float:
  """The highest confidence of a located vertebra (0 when none is located)."""
  return max((p.confidence for p in preds if p.present), default=0.0)


def check_found(preds: Sequence[vertebrae_lib.VertebraPrediction], threshold: float) -> None:
  """Raises :class:`NoVertebraFound` unless some located vertebra's confidence (its mean presence
  over its range) reaches ``threshold`` (module docstring: found or only placed)."""
  best = found_confidence(preds)
  if best < threshold:
    raise NoVertebraFound(
        f"stage 1 finds no cervical vertebra in this series (the most confident located one has "
        f"mean presence {best:.3f} < {threshold}): not a cervical-spine CT, or one the models "
        "cannot read")


def refine(preds: Sequence[vertebrae_lib.VertebraPrediction], volume: np.ndarray,
           refiner: RefineFn, size: tuple[int, int],
           window: tuple[float, float] | None = None, passes: int = 1
           ) -> tuple[vertebrae_lib.VertebraPrediction, ...]:
  """Each located vertebra's box replaced by the refiner's (module docstring).

  ``volume``: the study's (S, H, W) series, the slices the predictions index, uint8 windowed or HU
  with ``window`` (level, width); ``size``: the refiner's input (H, W). A refined box that comes
  out empty keeps the derived one. ``passes`` > 1: the refiner looks again at a crop around its
  own box, each pass starting where the last one ended.
  """
  for _ in range(check_refine_passes(passes)):
    preds = _refine_once(preds, volume, refiner, size, window)
  return tuple(preds)


def check_refine_passes(passes: Any) -> int:
  """``passes`` as the int :func:`refine` takes; ValueError unless it is a whole number >= 1.
  Checked where a run starts (pseudo-labels, the inference spec), not per study."""
  if isinstance(passes, bool) or not isinstance(passes, (int, np.integer)) or passes < 1:
    raise ValueError(f"refine passes must be >= 1 (a whole number); got {passes!r}")
  return int(passes)


def _refine_once(preds, volume, refiner, size, window):
  from cspine_jax.records import box_refine  # pylint: disable=import-outside-toplevel
  _, h, w = volume.shape
  scale = np.array([w, h, w, h], np.float64)
  todo = [(v, p) for v, p in enumerate(preds) if p.present]
  if not todo:
    return tuple(preds)
  crops = [box_refine.crop_input(volume, p.first_index, p.last_index,
                                 np.asarray(p.box, np.float64) * scale, size, window=window)
           for _, p in todo]
  images = np.stack([image for image, _ in crops])
  # Always 7 rows (the last repeated): a jitted refiner sees one shape, whatever was located.
  pad = np.repeat(images[-1:], NUM_VERTEBRAE - len(images), axis=0)
  boxes = np.asarray(refiner(np.concatenate([images, pad])))[:len(todo)]
  if boxes.shape != (len(todo), NUM_VERTEBRAE, 4):
    raise ValueError(f"box refiner returned shape {boxes.shape}, expected ({len(todo)}, 7, 4)")
  out = list(preds)
  for (v, p), (_, frame), rows in zip(todo, crops, boxes):
    box = np.clip(np.asarray(box_refine.from_crop(rows[v], frame)) / scale, 0.0, 1.0)
    if box[2] > box[0] and box[3] > box[1]:
      out[v] = dataclasses.replace(p, box=tuple(float(b) for b in box))
  return tuple(out)


def range_iou(a: tuple[int, int] | None, b: tuple[int, int] | None) -> float:
  """IoU of two inclusive slice ranges (1.0 when both are absent, 0.0 when one is)."""
  if a is None or b is None:
    return float(a is None and b is None)
  inter = max(0, min(a[1], b[1]) - max(a[0], b[0]) + 1)
  union = (a[1] - a[0] + 1) + (b[1] - b[0] + 1) - inter
  return inter / union


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
  """IoU of two (x0, y0, x1, y1) boxes (same units)."""
  return float(labels_lib.box_iou(a, b))


def compare(pred: Sequence[vertebrae_lib.VertebraPrediction], mask: np.ndarray,
            numbers: np.ndarray) -> list[dict]:
  """Per vertebra: range IoU and box IoU (pixels) of a study's predictions against its mask."""
  return compare_extents(pred, labels_lib.vertebra_extents(mask), mask.shape, numbers)


def compare_extents(pred: Sequence[vertebrae_lib.VertebraPrediction],
                    truth: Sequence[labels_lib.VertebraExtent | None], shape: Sequence[int],
                    numbers: np.ndarray) -> list[dict]:
  """:func:`compare` against a mask's ``labels.vertebra_extents`` and (S, H, W) ``shape`` (for
  callers that keep many studies and not their masks)."""
  rows = []
  for v, (p, t) in enumerate(zip(pred, truth)):
    got = vertebrae_lib.resolve(p, numbers, shape)
    rows.append({"vertebra": labels_lib.VERTEBRAE[v],
                 "range_iou": range_iou(None if got is None else got[:2],
                                        None if t is None else (t.first, t.last)),
                 "box_iou": (box_iou(got[2], t.box) if got is not None and t is not None
                             else float(got is None and t is None))})
  return rows


def summarise(rows: Iterable[dict]) -> dict[str, float]:
  """Mean range and box IoU over (study, vertebra) rows."""
  rows = list(rows)
  if not rows:
    return {"pairs": 0, "range_iou": float("nan"), "box_iou": float("nan")}
  return {"pairs": len(rows), "range_iou": float(np.mean([r["range_iou"] for r in rows])),
          "box_iou": float(np.mean([r["box_iou"] for r in rows]))}


def oracle_outputs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """What a perfect stage-1 model would say about a study: mask presences and normalised boxes."""
  sl = labels_lib.slice_labels(mask)
  _, h, w = mask.shape
  return sl.presence.astype(np.float64), sl.box / np.array([w, h, w, h], np.float64)


def label_dataset(data_dir: str | os.PathLike, stage1: Stage1Fn | Mapping[int, Stage1Fn], options,
                  out_path: str | os.PathLike,
                  *, rules: Rules = Rules(), batch_size: int = 32,
                  folds: Mapping[str, int] | None = None, progress: bool = False,
                  refiner: RefineFn | Mapping[int, RefineFn] | None = None,
                  refine_options=None, refine_passes: int = 1,
                  log: Callable[[str], None] = print) -> dict:
  """Runs stage 1 on every study of ``data_dir``/train.csv and writes the ``--vertebrae`` file.

  ``stage1`` is one scorer, or the fold models ``{held-out fold: scorer}``: their outputs averaged
  (the ensemble rule of ``predict.FoldEnsemble``) make the file, and on a study of fold k the
  output of model k alone, from the same pass, gives the out-of-fold comparison (``folds``: study
  uid -> fold). ``options`` are the stage-1 records' ``records.study.Options`` (same windowing and
  resizing as in training). On the studies with a segmentation the derived ranges and boxes are
  compared with the mask (``labels.vertebra_extents``): with the ensemble (which has seen those
  studies in training) and out-of-fold. ``decode="template"`` without a template fits it from the
  segmented studies' masks after the pass: all of them for the file, and for the out-of-fold
  comparison on fold k only the studies outside fold k (those model k trained on);
  ``calibrate_boxes`` without offsets fits them the same way (the file's from the ensemble's boxes,
  fold k's from model k's).
  ``refiner`` (one, or the fold models ``{held-out fold: refiner}`` of a ``box_refine`` run, whose
  records' options are ``refine_options``) then refines every box (:func:`refine`,
  ``refine_passes`` times): the file's by the fold models' average, fold k's out-of-fold ones by
  model k, after the fits above: from the windowed volumes kept in the first pass (up to
  ``KEEP_VOLUME_BYTES``), else read again.
  Unreadable studies are listed and left out of the file; studies in which no vertebra is found
  with confidence (:func:`check_found`) stay in it and are listed.
  Returns {"studies", "failed": [(uid, reason)], "not_found": [uid], "ensemble": IoUs,
  "out_of_fold": IoUs,
  "rules": the rules the file was made with (template and box offsets filled in)}, and with a
  refiner "ensemble_derived" / "out_of_fold_derived": the IoUs before refinement.
  """
  from cspine_jax.infer import predict, reader  # batching; the reader thread
  from cspine_jax.io import dicom, nifti
  from cspine_jax.records import study as study_lib

  refine_passes = check_refine_passes(refine_passes)  # before the stage-1 pass, not after it
  data_dir = pathlib.Path(data_dir)
  uids = labels_lib.read_train_csv(data_dir / "train.csv")["StudyInstanceUID"].tolist()
  inputs = [(uid,) + study_lib.study_paths(data_dir, uid) for uid in uids]

  def load(item):
    uid, image_dir, mask_path = item
    series = dicom.read_series(image_dir, warn=False)
    mask = nifti.load_mask(mask_path, series) if mask_path else None
    return series, mask

  members = dict(stage1) if isinstance(stage1, Mapping) else {None: stage1}
  if not members:
    raise ValueError("label_dataset needs a stage-1 scorer or at least one fold model")
  folds = dict(folds or {})
  # Pass 1: the model outputs of every study (small: S x 11 floats per fold model) and, where
  # there is a mask, its truth; decoding waits until a template can be fitted.
  scored, truths, failed = {}, {}, []
  volumes, kept_bytes = {}, 0
  from tqdm import tqdm
  bar = tqdm(total=len(inputs), unit="study", desc="pseudo-labels", disable=not progress)
  for (uid, _, _), loaded, error, _ in reader.prefetched(inputs, load):
    bar.update()
    if error is not None:
      failed.append((uid, f"{type(error).__name__}: {error}"))
      continue
    series, mask = loaded
    images = study_lib.slice_images(study_lib.Loaded(None, series, None), options)
    scored[uid] = (series.numbers,
                   {k: predict.in_batches(fn, [images], batch_size) for k, fn in members.items()})
    if mask is not None:
      truths[uid] = (mask.shape, labels_lib.vertebra_extents(mask))  # not the mask: memory
    if refiner is not None and refine_options is not None and kept_bytes < KEEP_VOLUME_BYTES:
      # The refiner's windowed uint8 volume, while they fit: its pass then reads nothing again.
      volumes[uid] = study_lib.window(series.volume, refine_options.window_level,
                                      refine_options.window_width)
      kept_bytes += volumes[uid].nbytes
  bar.close()

  def outputs(by_fold, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Model k's outputs, or (k None) the fold models' average (the ensemble rule)."""
    if k is not None:
      return by_fold[k]
    return (np.mean([p for p, _ in by_fold.values()], axis=0),
            np.mean([b for _, b in by_fold.values()], axis=0))

  def fitted(exclude_fold: int | None) -> Rules:
    """The rules with what is fitted from the masks filled in: every mask for the file; for model
    k's out-of-fold check only the studies outside fold k (those model k trained on)."""
    used = [uid for uid in truths if exclude_fold is None or folds.get(uid) != exclude_fold]
    fit = rules
    if rules.decode == "template" and rules.template is None:
      ranges = [[None if e is None else (e.first, e.last) for e in truths[uid][1]] for uid in used]
      fit = dataclasses.replace(fit, template=vertebra_template(ranges))
    if rules.calibrate_boxes and rules.box_offsets is None:
      uncalibrated = dataclasses.replace(fit, calibrate_boxes=False)
      pairs = []
      for uid in used:
        (_, h, w), extents = truths[uid]
        numbers, by_fold = scored[uid]
        preds = derive(*outputs(by_fold, exclude_fold), numbers, uncalibrated)
        pairs.append([(p.box, np.asarray(t.box, np.float64) / [w, h, w, h])
                      if p.present and t is not None else None for p, t in zip(preds, extents)])
      fit = dataclasses.replace(fit, box_offsets=fit_box_offsets(pairs))
    return fit

  file_rules = fitted(None)
  fold_rules = {}
  for k in members:
    if k is None:
      continue
    try:
      fold_rules[k] = fitted(k)
    except ValueError as e:  # only fold k's studies have masks: no honest fit for model k
      log(f"  out-of-fold comparison of fold {k} skipped: {e}")
  located, held_out = {}, {}  # the file's predictions; (fold, model k's) on fold k's masks
  for uid, (numbers, by_fold) in scored.items():
    located[uid] = derive(*outputs(by_fold, None), numbers, file_rules)
    k = folds.get(uid)
    if uid in truths and k is not None and k in by_fold and k in fold_rules:
      held_out[uid] = (k, derive(*by_fold[k], numbers, fold_rules[k]))

  def compared(file_preds, fold_preds) -> tuple[dict, dict]:
    ens, oof = [], []
    for uid, (shape, extents) in truths.items():
      if uid in file_preds:
        ens += compare_extents(file_preds[uid], extents, shape, scored[uid][0])
      if uid in fold_preds:
        oof += compare_extents(fold_preds[uid][1], extents, shape, scored[uid][0])
    return summarise(ens), summarise(oof)

  result = {"failed": failed, "rules": file_rules}
  if refiner is not None:
    result["ensemble_derived"], result["out_of_fold_derived"] = compared(located, held_out)
    _refine_all(inputs, located, held_out, refiner, refine_options, failed, progress, volumes,
                refine_passes)
  result["ensemble"], result["out_of_fold"] = compared(located, held_out)
  vertebrae_lib.write_vertebrae(out_path, located)
  result["studies"] = len(located)
  result["not_found"] = sorted(uid for uid, preds in located.items()
                               if found_confidence(preds) < file_rules.threshold)
  log(f"pseudo-labels: {len(located)} studies -> {out_path} ({len(failed)} unreadable)")
  if result["not_found"]:
    shown = ", ".join(result["not_found"][:10]) + (" ..." if len(result["not_found"]) > 10 else "")
    log(f"  stage 1 finds no vertebra with confidence >= {file_rules.threshold} in "
        f"{len(result['not_found'])} studies (their ranges and boxes are placements, not "
        f"findings): {shown}")
  for name in ("ensemble", "out_of_fold"):
    s = result[name]
    if s["pairs"]:
      before = (f" (derived {result[name + '_derived']['box_iou']:.3f}, then refined)"
                if refiner is not None else "")
      log(f"  vs masks ({name}, {s['pairs']} study-vertebra pairs): slice-range IoU "
          f"{s['range_iou']:.3f}, box IoU {s['box_iou']:.3f}{before}")
  for uid, reason in failed:
    log(f"  unreadable {uid}: {reason}")
  return result


def _refine_all(inputs, located: dict, held_out: dict, refiner, options, failed: list,
                progress: bool, volumes: dict, passes: int = 1) -> None:
  """:func:`label_dataset`'s second pass: refines ``located`` (by the refiners' average) and
  ``held_out`` (fold k's by refiner k) in place, from the kept ``volumes`` or the files read
  again; a study unreadable now joins ``failed``."""
  import functools  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from cspine_jax.infer import reader  # pylint: disable=import-outside-toplevel
  from cspine_jax.io import dicom  # pylint: disable=import-outside-toplevel
  from cspine_jax.records import study as study_lib  # pylint: disable=import-outside-toplevel
  if options is None:
    raise ValueError("a box refiner needs refine_options (its records' preprocessing options)")
  members = dict(refiner) if isinstance(refiner, Mapping) else {None: refiner}
  missing = sorted({k for k, _ in held_out.values()} - set(members)) if None not in members else []
  if missing:
    raise ValueError(f"no box refiner held out fold(s) {missing}: out-of-fold boxes need one")

  def averaged(images):
    return np.mean([fn(images) for fn in members.values()], axis=0)

  def load(item):
    if item[0] in volumes:
      return volumes.pop(item[0])
    window = functools.partial(study_lib.window, level=options.window_level,
                               width=options.window_width)
    return dicom.read_series(item[1], warn=False, map_hu=window).volume

  todo = [item for item in inputs if item[0] in located]
  bar = tqdm(total=len(todo), unit="study", desc="box refinement", disable=not progress)
  for (uid, _, _), volume, error, _ in reader.prefetched(todo, load):
    bar.update()
    if error is not None:
      failed.append((uid, f"{type(error).__name__}: {error}"))
      located.pop(uid)
      held_out.pop(uid, None)
      continue
    located[uid] = refine(located[uid], volume, averaged, options.image_size, passes=passes)
    if uid in held_out:
      k, preds = held_out[uid]
      held_out[uid] = (k, refine(preds, volume, members.get(k, averaged), options.image_size,
                                 passes=passes))
  bar.close()


def label_from_run(data_dir: str | os.PathLike, stage1_dir: str | os.PathLike,
                   records_dir: str | os.PathLike, out_path: str | os.PathLike, *,
                   rules: Rules = Rules(), batch_size: int = 32, progress: bool = False,
                   refine_dir: str | os.PathLike | None = None, refine_passes: int = 1,
                   log: Callable[[str], None] = print) -> dict:
  """:func:`label_dataset` with the fold models of a stage-1 training run (``stage1_dir/fold_*``)
  and the preprocessing options and folds of the stage-1 records they trained on
  (``records_dir/stage1``); with ``refine_dir``, a box_refine run's fold models refine the boxes
  (options from ``records_dir/box_refine``), ``refine_passes`` times. Returns label_dataset's
  dict plus "options" (those options), "refine_options" (the refiner's, or None) and
  "refine_passes"."""
  from cspine_jax.infer import predict
  from cspine_jax.records import pipeline, shards
  from cspine_jax.records import study as study_lib

  def options_of(task: str) -> study_lib.Options:
    identity = shards.read_json(pathlib.Path(records_dir) / task / pipeline.IDENTITY)
    return study_lib.Options.from_json(identity["options"])

  manifest = shards.read_manifest(pathlib.Path(records_dir) / "stage1")
  options = options_of("stage1")
  ensemble = predict.FoldEnsemble.load(stage1_dir, "stage1")
  # One pass per fold model: averaged for the file, each alone on its held-out studies.
  scorers = {k: predict.stage1_scorer(ensemble, fold=k) for k in ensemble.folds}
  refiners, refine_options = None, None
  if refine_dir is not None:
    refine_options = options_of("box_refine")
    refine = predict.FoldEnsemble.load(refine_dir, "box_refine")
    refiners = {k: predict.refine_scorer(refine, fold=k) for k in refine.folds}
  result = label_dataset(data_dir, scorers, options, out_path, rules=rules, batch_size=batch_size,
                         folds=manifest["folds"], progress=progress, refiner=refiners,
                         refine_options=refine_options, refine_passes=refine_passes, log=log)
  return dict(result, options=options, refine_options=refine_options, refine_passes=refine_passes)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m cspine_jax.infer.pseudo_labels",
                              description="Stage-1 pseudo-labels: the --vertebrae file.")
  p.add_argument("--data_dir", required=True, help="RSNA-format folder (train.csv, train_images/)")
  p.add_argument("--records", required=True, help="records folder holding stage1/ (options, folds)")
  p.add_argument("--stage1", required=True, help="stage-1 run folder (fold_*/checkpoints)")
  p.add_argument("--out", required=True, help="the --vertebrae CSV to write")
  p.add_argument("--refine", help="box_refine run folder (fold_*/checkpoints): refine the boxes "
                 "(its records under --records/box_refine)")
  p.add_argument("--refine_passes", type=int, default=1,
                 help="refiner passes per box, each from the last one's box (with --refine)")
  p.add_argument("--workdir", help="also write WORKDIR/inference.json for cspine_jax.predict "
                 "(stage-2 preprocessing taken as the stage-1 records' options)")
  p.add_argument("--decode", choices=DECODERS, default=Rules.decode)
  p.add_argument("--threshold", type=float, default=Rules.threshold)
  p.add_argument("--box_quantile", type=float, default=Rules.box_quantile)
  p.add_argument("--box_smoothing", type=float, default=Rules.box_smoothing,
                 help="Gaussian smoothing of the per-slice boxes along the slices, sigma as a "
                      "fraction of the C1..C7 span (0: none)")
  p.add_argument("--require_all", action="store_true", help="every vertebra on >= 1 slice")
  p.add_argument("--calibrate_boxes", action="store_true",
                 help="fit per-vertebra box-edge offsets on the segmented studies")
  p.add_argument("--top_n", type=int, default=7, help="written to inference.json")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--no_progress", action="store_true")
  args = p.parse_args(argv)
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  try:
    rules = Rules(threshold=args.threshold, box_quantile=args.box_quantile,
                  box_smoothing=args.box_smoothing, decode=args.decode,
                  require_all=args.require_all, calibrate_boxes=args.calibrate_boxes)
    result = label_from_run(args.data_dir, args.stage1, args.records, args.out, rules=rules,
                            batch_size=args.batch_size, progress=not args.no_progress,
                            refine_dir=args.refine, refine_passes=args.refine_passes)
  except (OSError, ValueError, KeyError) as e:  # missing runs/records, unfittable rules
    print(f"pseudo_labels: error: {e}", file=sys.stderr)
    return 2
  if args.workdir:
    from cspine_jax.infer import predict
    path = predict.write_spec(args.workdir, result["options"], result["options"],
                              top_n=args.top_n, rules=result["rules"],
                              refine_options=result["refine_options"],
                              refine_passes=result["refine_passes"])
    print(f"inference spec -> {path}")
  return 1 if result["failed"] else 0


if __name__ == "__main__":
  sys.exit(main())
