"""The box refiner: its crops and records, model and loss, and how pseudo-labels and predict use it."""
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from cspine_jax.infer import predict, pseudo_labels
from cspine_jax.models import box_refine as model_lib
from cspine_jax.models import registry
from cspine_jax.pp import refine_input
from cspine_jax.records import box_refine
from cspine_jax.pp import image as image_lib
from cspine_jax.pp import options as options_lib
from cspine_jax.pp import study as study_lib
from cspine_jax.io import vertebrae as vertebrae_lib
from cspine_jax.train import tasks
from cspine_jax.infer import ensemble as ensemble_lib
from cspine_jax.infer import spec as spec_lib
from cspine_jax.localize import derive as derive_lib
from cspine_jax.localize import refine as refine_lib

INNER = refine_input.MARGIN / (1 + 2 * refine_input.MARGIN)


def test_crop_frame_round_trip_and_projections():
  frame = refine_input.crop_frame((20, 30, 40, 70))  # 20 x 40 px
  m = refine_input.MARGIN
  assert frame == pytest.approx((20 - 20 * m, 30 - 40 * m, 20 * (1 + 2 * m), 40 * (1 + 2 * m)))
  np.testing.assert_allclose(refine_input.to_crop((20, 30, 40, 70), frame),
                             [INNER, INNER, 1 - INNER, 1 - INNER],
                             atol=1e-6)
  box = (22.5, 28.0, 41.0, 66.5)
  np.testing.assert_allclose(refine_input.from_crop(refine_input.to_crop(box, frame), frame),
                             box,
                             atol=1e-4)
  # A bright block on the top third of the range only: channel 0 shows it where its box says.
  volume = np.zeros((12, 64, 64), np.uint8)
  volume[3:5, 20:40, 10:30] = 200  # rows 20..39, columns 10..29
  image, frame = refine_input.crop_input(volume, 3, 11, (10, 20, 30, 40), (32, 32))
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  assert image[..., 1:].max() == 0 and image[..., 0].max() == 200
  rows, cols = np.nonzero(image[..., 0] > 100)
  x0, y0, x1, y1 = refine_input.to_crop((10, 20, 30, 40), frame) * 32
  assert abs(cols.min() - x0) <= 1 and abs(cols.max() + 1 - x1) <= 1
  assert abs(rows.min() - y0) <= 1 and abs(rows.max() + 1 - y1) <= 1
  # From HU with the window (only the frame's block windowed): the same pixels as windowing the
  # whole volume first, for frames inside the image and reaching past its edges.
  hu = np.random.default_rng(0).normal(300, 600, (12, 64, 64)).astype(np.float32)
  for box in ((10, 20, 30, 40), (-5, -3, 12, 9), (50, 40, 70, 66), (1.5, 2.25, 3.75, 4.5)):
    whole, _ = refine_input.crop_input(image_lib.window(hu, 400, 1800), 2, 9, box, (24, 20))
    block, _ = refine_input.crop_input(hu, 2, 9, box, (24, 20), window=(400, 1800))
    np.testing.assert_array_equal(block, whole)
  with pytest.raises(study_lib.StudyError, match="empty slice range"):
    refine_input.crop_input(volume, 20, 30, (10, 20, 30, 40), (32, 32))


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
  from cspine_jax import synthetic
  root = tmp_path_factory.mktemp("refine")
  data = pathlib.Path(synthetic.generate(root / "rsna", 2, 3, size="tiny", num_test=0,
                                         segmented_fraction=1.0))
  truth = json.loads((data / "ground_truth.json").read_text())["studies"]
  return data, truth


