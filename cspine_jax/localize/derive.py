"""Stage-1 outputs of one study -> its seven vertebra predictions (the rules of the pseudo-labels).

Per vertebra: the range by the decoder of :class:`Rules` (``localize.ranges``); the box from the
per-slice boxes over the range, restricted to the slices where no vertebra above this one is
called present (the vertebra above reaches down into this one's top slices with its arch and
spinous process and would widen it, while the one below starts inside this one's outline), then
combined, smoothed and calibrated as ``localize.boxes`` says; the confidence is the mean presence
over the range (absent: 1 - the peak probability). ``box_rule="study"`` is the seed's instead: one
box for the whole study, the union of the boxes of every slice where some vertebra's value
exceeds the threshold, given to each located vertebra (stage 2 then crops it square,
``pp.options.Options.square_crop``).

Found or only placed: ``require_all`` and the template place all seven vertebrae in any series, a
chest CT included. A study is *found* when some located vertebra's confidence reaches the
threshold (:func:`check_found`); inference gives a study where none is found the prior and an
error entry instead of stage 2's answer about the wrong anatomy.
"""
from __future__ import annotations

import dataclasses
from typing import Callable
from typing import Sequence

import numpy as np

from cspine_jax import labels as labels_lib
from cspine_jax.io import vertebrae as vertebrae_lib
from cspine_jax.localize import boxes as boxes_lib
from cspine_jax.localize import ranges as ranges_lib

# A stage-1 scorer: uint8 2.5D images (N, H, W, 3) -> (presence probabilities (N, 7), boxes (N, 4)
# normalised x0, y0, x1, y1). Models, fold ensembles and test oracles all fit this shape.
Stage1Fn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

NUM_VERTEBRAE = labels_lib.NUM_VERTEBRAE
BOX_RULES = ("vertebra", "study")


@dataclasses.dataclass(frozen=True)
class Rules:
  """The derivation's knobs (see the module docstring)."""
  threshold: float = 0.5
  box_quantile: float = 0.0
  decode: str = "ordered"
  require_all: bool = False
  # decode="template": the layout; None until ``label_dataset`` fits it from the masks.
  template: ranges_lib.Template | None = None
  # calibrate_boxes: the per-vertebra edge offsets; None until ``label_dataset`` fits them.
  calibrate_boxes: bool = False
  box_offsets: boxes_lib.BoxOffsets | None = None
  # Gaussian smoothing of the per-slice boxes along the slices, sigma = this x the C1..C7 span.
  box_smoothing: float = 0.0
  # "vertebra": a box per vertebra over its range; "study": one box per study (the seed's).
  box_rule: str = "vertebra"
  # decode="rolling": the centred window and the fewest slices inside the series it needs.
  rolling_window: int = 5
  rolling_min_periods: int = 3

  def __post_init__(self):
    if self.decode not in ranges_lib.DECODERS:
      raise ValueError(f"decode must be one of {ranges_lib.DECODERS}, got {self.decode!r}")
    if self.template is not None:  # JSON gives lists; keep the dataclass hashable and checked
      object.__setattr__(self, "template", ranges_lib.check_template(self.template))
    if self.box_offsets is not None:
      if not self.calibrate_boxes:
        raise ValueError("box_offsets given but calibrate_boxes is False")
      object.__setattr__(self, "box_offsets", boxes_lib.check_box_offsets(self.box_offsets))
    if not 0.0 < self.threshold < 1.0:
      raise ValueError(f"presence threshold must be in (0, 1), got {self.threshold}")
    if not 0.0 <= self.box_quantile < 0.5:
      raise ValueError(f"box_quantile must be in [0, 0.5), got {self.box_quantile}")
    if not 0.0 <= self.box_smoothing <= 1.0:
      raise ValueError(f"box_smoothing must be in [0, 1] (of the C1..C7 span), got "
                       f"{self.box_smoothing}")
    if self.box_rule not in BOX_RULES:
      raise ValueError(f"box_rule must be one of {BOX_RULES}, got {self.box_rule!r}")
    if not 1 <= self.rolling_min_periods <= self.rolling_window:
      raise ValueError(f"rolling needs 1 <= min_periods <= window, got {self.rolling_min_periods}, "
                       f"{self.rolling_window}")


def derive(
    presence: np.ndarray, boxes: np.ndarray, numbers: Sequence[int] | None = None,
    rules: Rules = Rules()
) -> tuple[vertebrae_lib.VertebraPrediction, ...]:
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
    runs = ranges_lib.ordered_ranges(presence, rules.require_all, rules.threshold)
  elif rules.decode == "template":
    if rules.template is None:
      raise ValueError('decode="template" needs Rules.template (label_dataset fits it from masks)')
    runs = ranges_lib.template_ranges(presence, rules.template, rules.threshold)
  elif rules.decode == "rolling":
    runs = ranges_lib.rolling_ranges(presence, rules.threshold, rules.rolling_window,
                                     rules.rolling_min_periods)
  else:
    runs = [ranges_lib.longest_run(called[:, v], presence[:, v]) for v in range(NUM_VERTEBRAE)]
  if rules.decode != "threshold":
    called = np.zeros_like(called)
    for v, run in enumerate(runs):
      if run is not None:
        called[run[0]:run[1] + 1, v] = True
  located = [r for r in runs if r is not None]
  if rules.box_smoothing > 0 and located:
    span = max(r[1] for r in located) - min(r[0] for r in located) + 1
    boxes = boxes_lib.smooth_boxes(boxes, rules.box_smoothing * span)
  study_box = None
  if rules.box_rule == "study":
    shown = (presence > rules.threshold).any(axis=1)
    study_box = boxes_lib.combine_boxes(boxes[shown], rules.box_quantile)
  out = []
  for v in range(NUM_VERTEBRAE):
    run = runs[v]
    if run is None:
      out.append(vertebrae_lib.absent(confidence=float(1.0 - presence[:, v].max())))
      continue
    first, last = run
    span = slice(first, last + 1)
    if study_box is not None:
      box = study_box
    else:
      below_nothing_above = ~called[span, :v].any(axis=1)
      chosen = boxes[span][below_nothing_above] if below_nothing_above.any() else boxes[span]
      if not boxes_lib.valid_boxes(np.clip(chosen, 0, 1)).any():
        chosen = boxes[span]
      box = boxes_lib.combine_boxes(chosen, rules.box_quantile)
    if rules.box_offsets is not None:
      box = boxes_lib.offset_box(box, rules.box_offsets[v])
    out.append(
        vertebrae_lib.VertebraPrediction(
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
