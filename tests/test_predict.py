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
    # Expected box: union of the per-slice boxes where no vertebra above this one shows.
    own = [s for s in range(t.first, t.last + 1) if not sl.presence[s, :v].any()]
    b = sl.box[own]
    expect = np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]) / 32
    np.testing.assert_allclose(p.box, expect, atol=1e-9)
    assert p.confidence == 1.0
  rows = pseudo_labels.compare(preds, mask, numbers)
  summary = pseudo_labels.summarise(rows)
  assert summary["range_iou"] == 1.0
  # Each vertebra's footprint is the same on all its slices, but here (unlike in a spine) the next
  # one's footprint does not lie inside it on their shared slice, so the box can be a bit wider.
  assert 0.8 < summary["box_iou"] < 1.0
  assert rows[6]["box_iou"] == 1.0  # C7: no vertebra below it, so its box is exact


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


def test_ordered_decoding_keeps_the_levels_in_order():
  mask = _mask()
  presence, boxes = pseudo_labels.oracle_outputs(mask)
  truth = [(e.first, e.last) for e in labels.vertebra_extents(mask)]
  assert pseudo_labels.ordered_ranges(presence) == truth
  # A confident C2 call far below C7 cannot pull C2 there: the levels keep their order.
  noisy = presence * 0.8 + 0.1
  noisy[39, 1] = 0.95
  assert pseudo_labels.ordered_ranges(noisy) == truth
  by_threshold = pseudo_labels.derive(noisy, boxes, rules=pseudo_labels.Rules(decode="threshold"))
  assert (by_threshold[1].first_index, by_threshold[1].last_index) == truth[1]  # longest run wins
  # A weak model (every probability under 0.5, highest on the right slices): thresholding calls
  # everything absent; the ordered decoding with require_all still finds each level.
  weak = presence * 0.3 + 0.1
  assert not any(p.present for p in pseudo_labels.derive(
      weak, boxes, rules=pseudo_labels.Rules(decode="threshold")))
  assert not any(p.present for p in pseudo_labels.derive(weak, boxes))
  got = pseudo_labels.derive(weak, boxes, rules=pseudo_labels.Rules(require_all=True))
  for p, (first, last) in zip(got, truth):
    assert p.present and first <= p.first_index <= p.last_index <= last
  # require_all gives every level at least one slice: in a study cut inside C6, C7 gets the last.
  cut = presence[:28]
  ranges = pseudo_labels.ordered_ranges(cut * 0.3 + 0.1, require_all=True)
  assert all(r is not None for r in ranges) and ranges[6][1] == 27
  with pytest.raises(ValueError, match="decode"):
    pseudo_labels.Rules(decode="viterbi")


# ----------------------------------------------------------------------------- end-to-end inference

import json
import pathlib
import shutil

import pandas as pd

from cspine_jax import metrics
from cspine_jax.infer import aggregate, predict
from cspine_jax.records import study as study_lib

OPTIONS = study_lib.Options(image_size=(32, 32), stage2_slices=6)


def _stage1(images):
  """Test double: C1..C7 in consecutive thirds of the 20-slice series, one central box."""
  n = len(images)
  idx = np.asarray(images[:, 0, 0, 1], np.float64)  # the test's slices carry their index here
  presence = np.zeros((n, 7))
  for v in range(7):
    presence[:, v] = ((idx >= 2 * v) & (idx <= 2 * v + 3)).astype(float) * 0.9
  return presence, np.tile([[0.25, 0.3, 0.75, 0.8]], (n, 1))


def _stage2(seqs, vertebra):
  """Test double: probability from the crops' mean brightness (any deterministic map works)."""
  return seqs.reshape(len(seqs), -1).mean(1) / 255.0


def _models():
  return predict.Models(stage1=_stage1, stage2=_stage2, options=OPTIONS, top_n=7)


@pytest.fixture
def studies(tmp_path, real_data_dir):
  root = tmp_path / "test_images"
  src = real_data_dir / "totalseg_ct" / "dicom_jpeg_lossless"
  shutil.copytree(src, root / "1.2.826.0.1.3680043.10001")
  shutil.copytree(src, root / "1.2.826.0.1.3680043.10002")
  bad = root / "1.2.826.0.1.3680043.10003"
  bad.mkdir()
  (bad / "1.dcm").write_bytes(b"not a dicom file")
  return root


