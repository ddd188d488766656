"""End-to-end tests of data_prep.prepare on generated tiny studies: every record set against the
generator's ground truth, kill-and-restart, bad studies, option mismatch, the --vertebrae file."""
import collections
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from cspine_jax import labels as labels_lib
from cspine_jax.io import dicom
from cspine_jax.records import pipeline
from cspine_jax.records import shards
from cspine_jax.records import slices2d
from cspine_jax.pp import crops as crops_lib
from cspine_jax.pp import options as options_lib
from cspine_jax.pp import study as study_lib
from cspine_jax.io import vertebrae as vertebrae_lib
from cspine_jax.synthetic import generate
import procs

REPO = pathlib.Path(__file__).resolve().parents[1]
OPTS = options_lib.Options(image_size=(32, 32), num_folds=3, stage2_slices=6, cube_size=16)
NUM_STUDIES = 5


def _cli(*argv):
  """(exit status, stderr) of ``python -m data_prep.prepare ARGV`` (never imported in tests: absl
  flags are process-global)."""
  proc = subprocess.run([sys.executable, "-m", "data_prep.prepare", *argv], cwd=REPO,
                        capture_output=True, text=True, timeout=300, check=False)
  return proc.returncode, proc.stderr


def _cli_args(data_dir, out, task, *extra):
  return ["--data_dir", str(data_dir), "--out", str(out), "--task", task, "--image_size", "32",
          "--num_folds", "3", "--stage2_slices", "6", "--cube_size", "16", "--noprogress", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("rsna")
  # Two damaged files (skipped by the reader) exercise numbers vs indices.
  generate(root, NUM_STUDIES, seed=3, size="tiny", corrupt=2)
  gt = json.loads((root / "ground_truth.json").read_text())
  return root, gt


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
  """Every task built once (workers=1 in-process; the CLI/multi-worker path is tested below)."""
  root, _ = data
  out = tmp_path_factory.mktemp("records")
  manifests = {t: pipeline.prepare(root, out, t, OPTS, workers=1, progress=False)
               for t in pipeline.TASKS}
  return out, manifests


def _train(gt):
  return {u: s for u, s in gt["studies"].items() if s["split"] == "train"}


def _series(root, uid):
  return dicom.read_series(root / "train_images" / uid, warn=False)


def _gt_presence(info, num_slices):
  presence = np.zeros((num_slices, 7), bool)
  for name, v in _located(info).items():
    presence[v["first"]:v["last"] + 1, labels_lib.VERTEBRAE.index(name)] = True
  return presence


def _located(info):
  """The ground truth's vertebrae that are in the study (absent ones are null)."""
  return {name: v for name, v in info["vertebrae"].items() if v is not None}


def _gt_labels(info):
  c = [float(name in info["fractured"]) for name in labels_lib.VERTEBRAE]
  return np.array([max(c)] + c, np.float32)


def _by_study(records):
  out = collections.defaultdict(list)
  for r in records:
    out[r["study_uid"]].append(r)
  return out


def test_manifests_and_folds(data, built):
  root, gt = data
  out, manifests = built
  train = _train(gt)
  folds = manifests["stage2"]["folds"]
  assert set(folds) == set(train)
  for task, m in manifests.items():
    assert m["schema_version"] == 1 and m["task"] == task and m["folds"] == folds
    assert m["num_records"] == sum(m["records_per_fold"])
    assert m["num_records"] == sum(s["num_records"] for s in m["shards"])
    assert m["options"] == OPTS.to_json() and m["bad_studies"] == []
    assert json.loads((out / task / "manifest.json").read_text()) == m
    for rec in pipeline.read_task(out, task):
      assert rec["fold"] == folds[rec["study_uid"]]


def test_stage1_against_ground_truth(data, built):
  root, gt = data
  out, manifests = built
  segmented = {u for u, s in _train(gt).items() if s["has_segmentation"]}
  assert segmented, "the generator made no segmented training study"
  by_study = _by_study(pipeline.read_task(out, "stage1"))
  assert set(by_study) == segmented
  for uid, recs in by_study.items():
    info = gt["studies"][uid]
    series = _series(root, uid)
    s, h, w = series.volume.shape
    recs.sort(key=lambda r: r["index"])
    assert [r["index"] for r in recs] == list(range(s))
    np.testing.assert_array_equal([r["number"] for r in recs], series.numbers)
    presence = np.stack([r["presence"] for r in recs])
    np.testing.assert_array_equal(presence, _gt_presence(info, s))
    for name, v in _located(info).items():
      assert recs[v["first"]]["number"] == v["first_number"]
      assert recs[v["last"]]["number"] == v["last_number"]
    area = np.stack([r["area"] for r in recs])
    assert np.array_equal(area > 0, presence > 0) and np.allclose(area.max(0)[presence.any(0)], 1)
    # Per-slice boxes lie inside the union of the visible vertebrae's boxes; together they span all.
    scale = np.array([w, h, w, h], np.float32)
    boxes = np.stack([r["box"] for r in recs]) * scale
    gt_boxes = {labels_lib.VERTEBRAE.index(n): np.array(v["box"])
                for n, v in _located(info).items()}
    for i, r in enumerate(recs):
      assert r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8
      assert r["box"].dtype == np.float32 and r["presence"].dtype == np.float32
      vis = [gt_boxes[v] for v in np.flatnonzero(presence[i])]
      if not vis:
        assert not boxes[i].any()
        continue
      lo = np.min([b[:2] for b in vis], 0)
      hi = np.max([b[2:] for b in vis], 0)
      assert np.all(boxes[i][:2] >= lo - 1e-3) and np.all(boxes[i][2:] <= hi + 1e-3)
    all_gt = np.array(list(gt_boxes.values()))
    shown = boxes[presence.any(1)]
    np.testing.assert_allclose([shown[:, 0].min(), shown[:, 1].min(), shown[:, 2].max(),
                                shown[:, 3].max()],
                               [*all_gt[:, :2].min(0), *all_gt[:, 2:].max(0)], atol=1e-3)
    # 2.5D: channel 1 of slice i is channel 0 of slice i + 1.
    for a, b in zip(recs, recs[1:]):
      np.testing.assert_array_equal(a["image"][..., 1], b["image"][..., 0])
    # Inference makes its stage-1 images from the HU volume: the same bytes as the records.
    inference = study_lib.slice_images(study_lib.Loaded(None, series, None), OPTS)
    np.testing.assert_array_equal(np.stack([r["image"] for r in recs]), inference)


def _expected_stage2(root, uid, info):
  series = _series(root, uid)
  out = {}
  for name, v in _located(info).items():
    ext = study_lib.Extent(v["first"], v["last"], tuple(v["box"]))
    out[labels_lib.VERTEBRAE.index(name)] = crops_lib.vertebra_images(series.volume, ext, OPTS)
  return out


def test_stage2_against_ground_truth(data, built):
  root, gt = data
  out, manifests = built
  train = _train(gt)
  recs = pipeline.read_task(out, "stage2")
  segmented = {u for u, s in train.items() if s["has_segmentation"]}
  bad = {b["study_uid"]: b["reason"] for b in manifests["stage2"]["bad_studies"]}
  # Without a --vertebrae file, studies without masks cannot be located (checked separately).
  assert set(_by_study(recs)) == segmented
  for uid, srecs in _by_study(recs).items():
    info = gt["studies"][uid]
    labels = _gt_labels(info)
    expected = _expected_stage2(root, uid, info)
    assert sorted(r["vertebra"] for r in srecs) == list(range(7))
    for r in srecs:
      v = r["vertebra"]
      assert r["images"].shape == (2, 32, 32, 3) and r["images"].dtype == np.uint8
      assert r["label"] == labels[1 + v]
      assert r["present"] == (v in expected)
      if v in expected:
        np.testing.assert_array_equal(r["images"], expected[v])
      else:
        assert not r["images"].any()
  assert not bad


def test_cnn3d_and_slices2d_against_ground_truth(data, built):
  root, gt = data
  out, _ = built
  train = _train(gt)
  cubes = _by_study(pipeline.read_task(out, "cnn3d"))
  assert set(cubes) == set(train)
  for uid, (rec,) in cubes.items():
    assert rec["volume"].shape == (16, 16, 16, 1) and rec["volume"].dtype == np.uint8
    np.testing.assert_array_equal(rec["labels"], _gt_labels(train[uid]))
  boxes_csv = root / "train_bounding_boxes.csv"
  box_rows = labels_lib.read_bounding_boxes(boxes_csv) if boxes_csv.exists() else None
  slices = _by_study(pipeline.read_task(out, "slices2d"))
  segmented = {u for u, s in train.items() if s["has_segmentation"]}
  assert set(slices) == segmented  # The others need --vertebrae (see the next test).
  for uid, recs in slices.items():
    info = train[uid]
    series = _series(root, uid)
    recs.sort(key=lambda r: r["index"])
    presence = _gt_presence(info, series.volume.shape[0])
    np.testing.assert_array_equal(np.stack([r["presence"] for r in recs]), presence)
    numbers = () if box_rows is None else tuple(
        box_rows.loc[box_rows["StudyInstanceUID"] == uid, "slice_number"])
    expected = slices2d.fracture_targets(presence, _gt_labels(info)[1:] > 0, series.numbers,
                                         numbers)
    fracture = np.stack([r["fracture"] for r in recs]) > 0
    np.testing.assert_array_equal(fracture, expected)
    for name, fr_numbers in info["fracture_slices"].items():
      v = labels_lib.VERTEBRAE.index(name)
      shown = set(series.numbers[presence[:, v]].tolist()) & set(fr_numbers)
      assert shown and shown <= set(series.numbers[fracture[:, v]].tolist())
      assert not fracture[~presence[:, v], v].any()
    assert all(r["image"].shape == (32, 32, 3) for r in recs)


def _file_predictions(train, inset=0):
  """--vertebrae entries from the ground truth (boxes ``inset`` pixels inside the true ones):
  ({uid: 7 predictions}, {(uid, vertebra): (first, last, pixel box)})."""
  preds, boxes = {}, {}
  for uid, info in train.items():
    _, h, w = info["shape"]
    row = []
    for name in labels_lib.VERTEBRAE:
      v = info["vertebrae"].get(name)
      if v is None:
        row.append(vertebrae_lib.absent())
        continue
      x0, y0, x1, y1 = v["box"]
      box = (x0 + inset, y0 + inset, x1 - inset, y1 - inset)
      boxes[uid, labels_lib.VERTEBRAE.index(name)] = (v["first"], v["last"], box)
      row.append(vertebrae_lib.VertebraPrediction(
          True, v["first"], v["last"], v["first_number"], v["last_number"],
          (box[0] / w, box[1] / h, box[2] / w, box[3] / h), 0.9))
    preds[uid] = tuple(row)
  return preds, boxes


def test_vertebrae_file_locates_unsegmented_studies(data, built, tmp_path):
  root, gt = data
  out, manifests = built
  train = _train(gt)
  unsegmented = {u for u, s in train.items() if not s["has_segmentation"]}
  for m in (manifests["stage2"], manifests["slices2d"]):
    assert {s["study_uid"] for s in m["shards"]} == set(train) - unsegmented
    assert {s["study_uid"] for s in m["skipped_studies"]} == unsegmented
    assert all("no segmentation" in s["reason"] for s in m["skipped_studies"])
  preds, _ = _file_predictions(train)
  vfile = tmp_path / "vertebrae.csv"
  vertebrae_lib.write_vertebrae(vfile, preds)
  m = pipeline.prepare(root, tmp_path / "out", "stage2", OPTS, vertebrae_file=vfile, progress=False)
  assert m["bad_studies"] == [] and m["num_records"] == 7 * len(train)
  for uid, srecs in _by_study(pipeline.read_task(tmp_path / "out", "stage2")).items():
    expected = _expected_stage2(root, uid, train[uid])
    for r in srecs:
      assert r["present"] == (r["vertebra"] in expected)
      if r["present"]:
        np.testing.assert_array_equal(r["images"], expected[r["vertebra"]])


def test_stage2_locate_vertebrae_crops_every_study_by_the_file(data, tmp_path):
  """stage2_locate="vertebrae": segmented studies too are cropped by the --vertebrae file (here a
  box 2 px inside the true one, so mask crops would differ); a study missing from it is bad, with
  a reason that says its segmentation was not used."""
  import dataclasses
  root, gt = data
  train = _train(gt)
  opts = dataclasses.replace(OPTS, stage2_locate="vertebrae")
  preds, boxes = _file_predictions(train, inset=2)
  left_out = sorted(u for u, info in train.items() if info["has_segmentation"])[0]
  vfile = tmp_path / "vertebrae.csv"
  vertebrae_lib.write_vertebrae(vfile, {u: p for u, p in preds.items() if u != left_out})
  m = pipeline.prepare(root, tmp_path / "out", "stage2", opts, vertebrae_file=vfile,
                       progress=False)
  assert m["options"]["stage2_locate"] == "vertebrae"
  bad = {b["study_uid"]: b["reason"] for b in m["bad_studies"]}
  assert list(bad) == [left_out] and "segmentation not used" in bad[left_out]
  recs = _by_study(pipeline.read_task(tmp_path / "out", "stage2"))
  assert left_out not in recs and set(recs) == set(train) - {left_out}
  for uid, srecs in recs.items():
    series = _series(root, uid)
    for r in srecs:
      if r["present"]:
        first, last, box = boxes[uid, r["vertebra"]]
        expected = crops_lib.vertebra_images(series.volume, study_lib.Extent(first, last, box), opts)
        np.testing.assert_array_equal(r["images"], expected)


@pytest.mark.skipif(NUM_STUDIES < 2, reason="needs several studies")
def test_interrupted_run_resumes_to_the_same_records(data, built, tmp_path, monkeypatch):
  root, _ = data
  out, _ = built
  reference = collections.Counter(map(shards.canonical, pipeline.read_task(out, "cnn3d")))
  calls = {"n": 0}
  original = pipeline.TASKS["cnn3d"].process

  def dying(study, options):
    calls["n"] += 1
    if calls["n"] == 3:
      raise KeyboardInterrupt  # As if the run were stopped while writing the third study.
    yield from original(study, options)

  monkeypatch.setattr(pipeline.TASKS["cnn3d"], "process", dying)
  with pytest.raises(KeyboardInterrupt):
    pipeline.prepare(root, tmp_path, "cnn3d", OPTS, progress=False)
  task_dir = tmp_path / "cnn3d"
  assert len(list(task_dir.glob("*.array_record"))) == 2
  assert not (task_dir / "manifest.json").exists()
  (task_dir / "9.9.array_record.tmp-4242").write_bytes(b"half a shard from a killed writer")
  monkeypatch.setattr(pipeline.TASKS["cnn3d"], "process", original)
  m = pipeline.prepare(root, tmp_path, "cnn3d", OPTS, progress=False)
  again = collections.Counter(map(shards.canonical, pipeline.read_task(tmp_path, "cnn3d")))
  assert again == reference and m["num_records"] == sum(reference.values())
  assert not [p for p in task_dir.iterdir() if shards.TMP_MARK in p.name]


# The command, with each study held back a while in the worker before its shard is complete (the
# task's `process` patched before the workers fork), so that a kill lands mid-run.
SLOW_PREPARE = """
import runpy, sys, time
from cspine_jax.records import pipeline
task, delay = pipeline.TASKS[sys.argv[1]], float(sys.argv[2])
original = task.process
def slow(study, options):
  time.sleep(delay)
  yield from original(study, options)
task.process = slow
sys.argv = ["prepare", *sys.argv[3:]]
runpy.run_module("data_prep.prepare", run_name="__main__")
"""


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_killed_cli_run_resumes(data, built, tmp_path, start_method):
  """A real SIGKILL of the command (2 workers) while studies remain: its workers end with it (a
  worker left behind would wait forever, or race the restarted run on its shard), and the same
  command again finishes with the records of an unbroken run."""
  root, _ = data
  out, manifests = built
  reference = collections.Counter(map(shards.canonical, pipeline.read_task(out, "cnn3d")))
  total = manifests["cnn3d"]["num_studies"]
  assert total >= 4
  args = [*_cli_args(root, tmp_path, "cnn3d"), "--workers", "2", "--start_method", start_method]
  proc = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, "cnn3d", "1.0", *args], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  task_dir = tmp_path / "cnn3d"
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if task_dir.exists() and any(task_dir.glob("*.array_record")):
      break
    time.sleep(0.02)
  workers = procs.children(proc.pid)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert len(workers) >= 2, workers  # the pool's workers (and maybe a resource tracker)
  assert not procs.still_alive(workers), "workers outlived the killed command"
  assert not procs.running_with(str(tmp_path)), "a process of the killed run is still running"
  # Killed mid-run: some studies written, others not (and no manifest).
  written = len(list(task_dir.glob("*.array_record")))
  assert 0 < written < total, (written, total)
  assert not (task_dir / shards.MANIFEST).exists()
  subprocess.run([sys.executable, "-m", "data_prep.prepare", *args], cwd=REPO, check=True,
                 capture_output=True)
  again = collections.Counter(map(shards.canonical, pipeline.read_task(tmp_path, "cnn3d")))
  assert again == reference
  assert not [p for p in task_dir.iterdir() if shards.TMP_MARK in p.name]


