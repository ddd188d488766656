"""localize: ranges, boxes, rules and comparison with masks, exact against an oracle stage 1."""
import json
import pathlib

import numpy as np
import pytest

from cspine_jax import labels
from cspine_jax.infer import spec as spec_lib
from cspine_jax.io import vertebrae as vertebrae_lib
from cspine_jax.localize import boxes as boxes_lib
from cspine_jax.localize import compare as compare_lib
from cspine_jax.localize import derive as derive_lib
from cspine_jax.localize import ranges as ranges_lib


def _mask():
  """40 slices, C1..C7 stacked with one-slice overlaps; each vertebra has its own footprint."""
  m = np.zeros((40, 32, 32), np.uint8)
  for v in range(7):
    a = 1 + 5 * v
    m[a:a + 6, 8 + v % 3:20 + v, 6 + v:18 + 2 * v % 7] = v + 1
  return m


def test_longest_run_and_iou_helpers():
  assert ranges_lib.longest_run(np.array([0, 1, 1, 0, 1, 1, 1, 0], bool)) == (4, 6)
  # Equal lengths: the heavier run wins.
  w = np.array([0, .6, .6, 0, .9, .9, 0])
  assert ranges_lib.longest_run(w > .5, w) == (4, 5)
  assert ranges_lib.longest_run(np.zeros(4, bool)) is None
  assert compare_lib.range_iou((0, 9), (5, 14)) == pytest.approx(5 / 15)
  assert compare_lib.range_iou(None, None) == 1.0 and compare_lib.range_iou((1, 2), None) == 0
  assert compare_lib.box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
  assert boxes_lib.combine_boxes(np.array([[.1, .2, .5, .6], [.2, .1, .6, .5], [0, 0, 0, 0]])) \
      == pytest.approx((.1, .1, .6, .6))
  with pytest.raises(ValueError):
    derive_lib.Rules(threshold=1.5)


def test_oracle_ranges_and_boxes_match_the_mask_exactly():
  mask = _mask()
  presence, boxes = compare_lib.oracle_outputs(mask)
  numbers = np.arange(100, 140)
  preds = derive_lib.derive(presence, boxes, numbers)
  truth = labels.vertebra_extents(mask)
  sl = labels.slice_labels(mask)
  for v, (p, t) in enumerate(zip(preds, truth)):
    assert p.present and (p.first_index, p.last_index) == (t.first, t.last)
    assert (p.first_number, p.last_number) == (100 + t.first, 100 + t.last)
    # Expected box: union of the per-slice boxes where no vertebra above this one shows.
    own = [s for s in range(t.first, t.last + 1) if not sl.presence[s, :v].any()]
    b = sl.box[own]
    expect = np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]) / 32
    np.testing.assert_allclose(p.box, expect, atol=1e-9)
    assert p.confidence == 1.0
  rows = compare_lib.compare(preds, mask, numbers)
  summary = compare_lib.summarise(rows)
  assert summary["range_iou"] == 1.0
  # Each vertebra's footprint is the same on all its slices, but here (unlike in a spine) the next
  # one's footprint does not lie inside it on their shared slice, so the box can be a bit wider.
  assert 0.8 < summary["box_iou"] < 1.0
  assert rows[6]["box_iou"] == 1.0  # C7: no vertebra below it, so its box is exact


def test_noisy_presence_and_absent_vertebra(tmp_path):
  mask = _mask()
  mask[mask == 7] = 0  # C7 not in the study
  presence, boxes = compare_lib.oracle_outputs(mask)
  presence = presence * 0.9 + 0.05
  presence[38, 0] = 0.8  # a stray confident slice far below C1: not part of its range
  preds = derive_lib.derive(presence, boxes)
  assert (preds[0].first_index, preds[0].last_index) == (1, 6)
  assert preds[0].confidence == pytest.approx(0.95)
  assert not preds[6].present and preds[6].confidence == pytest.approx(0.95)
  path = tmp_path / "vertebrae.csv"
  vertebrae_lib.write_vertebrae(path, {"1.2.3": preds})
  back = vertebrae_lib.read_vertebrae(path)["1.2.3"]
  assert [p.present for p in back] == [True] * 6 + [False]
  assert back[2].first_index == preds[2].first_index
  with pytest.raises(ValueError, match="expected presence"):
    derive_lib.derive(presence[:, :6], boxes)