def test_records_are_jittered_crops_of_the_true_box(segmented):
  data, truth = segmented
  uid = sorted(truth)[0]
  image_dir, mask_path = study_lib.study_paths(data, uid)
  study = study_lib.StudyInput(uid, str(image_dir), str(mask_path), fold=1)
  options = options_lib.Options(image_size=(32, 32))
  records = list(box_refine.process(study, options))
  present = [v for v, name in enumerate(("C1", "C2", "C3", "C4", "C5", "C6", "C7"))
             if truth[uid]["vertebrae"][name] is not None]
  assert len(records) == len(present) * box_refine.SAMPLES
  assert sorted({r["vertebra"] for r in records}) == present
  feats = box_refine.features(options)
  for r in records[:5]:
    for k, (shape, dtype) in feats.items():
      assert np.asarray(r[k]).shape == shape, k
    assert r["fold"] == 1 and r["study_uid"] == uid
  boxes = np.stack([r["box"] for r in records])
  assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
  # Jittered around the crop's inner box, and different from sample to sample.
  np.testing.assert_allclose(boxes.mean(0), [INNER, INNER, 1 - INNER, 1 - INNER], atol=0.08)
  assert np.std(boxes[:, 0]) > 0.01
  again = list(box_refine.process(study, options))  # seeded by the uid: the same records
  np.testing.assert_array_equal(np.stack([r["image"] for r in again]),
                                np.stack([r["image"] for r in records]))
  unsegmented = study_lib.StudyInput(uid, str(image_dir), None, fold=0)
  assert box_refine.skip_reason(unsegmented) == "no segmentation"


def test_model_starts_at_the_derived_box_and_loss_takes_the_own_row():
  m = registry.make_model({"name": "box_refine", "encoder": "convnext_test"},
                          rngs=registry.make_rngs(0))
  assert isinstance(m, model_lib.BoxRefiner)
  m.eval()
  out = np.asarray(m(jnp.zeros((3, 32, 32, 3))))
  assert out.shape == (3, 7, 4)
  np.testing.assert_allclose(out, np.broadcast_to([INNER, INNER, 1 - INNER, 1 - INNER], out.shape),
                             atol=1e-6)
  task = tasks.get("box_refine", box_loss="l1")
  outputs = jnp.zeros((2, 7, 4)).at[0, 3].set(0.5).at[1, 6].set(0.25)
  batch = {"vertebra": jnp.array([3, 6]), "box": jnp.full((2, 4), 0.5)}
  loss, _ = task.loss(outputs, batch, jnp.ones(2))
  assert float(loss) == pytest.approx(0.125)  # row 3 exact, row 6 off by 0.25 on every edge
  pred = np.zeros((2, 7, 4))
  pred[0, 3] = (0, 0, 1, 1)  # exact
  pred[1, 6] = (0, 0, 1, 1)  # four times the true box
  pred[1, 0] = (0, 0, 0.5, 0.5)  # another vertebra's row: not counted
  scores = tasks.box_refine_scores({"vertebra": np.array([3, 6]), "boxes_pred": pred,
                                    "box": np.array([[0, 0, 1, 1], [0, 0, 0.5, 0.5]], float)})
  assert scores["box_iou"] == pytest.approx((1.0 + 0.25) / 2)


def _preds():
  return tuple(vertebrae_lib.VertebraPrediction(True, 2 * v, 2 * v + 3, box=(0.25, 0.25, 0.5, 0.75))
               for v in range(6)) + (vertebrae_lib.absent(),)


def _fixed(box):
  """A refiner that answers ``box`` (crop coordinates) for every vertebra."""
  return lambda images: np.tile(np.asarray(box, np.float32), (len(images), 7, 1))


def test_refine_maps_the_crop_answer_back():
  volume = np.zeros((20, 40, 80), np.uint8)
  preds = _preds()
  same = refine_lib.refine(preds, volume, _fixed([INNER, INNER, 1 - INNER, 1 - INNER]), (16, 16))
  for a, b in zip(same, preds):
    assert a.present == b.present and a.first_index == b.first_index
    np.testing.assert_allclose(a.box, b.box, atol=1e-6)
  # The whole crop: the box grown by MARGIN (20 x 30 px -> 8 px / 12 px more per side), clipped.
  grown = refine_lib.refine(preds, volume, _fixed([0, 0, 1, 1]), (16, 16))
  m = refine_input.MARGIN
  np.testing.assert_allclose(grown[0].box, (0.25 - m * 0.25, 0.25 - m * 0.5, 0.5 + m * 0.25,
                                            min(1.0, 0.75 + m * 0.5)), atol=1e-6)
  assert not grown[6].present
  # An empty answer keeps the derived box; a wrong shape is an error.
  kept = refine_lib.refine(preds, volume, _fixed([0.6, 0.6, 0.4, 0.4]), (16, 16))
  assert kept[0].box == preds[0].box
  with pytest.raises(ValueError, match="box refiner returned"):
    refine_lib.refine(preds, volume, lambda x: np.zeros((len(x), 4)), (16, 16))