def test_submission_format_fallback_and_error_report(tmp_path, studies, monkeypatch):
  # The double marks each slice image with its index so ranges are predictable.
  real_images = study_lib.slice_images
  def marked(loaded, options):
    images = real_images(loaded, options).copy()
    images[:, 0, 0, 1] = np.arange(len(images))
    return images
  monkeypatch.setattr(study_lib, "slice_images", marked)
  prior = np.array([0.2, 0.05, 0.1, 0.03, 0.04, 0.05, 0.06, 0.07])
  folders = predict.find_studies(studies)
  assert [f.name[-5:] for f in folders] == ["10001", "10002", "10003"]
  writer = predict.study_writer(tmp_path / "json", tmp_path / "png")
  result = predict.run(folders, _models(), prior, batch_size=8, studies_per_batch=2,
                       on_study=writer)
  paths = predict.write_outputs(result, tmp_path / "sub" / "submission.csv")
  sub = pd.read_csv(paths["submission"], dtype={"row_id": str})
  assert list(sub.columns) == ["row_id", "fractured"]
  assert len(sub) == 24
  uids = [f.name for f in folders]
  assert sub["row_id"].tolist() == [f"{u}_{t}" for u in uids for t in labels.TARGETS]
  assert sub["fractured"].between(0, 1).all()
  wide = metrics.read_predictions(paths["submission"])
  # The unreadable study got the prior, the others top-7 of their vertebrae.
  np.testing.assert_allclose(wide.iloc[2][list(labels.TARGETS)].astype(float), prior, atol=1e-6)
  p = wide.iloc[0][list(labels.VERTEBRAE)].to_numpy(float)
  assert wide.iloc[0]["patient_overall"] == pytest.approx(aggregate.top_n_overall(p, 7), abs=1e-6)
  errors = json.loads(paths["errors"].read_text())
  assert len(errors) == 1 and errors[0]["StudyInstanceUID"] == uids[2]
  assert "SeriesError" in errors[0]["reason"]
  info = json.loads((tmp_path / "json" / f"{uids[0]}.json").read_text())
  assert info["status"] == "ok" and info["shape"] == [20, 512, 512]
  c2 = info["vertebrae"]["C2"]
  assert (c2["first_index"], c2["last_index"]) == (2, 5)
  assert c2["box_pixels"] == [128, 153, 384, 410]
  assert json.loads((tmp_path / "json" / f"{uids[2]}.json").read_text())["status"] == "fallback"
  assert (tmp_path / "png" / f"{uids[0]}.png").stat().st_size > 1000
  assert set(result.seconds) == set(predict.STAGES)


def test_a_series_where_stage1_finds_no_vertebra_gets_the_prior(tmp_path, studies):
  """require_all places all seven vertebrae in any series; with no confident one (a series of
  other anatomy: the fixture is an abdominal CT) stage 2 must not answer: prior + error entry."""
  def unsure(images):
    n = len(images)
    presence = np.full((n, 7), 0.05)
    presence[5:8, 6] = 0.3  # the best placed vertebra stays under the 0.5 threshold
    return presence, np.tile([[0.25, 0.3, 0.75, 0.8]], (n, 1))

  def stage2_must_not_run(seqs, vertebra):
    raise AssertionError("stage 2 ran on a study where stage 1 found no vertebra")

  models = predict.Models(stage1=unsure, stage2=stage2_must_not_run, options=OPTIONS,
                          rules=pseudo_labels.Rules(decode="ordered", require_all=True))
  prior = np.array([0.2, 0.05, 0.1, 0.03, 0.04, 0.05, 0.06, 0.07])
  folders = predict.find_studies(studies)
  result = predict.run(folders, models, prior, batch_size=8,
                       on_study=predict.study_writer(tmp_path / "json", None))
  assert [r.error is not None for r in result.results] == [True, True, True]
  for r in result.results[:2]:
    assert "stage 1 finds no cervical vertebra" in r.error and "0.3" in r.error
    np.testing.assert_allclose(r.probs, prior)
    assert all(v.present for v in r.vertebrae)  # the placement is kept for the report
  info = json.loads((tmp_path / "json" / f"{folders[0].name}.json").read_text())
  assert info["status"] == "fallback" and "NoVertebraFound" in info["error"]
  assert info["vertebrae"]["C7"]["confidence"] == pytest.approx(0.3)
  assert result.wide()["StudyInstanceUID"].tolist() == [f.name for f in folders]


