"""Tests for cspine_jax.labels: per-slice labels, vertebra extents, UID checks and the CSV tables."""
import nibabel as nib
import numpy as np
import pytest

from cspine_jax import labels


def _toy_mask():
  m = np.zeros((6, 10, 12), np.uint8)
  m[1, 2:4, 3:5] = 1   # C1: 4 px in slice 1
  m[2, 2:5, 3:6] = 1   # C1: 9 px in slice 2
  m[2, 6, 7] = 2       # C2: 1 px
  m[3, 5:8, 1:3] = 2   # C2: 6 px
  m[4, 0, 0] = 9       # label > 7: ignored
  m[5, 9, 11] = 7      # C7 in the last pixel
  return m


def test_constants():
  assert labels.VERTEBRAE == ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
  assert labels.TARGETS == ("patient_overall",) + labels.VERTEBRAE


def test_slice_labels_by_hand():
  sl = labels.slice_labels(_toy_mask())
  expected = np.zeros((6, 7), bool)
  expected[[1, 2], 0] = True
  expected[[2, 3], 1] = True
  expected[5, 6] = True
  np.testing.assert_array_equal(sl.presence, expected)
  assert sl.area_ratio.dtype == np.float32 and sl.box.dtype == np.float32
  np.testing.assert_allclose(sl.area_ratio[:, 0], [0, 4 / 9, 1, 0, 0, 0])
  np.testing.assert_allclose(sl.area_ratio[:, 1], [0, 0, 1 / 6, 1, 0, 0])
  np.testing.assert_allclose(sl.area_ratio[5], [0, 0, 0, 0, 0, 0, 1])
  np.testing.assert_array_equal(sl.box, [
      [0, 0, 0, 0],
      [3, 2, 5, 4],
      [3, 2, 8, 7],   # C1 block and the lone C2 pixel at (row 6, col 7)
      [1, 5, 3, 8],
      [0, 0, 0, 0],   # only label 9 there
      [11, 9, 12, 10],
  ])


def test_vertebra_extents_by_hand():
  ext = labels.vertebra_extents(_toy_mask())
  assert len(ext) == 7
  assert ext[0] == labels.VertebraExtent(1, 2, (3, 2, 6, 5))
  assert ext[1] == labels.VertebraExtent(2, 3, (1, 5, 8, 8))
  assert ext[2:6] == [None] * 4
  assert ext[6] == labels.VertebraExtent(5, 5, (11, 9, 12, 10))


def test_other_integer_dtypes_agree():
  m = _toy_mask()
  ref = labels.slice_labels(m)
  for dtype in (np.int16, np.int64, np.uint16):
    out = labels.slice_labels(m.astype(dtype))
    np.testing.assert_array_equal(out.box, ref.box)
    np.testing.assert_array_equal(out.area_ratio, ref.area_ratio)
  assert labels.vertebra_extents(m.astype(np.int32)) == labels.vertebra_extents(m)
  with pytest.raises(ValueError, match="integer labels"):
    labels.slice_labels(m.astype(np.float32))
  with pytest.raises(ValueError, match=r"\(S, H, W\)"):
    labels.slice_labels(m[0])


def test_large_mask():
  """Full-size mask: block-restricted counting agrees with a plain per-slice count.

  Its speed is measured by benchmarks/labels_and_masks.py, not here."""
  m = np.zeros((300, 512, 512), np.uint8)
  for v in range(1, 8):
    m[v * 30:v * 30 + 45, 100 + v * 5:300, 150:350 - v * 3] = v
  m[280, 10, 500] = 12  # A label > 7 far away widens the nonzero block, not the boxes.
  sl = labels.slice_labels(m)
  ext = labels.vertebra_extents(m)
  assert ext[6] == labels.VertebraExtent(210, 254, (150, 135, 329, 300))
  np.testing.assert_array_equal(sl.box[220], [150, 130, 332, 300])  # C6 and C7 overlap there
  assert (sl.box[255:] == 0).all()
  counts = np.stack([np.bincount(s.ravel(), minlength=256)[1:8] for s in m])
  np.testing.assert_array_equal(sl.presence, counts > 0)
  np.testing.assert_allclose(sl.area_ratio, counts / counts.max(0), rtol=1e-6)


def _naive_slice_labels(m):
  """Per slice, one ``==`` per vertebra: the definition, written plainly."""
  counts = np.array([[(sl == v).sum() for v in range(1, 8)] for sl in m]).reshape(len(m), 7)
  peak = counts.max(0, initial=0)
  area = np.divide(counts, peak, out=np.zeros(counts.shape), where=peak > 0)
  box = np.zeros((len(m), 4))
  for i, sl in enumerate(m):
    yy, xx = np.nonzero((sl >= 1) & (sl <= 7))
    if yy.size:
      box[i] = [xx.min(), yy.min(), xx.max() + 1, yy.max() + 1]
  return counts > 0, area.astype(np.float32), box