def test_ordered_decoding_keeps_the_levels_in_order():
  mask = _mask()
  presence, boxes = compare_lib.oracle_outputs(mask)
  truth = [(e.first, e.last) for e in labels.vertebra_extents(mask)]
  assert ranges_lib.ordered_ranges(presence) == truth
  # A confident C2 call far below C7 cannot pull C2 there: the levels keep their order.
  noisy = presence * 0.8 + 0.1
  noisy[39, 1] = 0.95
  assert ranges_lib.ordered_ranges(noisy) == truth
  by_threshold = derive_lib.derive(noisy, boxes, rules=derive_lib.Rules(decode="threshold"))
  assert (by_threshold[1].first_index, by_threshold[1].last_index) == truth[1]  # longest run wins
  # A weak model (every probability under 0.5, highest on the right slices): thresholding calls
  # everything absent; the ordered decoding with require_all still finds each level.
  weak = presence * 0.3 + 0.1
  assert not any(
      p.present for p in derive_lib.derive(weak, boxes, rules=derive_lib.Rules(decode="threshold")))
  assert not any(p.present for p in derive_lib.derive(weak, boxes))
  got = derive_lib.derive(weak, boxes, rules=derive_lib.Rules(require_all=True))
  for p, (first, last) in zip(got, truth):
    assert p.present and first <= p.first_index <= p.last_index <= last
  # require_all gives every level at least one slice: in a study cut inside C6, C7 gets the last.
  cut = presence[:28]
  ranges = ranges_lib.ordered_ranges(cut * 0.3 + 0.1, require_all=True)
  assert all(r is not None for r in ranges) and ranges[6][1] == 27
  with pytest.raises(ValueError, match="decode"):
    derive_lib.Rules(decode="viterbi")


def test_found_confidence_tells_a_finding_from_a_placement():
  presence = np.full((12, 7), 0.1)
  placed = derive_lib.derive(presence, np.tile([[0.2, 0.2, 0.8, 0.8]], (12, 1)),
                             rules=derive_lib.Rules(decode="ordered", require_all=True))
  assert all(p.present for p in placed)
  assert derive_lib.found_confidence(placed) == pytest.approx(0.1)
  with pytest.raises(derive_lib.NoVertebraFound, match="0.100 < 0.5"):
    derive_lib.check_found(placed, 0.5)
  presence[3:6, 2] = 0.9
  found = derive_lib.derive(presence, np.tile([[0.2, 0.2, 0.8, 0.8]], (12, 1)),
                            rules=derive_lib.Rules(decode="ordered", require_all=True))
  derive_lib.check_found(found, 0.5)  # C3 is found: no error
  assert derive_lib.found_confidence([vertebrae_lib.absent(0.9)] * 7) == 0.0


def test_template_fit_places_the_layout_where_per_slice_evidence_is_ambiguous():
  """Middle levels that a per-slice model confuses are placed by the layout fitted at its ends."""
  truth = [(2, 6), (5, 14), (14, 19), (20, 25), (26, 31), (32, 37), (38, 44)]
  template = ranges_lib.vertebra_template([truth, [(a + 3, b + 3) for a, b in truth]])
  lo, hi = truth[0][0], truth[-1][1]
  np.testing.assert_allclose(template[3], ((20 - lo) / (hi - lo), (25 - lo) / (hi - lo)))
  presence = np.full((50, 7), 0.05)
  for v, (a, b) in enumerate(truth):
    presence[a:b + 1, v] = 0.95
  # C4..C6 indistinguishable slice by slice: each of them 0.6 anywhere from C4's top to C6's end.
  presence[20:38, 3:6] = 0.6
  rules = derive_lib.Rules(decode="template", template=template)
  got = [(p.first_index, p.last_index)
         for p in derive_lib.derive(presence, np.tile([0.2, 0.2, 0.8, 0.8], (50, 1)), rules=rules)]
  assert got == truth
  ordered = ranges_lib.ordered_ranges(presence, require_all=True)
  assert ordered[3:6] != truth[3:6]  # what the template fixes
  # A study twice as long (thinner slices) is fitted by the same layout.
  stretched = np.repeat(presence, 2, axis=0)
  got2 = ranges_lib.template_ranges(stretched, template)
  assert all(
      abs(a - 2 * t[0]) <= 1 and abs(b - (2 * t[1] + 1)) <= 1 for (a, b), t in zip(got2, truth))


