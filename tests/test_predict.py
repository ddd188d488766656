"""Inference from DICOM (infer.predict, ensemble, spec): submission, fallbacks, the run folder."""
import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from cspine_jax import aggregate
from cspine_jax import labels
from cspine_jax import metrics
from cspine_jax.infer import ensemble
from cspine_jax.infer import predict
from cspine_jax.infer import spec as spec_lib
from cspine_jax.localize import derive as derive_lib
from cspine_jax.pp import options as options_lib
from cspine_jax.pp import study as study_lib
from cspine_jax.report import study_png

OPTIONS = options_lib.Options(image_size=(32, 32), stage2_slices=6)


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
  return spec_lib.Models(stage1=_stage1, stage2=_stage2, options=OPTIONS, top_n=7)


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


def test_submission_format_fallback_and_error_report(tmp_path, studies, marked):
  # `marked`: each slice image carries its index, so ranges are predictable.
  prior = PRIOR
  folders = predict.find_studies(studies)
  assert [f.name[-5:] for f in folders] == ["10001", "10002", "10003"]
  writers = [predict.json_writer(tmp_path / "json"), study_png.png_writer(tmp_path / "png")]
  result = predict.run(folders,
                       _models(),
                       prior,
                       batch_size=8,
                       studies_per_batch=2,
                       on_study=lambda res, series: [w(res, series) for w in writers])
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

  models = spec_lib.Models(stage1=unsure,
                           stage2=stage2_must_not_run,
                           options=OPTIONS,
                           rules=derive_lib.Rules(decode="ordered", require_all=True))
  prior = PRIOR
  folders = predict.find_studies(studies)
  result = predict.run(folders,
                       models,
                       prior,
                       batch_size=8,
                       on_study=predict.json_writer(tmp_path / "json"))
  assert [r.error is not None for r in result.results] == [True, True, True]
  for r in result.results[:2]:
    assert "stage 1 finds no cervical vertebra" in r.error and "0.3" in r.error
    np.testing.assert_allclose(r.probs, prior)
    assert all(v.present for v in r.vertebrae)  # the placement is kept for the report
  info = json.loads((tmp_path / "json" / f"{folders[0].name}.json").read_text())
  assert info["status"] == "fallback" and "NoVertebraFound" in info["error"]
  assert info["vertebrae"]["C7"]["confidence"] == pytest.approx(0.3)
  assert result.wide()["StudyInstanceUID"].tolist() == [f.name for f in folders]


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
  res = predict.run([folder],
                    _models(),
                    prior,
                    batch_size=8,
                    on_study=predict.json_writer(tmp_path / "json")).results[0]
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
  with pytest.raises(ensemble.PredictError):
    predict.find_studies(tmp_path / "missing")
  train = pd.DataFrame({"StudyInstanceUID": ["1.1", "1.2"], "patient_overall": [1, 0],
                        **{c: [0, 0] for c in labels.VERTEBRAE}})
  train.loc[0, "C2"] = 1
  train.to_csv(tmp_path / "train.csv", index=False)
  prior = spec_lib.load_prior(tmp_path / "train.csv")
  np.testing.assert_allclose(prior, [0.5, 0, 0.5, 0, 0, 0, 0, 0])
  spec_lib.write_prior(tmp_path / "prior.json", train)
  np.testing.assert_allclose(spec_lib.load_prior(tmp_path / "prior.json"), prior)
  (tmp_path / "bad.json").write_text('{"C1": 0.1}')
  with pytest.raises(ensemble.PredictError, match="bad.json"):
    spec_lib.load_prior(tmp_path / "bad.json")


def test_in_batches_pads_to_one_shape():
  shapes = []
  def fn(x):
    shapes.append(x.shape)
    return x.sum(1), x[:, 0]

  a, b = ensemble.in_batches(fn, [np.arange(14.).reshape(7, 2)], 3)
  assert shapes == [(3, 2)] * 3
  np.testing.assert_allclose(a, np.arange(14.).reshape(7, 2).sum(1))
  assert len(b) == 7