def _naive_extents(m):
  out = []
  for v in range(1, 8):
    zz, yy, xx = np.nonzero(m == v)
    out.append(None if zz.size == 0 else labels.VertebraExtent(
        int(zz.min()), int(zz.max()), (int(xx.min()), int(yy.min()), int(xx.max()) + 1,
                                       int(yy.max()) + 1)))
  return out


@pytest.mark.parametrize("shape", [(9, 24, 32), (7, 13, 21), (5, 16, 40)])
def test_random_masks_match_the_definition(shape):
  """Random blobs of labels 0..12 (> 7 ignored) against the plain per-slice definition, on masks
  whose rows allow the 8-voxel word reductions and on ones that do not (odd width, a view)."""
  rng = np.random.default_rng(sum(shape))
  for trial in range(6):
    m = np.zeros(shape, np.uint8)
    for _ in range(rng.integers(0, 12)):
      s0, y0, x0 = (int(rng.integers(0, n)) for n in shape)
      ds, dy, dx = (int(rng.integers(1, 6)) for _ in range(3))
      m[s0:s0 + ds, y0:y0 + dy, x0:x0 + dx] = rng.integers(1, 13)
    for mask in (m, m[:, :, ::-1], np.asfortranarray(m)):  # The last two: no word path.
      presence, area, box = _naive_slice_labels(mask)
      sl = labels.slice_labels(mask)
      np.testing.assert_array_equal(sl.presence, presence, err_msg=f"trial {trial}")
      np.testing.assert_array_equal(sl.area_ratio, area)
      np.testing.assert_array_equal(sl.box, box)
      assert labels.vertebra_extents(mask) == _naive_extents(mask)


def test_empty_masks():
  for empty in (np.zeros((3, 4, 5), np.uint8), np.zeros((0, 4, 5), np.uint8),
                np.zeros((2, 8, 16), np.uint8)):
    sl = labels.slice_labels(empty)
    assert sl.presence.shape == (len(empty), 7) and not sl.presence.any()
    assert sl.box.shape == (len(empty), 4) and not sl.box.any()
    assert labels.vertebra_extents(empty) == [None] * 7
  only_thoracic = np.zeros((2, 8, 16), np.uint8)
  only_thoracic[1, 3, 5] = 9  # A nonzero block without any C1-C7 voxel.
  assert not labels.slice_labels(only_thoracic).box.any()
  assert labels.vertebra_extents(only_thoracic) == [None] * 7


def _real_vertebrae(real_data_dir):
  """The real label map as (S, H, W) head to feet, T11..L5 relabelled 1..7 like C1..C7."""
  img = nib.as_closest_canonical(nib.load(real_data_dir / "totalseg_nifti" / "seg.nii.gz"))
  data = np.asarray(img.dataobj).astype(np.uint8)  # RAS: (x, y, z)
  # z from the head down; rows from anterior to posterior, like a DICOM axial slice.
  vol = np.ascontiguousarray(data.transpose(2, 1, 0)[::-1, ::-1])
  out = np.where((vol >= 27) & (vol <= 33), 34 - vol.astype(np.int16), 0).astype(np.uint8)
  out[vol == 26] = 20  # S1 stays as a label > 7, to be ignored
  return out


def test_real_vertebra_shapes(real_data_dir):
  mask = _real_vertebrae(real_data_dir)
  ext = labels.vertebra_extents(mask)
  sl = labels.slice_labels(mask)
  assert all(e is not None for e in ext)
  firsts = [e.first for e in ext]
  lasts = [e.last for e in ext]
  assert firsts == sorted(firsts) and lasts == sorted(lasts)  # T11 on top ... L5 at the bottom
  for v, e in enumerate(ext):
    assert e.first <= e.last
    # A vertebra occupies one unbroken run of slices.
    assert sl.presence[e.first:e.last + 1, v].all()
    assert not sl.presence[:e.first, v].any() and not sl.presence[e.last + 1:, v].any()
    zz, yy, xx = np.nonzero(mask == v + 1)
    assert (zz.min(), zz.max()) == (e.first, e.last)
    assert e.box == (xx.min(), yy.min(), xx.max() + 1, yy.max() + 1)
    assert sl.area_ratio[:, v].max() == 1.0
    assert (sl.area_ratio[:, v] > 0).sum() == e.last - e.first + 1
  for s in np.flatnonzero(sl.presence.any(1)):
    yy, xx = np.nonzero((mask[s] >= 1) & (mask[s] <= 7))
    np.testing.assert_array_equal(sl.box[s], [xx.min(), yy.min(), xx.max() + 1, yy.max() + 1])
  empty = ~sl.presence.any(1)
  assert empty.any() and (sl.box[empty] == 0).all()  # S1-only and blank slices have no box