def test_found_confidence_tells_a_finding_from_a_placement():
  presence = np.full((12, 7), 0.1)
  placed = pseudo_labels.derive(presence, np.tile([[0.2, 0.2, 0.8, 0.8]], (12, 1)),
                                rules=pseudo_labels.Rules(decode="ordered", require_all=True))
  assert all(p.present for p in placed)
  assert pseudo_labels.found_confidence(placed) == pytest.approx(0.1)
  with pytest.raises(pseudo_labels.NoVertebraFound, match="0.100 < 0.5"):
    pseudo_labels.check_found(placed, 0.5)
  presence[3:6, 2] = 0.9
  found = pseudo_labels.derive(presence, np.tile([[0.2, 0.2, 0.8, 0.8]], (12, 1)),
                               rules=pseudo_labels.Rules(decode="ordered", require_all=True))
  pseudo_labels.check_found(found, 0.5)  # C3 is found: no error
  assert pseudo_labels.found_confidence([vertebrae_lib.absent(0.9)] * 7) == 0.0


def test_a_study_folder_with_several_series_reads_the_axial_one(tmp_path, studies):
  """A scanner's export holds more than the axial series: predict reads the series with the most
  axial slices and says so in the study's JSON; --series strict lets such a study fall back."""
  import pydicom
  folder = studies / "1.2.826.0.1.3680043.10001"
  for i, path in enumerate(sorted(folder.iterdir())[:3]):  # a 3-slice second series
    ds = pydicom.dcmread(path)
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10001.77"
    ds.save_as(folder / f"extra{i}.dcm")
  prior = np.full(8, 0.1)
  res = predict.run([folder], _models(), prior, batch_size=8,
                    on_study=predict.study_writer(tmp_path / "json", None)).results[0]
  assert res.error is None and res.shape == (20, 512, 512)
  info = json.loads((tmp_path / "json" / f"{folder.name}.json").read_text())
  assert info["status"] == "ok"
  assert info["reader_notes"][0].startswith("2 series in the folder: read ")
  assert "'1.2.826.0.1.3680043.10001.77' (3 axial of 3 slices)" in info["reader_notes"][0]
  strict = predict.run([folder], _models(), prior, batch_size=8, series_uid=None).results[0]
  assert "SeriesError" in strict.error and "2 series mixed" in strict.error
  np.testing.assert_allclose(strict.probs, prior)


def test_single_study_folder_and_prior(tmp_path, studies):
  one = studies / "1.2.826.0.1.3680043.10001"
  assert predict.find_studies(one) == [one]
  with pytest.raises(predict.PredictError):
    predict.find_studies(tmp_path / "missing")
  train = pd.DataFrame({"StudyInstanceUID": ["1.1", "1.2"], "patient_overall": [1, 0],
                        **{c: [0, 0] for c in labels.VERTEBRAE}})
  train.loc[0, "C2"] = 1
  train.to_csv(tmp_path / "train.csv", index=False)
  prior = predict.load_prior(tmp_path / "train.csv")
  np.testing.assert_allclose(prior, [0.5, 0, 0.5, 0, 0, 0, 0, 0])
  predict.write_prior(tmp_path / "prior.json", train)
  np.testing.assert_allclose(predict.load_prior(tmp_path / "prior.json"), prior)
  (tmp_path / "bad.json").write_text('{"C1": 0.1}')
  with pytest.raises(predict.PredictError, match="bad.json"):
    predict.load_prior(tmp_path / "bad.json")


def test_in_batches_pads_to_one_shape():
  shapes = []
  def fn(x):
    shapes.append(x.shape)
    return x.sum(1), x[:, 0]
  a, b = predict.in_batches(fn, [np.arange(14.).reshape(7, 2)], 3)
  assert shapes == [(3, 2)] * 3
  np.testing.assert_allclose(a, np.arange(14.).reshape(7, 2).sum(1))
  assert len(b) == 7