def test_refine_passes_start_each_look_from_the_last_box():
  volume = np.zeros((20, 40, 80), np.uint8)
  preds = _preds()
  calls = []

  def whole_crop(images):  # answers the whole crop: each pass grows the box by the margin
    calls.append(len(images))
    return _fixed([0, 0, 1, 1])(images)

  once = refine_lib.refine(preds, volume, whole_crop, (16, 16))
  twice = refine_lib.refine(preds, volume, whole_crop, (16, 16), passes=2)
  again = refine_lib.refine(once, volume, whole_crop, (16, 16))
  assert len(calls) == 4  # one refiner call per pass (all vertebrae of the study in one batch)
  for a, b, c in zip(twice, again, once):
    assert a == b
    if c.present:
      assert (a.box[2] - a.box[0]) > (c.box[2] - c.box[0])  # the second look grew it again
  with pytest.raises(ValueError, match="passes must be >= 1"):
    refine_lib.refine(preds, volume, whole_crop, (16, 16), passes=0)


def test_inference_refines_as_often_as_the_spec_says(tmp_path):
  import types
  options = options_lib.Options(image_size=(16, 16))
  path = spec_lib.write_spec(tmp_path, refine=True, refine_passes=2)
  assert json.loads(path.read_text())["refine_passes"] == 2
  # A spec with bad passes is refused when it is read, naming the file (before any model loads).
  spec = json.loads(path.read_text())
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / spec_lib.SPEC).write_text(json.dumps(dict(spec, refine_passes=0)))
  with pytest.raises(ensemble_lib.PredictError, match=f"{spec_lib.SPEC}.*passes must be >= 1"):
    spec_lib.load_models(tmp_path / "bad")
  calls = []

  def refiner(images):
    calls.append(len(images))
    return _fixed([0, 0, 1, 1])(images)

  models = spec_lib.Models(stage1=None,
                           stage2=None,
                           options=options,
                           refiner=refiner,
                           refine_options=options,
                           refine_passes=2)
  series = types.SimpleNamespace(volume=np.zeros((20, 40, 80), np.int16))  # all refine_boxes reads
  out = predict.refine_boxes(series, _preds(), models)
  assert len(calls) == 2
  want = refine_lib.refine(_preds(),
                           series.volume,
                           refiner, (16, 16),
                           passes=2,
                           window=(options.window_level, options.window_width))
  assert out == want