@pytest.mark.parametrize("uid", ["1.2.826.0.1.3680043.10001", "7", "1" * 64])
def test_check_uid_accepts(uid):
  assert labels.check_uid(uid) == uid


@pytest.mark.parametrize("uid", ["", "1..2", ".1.2", "1.2.", "../etc", "1/2", "1.2a", " 1.2",
                                 "1" * 65, "1.2\n", None, 12])
def test_check_uid_rejects(uid):
  with pytest.raises(ValueError, match="invalid StudyInstanceUID"):
    labels.check_uid(uid)


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return path


TRAIN_HEADER = "StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7\n"


def test_read_train_csv(tmp_path):
  path = _write(tmp_path, "train.csv",
                TRAIN_HEADER + "1.2.3,1,0,1,0,0,0,0,0\n1.2.4,0,0,0,0,0,0,0,0\n")
  df = labels.read_train_csv(path)
  assert list(df.columns) == ["StudyInstanceUID", *labels.TARGETS]
  assert df["StudyInstanceUID"].tolist() == ["1.2.3", "1.2.4"]
  assert df["C2"].tolist() == [1, 0] and df["C2"].dtype == np.int64


@pytest.mark.parametrize("body,message", [
    ("1.2.3,1,0,2,0,0,0,0,0\n", r"row 0 \(line 2\): C2='2' is not 0 or 1"),
    ("1.2.3,1,0,1,0,0,0,0,\n", r"row 0 \(line 2\): C7='' is not 0 or 1"),
    ("1.2.3,1,0,1,0,0,0,0,0\n1.2.3,0,0,0,0,0,0,0,0\n",
     r"row 1 \(line 3\): duplicate StudyInstanceUID 1.2.3"),
    ("1.2.3,1,0,1,0,0,0,0,0\n../x,0,0,0,0,0,0,0,0\n",
     r"row 1 \(line 3\): invalid StudyInstanceUID '../x'"),
])
def test_read_train_csv_errors(tmp_path, body, message):
  path = _write(tmp_path, "train.csv", TRAIN_HEADER + body)
  with pytest.raises(labels.TableError, match="train.csv: " + message):
    labels.read_train_csv(path)


def test_read_train_csv_missing_column_and_file(tmp_path):
  path = _write(tmp_path, "train.csv", "StudyInstanceUID,patient_overall,C1\n1.2,0,0\n")
  with pytest.raises(labels.TableError, match=r"train.csv: missing columns \['C2'"):
    labels.read_train_csv(path)
  with pytest.raises(labels.TableError, match="nope.csv: cannot read CSV"):
    labels.read_train_csv(tmp_path / "nope.csv")


def test_read_bounding_boxes(tmp_path):
  header = "StudyInstanceUID,x,y,width,height,slice_number\n"
  path = _write(tmp_path, "boxes.csv",
                header + "1.2.3,10.5,20,30.25,40,133\n1.2.3,11,21,30,40,134\n")
  df = labels.read_bounding_boxes(path)
  assert df["slice_number"].tolist() == [133, 134] and df["slice_number"].dtype == np.int64
  assert df["x"].tolist() == [10.5, 11.0] and df["width"].iloc[0] == 30.25
  bad = _write(tmp_path, "bad.csv", header + "1.2.3,10,20,30,40,1.5\n")
  with pytest.raises(labels.TableError, match=r"bad.csv: row 0 \(line 2\): slice_number='1.5'"):
    labels.read_bounding_boxes(bad)
  bad = _write(tmp_path, "bad2.csv", header + "1.2.3,10,20,30,40,1\n1.2.3,x,20,30,40,1\n")
  with pytest.raises(labels.TableError, match=r"bad2.csv: row 1 \(line 3\): x='x' is not a number"):
    labels.read_bounding_boxes(bad)
  bad = _write(tmp_path, "bad3.csv", header + "1.2.3,10,20,0,40,1\n")
  with pytest.raises(labels.TableError, match=r"width=0.0 is not positive"):
    labels.read_bounding_boxes(bad)


def test_box_iou_by_hand_and_row_by_row():
  assert labels.box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
  got = labels.box_iou([[0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 0, 0]],
                       [[0, 0, 2, 2], [2, 2, 3, 3], [0, 0, 0, 0]])
  np.testing.assert_allclose(got, [1.0, 0.0, 0.0])  # equal, disjoint, both empty
