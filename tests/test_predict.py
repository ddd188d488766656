"""Inference: stage-1 pseudo-labels (range/box derivation), submission, fallbacks."""
import numpy as np
import pytest

from cspine_jax import labels
from cspine_jax.infer import pseudo_labels
from cspine_jax.records import vertebrae as vertebrae_lib


def _mask():
  """40 slices, C1..C7 stacked with one-slice overlaps; each vertebra has its own footprint."""
  m = np.zeros((40, 32, 32), np.uint8)
  for v in range(7):
    a = 1 + 5 * v
    m[a:a + 6, 8 + v % 3:20 + v, 6 + v:18 + 2 * v % 7] = v + 1
  return m


def test_longest_run_and_iou_helpers():
  assert pseudo_labels.longest_run(np.array([0, 1, 1, 0, 1, 1, 1, 0], bool)) == (4, 6)
  # Equal lengths: the heavier run wins.
  w = np.array([0, .6, .6, 0, .9, .9, 0])
  assert pseudo_labels.longest_run(w > .5, w) == (4, 5)
  assert pseudo_labels.longest_run(np.zeros(4, bool)) is None
  assert pseudo_labels.range_iou((0, 9), (5, 14)) == pytest.approx(5 / 15)
  assert pseudo_labels.range_iou(None, None) == 1.0 and pseudo_labels.range_iou((1, 2), None) == 0
  assert pseudo_labels.box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
  assert pseudo_labels.combine_boxes(np.array([[.1, .2, .5, .6], [.2, .1, .6, .5], [0, 0, 0, 0]])) \
      == pytest.approx((.1, .1, .6, .6))
  with pytest.raises(ValueError):
    pseudo_labels.Rules(threshold=1.5)


def test_oracle_ranges_and_boxes_match_the_mask_exactly():
  mask = _mask()
  presence, boxes = pseudo_labels.oracle_outputs(mask)
  numbers = np.arange(100, 140)
  preds = pseudo_labels.derive(presence, boxes, numbers)
  truth = labels.vertebra_extents(mask)
  sl = labels.slice_labels(mask)
  for v, (p, t) in enumerate(zip(preds, truth)):
    assert p.present and (p.first_index, p.last_index) == (t.first, t.last)
    assert (p.first_number, p.last_number) == (100 + t.first, 100 + t.last)
    # Expected box: union of the per-slice boxes where only this vertebra shows.
    own = [s for s in range(t.first, t.last + 1) if sl.presence[s].sum() == 1]
    b = sl.box[own]
    expect = np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]) / 32
    np.testing.assert_allclose(p.box, expect, atol=1e-9)
    assert p.confidence == 1.0
  rows = pseudo_labels.compare(preds, mask, numbers)
  summary = pseudo_labels.summarise(rows)
  assert summary["range_iou"] == 1.0
  assert summary["box_iou"] == 1.0  # each vertebra's footprint is the same on all its slices


def test_noisy_presence_and_absent_vertebra(tmp_path):
  mask = _mask()
  mask[mask == 7] = 0  # C7 not in the study
  presence, boxes = pseudo_labels.oracle_outputs(mask)
  presence = presence * 0.9 + 0.05
  presence[38, 0] = 0.8  # a stray confident slice far below C1: not part of its range
  preds = pseudo_labels.derive(presence, boxes)
  assert (preds[0].first_index, preds[0].last_index) == (1, 6)
  assert preds[0].confidence == pytest.approx(0.95)
  assert not preds[6].present and preds[6].confidence == pytest.approx(0.95)
  path = tmp_path / "vertebrae.csv"
  vertebrae_lib.write_vertebrae(path, {"1.2.3": preds})
  back = vertebrae_lib.read_vertebrae(path)["1.2.3"]
  assert [p.present for p in back] == [True] * 6 + [False]
  assert back[2].first_index == preds[2].first_index
  with pytest.raises(ValueError, match="expected presence"):
    pseudo_labels.derive(presence[:, :6], boxes)