def test_template_rules_are_checked_and_survive_the_inference_spec(tmp_path):
  with pytest.raises(ValueError, match="7 \\(start, end\\)"):
    derive_lib.Rules(decode="template", template=((0.0, 0.2),) * 6)
  with pytest.raises(ValueError, match="needs Rules.template"):
    derive_lib.derive(np.full((10, 7), .5), np.zeros((10, 4)),
                      rules=derive_lib.Rules(decode="template"))
  with pytest.raises(ValueError, match="all seven"):
    ranges_lib.vertebra_template([[(0, 3)] * 6 + [None]])
  template = tuple((v / 8, (v + 1.5) / 8) for v in range(7))
  rules = derive_lib.Rules(decode="template", template=template)
  spec_lib.write_spec(tmp_path, rules=rules)
  spec = json.loads((tmp_path / spec_lib.SPEC).read_text())
  assert derive_lib.Rules(**spec["rules"]) == rules


def test_box_offsets_fit_apply_and_validate(tmp_path):
  got, truth = (0.2, 0.2, 0.6, 0.4), (0.1, 0.2, 0.7, 0.5)  # width 0.4, height 0.2
  pairs = [[(got, truth)] * 7, [(got, truth)] * 6 + [None], [((0.2, 0.2, 0.6, 0.4), got)] * 7]
  offsets = boxes_lib.fit_box_offsets(pairs)  # the median of the three studies' offsets
  np.testing.assert_allclose(offsets[0], (-0.25, 0.0, 0.25, 0.5))
  np.testing.assert_allclose(offsets[6], (-0.125, 0.0, 0.125, 0.25))
  np.testing.assert_allclose(boxes_lib.offset_box(got, offsets[0]), truth)
  np.testing.assert_allclose(boxes_lib.offset_box((0.0, 0.0, 1.0, 0.5), offsets[0]),
                             (0.0, 0.0, 1.0, 0.75))  # kept inside the image
  with pytest.raises(ValueError, match="no segmented study locates C3"):
    boxes_lib.fit_box_offsets([[(got, truth)] * 2 + [None] + [(got, truth)] * 4])
  with pytest.raises(ValueError, match="7 x \\(x0, y0, x1, y1\\)"):
    derive_lib.Rules(calibrate_boxes=True, box_offsets=((0.0,) * 4,) * 6)
  with pytest.raises(ValueError, match="calibrate_boxes is False"):
    derive_lib.Rules(box_offsets=offsets)
  with pytest.raises(ValueError, match="needs Rules.box_offsets"):
    derive_lib.derive(np.full((10, 7), .5), np.zeros((10, 4)),
                      rules=derive_lib.Rules(calibrate_boxes=True))
  rules = derive_lib.Rules(calibrate_boxes=True, box_offsets=offsets)
  spec_lib.write_spec(tmp_path, rules=rules)
  spec = json.loads((tmp_path / spec_lib.SPEC).read_text())
  assert derive_lib.Rules(**spec["rules"]) == rules