def test_oracle_pseudo_labels_on_generated_studies(tmp_path, capsys):
  from cspine_jax import synthetic
  from cspine_jax.io import dicom, nifti
  data = synthetic.generate(tmp_path / "rsna", 4, 3, size="tiny", num_test=0,
                            segmented_fraction=1.0)
  truth = json.loads((pathlib.Path(data) / "ground_truth.json").read_text())["studies"]
  located, rows = {}, []
  for uid, gt in truth.items():
    series = dicom.read_series(pathlib.Path(data) / "train_images" / uid, warn=False)
    mask = nifti.load_mask(pathlib.Path(data) / "segmentations" / f"{uid}.nii", series)
    presence, boxes = pseudo_labels.oracle_outputs(mask)
    preds = pseudo_labels.derive(presence, boxes, series.numbers)
    for name, p in zip(labels.VERTEBRAE, preds):
      t = gt["vertebrae"].get(name)
      assert p.present == (t is not None)
      if t is not None:
        assert (p.first_index, p.last_index) == (t["first"], t["last"])
        assert (p.first_number, p.last_number) == (t["first_number"], t["last_number"])
    located[uid] = preds
    rows += pseudo_labels.compare(preds, mask, series.numbers)
  summary = pseudo_labels.summarise(rows)
  print(f"oracle stage 1 on generated studies: {summary}")
  assert summary["range_iou"] == 1.0
  # Boxes come from the slices that show one vertebra only: close to, not equal to, the truth.
  assert summary["box_iou"] > 0.6
  path = tmp_path / "vertebrae.csv"
  vertebrae_lib.write_vertebrae(path, located)
  assert vertebrae_lib.read_vertebrae(path).keys() == located.keys()


