"""The pseudo-label driver (infer.pseudo_labels) and its command line: stage 1 over a data folder."""
import json
import pathlib
import subprocess
import sys

import numpy as np

from cspine_jax import labels
from cspine_jax.infer import pseudo_labels
from cspine_jax.io import vertebrae as vertebrae_lib
from cspine_jax.localize import boxes as boxes_lib
from cspine_jax.localize import compare as compare_lib
from cspine_jax.localize import derive as derive_lib
from cspine_jax.localize import ranges as ranges_lib
from cspine_jax.pp import options as options_lib
from cspine_jax.pp import study as study_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_oracle_pseudo_labels_on_generated_studies(tmp_path, capsys):
  from cspine_jax import synthetic
  from cspine_jax.io import dicom
  from cspine_jax.io import nifti
  data = synthetic.generate(tmp_path / "rsna", 4, 3, size="tiny", num_test=0,
                            segmented_fraction=1.0)
  truth = json.loads((pathlib.Path(data) / "ground_truth.json").read_text())["studies"]
  located, rows = {}, []
  for uid, gt in truth.items():
    series = dicom.read_series(pathlib.Path(data) / "train_images" / uid, warn=False)
    mask = nifti.load_mask(pathlib.Path(data) / "segmentations" / f"{uid}.nii", series)
    presence, boxes = compare_lib.oracle_outputs(mask)
    preds = derive_lib.derive(presence, boxes, series.numbers)
    for name, p in zip(labels.VERTEBRAE, preds):
      t = gt["vertebrae"].get(name)
      assert p.present == (t is not None)
      if t is not None:
        assert (p.first_index, p.last_index) == (t["first"], t["last"])
        assert (p.first_number, p.last_number) == (t["first_number"], t["last_number"])
    located[uid] = preds
    rows += compare_lib.compare(preds, mask, series.numbers)
  summary = compare_lib.summarise(rows)
  print(f"oracle stage 1 on generated studies: {summary}")
  assert summary["range_iou"] == 1.0
  # Boxes come from the slices that show one vertebra only: close to, not equal to, the truth.
  assert summary["box_iou"] > 0.6
  path = tmp_path / "vertebrae.csv"
  vertebrae_lib.write_vertebrae(path, located)
  assert vertebrae_lib.read_vertebrae(path).keys() == located.keys()


