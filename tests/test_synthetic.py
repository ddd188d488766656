"""Tests of the synthetic RSNA-format generator (tiny studies: a few seconds in all)."""
import csv
import dataclasses
import hashlib
import json
import pathlib
import signal
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest

from cspine_jax.io.dicom import read_series
from cspine_jax.io.nifti import load_mask
from cspine_jax.synthetic import anatomy as anatomy_lib
from cspine_jax.synthetic import fractures, geometry, render, shapes, studies, writers
import procs

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
  assert proc.stdout.startswith(
      f"wrote {out} (1 train studies, size tiny, difficulty realistic) in ")
  gt = json.loads((out / "ground_truth.json").read_text())
  (uid, s), = gt["studies"].items()
  assert s["has_segmentation"] and (out / "segmentations" / f"{uid}.nii").exists()
  assert gt["difficulty"] == s["difficulty"] == "realistic" and s["scene"]["slab_samples"] >= 1


def test_bad_arguments_are_refused(tmp_path):
  with pytest.raises(ValueError, match="size"):
    studies.sample_study(SEED, 0, "huge")
  with pytest.raises(ValueError, match="corrupt"):
    studies.generate(tmp_path, 1, SEED, size="tiny", corrupt=5)
  with pytest.raises(ValueError, match="difficulty"):
    studies.sample_study(SEED, 0, "tiny", difficulty="brutal")
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