def test_box_smoothing_denoises_per_slice_boxes():
  """Gaussian smoothing along the slices: constant and linear runs of valid boxes are kept,
  invalid (empty) boxes are neither changed nor mixed in, and noisy per-slice boxes give boxes
  closer to the mask's."""
  boxes = np.tile([.2, .3, .6, .7], (12, 1))
  boxes[5] = 0  # a slice without a box
  np.testing.assert_allclose(boxes_lib.smooth_boxes(boxes, 2.0), boxes, atol=1e-12)
  ramp = np.stack(
      [np.linspace(.1, .3, 40),
       np.full(40, .2),
       np.linspace(.5, .7, 40),
       np.full(40, .8)], 1)
  got = boxes_lib.smooth_boxes(ramp, 3.0)
  np.testing.assert_allclose(got[12:28], ramp[12:28], atol=1e-9)  # away from the ends
  np.testing.assert_array_equal(boxes_lib.smooth_boxes(ramp, 0.0), ramp)
  mask = _mask()
  presence, boxes = compare_lib.oracle_outputs(mask)
  noisy = boxes + np.where(boxes.any(1, keepdims=True),
                           np.random.default_rng(0).normal(0, 0.04, boxes.shape), 0)
  ious = {}
  for f in (0.0, 0.15):
    rules = derive_lib.Rules(box_smoothing=f)
    ious[f] = compare_lib.summarise(
        compare_lib.compare(derive_lib.derive(presence, noisy, rules=rules), mask,
                            np.arange(40)))["box_iou"]
  assert ious[0.15] > ious[0.0] + 0.05, ious
  with pytest.raises(ValueError, match="box_smoothing"):
    derive_lib.Rules(box_smoothing=1.5)
  rules = derive_lib.Rules(box_smoothing=0.15)
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    spec_lib.write_spec(d, rules=rules)
    spec = json.loads((pathlib.Path(d) / spec_lib.SPEC).read_text())
  assert derive_lib.Rules(**spec["rules"]) == rules


def _ratio_mask():
  """60 slices; each vertebra's footprint swells and shrinks over its slices, so its area ratio
  rises from small values to 1 and falls again, as in a real spine."""
  m = np.zeros((60, 40, 40), np.uint8)
  for v in range(7):
    first = 2 + 7 * v
    for k in range(9):
      r = 1 + min(k, 8 - k) * 2
      m[first + k, 20 - r // 2:20 + r // 2 + 1, 4 + 4 * v:4 + 4 * v + r] = v + 1
  return m


def test_rolling_mean_is_pandas_centred_rolling_mean():
  import pandas as pd
  x = np.random.default_rng(0).random((12, 3))
  for window, periods in ((5, 3), (4, 2), (3, 3)):
    want = pd.DataFrame(x).rolling(window, min_periods=periods, center=True).mean().to_numpy()
    np.testing.assert_allclose(ranges_lib.rolling_mean(x, window, periods), want, atol=1e-12)


def test_seed_decoder_on_an_oracle_gives_its_ranges_and_one_box_per_study(tmp_path):
  import pandas as pd
  mask = _ratio_mask()
  sl = labels.slice_labels(mask)
  ratio = sl.area_ratio.astype(np.float64)  # what the seed's head regresses, here exact
  boxes = sl.box / 40.0
  rules = derive_lib.Rules(decode="rolling", threshold=0.3, box_rule="study")
  preds = derive_lib.derive(ratio, boxes, np.arange(200, 260), rules)
  rolled = pd.DataFrame(ratio).rolling(5, min_periods=3, center=True).mean().to_numpy()
  truth = labels.vertebra_extents(mask)
  shown = (ratio > 0.3).any(axis=1)
  b = sl.box[shown]
  study_box = np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]) / 40.0
  for v, p in enumerate(preds):
    over = np.flatnonzero(rolled[:, v] > 0.3)  # the seed's window_range(thresh=0.3)
    assert p.present and (p.first_index, p.last_index) == (over[0], over[-1])
    assert p.first_number == 200 + over[0]
    # Inside the true range, trimmed at the faint ends (the seed's 24 slices skip them).
    assert truth[v].first < p.first_index and p.last_index < truth[v].last
    np.testing.assert_allclose(p.box, study_box, atol=1e-9)  # every vertebra: the study's box
  # The project's decoders on the same outputs keep one box per vertebra.
  own = derive_lib.derive(ratio, boxes, None, derive_lib.Rules(decode="rolling", threshold=0.3))
  assert len({p.box for p in own}) == 7
  # A vertebra never over the threshold is absent; the rules travel through the inference spec.
  faint = ratio.copy()
  faint[:, 3] = np.minimum(faint[:, 3], 0.25)
  assert not derive_lib.derive(faint, boxes, None, rules)[3].present
  path = spec_lib.write_spec(tmp_path, rules=rules)
  assert derive_lib.Rules(**json.loads(path.read_text())["rules"]) == rules
  with pytest.raises(ValueError, match="box_rule"):
    derive_lib.Rules(box_rule="slice")
  with pytest.raises(ValueError, match="min_periods"):
    derive_lib.Rules(decode="rolling", rolling_window=3, rolling_min_periods=4)