def test_label_dataset_with_fold_models_scores_each_study_once(tmp_path):
  """Fold models: one pass each. Leak-free: a segmented study of fold k holds what model k says
  (it never trained on that study), a study without a mask the models' average."""
  from cspine_jax import synthetic
  data = pathlib.Path(
      synthetic.generate(tmp_path / "rsna", 4, 5, size="tiny", num_test=0, segmented_fraction=0.5))
  studies = json.loads((data / "ground_truth.json").read_text())["studies"]
  uids = sorted(studies)
  calls = {0: 0, 1: 0}

  def scorer(fold, p, box):

    def fn(images):
      calls[fold] += 1
      n = len(images)
      presence = np.zeros((n, 7))
      presence[:n // 2, :4] = p  # fold-specific, so the average differs from either model
      presence[n // 2:, 4:] = 0.9
      return presence, np.tile(np.asarray(box, float), (n, 1))

    return fn

  options = options_lib.Options(image_size=(32, 32))
  out = tmp_path / "vertebrae.csv"
  folds = {u: i % 2 for i, u in enumerate(uids)}
  boxes = {0: (0.2, 0.2, 0.6, 0.6), 1: (0.4, 0.4, 0.8, 0.8)}
  result = pseudo_labels.label_dataset(
      data, {0: scorer(0, 0.9, boxes[0]), 1: scorer(1, 0.3, boxes[1])}, options, out,
      batch_size=1000, folds=folds, log=lambda _: None)
  assert calls == {0: 4, 1: 4}  # one batch per study per model: no second out-of-fold pass
  segmented = [u for u in uids if studies[u]["has_segmentation"]]
  assert 0 < len(segmented) < 4
  assert result["studies"] == 4 and result["out_of_fold"]["pairs"] == len(segmented) * 7
  assert result["sources"] == {"out_of_fold": len(segmented), "ensemble": 4 - len(segmented),
                               "in_sample": []}
  written = vertebrae_lib.read_vertebrae(out)
  for uid in uids:
    c1 = written[uid][0]
    if uid in segmented:  # model k's own call: present only where its presence reaches 0.5
      assert c1.present == (folds[uid] == 0)
      if c1.present:
        np.testing.assert_allclose(c1.box, boxes[0], atol=1e-6)
    else:  # the average presence of C1..C4 on the first half is 0.6 >= 0.5; box = mean box
      assert c1.present
      np.testing.assert_allclose(c1.box, (0.3, 0.3, 0.7, 0.7), atol=1e-6)


def test_fold_k_rules_are_fitted_without_fold_k_masks(tmp_path):
  """The template and box offsets that decode fold k's studies come from the other folds' masks
  only; the rules written for new studies from every mask."""
  data, uids, options, scorer = _oracle_data(tmp_path)
  folds = {u: i % 2 for i, u in enumerate(uids)}
  result = pseudo_labels.label_dataset(
      data, {0: scorer, 1: scorer}, options, tmp_path / "v.csv",
      rules=derive_lib.Rules(decode="template", calibrate_boxes=True), batch_size=1000,
      folds=folds, log=lambda _: None)
  from cspine_jax.io import dicom
  from cspine_jax.io import nifti
  spans = {}
  for uid in uids:
    series = dicom.read_series(data / "train_images" / uid, warn=False)
    extents = labels.vertebra_extents(nifti.load_mask(data / "segmentations" / f"{uid}.nii",
                                                      series))
    spans[uid] = [(e.first, e.last) for e in extents]
  for k in (0, 1):
    outside = [spans[u] for u in uids if folds[u] != k]
    np.testing.assert_allclose(result["fold_rules"][k].template,
                               ranges_lib.vertebra_template(outside), atol=1e-12)
    assert not np.allclose(result["fold_rules"][k].template,
                           ranges_lib.vertebra_template([spans[u] for u in uids
                                                         if folds[u] == k]))
  np.testing.assert_allclose(result["rules"].template,
                             ranges_lib.vertebra_template(spans.values()), atol=1e-12)


def test_label_dataset_lists_the_studies_where_no_vertebra_is_found(tmp_path):
  from cspine_jax import synthetic
  data = pathlib.Path(
      synthetic.generate(tmp_path / "rsna", 3, 5, size="tiny", num_test=0, segmented_fraction=1.0))
  uids = labels.read_train_csv(data / "train.csv")["StudyInstanceUID"].tolist()  # read order

  def scorer(images):  # one call per study: the first shows no vertebra, the others C1..C7
    n = len(images)
    presence = np.full((n, 7), 0.2 if scorer.calls == 0 else 0.9)
    scorer.calls += 1
    return presence, np.tile([[0.2, 0.2, 0.7, 0.7]], (n, 1))

  scorer.calls = 0

  lines = []
  result = pseudo_labels.label_dataset(data, scorer, options_lib.Options(image_size=(32, 32)),
                                       tmp_path / "v.csv", batch_size=1000, rules=derive_lib.Rules(
                                           decode="ordered", require_all=True), log=lines.append)
  assert result["studies"] == 3 and result["not_found"] == [uids[0]]
  assert any("no vertebra with confidence >= 0.5 in 1 studies" in line and uids[0] in line
             for line in lines)
  assert uids[0] in vertebrae_lib.read_vertebrae(tmp_path / "v.csv")  # kept in the file


def _oracle_data(tmp_path, distort=None):
  """4 segmented tiny studies and a stage-1 scorer that says what their masks say (boxes passed
  through ``distort`` (N, 4) -> (N, 4) when given): (data folder, uids, options, scorer)."""
  from cspine_jax import synthetic
  from cspine_jax.io import dicom
  from cspine_jax.io import nifti
  data = pathlib.Path(
      synthetic.generate(tmp_path / "rsna", 4, 7, size="tiny", num_test=0, segmented_fraction=1.0))
  uids = sorted(json.loads((data / "ground_truth.json").read_text())["studies"])
  options = options_lib.Options(image_size=(32, 32))
  oracle = {}  # the study's images -> what a perfect stage 1 says about them
  for uid in uids:
    series = dicom.read_series(data / "train_images" / uid, warn=False)
    images = study_lib.slice_images(study_lib.Loaded(None, series, None), options)
    presence, boxes = compare_lib.oracle_outputs(
        nifti.load_mask(data / "segmentations" / f"{uid}.nii", series))
    oracle[images.tobytes()] = (len(images), (presence, distort(boxes) if distort else boxes))

  def scorer(images):  # one padded batch per study (batch_size 1000)
    for key, (n, (presence, boxes)) in oracle.items():
      if images[:n].tobytes() == key:
        pad = len(images) - n
        return np.pad(presence, ((0, pad), (0, 0))), np.pad(boxes, ((0, pad), (0, 0)))
    raise AssertionError("unknown study")

  return data, uids, options, scorer


def test_label_dataset_fits_the_template_from_masks_per_fold(tmp_path):
  """decode="template" without a layout: the file's comes from every mask, fold k's out-of-fold
  comparison from the masks outside fold k; an oracle stage 1 recovers the true ranges."""
  data, uids, options, scorer = _oracle_data(tmp_path)
  result = pseudo_labels.label_dataset(data, {0: scorer, 1: scorer}, options, tmp_path / "v.csv",
                                       rules=derive_lib.Rules(decode="template"),
                                       batch_size=1000, folds={
                                           u: i % 2 for i, u in enumerate(uids)
                                       }, log=lambda _: None)
  assert result["rules"].template is not None
  assert result["in_sample"]["pairs"] == 4 * 7 and result["out_of_fold"]["pairs"] == 4 * 7
  # A rigid layout is close to, not exactly, each study's own ranges.
  assert result["in_sample"]["range_iou"] > 0.75
  assert result["out_of_fold"]["range_iou"] > 0.7


def test_label_dataset_calibrates_systematically_wrong_boxes(tmp_path):
  """A stage 1 whose boxes are all 30% too narrow: calibrate_boxes fits offsets from the masks
  (every mask for the file, the other fold's for each out-of-fold check) that undo it."""

  def narrow(boxes):
    w = boxes[:, 2] - boxes[:, 0]
    return boxes + np.stack([0.15 * w, 0 * w, -0.15 * w, 0 * w], -1)

  data, uids, options, scorer = _oracle_data(tmp_path, narrow)
  folds = {u: i % 2 for i, u in enumerate(uids)}
  results = {}
  for calibrate in (False, True):
    results[calibrate] = pseudo_labels.label_dataset(
        data, {0: scorer, 1: scorer}, options, tmp_path / f"v{calibrate}.csv",
        rules=derive_lib.Rules(decode="ordered", calibrate_boxes=calibrate), batch_size=1000,
        folds=folds, log=lambda _: None)
  offsets = np.asarray(results[True]["rules"].box_offsets)
  assert results[False]["rules"].box_offsets is None
  # Each edge moved out by 0.15 / 0.7 of the narrowed width (per-slice boxes widen it a little).
  np.testing.assert_allclose(offsets[:, 0], -0.15 / 0.7, atol=0.05)
  np.testing.assert_allclose(offsets[:, 2], 0.15 / 0.7, atol=0.05)
  for name in ("in_sample", "out_of_fold"):
    before, after = results[False][name]["box_iou"], results[True][name]["box_iou"]
    assert before < 0.8 and after > before + 0.1, (name, before, after)
  written = vertebrae_lib.read_vertebrae(tmp_path / "vTrue.csv")
  raw = vertebrae_lib.read_vertebrae(tmp_path / "vFalse.csv")
  # A segmented study's boxes: derived, then moved by its fold's offsets (fitted on the others).
  own = np.asarray(results[True]["fold_rules"][folds[uids[0]]].box_offsets)
  assert not np.allclose(own, offsets)
  for v in range(7):
    np.testing.assert_allclose(written[uids[0]][v].box,
                               boxes_lib.offset_box(raw[uids[0]][v].box, own[v]), atol=1e-6)


def test_pseudo_label_command_names_missing_inputs(tmp_path):
  done = subprocess.run([
      sys.executable, "-m", "cspine_jax.pseudo_labels", f"--data_dir={tmp_path}",
      f"--records={tmp_path / 'records'}", f"--stage1={tmp_path / 'run'}",
      f"--out={tmp_path / 'v.csv'}"
  ], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr
  assert str(tmp_path / "records" / "stage1") in done.stderr
  assert not (tmp_path / "v.csv").exists()
