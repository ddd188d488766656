"""Unit tests of the record-set pieces that need no study on disk: folds, shards, the vertebrae
file, and the image helpers (window, resize, 2.5D, crops, depth resampling, fracture targets); the
resampler is compared with PIL on a slice of the real CT fixture."""
import collections
import json

import numpy as np
import pytest
from PIL import Image

from cspine_jax.records import cnn3d
from cspine_jax.records import folds
from cspine_jax.records import shards
from cspine_jax.records import slices2d
from cspine_jax.pp import crops as crops_lib
from cspine_jax.pp import image as image_lib
from cspine_jax.pp import options as options_lib
from cspine_jax.pp import study as study_lib
from cspine_jax.io import dicom
from cspine_jax.io import vertebrae


# ----------------------------------------------------------------------------- folds


def _strata(n=103, seed=1):
  rng = np.random.default_rng(seed)
  return {f"1.2.826.0.1.{i}": int(rng.random() < 0.3) for i in range(n)}


def test_folds_deterministic_balanced_stratified():
  strata = _strata()
  a = folds.assign_folds(strata, 5, seed=0)
  shuffled = dict(reversed(list(strata.items())))
  assert folds.assign_folds(shuffled, 5, seed=0) == a  # Row order does not matter.
  assert folds.assign_folds(strata, 5, seed=1) != a
  assert set(a) == set(strata) and set(a.values()) == set(range(5))
  sizes = folds.fold_counts(a, 5)
  assert max(sizes) - min(sizes) <= 1
  positives = collections.Counter(a[u] for u, s in strata.items() if s)
  assert max(positives.values()) - min(positives.values()) <= 1


def test_folds_fewer_studies_than_folds():
  a = folds.assign_folds({"1.1": 0, "1.2": 1}, 5)
  assert sorted(a.values()) == [0, 1]
  with pytest.raises(ValueError):
    folds.assign_folds({"1.1": 0}, 0)


# ----------------------------------------------------------------------------- shards


def test_shard_roundtrip_and_atomicity(tmp_path):
  recs = [{"image": np.full((4, 5, 3), i, np.uint8), "label": np.float32(i), "study_uid": "1.2",
           "present": bool(i % 2)} for i in range(7)]
  path = tmp_path / "a.array_record"
  assert shards.write_shard(path, recs) == 7
  back = list(shards.read_shard(path))
  assert shards.num_records(path) == 7 and len(back) == 7
  for r, b in zip(recs, back):
    np.testing.assert_array_equal(r["image"], b["image"])
    assert b["label"] == r["label"] and b["study_uid"] == "1.2" and b["present"] == r["present"]

  def failing():
    yield recs[0]
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError, match="boom"):
    shards.write_shard(tmp_path / "b.array_record", failing())
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.array_record"]  # Nothing half-written.
  (tmp_path / "c.array_record.tmp-123").write_bytes(b"partial")
  assert shards.remove_temporaries(tmp_path) == ["c.array_record.tmp-123"]


def test_manifest_missing_or_foreign(tmp_path):
  with pytest.raises(ValueError, match="no manifest"):
    shards.read_manifest(tmp_path)
  shards.write_json(tmp_path / shards.MANIFEST, {"schema_version": 99})
  with pytest.raises(ValueError, match="schema_version 99"):
    shards.read_manifest(tmp_path)


# ----------------------------------------------------------------------------- vertebrae file


def _preds():
  p = vertebrae.VertebraPrediction(True, 3, 9, 40, 34, (0.1, 0.2, 0.5, 0.6), 0.9)
  return {"1.2.3": (p,) + (vertebrae.absent(0.8),) * 6,
          "1.2.4": tuple(vertebrae.VertebraPrediction(True, v, v + 2, v, v + 2, (0, 0, 1, 1), 1.0)
                         for v in range(7))}