def test_bad_study_is_listed_and_the_rest_written(data, built, tmp_path):
  root, gt = data
  out, manifests = built
  copy = tmp_path / "rsna"
  shutil.copytree(root, copy)
  victim = sorted(_train(gt))[0]
  for f in (copy / "train_images" / victim).iterdir():
    f.write_bytes(b"not a dicom file")
  m = pipeline.prepare(copy, tmp_path / "out", "cnn3d", OPTS, progress=False)
  assert [b["study_uid"] for b in m["bad_studies"]] == [victim]
  assert "SeriesError" in m["bad_studies"][0]["reason"] and victim in m["bad_studies"][0]["reason"]
  assert m["num_records"] == manifests["cnn3d"]["num_records"] - 1
  assert {s["study_uid"] for s in m["shards"]} == set(_train(gt)) - {victim}


def test_restart_with_other_options_is_refused(data, tmp_path):
  root, _ = data
  pipeline.prepare(root, tmp_path, "cnn3d", OPTS, progress=False)
  other = options_lib.Options(image_size=(32, 32), num_folds=3, stage2_slices=6, cube_size=8)
  with pytest.raises(pipeline.PrepareError, match="cube_size"):
    pipeline.prepare(root, tmp_path, "cnn3d", other, progress=False)
  # The command refuses them too (exit status 2, the reason on stderr), and a bad --image_size.
  rc, err = _cli(*_cli_args(root, tmp_path, "cnn3d", "--window_level", "300"))
  assert rc == 2 and "prepare: error:" in err and "window_level" in err, err
  rc, err = _cli(*_cli_args(root, tmp_path, "cnn3d", "--image_size", "32,32,3"))
  assert rc == 2 and "--image_size takes H or H,W, got 32,32,3" in err, err
  # A folder written by code whose images differ for the same options (an older resize) is refused.
  identity = tmp_path / "cnn3d" / pipeline.IDENTITY
  old = json.loads(identity.read_text())
  identity.write_text(json.dumps(dict(old, pixels_version=1)))
  with pytest.raises(pipeline.PrepareError, match="pixels_version"):
    pipeline.prepare(root, tmp_path, "cnn3d", OPTS, progress=False)
  # One written before a field was added (its records would lack it) is refused too.
  fewer = dict(old, features={k: v for k, v in old["features"].items() if k != "labels"})
  identity.write_text(json.dumps(fewer))
  with pytest.raises(pipeline.PrepareError, match="features"):
    pipeline.prepare(root, tmp_path, "cnn3d", OPTS, progress=False)


def test_bad_uid_in_csv_never_becomes_a_path(data, tmp_path):
  root, _ = data
  copy = tmp_path / "rsna"
  copy.mkdir()
  df = pd.read_csv(root / "train.csv", dtype=str)
  df.loc[0, "StudyInstanceUID"] = "../../etc"
  df.to_csv(copy / "train.csv", index=False)
  with pytest.raises(labels_lib.TableError, match="invalid StudyInstanceUID"):
    pipeline.prepare(copy, tmp_path / "out", "cnn3d", OPTS, progress=False)
  assert not (tmp_path / "out").exists()