def test_fold_ensemble_restores_checkpoints_and_averages(tmp_path, monkeypatch):
  import ml_collections
  from flax import nnx

  from cspine_jax import input as input_lib
  from cspine_jax import models
  from cspine_jax.train import checkpoints
  from test_checkpoints import make_iterator, make_trainer
  from test_input import write_task_shards
  from test_train import TinySeq

  from cspine_jax.train import sharding
  records = write_task_shards(tmp_path / "rec", "stage2", 21)
  trainer, it = make_trainer(), make_iterator(records)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (5, 8, 16, 16, 3), dtype=np.uint8)
  vertebra = np.arange(5, dtype=np.int32)
  x = input_lib.normalize(images)
  probs = []
  for fold in (0, 1):  # two "fold models": the same run one step apart
    trainer.state, _ = trainer.train_step(trainer.state,
                                          sharding.shard_batch(next(it), trainer.mesh))
    ck = checkpoints.Checkpointer(tmp_path / "run" / "stage2" / f"fold_{fold}" / "checkpoints")
    ck.save(fold + 1, trainer.state, it, {"task": "stage2", "fold": fold, "model": {"width": 8}},
            score=0.5)
    ck.close()
    # Expected outputs now: the next train step donates (deletes) these arrays.
    probs.append(np.asarray(1 / (1 + np.exp(-np.asarray(trainer.model()(x, vertebra))))))
  # The run's models are rebuilt from the config in the checkpoint meta.
  monkeypatch.setattr(models, "make_model", lambda cfg, rngs: TinySeq(cfg.width, rngs=rngs),
                      raising=False)
  ens = predict.FoldEnsemble.load(tmp_path / "run" / "stage2", "stage2")
  assert len(ens) == 2 and ens.folds == [0, 1]
  got = ens({"images": images, "vertebra": vertebra})["prob"]
  np.testing.assert_allclose(got, np.mean(probs, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ens({"images": images, "vertebra": vertebra}, fold=1)["prob"],
                             probs[1], rtol=1e-5, atol=1e-6)
  with pytest.raises(predict.PredictError, match="fold 4"):
    ens({"images": images, "vertebra": vertebra}, fold=4)
  with pytest.raises(predict.PredictError, match="no trained model"):
    predict.fold_dirs(tmp_path / "run" / "stage1")


def test_label_dataset_with_fold_models_scores_each_study_once(tmp_path):
  """Fold models: one pass each; the file holds their average, out-of-fold uses the own model."""
  from cspine_jax import synthetic
  data = pathlib.Path(synthetic.generate(tmp_path / "rsna", 4, 5, size="tiny", num_test=0,
                                         segmented_fraction=1.0))
  uids = sorted(json.loads((data / "ground_truth.json").read_text())["studies"])
  calls = {0: 0, 1: 0}

  def scorer(fold, p, box):
    def fn(images):
      calls[fold] += 1
      n = len(images)
      presence = np.zeros((n, 7))
      presence[: n // 2, :4] = p  # fold-specific, so the average differs from either model
      presence[n // 2:, 4:] = 0.9
      return presence, np.tile(np.asarray(box, float), (n, 1))
    return fn

  options = study_lib.Options(image_size=(32, 32))
  out = tmp_path / "vertebrae.csv"
  result = pseudo_labels.label_dataset(
      data, {0: scorer(0, 0.9, (0.2, 0.2, 0.6, 0.6)), 1: scorer(1, 0.3, (0.4, 0.4, 0.8, 0.8))},
      options, out, batch_size=1000, folds={u: i % 2 for i, u in enumerate(uids)}, log=lambda _: None)
  assert calls == {0: 4, 1: 4}  # one batch per study per model: no second out-of-fold pass
  assert result["studies"] == 4 and result["out_of_fold"]["pairs"] == 4 * 7
  written = vertebrae_lib.read_vertebrae(out)
  # The average presence of C1..C4 on the first half is 0.6 >= 0.5: present; box = mean box.
  c1 = written[uids[0]][0]
  assert c1.present
  np.testing.assert_allclose(c1.box, (0.3, 0.3, 0.7, 0.7), atol=1e-6)


def test_label_dataset_lists_the_studies_where_no_vertebra_is_found(tmp_path):
  from cspine_jax import synthetic
  data = pathlib.Path(synthetic.generate(tmp_path / "rsna", 3, 5, size="tiny", num_test=0,
                                         segmented_fraction=1.0))
  uids = labels.read_train_csv(data / "train.csv")["StudyInstanceUID"].tolist()  # read order

  def scorer(images):  # one call per study: the first shows no vertebra, the others C1..C7
    n = len(images)
    presence = np.full((n, 7), 0.2 if scorer.calls == 0 else 0.9)
    scorer.calls += 1
    return presence, np.tile([[0.2, 0.2, 0.7, 0.7]], (n, 1))
  scorer.calls = 0

  lines = []
  result = pseudo_labels.label_dataset(
      data, scorer, study_lib.Options(image_size=(32, 32)), tmp_path / "v.csv", batch_size=1000,
      rules=pseudo_labels.Rules(decode="ordered", require_all=True), log=lines.append)
  assert result["studies"] == 3 and result["not_found"] == [uids[0]]
  assert any("no vertebra with confidence >= 0.5 in 1 studies" in line and uids[0] in line
             for line in lines)
  assert uids[0] in vertebrae_lib.read_vertebrae(tmp_path / "v.csv")  # kept in the file


def test_template_fit_places_the_layout_where_per_slice_evidence_is_ambiguous():
  """Middle levels that a per-slice model confuses are placed by the layout fitted at its ends."""
  truth = [(2, 6), (5, 14), (14, 19), (20, 25), (26, 31), (32, 37), (38, 44)]
  template = pseudo_labels.vertebra_template([truth, [(a + 3, b + 3) for a, b in truth]])
  lo, hi = truth[0][0], truth[-1][1]
  np.testing.assert_allclose(template[3], ((20 - lo) / (hi - lo), (25 - lo) / (hi - lo)))
  presence = np.full((50, 7), 0.05)
  for v, (a, b) in enumerate(truth):
    presence[a:b + 1, v] = 0.95
  # C4..C6 indistinguishable slice by slice: each of them 0.6 anywhere from C4's top to C6's end.
  presence[20:38, 3:6] = 0.6
  rules = pseudo_labels.Rules(decode="template", template=template)
  got = [(p.first_index, p.last_index) for p in pseudo_labels.derive(presence, np.tile(
      [0.2, 0.2, 0.8, 0.8], (50, 1)), rules=rules)]
  assert got == truth
  ordered = pseudo_labels.ordered_ranges(presence, require_all=True)
  assert ordered[3:6] != truth[3:6]  # what the template fixes
  # A study twice as long (thinner slices) is fitted by the same layout.
  stretched = np.repeat(presence, 2, axis=0)
  got2 = pseudo_labels.template_ranges(stretched, template)
  assert all(abs(a - 2 * t[0]) <= 1 and abs(b - (2 * t[1] + 1)) <= 1 for (a, b), t in
             zip(got2, truth))


def test_template_rules_are_checked_and_survive_the_inference_spec(tmp_path):
  with pytest.raises(ValueError, match="7 \\(start, end\\)"):
    pseudo_labels.Rules(decode="template", template=((0.0, 0.2),) * 6)
  with pytest.raises(ValueError, match="needs Rules.template"):
    pseudo_labels.derive(np.full((10, 7), .5), np.zeros((10, 4)),
                         rules=pseudo_labels.Rules(decode="template"))
  with pytest.raises(ValueError, match="all seven"):
    pseudo_labels.vertebra_template([[(0, 3)] * 6 + [None]])
  template = tuple((v / 8, (v + 1.5) / 8) for v in range(7))
  rules = pseudo_labels.Rules(decode="template", template=template)
  options = study_lib.Options(image_size=(32, 32))
  predict.write_spec(tmp_path, options, options, rules=rules)
  spec = json.loads((tmp_path / predict.SPEC).read_text())
  assert pseudo_labels.Rules(**spec["rules"]) == rules


def _oracle_data(tmp_path, distort=None):
  """4 segmented tiny studies and a stage-1 scorer that says what their masks say (boxes passed
  through ``distort`` (N, 4) -> (N, 4) when given): (data folder, uids, options, scorer)."""
  from cspine_jax import synthetic
  from cspine_jax.io import dicom, nifti
  data = pathlib.Path(synthetic.generate(tmp_path / "rsna", 4, 7, size="tiny", num_test=0,
                                         segmented_fraction=1.0))
  uids = sorted(json.loads((data / "ground_truth.json").read_text())["studies"])
  options = study_lib.Options(image_size=(32, 32))
  oracle = {}  # the study's images -> what a perfect stage 1 says about them
  for uid in uids:
    series = dicom.read_series(data / "train_images" / uid, warn=False)
    images = study_lib.slice_images(study_lib.Loaded(None, series, None), options)
    presence, boxes = pseudo_labels.oracle_outputs(
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
  result = pseudo_labels.label_dataset(
      data, {0: scorer, 1: scorer}, options, tmp_path / "v.csv",
      rules=pseudo_labels.Rules(decode="template"), batch_size=1000,
      folds={u: i % 2 for i, u in enumerate(uids)}, log=lambda _: None)
  assert result["rules"].template is not None
  assert result["ensemble"]["pairs"] == 4 * 7 and result["out_of_fold"]["pairs"] == 4 * 7
  # A rigid layout is close to, not exactly, each study's own ranges.
  assert result["ensemble"]["range_iou"] > 0.75
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
        rules=pseudo_labels.Rules(decode="ordered", calibrate_boxes=calibrate), batch_size=1000,
        folds=folds, log=lambda _: None)
  offsets = np.asarray(results[True]["rules"].box_offsets)
  assert results[False]["rules"].box_offsets is None
  # Each edge moved out by 0.15 / 0.7 of the narrowed width (per-slice boxes widen it a little).
  np.testing.assert_allclose(offsets[:, 0], -0.15 / 0.7, atol=0.05)
  np.testing.assert_allclose(offsets[:, 2], 0.15 / 0.7, atol=0.05)
  for name in ("ensemble", "out_of_fold"):
    before, after = results[False][name]["box_iou"], results[True][name]["box_iou"]
    assert before < 0.8 and after > before + 0.1, (name, before, after)
  written = vertebrae_lib.read_vertebrae(tmp_path / "vTrue.csv")
  raw = vertebrae_lib.read_vertebrae(tmp_path / "vFalse.csv")
  for v in range(7):  # the file's boxes are the derived ones moved by the fitted offsets
    np.testing.assert_allclose(written[uids[0]][v].box, pseudo_labels.offset_box(
        raw[uids[0]][v].box, offsets[v]), atol=1e-6)


def test_box_offsets_fit_apply_and_validate(tmp_path):
  got, truth = (0.2, 0.2, 0.6, 0.4), (0.1, 0.2, 0.7, 0.5)  # width 0.4, height 0.2
  pairs = [[(got, truth)] * 7, [(got, truth)] * 6 + [None], [((0.2, 0.2, 0.6, 0.4), got)] * 7]
  offsets = pseudo_labels.fit_box_offsets(pairs)  # the median of the three studies' offsets
  np.testing.assert_allclose(offsets[0], (-0.25, 0.0, 0.25, 0.5))
  np.testing.assert_allclose(offsets[6], (-0.125, 0.0, 0.125, 0.25))
  np.testing.assert_allclose(pseudo_labels.offset_box(got, offsets[0]), truth)
  np.testing.assert_allclose(pseudo_labels.offset_box((0.0, 0.0, 1.0, 0.5), offsets[0]),
                             (0.0, 0.0, 1.0, 0.75))  # kept inside the image
  with pytest.raises(ValueError, match="no segmented study locates C3"):
    pseudo_labels.fit_box_offsets([[(got, truth)] * 2 + [None] + [(got, truth)] * 4])
  with pytest.raises(ValueError, match="7 x \\(x0, y0, x1, y1\\)"):
    pseudo_labels.Rules(calibrate_boxes=True, box_offsets=((0.0,) * 4,) * 6)
  with pytest.raises(ValueError, match="calibrate_boxes is False"):
    pseudo_labels.Rules(box_offsets=offsets)
  with pytest.raises(ValueError, match="needs Rules.box_offsets"):
    pseudo_labels.derive(np.full((10, 7), .5), np.zeros((10, 4)),
                         rules=pseudo_labels.Rules(calibrate_boxes=True))
  rules = pseudo_labels.Rules(calibrate_boxes=True, box_offsets=offsets)
  options = study_lib.Options(image_size=(32, 32))
  predict.write_spec(tmp_path, options, options, rules=rules)
  spec = json.loads((tmp_path / predict.SPEC).read_text())
  assert pseudo_labels.Rules(**spec["rules"]) == rules


def test_box_smoothing_denoises_per_slice_boxes():
  """Gaussian smoothing along the slices: constant and linear runs of valid boxes are kept,
  invalid (empty) boxes are neither changed nor mixed in, and noisy per-slice boxes give boxes
  closer to the mask's."""
  boxes = np.tile([.2, .3, .6, .7], (12, 1))
  boxes[5] = 0  # a slice without a box
  np.testing.assert_allclose(pseudo_labels.smooth_boxes(boxes, 2.0), boxes, atol=1e-12)
  ramp = np.stack([np.linspace(.1, .3, 40), np.full(40, .2), np.linspace(.5, .7, 40),
                   np.full(40, .8)], 1)
  got = pseudo_labels.smooth_boxes(ramp, 3.0)
  np.testing.assert_allclose(got[12:28], ramp[12:28], atol=1e-9)  # away from the ends
  np.testing.assert_array_equal(pseudo_labels.smooth_boxes(ramp, 0.0), ramp)
  mask = _mask()
  presence, boxes = pseudo_labels.oracle_outputs(mask)
  noisy = boxes + np.where(boxes.any(1, keepdims=True),
                           np.random.default_rng(0).normal(0, 0.04, boxes.shape), 0)
  ious = {}
  for f in (0.0, 0.15):
    rules = pseudo_labels.Rules(box_smoothing=f)
    ious[f] = pseudo_labels.summarise(pseudo_labels.compare(
        pseudo_labels.derive(presence, noisy, rules=rules), mask, np.arange(40)))["box_iou"]
  assert ious[0.15] > ious[0.0] + 0.05, ious
  with pytest.raises(ValueError, match="box_smoothing"):
    pseudo_labels.Rules(box_smoothing=1.5)
  rules = pseudo_labels.Rules(box_smoothing=0.15)
  options = study_lib.Options(image_size=(32, 32))
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    predict.write_spec(d, options, options, rules=rules)
    spec = json.loads((pathlib.Path(d) / predict.SPEC).read_text())
  assert pseudo_labels.Rules(**spec["rules"]) == rules


def test_pseudo_label_command_names_missing_inputs(tmp_path, capsys):
  code = pseudo_labels.main(["--data_dir", str(tmp_path), "--records", str(tmp_path / "records"),
                             "--stage1", str(tmp_path / "run"), "--out", str(tmp_path / "v.csv")])
  assert code == 2
  assert str(tmp_path / "records" / "stage1") in capsys.readouterr().err
  assert not (tmp_path / "v.csv").exists()