def test_vertebrae_file_roundtrip(tmp_path):
  path = tmp_path / "v.csv"
  vertebrae.write_vertebrae(path, _preds())
  back = vertebrae.read_vertebrae(path)
  assert set(back) == {"1.2.3", "1.2.4"}
  assert back["1.2.3"][0] == _preds()["1.2.3"][0]
  assert not back["1.2.3"][1].present and back["1.2.3"][1].confidence == pytest.approx(0.8)
  assert back["1.2.4"] == _preds()["1.2.4"]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("1.2.3,C1", "1.2/../3,C1", 1), "invalid StudyInstanceUID"),
    (lambda t: t.replace("1.2.3,C2", "1.2.3,C9", 1), "vertebra 'C9'"),
    (lambda t: "\n".join(l for l in t.splitlines() if ",C5," not in l or "1.2.4" not in l),
     r"1.2.4 has no row for \['C5'\]"),
    (lambda t: t.replace("0.10000000,0.20000000,0.50000000", "0.60000000,0.20000000,0.50000000", 1),
     "not a normalised box"),
    (lambda t: t + t.splitlines()[1] + "\n", "duplicate row"),
])
def test_vertebrae_file_errors(tmp_path, edit, message):
  path = tmp_path / "v.csv"
  vertebrae.write_vertebrae(path, _preds())
  path.write_text(edit(path.read_text()))
  with pytest.raises(vertebrae.VertebraeFileError, match=message):
    vertebrae.read_vertebrae(path)


def test_resolve_prefers_file_numbers():
  pred = _preds()["1.2.3"][0]  # indices 3..9, numbers 40..34, box (0.1, 0.2, 0.5, 0.6)
  numbers = np.arange(50, 0, -1)  # Reversed numbering: number n at index 50 - n.
  first, last, box = vertebrae.resolve(pred, numbers, (50, 100, 200))
  assert (first, last) == (10, 16)
  assert box == (20, 20, 100, 60)
  # Numbers unknown (e.g. non-numeric names): the sorted indices are used.
  assert vertebrae.resolve(pred, np.full(50, -1), (50, 100, 200))[:2] == (3, 9)
  with pytest.raises(ValueError, match="outside a series of 5"):
    vertebrae.resolve(pred, np.full(5, -1), (5, 100, 200))
  assert vertebrae.resolve(vertebrae.absent(), numbers, (50, 100, 200)) is None


# ----------------------------------------------------------------------------- image helpers