_GENERATE_MANY = """
import sys
from cspine_jax.synthetic import studies
studies.generate(sys.argv[1], 400, 3, size="tiny", num_test=0, progress=True, workers=2)
"""


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="reads /proc")
def test_worker_processes_end_with_a_killed_generator(tmp_path):
  proc = subprocess.Popen([sys.executable, "-u", "-c", _GENERATE_MANY, str(tmp_path / "out")],
                          cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().startswith("[1/400]")
    workers = procs.children(proc.pid)
    assert len(workers) >= 2, workers
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert not procs.still_alive(workers), "generator processes outlived their parent"


# --- Difficulty levels ------------------------------------------------------------------------

# content_digest() of the `data` fixture's folder (easy, the default) written by the original
# generator (commit 72f601e): decoded pixels and key tags of every DICOM file, mask arrays and
# affines, the CSVs and ground_truth.json byte for byte. Decoded values rather than DICOM bytes, so
# a newer JPEG-LS / JPEG 2000 encoder does not count as a change of the generator.
EASY_DIGEST = "2580344d96c012a722207f4cc72adc868de726074f2aa2ab247f56053f66ecfc"
HARD_SEED = 0  # its first six tiny "hard" studies: dental metal, two plates, three without metal


def content_digest(root: pathlib.Path) -> str:
  h = hashlib.sha256()
  for p in sorted(root.rglob("*")):
    if not p.is_file():
      continue
    h.update(str(p.relative_to(root)).encode())
    if p.suffix == ".dcm":
      try:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          ds = pydicom.dcmread(p)
          pixels = ds.pixel_array
      except (pydicom.errors.InvalidDicomError, ValueError, AttributeError, EOFError, OSError,
              RuntimeError):  # a damaged file: its bytes
        h.update(p.read_bytes())
        continue
      h.update(pixels.tobytes())
      h.update(repr([str(ds.file_meta.TransferSyntaxUID)] + [str(ds.get(k)) for k in (
          "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
          "InstanceNumber", "RescaleIntercept", "PixelRepresentation", "BitsStored",
          "SOPInstanceUID")]).encode())
    elif p.suffix == ".nii":
      img = nib.load(p)
      h.update(np.asarray(img.dataobj).tobytes())
      h.update(np.round(img.affine, 6).tobytes())
    else:
      h.update(p.read_bytes())
  return h.hexdigest()


def test_easy_reproduces_the_original_generator(data):
  root, gt = data
  assert content_digest(root) == EASY_DIGEST
  assert "difficulty" not in gt  # the original file: no key means easy
  for uid, s in gt["studies"].items():
    assert "scene" not in s and "mimics" not in s
    spec = studies.sample_study(SEED, s["index"], "tiny", split=s["split"], uid=uid)
    assert spec.scene is None and not spec.compressions and not spec.notes
    assert all(b.depth is None and b.gap >= 2.5 for b in spec.breaks)  # the wide, flat clefts


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
  root = tmp_path_factory.mktemp("hard")
  studies.generate(root, 6, HARD_SEED, size="tiny", num_test=0, difficulty="hard")
  return root, json.loads((root / "ground_truth.json").read_text())


def test_realistic_levels_are_deterministic_for_any_worker_count(hard, tmp_path):
  root, gt = hard
  again = studies.generate(tmp_path / "again", 6, HARD_SEED, size="tiny", num_test=0,
                           difficulty="hard", workers=2)
  first = _tree_hashes(root)
  assert len(first) > 100 and first == _tree_hashes(pathlib.Path(again))
  # The same patients, labels and scanner settings as the easy level of the seed.
  for uid, s in gt["studies"].items():
    easy = studies.sample_study(HARD_SEED, s["index"], "tiny")
    assert [studies.anat.CERVICAL[i] for i in easy.fractured] == s["fractured"]
    assert easy.uid == uid and easy.geometry.shape == tuple(s["shape"])
  # Masks for the RSNA share of studies by default (at least one).
  assert gt["segmented_fraction"] == pytest.approx(87 / 2019)
  assert sum(s["has_segmentation"] for s in gt["studies"].values()) == 1


def test_ground_truth_describes_what_was_generated(hard):
  _, gt = hard
  assert gt["difficulty"] == "hard"
  for s in gt["studies"].values():
    assert s["difficulty"] == "hard" and s["pose"] is not None and s["bone_density"] > 0
    assert s["scene"]["slab_mm"] == pytest.approx(s["slice_thickness"], abs=1e-3)
    assert set(s["fractures"]) == set(s["fractured"])
    for fs in s["fractures"].values():
      for f in fs:
        assert f["kind"] in ("cleft", "dens", "compression")
        if f["kind"] == "compression":
          assert 0.1 <= f["height_loss"] <= 0.3 and f["band_mm"] > 0
        else:
          assert 0 < f["width_mm"] <= 2.5 and f["depth"] <= 0.7
    for m in s["mimics"]:
      assert m["kind"] in ("vascular_channel", "schmorl_node", "bone_island",
                           "c1_posterior_arch_cleft") and m["vertebra"] in VERTEBRAE
  # Mimics in intact patients too.
  assert any(s["mimics"] for s in gt["studies"].values() if not s["fractured"])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_metal_and_its_streaks_where_ground_truth_lists_them(hard):
  root, gt = hard
  metal = {}
  for uid, s in gt["studies"].items():
    metal[uid] = [a for a in s["artifacts"] if a["kind"] == "metal"]
    hu = read_series(root / "train_images" / uid).volume
    assert (hu.max() >= 2500) == bool(metal[uid]), uid  # metal saturates; bone stays below
  assert 0 < sum(map(bool, metal.values())) < len(metal)
  assert {a["source"] for m in metal.values() for a in m} == {"dental", "plate"}
  for uid, s in gt["studies"].items():
    if not metal[uid]:
      continue
    spec = studies.sample_study(HARD_SEED, s["index"], "tiny", difficulty="hard", uid=uid)
    with_streaks = studies.make_study(spec).hu.astype(np.int32)
    without = studies.make_study(dataclasses.replace(
        spec, scene=dataclasses.replace(spec.scene, metal=()))).hu
    diff = with_streaks - without
    z = spec.geometry.positions[:, 2]
    reach = np.zeros(len(z), bool)
    for m in spec.scene.metal:
      reach |= np.abs(z - m.center[2]) <= m.half_z + spec.scene.slab_mm / 2
    changed = diff.any(axis=(1, 2))
    assert changed.any() and not changed[~reach].any()  # only slices whose slab meets metal
    # Streaks reach far from the objects: changes 20 mm away from every one of them.
    x0, y0 = spec.geometry.in_plane_xy()
    s0 = int(np.flatnonzero(changed)[0])
    x, y = x0 + spec.geometry.positions[s0, 0], y0 + spec.geometry.positions[s0, 1]
    far = np.ones(x.shape, bool)
    for m in spec.scene.metal:
      far &= np.hypot(x - m.center[0], y - m.center[1]) > 20
    assert np.abs(diff[s0][far & (without[s0] > -500)]).max() > 30


def _around(bone, px: float, spacing: float, width_mm: float, depth_mm: float):
  """A fine axial grid centred on a bone."""
  n, s = round(width_mm / px), round(depth_mm / spacing)
  c = bone.center
  return geometry.axial_geometry((s, n, n), (px, px), spacing, (float(c[0]), float(c[1])),
                                 float(c[2]) + (s - 1) * spacing / 2)


def _plain(spec, name: str, g, slab: float, samples: int, **changes):
  """The study on grid g with no noise, texture, padding or damage, and bone `name` without
  mimics (its interior is its cancellous value)."""
  bone = spec.anatomy.vertebra(name)
  bones = tuple(dataclasses.replace(b, pits=(), densities=()) if b is bone else b
                for b in spec.anatomy.bones)
  fields = {"anatomy": dataclasses.replace(spec.anatomy, bones=bones), "geometry": g,
            "scene": dataclasses.replace(spec.scene, slab_mm=slab, slab_samples=samples),
            "noise_seed": None, "pad_circle": False, "corrupt": (), "breaks": (),
            "compressions": ()}
  return dataclasses.replace(spec, **{**fields, **changes})


@pytest.mark.parametrize("px", [0.25, 1.4])
def test_hairline_cleft_width_in_the_dicom_pixels(tmp_path, px):
  """A 1 mm hairline through trabecular bone: the dip it leaves in the written pixels has the
  area of a 1 mm gap (fine pixels: also its full width at half depth), however coarse the grid."""
  spec = studies.sample_study(SEED, 2, "tiny", difficulty="realistic", fractured=(),
                              transfer_syntax="explicit")
  bone = spec.anatomy.vertebra("C4")
  width = 1.0
  hairline = fractures.Break(4, "body", (0.0, 0.0, 0.0), (1.0, 0.0, 0.0), width,
                             (0.0, 0.0, 0.0), 30.0, depth=1.0, subtype="hairline")
  g = _around(bone, px, 1.0, 40.0, 5.0)
  intact = _plain(spec, "C4", g, 1.0, 3)
  broken = dataclasses.replace(intact, breaks=(hairline,))
  entry, _ = studies.write_study(broken, tmp_path)
  assert entry["fractures"]["C4"][0]["width_mm"] == width
  written = read_series(tmp_path / "train_images" / spec.uid).volume
  s, r, _ = np.rint(g.to_index(bone.center)).astype(int)
  dip = studies.make_study(intact).hu[s, r].astype(np.float64) - written[s, r]
  assert dip.min() >= -1  # nothing brighter
  across = abs(bone.axes[0, 0])  # the row crosses the plane at this cosine
  contrast = bone.cancellous_hu - render.HEMATOMA_HU
  assert dip.sum() * px * across / contrast == pytest.approx(width, rel=0.12)
  if px < 0.5:
    assert (dip > dip.max() / 2).sum() * px * across == pytest.approx(width, abs=2 * px)


def test_compression_height_loss_in_the_mask(tmp_path):
  spec = studies.sample_study(SEED, 5, "tiny", difficulty="realistic", fractured=(),
                              has_segmentation=True, transfer_syntax="explicit")
  bone = spec.anatomy.vertebra("C5")
  a, b, h = bone.landmarks["body"][3:6]
  g = _around(bone, 0.5, 0.5, 44.0, 30.0)
  x0, y0 = g.in_plane_xy()

  def body_heights(comps, name):
    sp = _plain(spec, "C5", g, 0.5, 1, compressions=comps)
    studies.write_study(sp, tmp_path / name)
    series = read_series(tmp_path / name / "train_images" / spec.uid)
    mask = load_mask(tmp_path / name / "segmentations" / f"{spec.uid}.nii", series)
    s, r, c = np.nonzero(mask == 5)
    u, v, w = bone.local(x0[r, c] + g.positions[s, 0], y0[r, c] + g.positions[s, 1],
                         g.positions[s, 2])
    heights = []
    for lo, hi in ((-0.8 * b, -0.4 * b), (0.2 * b, 0.6 * b)):  # anterior, posterior
      col = (np.abs(u) < a / 3) & (v > lo) & (v < hi)
      heights.append(float(w[col].max() - w[col].min()))
    return heights, series.volume, mask

  (front, back), intact_hu, _ = body_heights((), "intact")
  assert front == pytest.approx(h, abs=1.0) and back == pytest.approx(h, abs=1.0)
  crush = fractures.Compression(5, 0.3, "crush", 3.0, 200.0, (a, b, h))
  (front_c, back_c), crushed_hu, mask = body_heights((crush,), "crush")
  assert front_c / front == pytest.approx(0.7, abs=0.06)
  assert back_c / back == pytest.approx(0.7, abs=0.06)
  wedge = fractures.Compression(5, 0.3, "wedge", 3.0, 200.0, (a, b, h))
  (front_w, back_w), _, _ = body_heights((wedge,), "wedge")
  assert front_w < back_w - 1.5 and front_w / front == pytest.approx(0.7, abs=0.08)
  # The mask is the HU's bone: the lost height above the collapsed endplate is disc, not bone.
  lost = (mask == 0) & (intact_hu > 200) & (crushed_hu < 150)
  assert lost.sum() > 50
  # A sclerotic band under the new endplate.
  band = (mask == 5) & (crushed_hu > intact_hu + 100)
  assert band.sum() > 50


def test_slab_averaging_spreads_a_thin_plate_over_the_slices_its_slab_meets():
  spec = studies.sample_study(SEED, 0, "tiny", difficulty="realistic")
  cx, cy = (float(x) for x in spec.anatomy.vertebra("C4").center[:2])
  z0, thick, hu = 1.0, 1.0, 2000.0  # a 1 mm plate between slices at z = 2 and 0
  plate = anatomy_lib.Bone(label=0, name="plate", center=np.array([cx, cy, z0]), axes=np.eye(3),
                           parts={"plate": (shapes.Prim("cyl", (0, 0, 30, 30, -thick / 2,
                                                                thick / 2)),)},
                           cortical_hu=hu, cancellous_hu=hu, cortex_mm=0.5)
  g = geometry.axial_geometry((11, 16, 16), (0.5, 0.5), 2.0, (cx, cy), 10.0)
  empty = dataclasses.replace(spec.anatomy, bones=())
  with_plate = dataclasses.replace(spec.anatomy, bones=(plate,))

  def draw(anatomy, slab, samples):
    scene = dataclasses.replace(spec.scene, slab_mm=slab, slab_samples=samples)
    return render.render(anatomy, g, scene=scene).hu.astype(np.float64)

  background = draw(empty, 2.0, 1)
  assert np.array_equal(draw(with_plate, 2.0, 1), background)  # point samples miss it
  seen = (draw(with_plate, 6.0, 13) - background)[:, 8, 8] / (hu - background[:, 8, 8])
  z = g.positions[:, 2]
  meets = np.abs(z - z0) < 3.0 + thick / 2
  assert np.array_equal(seen > 0.01, meets)  # 4 slabs of 6 mm meet it
  assert seen.sum() * 2.0 == pytest.approx(thick, rel=0.1)  # its thickness, spread out
  assert seen.max() == pytest.approx(thick / 6.0, abs=0.05)


def test_realistic_noise_is_correlated_in_bone():
  def neighbour_correlation(noisy, clean, labels):
    n = noisy.astype(np.float64) - clean
    bone = (labels >= 1) & (labels <= 7)
    pair = bone[:, :, :-1] & bone[:, :, 1:]
    return np.corrcoef(n[:, :, :-1][pair], n[:, :, 1:][pair])[0, 1]

  spec = studies.sample_study(SEED, 1, "tiny", difficulty="realistic", pad_circle=False)
  quiet = dataclasses.replace(spec, scene=dataclasses.replace(
      spec.scene, texture_hu=0.0, marrow_hu=0.0, streak_hu=0.0, metal=()))
  clean = studies.make_study(dataclasses.replace(quiet, noise_seed=None))
  noisy = studies.make_study(quiet)
  expected = np.exp(-1.0 / (4 * spec.scene.noise_corr_px ** 2))  # Gaussian kernel, 1 pixel apart
  corr = neighbour_correlation(noisy.hu, clean.hu, clean.labels)
  assert corr > 0.3 and corr == pytest.approx(expected, abs=0.1)
  easy = studies.sample_study(SEED, 1, "tiny", pad_circle=False)
  white = render.render(easy.anatomy, easy.geometry, easy.breaks)
  assert abs(neighbour_correlation(studies.make_study(easy).hu, white.hu, white.labels)) < 0.1


def test_texture_makes_cancellous_bone_uneven():
  spec = studies.sample_study(SEED, 1, "tiny", difficulty="realistic", pad_circle=False)
  no_noise = dataclasses.replace(spec.scene, noise_hu=0.0, streak_hu=0.0, metal=())
  textured = studies.make_study(dataclasses.replace(spec, scene=no_noise))
  flat = studies.make_study(dataclasses.replace(spec, scene=no_noise, noise_seed=None))
  body = flat.labels == 4
  assert np.std((textured.hu.astype(np.float64) - flat.hu)[body]) > 5


def _first(difficulty: str, test, size: str = "tiny") -> tuple[int, studies.StudySpec]:
  """The first study of SEED (index, spec) that passes test."""
  for i in range(200):
    spec = studies.sample_study(SEED, i, size, difficulty=difficulty)
    if test(spec):
      return i, spec
  raise AssertionError("no such study in 200")


def _find(difficulty: str, test, size: str = "tiny") -> studies.StudySpec:
  return _first(difficulty, test, size)[1]


def test_mimics_and_head_rotation_show_in_the_pixels_and_masks():
  spec = _find("hard", lambda s: any(m["kind"] == "c1_posterior_arch_cleft"
                                     for m in s.notes["mimics"])
               and abs(s.notes["pose"]["head_rotation_deg"]) > 8, "small")
  c1 = spec.anatomy.vertebra("C1")
  _, cv, _, _, rb, _ = c1.landmarks["ring"]
  arch = c1.center + np.array([0.0, cv + rb, 0.0]) @ c1.axes  # the posterior arch's middle
  g = _around(dataclasses.replace(c1, center=arch), 0.5, 1.0, 100.0, 1.0)
  x0, y0 = g.in_plane_xy()
  u, v, w = c1.local(x0 + g.positions[0, 0], y0 + g.positions[0, 1],
                     np.full(x0.shape, g.positions[0, 2], np.float32))
  gap = next(pit for pit, _ in c1.pits if pit.kind == "cyl")  # the cleft: (u, v, half width..)
  midline = ((np.abs(u - gap.params[0]) < gap.params[2] - 0.3) & (np.abs(v - cv - rb) < 1.0)
             & (np.abs(w) < 2.0))
  cleft = studies.make_study(dataclasses.replace(spec, geometry=g, noise_seed=None))
  whole = dataclasses.replace(spec.anatomy, bones=tuple(
      dataclasses.replace(b, pits=()) if b is c1 else b for b in spec.anatomy.bones))
  intact = studies.make_study(dataclasses.replace(spec, anatomy=whole, geometry=g,
                                                  noise_seed=None))
  assert (intact.labels[0][midline] == 1).all() and not (cleft.labels[0][midline] == 1).any()
  assert cleft.hu[0][midline].max() < 300  # a gap, with a cortical rim beside it
  # Head rotation: C1's lateral axis (its longest) turns by the ground truth's angle against T1's.
  whole = studies.make_study(dataclasses.replace(spec, noise_seed=None))
  g = spec.geometry
  x0, y0 = g.in_plane_xy()

  def lateral_angle(label):
    s, r, c = np.nonzero(whole.labels == label)
    xyz = np.stack([x0[r, c] + g.positions[s, 0], y0[r, c] + g.positions[s, 1], g.positions[s, 2]])
    xyz -= xyz.mean(axis=1, keepdims=True)
    major = np.linalg.eigh(xyz @ xyz.T)[1][:, -1]
    return np.degrees(np.arctan2(major[1], major[0]))

  turn = (lateral_angle(1) - lateral_angle(8) + 90) % 180 - 90
  assert turn == pytest.approx(spec.notes["pose"]["head_rotation_deg"], abs=2.5)


def test_vascular_channels_are_dark_lines_in_intact_bodies():
  spec = _find("realistic", lambda s: not s.fractured and any(
      m["kind"] == "vascular_channel" for m in s.notes["mimics"]))
  name = next(m["vertebra"] for m in spec.notes["mimics"] if m["kind"] == "vascular_channel")
  bone = spec.anatomy.vertebra(name)
  g = _around(bone, 0.3, 0.5, 40.0, 10.0)
  sp = dataclasses.replace(spec, geometry=g, noise_seed=None, scene=dataclasses.replace(
      spec.scene, slab_mm=0.5, slab_samples=1))
  ph = studies.make_study(sp)
  plain = dataclasses.replace(spec.anatomy, bones=tuple(
      dataclasses.replace(b, pits=()) if b is bone else b for b in spec.anatomy.bones))
  without = studies.make_study(dataclasses.replace(sp, anatomy=plain))
  label = anatomy_lib.CERVICAL.index(name) + 1
  darker = (without.labels == label) & (ph.hu < without.hu - 100)
  assert darker.sum() > 10 and not ph.fracture.any()


def _neck(spec: studies.StudySpec, mm: float = 1.0, width_mm: float = 80.0) -> geometry.Geometry:
  """A grid of mm voxels from above C1 to below C7, centred on C4."""
  top = float(spec.anatomy.vertebra("C1").center[2]) + 15
  bottom = float(spec.anatomy.vertebra("C7").center[2]) - 15
  n = round(width_mm / mm)
  c = spec.anatomy.vertebra("C4").center
  return geometry.axial_geometry((round((top - bottom) / mm), n, n), (mm, mm), mm,
                                 (float(c[0]), float(c[1])), top)


def _mask_centroids(spec: studies.StudySpec, g: geometry.Geometry, tmp_path: pathlib.Path):
  """Written mask on grid g (no noise) -> {label: LPS centroid} for C1-C7, and the mask."""
  sp = dataclasses.replace(spec, geometry=g, noise_seed=None, pad_circle=False, corrupt=(),
                           has_segmentation=True, options=dataclasses.replace(
                               spec.options, transfer_syntax="explicit"),
                           scene=spec.scene and dataclasses.replace(
                               spec.scene, slab_mm=g.slice_spacing, slab_samples=1))
  studies.write_study(sp, tmp_path)
  series = read_series(tmp_path / "train_images" / spec.uid)
  mask = load_mask(tmp_path / "segmentations" / f"{spec.uid}.nii", series)
  x0, y0 = g.in_plane_xy()
  out = {}
  for k in range(1, 8):
    s, r, c = np.nonzero(mask == k)
    out[k] = np.array([np.mean(x0[r, c] + g.positions[s, 0]),
                       np.mean(y0[r, c] + g.positions[s, 1]), np.mean(g.positions[s, 2])])
  return out, mask


def test_scoliosis_and_coronal_tilt_move_the_vertebrae_sideways(tmp_path):
  """Against the easy level's patient of the same seed (same anatomy, no pose): each vertebra's
  mask moves sideways by the curve and the tilt ground_truth.json's pose gives."""
  index, spec = _first("realistic", lambda s: abs(s.notes["pose"]["scoliosis_mm"]) > 4
                       and abs(s.notes["pose"]["head_rotation_deg"]) < 3
                       and not s.notes["degeneration"])
  easy = studies.sample_study(SEED, index, "tiny")
  g = _neck(spec)
  moved, _ = _mask_centroids(spec, g, tmp_path / "real")
  still, _ = _mask_centroids(easy, g, tmp_path / "easy")
  pose = spec.notes["pose"]
  z1 = spec.anatomy.vertebra("C1").center[2]
  z_end = spec.anatomy.vertebra("T4").center[2]
  shifts = []
  for k in range(1, 8):
    z = moved[k][2]
    t = np.clip((z1 - z) / (z1 - z_end), 0.0, 1.0)
    expected = (pose["scoliosis_mm"] * np.sin(np.pi * t)
                + (z - z1) * np.tan(np.deg2rad(pose["coronal_tilt_deg"])))
    shifts.append(moved[k][0] - still[k][0])
    assert shifts[-1] == pytest.approx(expected, abs=0.6), k
    assert moved[k][1] == pytest.approx(still[k][1], abs=1.0)  # not forwards or backwards
  assert max(map(abs, shifts)) > 3.0


def test_degeneration_narrows_the_disc_and_grows_osteophytes(tmp_path, monkeypatch):
  """A patient with one degenerated disc against the same patient drawn with that disc at full
  height (every other draw the same): the two vertebrae's masks come closer by the narrowing, the
  other levels keep their distance; the osteophytes are bone in the mask beside the disc."""
  index, spec = _first("realistic", lambda s: len(s.notes["degeneration"]) == 1
                       and s.notes["degeneration"][0]["disc_height_factor"] < 0.5
                       and s.notes["degeneration"][0]["osteophytes"] > 0)
  note = spec.notes["degeneration"][0]
  upper, lower = (anatomy_lib.CERVICAL.index(n) + 1 for n in note["level"].split("-"))
  draw = studies.realism.sample_disc_scale
  monkeypatch.setattr(studies.realism, "sample_disc_scale",
                      lambda rng, level: {k: 1.0 for k in draw(rng, level)})
  full = studies.sample_study(SEED, index, "tiny", difficulty="realistic")
  monkeypatch.undo()
  g = _neck(spec)
  narrow, mask = _mask_centroids(spec, g, tmp_path / "narrow")
  wide, _ = _mask_centroids(full, g, tmp_path / "wide")
  for k in range(1, 7):
    closer = np.linalg.norm(wide[k + 1] - wide[k]) - np.linalg.norm(narrow[k + 1] - narrow[k])
    if k == upper:
      assert lower == k + 1 and closer > 1.5  # (1 - factor) of a 4-6 mm disc
    else:
      assert abs(closer) < 0.4, k
  # Osteophytes: the same patient without them has less bone at the two vertebrae.
  bones = tuple(dataclasses.replace(b, parts={n: p for n, p in b.parts.items()
                                              if n != "osteophyte"})
                for b in spec.anatomy.bones)
  _, smooth = _mask_centroids(dataclasses.replace(spec, anatomy=dataclasses.replace(
      spec.anatomy, bones=bones)), g, tmp_path / "smooth")
  gained = (mask > 0) & (smooth == 0)
  assert gained.sum() > 10 and not ((mask == 0) & (smooth > 0)).any()
  assert set(np.unique(mask[gained])) <= {upper, lower}


def test_type_ii_dens_fracture_is_near_axial_and_on_few_slices():
  spec = _find("realistic", lambda s: any(b.subtype == "type II" for b in s.breaks))
  dens = next(b for b in spec.breaks if b.subtype == "type II")
  assert dens.describe()["plane_to_axial_deg"] <= 20 and dens.gap <= 3.5
  c2 = spec.anatomy.vertebra("C2")
  g = geometry.axial_geometry((60, 60, 60), (0.5, 0.5), 0.5,
                              (float(c2.center[0]), float(c2.center[1])), float(c2.center[2]) + 25)
  ph = studies.make_study(dataclasses.replace(
      spec, geometry=g, breaks=(dens,), noise_seed=None, pad_circle=False,
      scene=dataclasses.replace(spec.scene, slab_mm=0.5, slab_samples=1)))
  broken = np.flatnonzero(ph.fracture.any(axis=(1, 2)))
  bone = np.flatnonzero((ph.labels == 2).any(axis=(1, 2)))
  assert 0 < len(broken) and np.ptp(broken) + 1 <= 0.3 * (np.ptp(bone) + 1)  # a thin axial band
  # On the study's own grid: one or two of C2's slices.
  own = studies.make_study(dataclasses.replace(spec, breaks=(dens,), noise_seed=None))
  assert 1 <= own.fracture.any(axis=(1, 2)).sum() <= 2 < (own.labels == 2).any(axis=(1, 2)).sum()


def test_shoulder_streaks_are_lateral_and_below_the_shoulders():
  spec = _find("realistic", lambda s: s.scene.streak_hu > 60 and not s.scene.metal)
  quiet = dataclasses.replace(spec, pad_circle=False)
  streaked = studies.make_study(quiet).hu.astype(np.float64)
  plain = studies.make_study(dataclasses.replace(
      quiet, scene=dataclasses.replace(spec.scene, streak_hu=0.0))).hu
  diff = streaked - plain  # the same noise: only the streaks differ
  z = spec.geometry.positions[:, 2]
  top, _ = spec.scene.shoulder_z
  assert not diff[z >= top].any()
  low = int(np.argmin(z))
  assert np.abs(diff[low]).max() > 20
  d = diff[low]  # near-lateral lines: neighbours along a row agree more than along a column
  rows = np.corrcoef(d[:, :-1].ravel(), d[:, 1:].ravel())[0, 1]
  cols = np.corrcoef(d[:-1].ravel(), d[1:].ravel())[0, 1]
  assert rows > 0.8 and rows > cols + 0.2

