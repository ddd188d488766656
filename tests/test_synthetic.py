"""Tests of the synthetic RSNA-format generator (tiny studies: a few seconds in all)."""
import csv
import dataclasses
import hashlib
import json
import pathlib
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest

from cspine_jax.io.dicom import read_series
from cspine_jax.io.nifti import load_mask
from cspine_jax.synthetic import fractures, geometry, render, studies, writers

REPO = pathlib.Path(__file__).resolve().parents[1]
SEED = 14
NUM_TRAIN, NUM_TEST = 6, 2
VERTEBRAE = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")


def _tree_hashes(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("rsna")
  studies.generate(root, NUM_TRAIN, SEED, size="tiny", num_test=NUM_TEST, corrupt=2)
  gt = json.loads((root / "ground_truth.json").read_text())
  return root, gt


def _regenerate(gt_entry: dict, uid: str):
  """The study's spec and phantom, drawn again from its index (independent of the files)."""
  spec = studies.sample_study(SEED, gt_entry["index"], "tiny", split=gt_entry["split"],
                              has_segmentation=gt_entry["has_segmentation"], uid=uid)
  return spec, studies.make_study(spec)


def test_same_seed_is_byte_identical_and_other_seed_differs(data, tmp_path):
  root, gt = data
  # This seed's studies use every transfer syntax, so each encoder is proven deterministic.
  assert ({s["transfer_syntax"] for s in gt["studies"].values()}
          == set(writers.TRANSFER_SYNTAXES.values()))
  again = tmp_path / "again"
  studies.generate(again, NUM_TRAIN, SEED, size="tiny", num_test=NUM_TEST, corrupt=2)
  first = _tree_hashes(root)
  assert len(first) > 100 and first == _tree_hashes(again)
  other = tmp_path / "other"
  studies.generate(other, 2, SEED + 1, size="tiny", num_test=0)
  assert set(_tree_hashes(other).values()).isdisjoint(first.values())


def test_layout_and_tables(data):
  root, gt = data
  info = gt["studies"]
  assert gt["version"] == 1
  assert sum(s["split"] == "train" for s in info.values()) == NUM_TRAIN
  assert sum(s["split"] == "test" for s in info.values()) == NUM_TEST
  with open(root / "train.csv") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == list(writers.TRAIN_COLUMNS)
  assert [r["StudyInstanceUID"] for r in rows] == [u for u, s in info.items()
                                                   if s["split"] == "train"]
  for r in rows:
    s = info[r["StudyInstanceUID"]]
    flags = [int(r[v]) for v in VERTEBRAE]
    assert [v for v, f in zip(VERTEBRAE, flags) if f] == s["fractured"]
    assert int(r["patient_overall"]) == int(any(flags))
    files = list((root / "train_images" / r["StudyInstanceUID"]).glob("*.dcm"))
    assert len(files) == s["num_files"]
  for uid, s in info.items():
    assert (root / f"{s['split']}_images" / uid).is_dir()
    assert (root / "segmentations" / f"{uid}.nii").exists() == s["has_segmentation"]
    assert s["split"] == "train" or not s["has_segmentation"]
  assert any(s["has_segmentation"] for s in info.values())
  with open(root / "train_bounding_boxes.csv") as f:
    boxes = list(csv.DictReader(f))
  assert list(boxes[0]) == list(writers.BOX_COLUMNS)
  for b in boxes:
    s = info[b["StudyInstanceUID"]]
    n = int(b["slice_number"])
    # Boxes only on slices of fractured vertebrae, naming files that exist, inside the image.
    assert any(n in s["fracture_slices"][v] for v in s["fractured"])
    assert (root / "train_images" / b["StudyInstanceUID"] / f"{n}.dcm").exists()
    x, y, w, h = (float(b[k]) for k in ("x", "y", "width", "height"))
    assert w > 0 and h > 0 and x >= 0 and y >= 0
    assert x + w <= s["shape"][2] and y + h <= s["shape"][1]
  # Every fractured train vertebra crosses at least one slice with a box.
  for uid, s in info.items():
    if s["split"] == "train":
      got = {b["slice_number"] for b in boxes if b["StudyInstanceUID"] == uid}
      for v in s["fractured"]:
        assert s["fracture_slices"][v] and {str(n) for n in s["fracture_slices"][v]} <= got


def test_ground_truth_agrees_with_label_volume_and_masks(data):
  root, gt = data
  for uid, s in gt["studies"].items():
    spec, ph = _regenerate(s, uid)
    n = s["num_slices"]
    assert s["shape"] == [n, *ph.labels.shape[1:]] and s["num_files"] == ph.labels.shape[0]
    numbers = writers.file_numbers(s["num_files"], s["first_number"], s["reversed"])
    for i, name in enumerate(VERTEBRAE):
      zs, ys, xs = np.nonzero(ph.labels == i + 1)
      v = s["vertebrae"][name]
      assert (v["first"], v["last"]) == (zs.min(), zs.max())
      assert (v["first_number"], v["last_number"]) == (numbers[zs.min()], numbers[zs.max()])
      assert v["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    # Thoracic labels (8+) sit below C7.
    assert (ph.labels >= 8).any()
    assert np.nonzero(ph.labels >= 8)[0].max() > s["vertebrae"]["C7"]["last"]
    if s["has_segmentation"]:
      img = nib.load(root / "segmentations" / f"{uid}.nii")
      data_ = np.asarray(img.dataobj)
      assert data_.dtype == np.uint8 and data_.shape == (ph.labels.shape[2], ph.labels.shape[1], n)
      # The Kaggle notebooks' recipe recovers the sorted (slice, row, column) volume.
      np.testing.assert_array_equal(data_[:, ::-1, ::-1].transpose(2, 1, 0), ph.labels[:n])


def test_every_transfer_syntax_and_storage_reads_back(tmp_path):
  cases = [dict(transfer_syntax=t, signed=sg, intercept=ic, bits_stored=b)
           for t, (sg, ic, b) in zip(writers.TRANSFER_SYNTAXES,
                                     [(True, -1024.0, 16), (False, -1024.0, 12), (True, 0.0, 16),
                                      (False, -1024.0, 16), (True, -1024.0, 16)])]
  cases.append(dict(transfer_syntax="j2k", signed=False, intercept=-1024.0, bits_stored=12))
  for k, case in enumerate(cases):
    spec = studies.sample_study(SEED, 100 + k, "tiny", pad_circle=case["signed"], **case)
    ph = studies.make_study(spec)
    entry, _ = studies.write_study(spec, tmp_path, ph)
    folder = tmp_path / "train_images" / spec.uid
    for s, n in enumerate(writers.file_numbers(ph.hu.shape[0], spec.options.first_number,
                                               spec.options.reversed)):
      ds = pydicom.dcmread(folder / f"{n}.dcm")
      assert ds.file_meta.TransferSyntaxUID == writers.TRANSFER_SYNTAXES[case["transfer_syntax"]]
      assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
      assert ds.StudyInstanceUID == spec.uid and ds.SOPInstanceUID.startswith(spec.uid)
      assert ds.BitsAllocated == 16 and ds.PixelRepresentation == int(case["signed"])
      hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
      np.testing.assert_array_equal(hu, ph.hu[s], err_msg=f"{case} slice {n}")
      np.testing.assert_allclose([float(x) for x in ds.ImagePositionPatient],
                                 spec.geometry.positions[s])
    assert entry["transfer_syntax"] == writers.TRANSFER_SYNTAXES[case["transfer_syntax"]]


def test_nifti_affine_follows_the_dicom_geometry():
  g = geometry.axial_geometry((7, 5, 6), (0.8, 0.7), 1.25, (10.0, -20.0), 50.0)
  a = g.nifti_affine()
  # Standard orientation: columns (-dx, 0, 0), (0, +dy, 0), (0, 0, +dz).
  np.testing.assert_allclose(a[:3, :3], np.diag([-0.7, 0.8, 1.25]), atol=1e-9)
  for angle in (0.0, 4.5, -30.0):
    g = geometry.axial_geometry((7, 5, 6), (0.8, 0.7), 1.25, (10.0, -20.0), 50.0, angle)
    a = g.nifti_affine()
    s_, h, _ = g.shape
    rng = np.random.default_rng(0)
    for s, r, c in rng.integers(0, [7, 5, 6], size=(20, 3)):
      lps = (g.positions[s] + c * g.pixel_spacing[1] * g.row_cosines
             + r * g.pixel_spacing[0] * g.col_cosines)
      ijk = np.array([c, h - 1 - r, s_ - 1 - s, 1.0])
      np.testing.assert_allclose(a @ ijk, [-lps[0], -lps[1], lps[2], 1.0], atol=1e-6)
  vol = np.arange(7 * 5 * 6).reshape(7, 5, 6)
  nii = geometry.to_nifti_layout(vol)
  assert nii[1, 0, 0] == vol[6, 4, 1]
  np.testing.assert_array_equal(geometry.from_nifti_layout(nii), vol)


def test_hu_statistics_are_plausible():
  spec = studies.sample_study(SEED, 3, "small", pad_circle=False)
  ph = studies.make_study(spec)
  for label in range(1, 8):
    bone = ph.hu[ph.labels == label]
    assert np.percentile(bone, 95) > 500, label  # cortical shell
    assert 150 < np.median(bone) < 800, label
    assert np.percentile(bone, 20) < 450, label  # cancellous inside
  corners = ph.hu[:, :4, :4]
  assert np.median(corners) < -900  # air
  assert ph.hu.min() >= render.HU_MIN and ph.hu.max() <= render.HU_MAX
  # Inside the body outline (above air) soft tissue dominates: fat and muscle, -150..100 HU.
  body = ph.hu[(ph.labels == 0) & (ph.hu > -500)]
  assert -150 < np.median(body) < 100


def test_prevalence_close_to_rsna():
  rng = np.random.default_rng(0)
  draws = [fractures.sample_fractured(rng) for _ in range(3000)]
  positive = np.mean([bool(d) for d in draws])
  assert abs(positive - fractures.POSITIVE_RATE) < 0.03
  rates = np.zeros(7)
  for d in draws:
    rates[list(d)] += 1
  rates /= len(draws)
  np.testing.assert_allclose(rates, fractures.VERTEBRA_RATES, atol=0.02)
  assert np.argsort(rates)[-2:].tolist() in ([1, 6], [6, 1], [5, 6])  # C2 / C7 (and C6) lead
  counts = np.bincount([len(d) for d in draws if d])
  assert counts[1] + counts[2] > 0.8 * sum(counts)


def test_fractures_are_in_the_voxels_and_local():
  spec = studies.sample_study(SEED, 7, "small", fractured=(1, 6))
  with_f = studies.make_study(spec)
  without = studies.make_study(dataclasses.replace(spec, breaks=()))
  assert not without.fracture.any()
  assert set(np.unique(with_f.fracture)) == {0, 2, 7}
  diff = with_f.hu.astype(np.int32) != without.hu
  # Changes only in and right around the fractured vertebrae; distant ones render identically.
  for label in (4, 5):
    assert not diff[without.labels == label].any(), label
  near = np.zeros_like(diff)
  for label in (2, 7):
    idx = np.argwhere(with_f.labels == label)
    lo, hi = np.maximum(idx.min(0) - 3, 0), idx.max(0) + 4
    near[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
  assert diff.any() and not diff[~near].any()
  for label in (2, 7):
    region = with_f.fracture == label
    assert (with_f.hu[region] < without.hu[region] - 100).mean() > 0.5  # a dark line through bone
  # Local: the fracture line is a small part of the vertebra.
  assert (with_f.fracture == 7).sum() < 0.3 * (with_f.labels == 7).sum()


def test_reversed_and_standard_order(tmp_path):
  for rev in (False, True):
    spec = studies.sample_study(SEED, 20, "tiny", reversed=rev, first_number=8,
                                transfer_syntax="explicit")
    ph = studies.make_study(spec)
    studies.write_study(spec, tmp_path, ph)
    folder = tmp_path / "train_images" / spec.uid
    z = {int(p.stem): float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
         for p in folder.glob("*.dcm")}
    ns = sorted(z)
    assert ns[0] == 8 and ns[-1] == 8 + ph.hu.shape[0] - 1  # 9.dcm, 10.dcm ... do not sort as text
    steps = np.diff([z[n] for n in ns])
    assert (steps > 0).all() if rev else (steps < 0).all()


def test_round_trip_through_readers(tmp_path):
  """read_series + load_mask reproduce the generated HU and labels (normal, reversed, rotated)."""
  for k, over in enumerate([dict(reversed=False), dict(reversed=True, transfer_syntax="jpegls"),
                            dict(reversed=True, transfer_syntax="rle")]):
    spec = studies.sample_study(SEED, 30 + k, "tiny", has_segmentation=True, **over)
    if k == 2:  # a rotated image plane
      g = spec.geometry
      spec = dataclasses.replace(spec, geometry=geometry.axial_geometry(
          g.shape, g.pixel_spacing, g.slice_spacing, tuple(g.positions[g.shape[0] // 2, :2]
                                                           + 30.0), float(g.positions[0, 2]), 5.0))
    ph = studies.make_study(spec)
    studies.write_study(spec, tmp_path, ph)
    series = read_series(tmp_path / "train_images" / spec.uid)
    assert series.reversed == over["reversed"]
    np.testing.assert_array_equal(series.volume, ph.hu.astype(np.float32))
    mask = load_mask(tmp_path / "segmentations" / f"{spec.uid}.nii", series)
    np.testing.assert_array_equal(mask, ph.labels)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's complaints about the damaged files
def test_corrupt_files_are_damaged_recorded_and_skipped(data):
  root, gt = data
  damaged = [(uid, s) for uid, s in gt["studies"].items() if s["corrupt_files"]]
  assert sum(len(s["corrupt_files"]) for _, s in damaged) == 2
  for uid, s in damaged:
    assert s["split"] == "train" and s["num_files"] == s["num_slices"] + len(s["corrupt_files"])
    for name in s["corrupt_files"]:
      with pytest.raises(Exception):
        pydicom.dcmread(root / "train_images" / uid / name).pixel_array  # noqa: B018
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      series = read_series(root / "train_images" / uid)
    assert list(series.shape) == s["shape"]
    assert sorted(n for n, _ in series.skipped) == sorted(s["corrupt_files"])


def test_cli(tmp_path):
  out = tmp_path / "cli"
  proc = subprocess.run(
      [sys.executable, "-m", "data_prep.make_synthetic", "--out", str(out), "--studies", "1",
       "--seed", "3", "--size", "tiny", "--test", "0", "--segmented", "1"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith(f"wrote {out} (1 train studies, size tiny) in ")
  gt = json.loads((out / "ground_truth.json").read_text())
  (uid, s), = gt["studies"].items()
  assert s["has_segmentation"] and (out / "segmentations" / f"{uid}.nii").exists()


def test_bad_arguments_are_refused(tmp_path):
  with pytest.raises(ValueError, match="size"):
    studies.sample_study(SEED, 0, "huge")
  with pytest.raises(ValueError, match="corrupt"):
    studies.generate(tmp_path, 1, SEED, size="tiny", corrupt=5)
  spec = studies.sample_study(SEED, 0, "tiny")
  with pytest.raises(ValueError, match="transfer syntax"):
    writers.write_series(tmp_path / "x", np.zeros(spec.geometry.shape, np.int16), spec.geometry,
                         dataclasses.replace(spec.options, transfer_syntax="jpeg-baseline"))


def test_generate_with_worker_processes_writes_the_same_files(tmp_path):
  def digest(root):
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
  one = studies.generate(tmp_path / "one", 3, 7, size="tiny", num_test=1, corrupt=1)
  two = studies.generate(tmp_path / "two", 3, 7, size="tiny", num_test=1, corrupt=1, workers=2)
  a, b = digest(pathlib.Path(one)), digest(pathlib.Path(two))
  assert len(a) > 10 and a == b