def test_window_bone_default():
  hu = np.array([[-3000, -500, 400, 1300, 3000, 400 + 900 * (2 * 100 / 255 - 1)]], np.float32)
  out = image_lib.window(hu, 400, 1800)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, [[0, 0, 128, 255, 255, 100]])
  big = np.random.default_rng(0).normal(300, 800, (9, 37, 41)).astype(np.float32)
  ref = np.clip(np.floor((big - (-500)) * (255 / 1800) + 0.5), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(image_lib.window(big, 400, 1800), ref)


def test_resize_and_stack_25d():
  vol = np.stack([np.full((40, 60), i * 10, np.uint8) for i in range(5)])
  res = image_lib.resize_slices(vol, (16, 24))
  assert res.shape == (5, 16, 24) and res.dtype == np.uint8
  np.testing.assert_array_equal(res[:, 0, 0], [0, 10, 20, 30, 40])
  img = image_lib.stack_25d(res)
  assert img.shape == (5, 16, 24, 3)
  np.testing.assert_array_equal(img[0, 0, 0], [0, 0, 10])  # Edge repeats the end slice.
  np.testing.assert_array_equal(img[2, 0, 0], [10, 20, 30])
  np.testing.assert_array_equal(img[4, 0, 0], [30, 40, 40])
  np.testing.assert_array_equal(image_lib.stack_25d(res, [1])[0, 3, 3], [0, 10, 20])


@pytest.fixture(scope="module")
def ct_slice(real_data_dir):
  """A real CT slice (512 x 512, an abdomen) in the bone window, as the records see it."""
  series = dicom.read_series(real_data_dir / "totalseg_ct" / "dicom_jpeg_lossless", warn=False)
  return image_lib.window(series.volume[10], 400, 1800)


# Shrinking the whole slice (stage 1's 512 -> 224, a small anisotropic size) and enlarging a
# 64 x 48 crop of it (stage 2's vertebra crops are enlarged to the image size), square or not.
RESIZES = [(None, (224, 224)), (None, (96, 80)), (None, (37, 301)),
           ((200, 264, 220, 268), (224, 224)), ((200, 264, 220, 268), (160, 97)),
           ((200, 264, 220, 268), (500, 13))]


@pytest.mark.parametrize("crop,size", RESIZES)
def test_resize_matches_pil_bilinear_on_a_ct_slice(ct_slice, crop, size):
  """The banded resampler is PIL's Image.resize(..., BILINEAR) (antialiased when shrinking): on
  float32 planes within float32 rounding (1e-4 of a grey level); on uint8 slices within one grey
  level, and on few pixels (PIL's 8-bit path rounds to uint8 between its two passes and uses
  fixed-point weights; ours rounds once)."""
  image = ct_slice if crop is None else ct_slice[crop[0]:crop[1], crop[2]:crop[3]]
  assert image.std() > 10  # structure to resample, not a flat plane
  pil = lambda img, mode=None: np.asarray(Image.fromarray(img, mode).resize(size[::-1],
                                                                             Image.BILINEAR))
  plane = image_lib.resize_plane(image.astype(np.float32), size)
  np.testing.assert_allclose(plane, pil(image.astype(np.float32), "F"), rtol=0, atol=1e-4)
  ours = image_lib.resize_slices(image[None], size)[0]
  diff = np.abs(ours.astype(np.int16) - pil(image))
  assert ours.shape == size and diff.max() <= 1 and diff.mean() < 0.2, (diff.max(), diff.mean())
  # The weights themselves: rows of PIL's filter (each sums to 1).
  w = image_lib.resize_weights(image.shape[0], size[0])
  np.testing.assert_allclose(w.sum(1), 1, atol=1e-6)


def test_evenly_spaced_paper_example():
  # "47 slices -> 24 slices with index 0, 2, 4, ..., 46".
  np.testing.assert_array_equal(image_lib.evenly_spaced(0, 46, 24), np.arange(0, 47, 2))
  idx = image_lib.evenly_spaced(5, 9, 24)  # Fewer slices than samples: repeats, stays in range.
  assert idx.min() == 5 and idx.max() == 9 and np.all(np.diff(idx) >= 0)


def test_crop_box_margin_and_clip():
  assert crops_lib.crop_box((10, 20, 30, 60), 0.1, 100, 100) == (8, 16, 32, 64)
  assert crops_lib.crop_box((0, 0, 100, 50), 0.5, 60, 100) == (0, 0, 100, 60)
  with pytest.raises(study_lib.StudyError):
    crops_lib.crop_box((5, 5, 5, 9), 0.0, 10, 10)


def test_stage2_vertebra_images_crop_before_resize():
  # Each voxel encodes its slice: windowed values tell which slices were taken.
  s, h, w = 30, 64, 80
  vol = np.broadcast_to(np.arange(s, dtype=np.float32)[:, None, None] * 50 - 500, (s, h, w)).copy()
  vol[:, :, :40] = -1000  # Left half dark: the crop (x >= 40) must not see it.
  opts = options_lib.Options(image_size=(8, 8), stage2_slices=6, crop_margin=0.0)
  ext = study_lib.Extent(first=4, last=14, box=(40, 10, 80, 50))
  images = crops_lib.vertebra_images(vol, ext, opts)
  assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8
  idx = image_lib.evenly_spaced(4, 14, 6)
  expected = image_lib.window(vol[idx, 0, 79], 400, 1800).reshape(2, 3)
  np.testing.assert_array_equal(images[:, 0, 0, :], expected)
  assert np.all(images == images[:, :1, :1, :])  # Uniform crop: the dark half was cut away.


def test_resample_depth():
  vol = np.stack([np.full((2, 2), v, np.uint8) for v in (0, 100, 200)])
  out = cnn3d.resample_depth(vol, 5)
  np.testing.assert_array_equal(out[:, 0, 0], [0, 50, 100, 150, 200])
  assert cnn3d.resample_depth(vol, 2)[:, 0, 0].tolist() == [0, 200]


def test_fracture_targets_rule():
  presence = np.zeros((6, 7), bool)
  presence[0:3, 0] = True  # C1 on slices 0..2
  presence[2:6, 1] = True  # C2 on slices 2..5
  presence[4:6, 2] = True  # C3 on slices 4..5
  fractured = np.array([1, 1, 1, 0, 0, 0, 0], bool)
  numbers = np.arange(100, 106)
  plain = slices2d.fracture_targets(presence, fractured, numbers, ())
  np.testing.assert_array_equal(plain, presence & fractured)
  # Boxes on slices 103, 104 (indices 3, 4): C2 narrows to them, C3 to 4, C1 has none -> all its.
  boxed = slices2d.fracture_targets(presence, fractured, numbers, (103, 104))
  np.testing.assert_array_equal(np.flatnonzero(boxed[:, 1]), [3, 4])
  np.testing.assert_array_equal(np.flatnonzero(boxed[:, 2]), [4])
  np.testing.assert_array_equal(np.flatnonzero(boxed[:, 0]), [0, 1, 2])


def test_options_validation():
  with pytest.raises(ValueError, match="multiple of 3"):
    options_lib.Options(stage2_slices=10)
  with pytest.raises(ValueError, match="image_size"):
    options_lib.Options(image_size=(0, 4))
  assert options_lib.Options(image_size=[32, 48]).to_json()["image_size"] == [32, 48]
  opts = options_lib.Options(image_size=(32, 48), crop_margin=0.2, stage2_locate="vertebrae")
  assert options_lib.Options.from_json(json.loads(json.dumps(opts.to_json()))) == opts


def test_pixel_box_survives_the_file(tmp_path):
  rng = np.random.default_rng(0)
  preds, boxes = {}, {}
  for i in range(50):
    x0, y0 = rng.integers(0, 400, 2)
    box = (int(x0), int(y0), int(x0 + rng.integers(1, 112)), int(y0 + rng.integers(1, 112)))
    boxes[f"1.9.{i}"] = box
    norm = (box[0] / 512, box[1] / 512, box[2] / 512, box[3] / 512)
    preds[f"1.9.{i}"] = (vertebrae.VertebraPrediction(True, 0, 1, 0, 1, norm, 1.0),) * 7
  vertebrae.write_vertebrae(tmp_path / "v.csv", preds)
  for uid, p in vertebrae.read_vertebrae(tmp_path / "v.csv").items():
    assert vertebrae.resolve(p[0], np.arange(2), (2, 512, 512))[2] == boxes[uid]


@pytest.mark.parametrize("tsyntax", ["explicit", "rle"])  # Bytes read directly / pydicom decoder.
def test_window_at_read_equals_window_after(tmp_path, tsyntax):
  """load(options=) windows each slice as it is decoded, load(planes=True) also resizes it: the
  same pixels and images as from the HU volume afterwards, with a damaged slice skipped by all."""
  from cspine_jax.synthetic import studies
  spec = studies.sample_study(7, 0, "tiny", has_segmentation=True, transfer_syntax=tsyntax,
                              corrupt=("garbled",))
  studies.write_study(spec, tmp_path)
  image_dir, mask = study_lib.study_paths(tmp_path, spec.uid)
  inp = study_lib.StudyInput(uid=spec.uid, image_dir=image_dir, mask_path=mask, fold=0,
                         labels=(0,) * 8)
  opts = options_lib.Options(image_size=(32, 32))
  hu = study_lib.load(inp, with_mask=True)
  win = study_lib.load(inp, with_mask=True, options=opts)
  assert hu.window is None and hu.series.volume.dtype == np.float32
  assert win.window == (400.0, 1800.0) and win.series.volume.dtype == np.uint8
  assert win.series.skipped and win.series.skipped == hu.series.skipped
  np.testing.assert_array_equal(win.series.volume, image_lib.window(hu.series.volume, 400, 1800))
  np.testing.assert_array_equal(win.mask, hu.mask)
  planes = study_lib.load(inp, with_mask=True, options=opts, planes=True)
  assert planes.planes == (32, 32) and planes.series.volume.shape[1:] == (32, 32)
  assert planes.series.shape == hu.series.shape  # The DICOM grid, which the mask is on.
  np.testing.assert_array_equal(planes.mask, hu.mask)
  np.testing.assert_array_equal(study_lib.slice_images(planes, opts), study_lib.slice_images(hu, opts))
  with pytest.raises(study_lib.StudyError, match="made from HU slices"):
    study_lib.slice_images(win, opts)  # Full-size windowed uint8 would round twice: refused.
  with pytest.raises(study_lib.StudyError, match="the options ask for"):
    study_lib.slice_images(planes, options_lib.Options(image_size=(16, 16)))
  ext = study_lib.Extent(2, 9, (10, 12, 40, 44))
  np.testing.assert_array_equal(
      crops_lib.vertebra_images(win.series.volume, ext, opts, win.window),
      crops_lib.vertebra_images(hu.series.volume, ext, opts))
  with pytest.raises(study_lib.StudyError, match=r"read in window \(400.0, 1800.0\)"):
    study_lib.windowed(win.series.volume, options_lib.Options(window_level=300.0), win.window)