def _stage1(images):
  """A stage 1 that shows C1..C7 on consecutive sevenths of the slices, one box everywhere."""
  n = len(images)
  presence = np.zeros((n, 7))
  for v in range(7):
    presence[v * n // 7:(v + 1) * n // 7, v] = 0.9
  return presence, np.tile([0.3, 0.3, 0.6, 0.7], (n, 1))


def test_label_dataset_refines_the_file_by_the_average_and_each_fold_by_its_model(
    segmented, tmp_path, monkeypatch):
  """Refiner 0 keeps the derived boxes, refiner 1 answers the whole crop: fold 0's held-out
  boxes stay, fold 1's grow; every study here has a mask, so the file holds those (leak-free)."""
  data, truth = segmented
  uids = sorted(truth)
  folds = {u: i % 2 for i, u in enumerate(uids)}
  options = options_lib.Options(image_size=(32, 32))
  scorer = _stage1
  refiners = {0: _fixed([INNER, INNER, 1 - INNER, 1 - INNER]), 1: _fixed([0, 0, 1, 1])}
  plain = pseudo_labels.label_dataset(data, {0: scorer, 1: scorer}, options, tmp_path / "a.csv",
                                      batch_size=1000, folds=folds, log=lambda _: None)
  refined = pseudo_labels.label_dataset(
      data, {0: scorer, 1: scorer}, options, tmp_path / "b.csv", batch_size=1000, folds=folds,
      refiner=refiners, refine_options=options, log=lambda _: None)
  assert refined["out_of_fold_derived"] == plain["out_of_fold"]
  assert refined["in_sample"]["range_iou"] == plain["in_sample"]["range_iou"]
  a, b = vertebrae_lib.read_vertebrae(tmp_path / "a.csv"), vertebrae_lib.read_vertebrae(
      tmp_path / "b.csv")
  _, h, w = truth[uids[1]]["shape"]
  scale = np.array([w, h, w, h], float)
  frame = refine_input.crop_frame(np.array([0.3, 0.3, 0.6, 0.7]) * scale)
  grown = np.clip(np.array(refine_input.from_crop((0, 0, 1, 1), frame)) / scale, 0, 1)
  assert folds[uids[0]] == 0 and folds[uids[1]] == 1
  np.testing.assert_allclose(b[uids[0]][0].box, (0.3, 0.3, 0.6, 0.7), atol=1e-5)  # refiner 0
  np.testing.assert_allclose(b[uids[1]][0].box, grown, atol=1e-5)  # refiner 1
  assert a[uids[0]][0].box == pytest.approx((0.3, 0.3, 0.6, 0.7))
  # Volumes kept from the first pass and volumes read again give the same crops.
  def by_content(images):  # an answer that moves with the crop's pixels
    shift = np.asarray(images, np.float32).mean(axis=(1, 2, 3))[:, None, None] / 2550
    return _fixed([INNER, INNER, 1 - INNER, 1 - INNER])(images) + shift
  for name, keep in (("kept.csv", 2 << 30), ("read.csv", 0)):
    monkeypatch.setattr(pseudo_labels, "KEEP_VOLUME_BYTES", keep)
    pseudo_labels.label_dataset(data, {0: scorer, 1: scorer}, options, tmp_path / name,
                                batch_size=1000, folds=folds, refiner=by_content,
                                refine_options=options, log=lambda _: None)
  assert (tmp_path / "kept.csv").read_text() == (tmp_path / "read.csv").read_text()
  assert (tmp_path / "kept.csv").read_text() != (tmp_path / "a.csv").read_text()
  with pytest.raises(ValueError, match="held out fold"):
    pseudo_labels.label_dataset(data, {0: scorer, 1: scorer}, options, tmp_path / "c.csv",
                                batch_size=1000, folds=folds, refiner={0: refiners[0]},
                                refine_options=options, log=lambda _: None)
  # Bad passes are refused before the stage-1 pass runs (no scorer call), not after it.
  calls = []

  def counting(images):
    calls.append(len(images))
    return _stage1(images)
  for bad in (0, 1.5, True):
    with pytest.raises(ValueError, match="passes must be >= 1"):
      pseudo_labels.label_dataset(data, counting, options, tmp_path / "d.csv", folds=folds,
                                  refiner=refiners[0], refine_options=options, refine_passes=bad,
                                  log=lambda _: None)
  assert not calls and not (tmp_path / "d.csv").exists()


def test_predict_refines_located_boxes_and_the_spec_names_the_refiner(segmented, tmp_path):
  from cspine_jax.io import dicom
  data, truth = segmented
  series = dicom.read_series(data / "train_images" / sorted(truth)[0], warn=False)
  options = options_lib.Options(image_size=(32, 32))
  stage1 = _stage1
  rules = derive_lib.Rules(require_all=True)
  base = spec_lib.Models(stage1=stage1, stage2=None, options=options, rules=rules)
  grown = spec_lib.Models(stage1=stage1,
                          stage2=None,
                          options=options,
                          rules=rules,
                          refiner=_fixed([0, 0, 1, 1]),
                          refine_options=options)
  before, _, _ = predict.locate(series, base, 64)
  assert predict.refine_boxes(series, before, base) == before  # no refiner: unchanged
  after = predict.refine_boxes(series, predict.locate(series, grown, 64)[0], grown)
  assert sum(p.present for p in before) == 7
  for p, q in zip(before, after):
    assert (p.first_index, p.last_index) == (q.first_index, q.last_index)
    assert q.box[0] < p.box[0] and q.box[2] > p.box[2], (p.box, q.box)
  with pytest.raises(ValueError, match="needs its options"):
    spec_lib.Models(stage1=stage1, stage2=None, options=options, refiner=_fixed([0, 0, 1, 1]))
  spec_lib.write_spec(tmp_path, refine=True)
  assert json.loads((tmp_path / spec_lib.SPEC).read_text())["refine"] is True
  spec_lib.write_spec(tmp_path)
  assert json.loads((tmp_path / spec_lib.SPEC).read_text())["refine"] is False