def test_fold_ensemble_restores_checkpoints_and_averages(tmp_path, monkeypatch):

  from test_checkpoints import make_iterator
  from test_checkpoints import make_trainer
  from test_input import write_task_shards
  from test_train import TinySeq

  from cspine_jax import models
  from cspine_jax.inputs import augment as augment_lib
  from cspine_jax.train import checkpoints
  from cspine_jax.train import sharding
  records = write_task_shards(tmp_path / "rec", "stage2", 21)
  trainer, it = make_trainer(), make_iterator(records)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (5, 8, 16, 16, 3), dtype=np.uint8)
  vertebra = np.arange(5, dtype=np.int32)
  x = augment_lib.normalize(images)
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
  ens = ensemble.FoldEnsemble.load(tmp_path / "run" / "stage2", "stage2")
  assert len(ens) == 2 and ens.folds == [0, 1]
  got = ens({"images": images, "vertebra": vertebra})["prob"]
  np.testing.assert_allclose(got, np.mean(probs, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ens({"images": images, "vertebra": vertebra}, fold=1)["prob"],
                             probs[1], rtol=1e-5, atol=1e-6)
  with pytest.raises(ensemble.PredictError, match="fold 4"):
    ens({"images": images, "vertebra": vertebra}, fold=4)
  with pytest.raises(ensemble.PredictError, match="no trained model"):
    ensemble.fold_dirs(tmp_path / "run" / "stage1")


def test_each_stage_preprocesses_as_its_models_records_were_made(tmp_path):
  """Inference takes each stage's options from its models' checkpoints (how their records were
  made); an older inference.json that names options must agree with them."""
  import types
  stage2 = options_lib.Options(image_size=(32, 32), stage2_slices=6, crop_margin=0.2)
  fake = types.SimpleNamespace(record_options=lambda: stage2,
                               task=types.SimpleNamespace(name="stage2"))
  path = tmp_path / spec_lib.SPEC
  assert spec_lib._options(fake, {}, "stage2_options", path) == stage2
  assert spec_lib._options(fake, {"stage2_options": stage2.to_json()}, "stage2_options",
                           path) == stage2
  other = options_lib.Options(image_size=(32, 32), stage2_slices=6)  # the stage-1 records' margin
  with pytest.raises(ensemble.PredictError, match="crop_margin"):
    spec_lib._options(fake, {"stage2_options": other.to_json()}, "stage2_options", path)
  old = types.SimpleNamespace(record_options=lambda: None,
                              task=types.SimpleNamespace(name="stage2"))
  with pytest.raises(ensemble.PredictError, match="stage2_options is missing"):
    spec_lib._options(old, {}, "stage2_options", path)


@pytest.fixture
def marked(monkeypatch):
  """Each stage-1 image carries its slice index (what `_stage1` reads)."""
  real_images = study_lib.slice_images

  def mark(loaded, options):
    images = real_images(loaded, options).copy()
    images[:, 0, 0, 1] = np.arange(len(images))
    return images

  monkeypatch.setattr(study_lib, "slice_images", mark)


PRIOR = np.array([0.2, 0.05, 0.1, 0.03, 0.04, 0.05, 0.06, 0.07])


def test_a_study_whose_stage2_outputs_are_not_finite_falls_back_and_the_run_goes_on(
    tmp_path, studies, marked):
  """A non-finite stage-2 output used to raise in top_n_overall outside the per-study handling,
  ending the whole run; now that study alone gets the prior and an error entry."""
  def nan_for_the_second_study(seqs, vertebra):
    probs = _stage2(seqs, vertebra)
    probs[7:14] = np.where(np.arange(7) == 2, np.nan, probs[7:14])  # study 2's C3
    return probs

  models = spec_lib.Models(stage1=_stage1, stage2=nan_for_the_second_study, options=OPTIONS)
  folders = predict.find_studies(studies)
  result = predict.run(folders, models, PRIOR, batch_size=16, studies_per_batch=2,
                       on_study=predict.json_writer(tmp_path / "json"))
  first, second, unreadable = result.results
  assert first.error is None and np.all(np.isfinite(first.probs))
  assert second.error == "Stage2Error: stage 2 gave non-finite probabilities for C3"
  np.testing.assert_allclose(second.probs, PRIOR)
  assert "SeriesError" in unreadable.error
  paths = predict.write_outputs(result, tmp_path / "submission.csv")
  wide = metrics.read_predictions(paths["submission"])
  assert len(wide) == 3 and np.isfinite(wide[list(labels.TARGETS)].to_numpy(float)).all()
  errors = json.loads(paths["errors"].read_text())
  assert [e["folder"] for e in errors] == [str(folders[1]), str(folders[2])]
  info = json.loads((tmp_path / "json" / f"{folders[1].name}.json").read_text())
  assert info["status"] == "fallback" and "non-finite" in info["error"]


def test_a_stage2_call_that_raises_is_retried_per_study(studies, marked):
  calls = []

  def flaky(seqs, vertebra):
    calls.append(len(seqs))
    if len(calls) == 1:
      raise RuntimeError("device lost")
    return _stage2(seqs, vertebra)

  folders = predict.find_studies(studies)[:2]
  models = spec_lib.Models(stage1=_stage1, stage2=flaky, options=OPTIONS)
  result = predict.run(folders, models, PRIOR, batch_size=16, studies_per_batch=2)
  assert [r.error for r in result.results] == [None, None]  # each alone went through
  assert len(calls) == 3

  def broken(seqs, vertebra):
    raise RuntimeError("bad weights")

  models = spec_lib.Models(stage1=_stage1, stage2=broken, options=OPTIONS)
  result = predict.run(folders, models, PRIOR, batch_size=16, studies_per_batch=2)
  assert [r.error for r in result.results] == ["stage 2 failed: RuntimeError: bad weights"] * 2
  for r in result.results:
    np.testing.assert_allclose(r.probs, PRIOR)


def test_two_folders_of_one_study_give_one_set_of_rows(tmp_path, real_data_dir, marked):
  """Folders named otherwise whose files carry the same StudyInstanceUID: the first one's rows;
  the second has none and an error entry naming both folders (duplicate rows would be a silently
  wrong submission)."""
  src = real_data_dir / "totalseg_ct" / "dicom_jpeg_lossless"
  root = tmp_path / "test_images"
  for name in ("scan_a", "scan_b"):
    shutil.copytree(src, root / name)
  folders = predict.find_studies(root)
  result = predict.run(folders, _models(), PRIOR, batch_size=8,
                       on_study=predict.json_writer(tmp_path / "json"))
  uid = result.results[0].uid
  assert uid == result.results[1].uid and uid.startswith("1.2.826.0.1.3680043.8.498.")
  a, b = result.results
  assert a.error is None and b.duplicate_of == str(folders[0]) and b.probs is None
  assert str(folders[0]) in b.error and str(folders[1]) in b.error and "DuplicateStudy" in b.error
  paths = predict.write_outputs(result, tmp_path / "submission.csv")
  sub = pd.read_csv(paths["submission"], dtype={"row_id": str})
  assert sub["row_id"].tolist() == [f"{uid}_{t}" for t in labels.TARGETS]
  np.testing.assert_allclose(sub["fractured"], np.round(a.probs, 6))
  (error,) = json.loads(paths["errors"].read_text())
  assert error["folder"] == str(folders[1]) and str(folders[0]) in error["reason"]
  assert json.loads((tmp_path / "json" / f"{uid}.json").read_text())["status"] == "ok"
  info = json.loads((tmp_path / "json" / f"scan_b{predict.DUPLICATE_SUFFIX}").read_text())
  assert info["status"] == "duplicate" and info["duplicate_of"] == str(folders[0])
  # A Run with one UID twice (no run makes one) refuses to become a submission.
  twice = predict.Run([a, dataclasses.replace(a, folder="other")], {})
  with pytest.raises(ValueError, match=uid):
    twice.wide()


def _run_to_files(folders, models, json_dir, out, fingerprint, **kwargs):
  done = predict.finished(folders, json_dir, fingerprint)
  result = predict.run(folders, models, PRIOR, batch_size=8, studies_per_batch=1,
                       on_study=predict.json_writer(json_dir, fingerprint), done=done, **kwargs)
  paths = predict.write_outputs(result, out)
  return done, paths["submission"].read_bytes(), paths["errors"].read_bytes()


def test_a_killed_prediction_resumes_to_the_same_submission(tmp_path, studies, marked,
                                                             monkeypatch):
  """What `python -m cspine_jax.predict` does when started again after a kill: the studies whose
  JSON the same run folder wrote are taken as they are, the others predicted; the submission is
  byte-identical to an unbroken run's. JSON that is missing, unreadable or of another run folder
  is redone."""
  shorter = studies / "1.2.826.0.1.3680043.10002"  # a study that differs from the first
  for f in sorted(shorter.iterdir())[:4]:
    f.unlink()
  for name in ("scan_x", "scan_y"):  # named otherwise: the files' UID, the second a duplicate
    shutil.copytree(studies / "1.2.826.0.1.3680043.10001", studies / name)
  folders = predict.find_studies(studies)
  assert len(folders) == 5
  fp = "fingerprint-1"
  # The unbroken run.
  done, want_sub, want_err = _run_to_files(folders, _models(), tmp_path / "a", tmp_path / "a.csv",
                                           fp)
  assert done == {}
  want = metrics.read_predictions(tmp_path / "a.csv")
  assert len(want) == 4 and want.iloc[0]["C1"] != want.iloc[1]["C1"]
  assert len(json.loads(want_err)) == 2  # the unreadable study and the duplicate
  # Killed while stage 2 ran on the second study (studies_per_batch=1: one call per study).
  read = []  # the slice count of each study that stage 1 ran on
  real_locate = predict.locate

  def locate(series, *args):
    read.append(series.volume.shape[0])
    return real_locate(series, *args)

  monkeypatch.setattr(predict, "locate", locate)

  def killed(seqs, vertebra):
    if len(read) == 2:
      raise KeyboardInterrupt
    return _stage2(seqs, vertebra)

  with pytest.raises(KeyboardInterrupt):
    _run_to_files(folders, spec_lib.Models(stage1=_stage1, stage2=killed, options=OPTIONS),
                  tmp_path / "b", tmp_path / "b.csv", fp)
  assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [f"{folders[0].name}.json"]
  assert not (tmp_path / "b.csv").exists()
  # Started again: only the others are predicted (stage 1 sees their slices; the duplicate is
  # read, then left out).
  read.clear()
  models = _models()
  done, sub, err = _run_to_files(folders, models, tmp_path / "b", tmp_path / "b.csv", fp)
  assert list(done) == [str(folders[0])] and read == [16, 20]  # 10002 (16 slices), scan_x
  assert sub == want_sub and err == want_err
  # One study's JSON gone, the duplicate's cut short: those two are done again.
  (tmp_path / "b" / f"{folders[1].name}.json").unlink()
  dup = tmp_path / "b" / f"scan_y{predict.DUPLICATE_SUFFIX}"
  dup.write_text(dup.read_text()[:40])
  read.clear()
  done, sub, err = _run_to_files(folders, models, tmp_path / "b", tmp_path / "b.csv", fp)
  assert sorted(done) == sorted(str(folders[i]) for i in (0, 2, 3)) and read == [16]
  assert sub == want_sub and err == want_err
  # Another run folder (or other options, run_fingerprint): nothing of the old results is taken.
  assert len(predict.finished(folders, tmp_path / "b", fp)) == 5
  assert predict.finished(folders, tmp_path / "b", "other") == {}


def test_the_run_fingerprint_changes_with_the_run_folder_and_options(tmp_path):
  run = tmp_path / "run"
  ckpt = run / "stage2" / "fold_0" / "checkpoints" / "5"
  ckpt.mkdir(parents=True)
  (ckpt / "state").write_bytes(b"weights")
  (run / "stage2" / "fold_0" / "log.txt").write_text("not part of the models")
  (run / spec_lib.SPEC).write_text('{"top_n": 7}')

  def fp(**kw):
    return predict.run_fingerprint(run, **{"top_n": 7, "prior": PRIOR, "series_uid": "auto",
                                           **kw})

  first = fp()
  assert fp() == first
  (run / "stage2" / "fold_0" / "log.txt").write_text("training went on")
  assert fp() == first
  assert fp(top_n=3) != first and fp(prior=PRIOR * 0.5) != first and fp(series_uid=None) != first
  (run / spec_lib.SPEC).write_text('{"top_n": 6}')
  assert fp() != first
  (run / spec_lib.SPEC).write_text('{"top_n": 7}')
  assert fp() == first
  (ckpt / "state").write_bytes(b"other weights")  # a retrained model
  assert fp() != first
