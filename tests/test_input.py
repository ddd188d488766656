"""Input: the grain pipeline (sharding, order, uint8 batches, checkpointable state, bad shards) and
the device-side augmentation (against a PIL rotation) and normalisation."""
import json
import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from cspine_jax.inputs import augment as augment_lib
from cspine_jax.inputs import loader as loader_lib
from cspine_jax.records import schema, shards


def make_record(task: str, i: int, size: int = 16, rng: np.random.Generator | None = None) -> dict:
  """A small valid record of ``task`` whose pixels encode ``i`` (study ``i // 7``)."""
  rng = rng or np.random.default_rng(i)
  uid = f"1.2.826.0.1.{i // 7}"
  fold = (i // 7) % 3
  if task == "stage2":
    return {"images": rng.integers(0, 255, (8, size, size, 3), dtype=np.uint8),
            "label": np.float32(i % 5 == 0), "vertebra": i % 7, "present": True,
            "study_uid": uid, "fold": fold}
  if task == "stage1":
    return {"image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
            "presence": (rng.random(7) < 0.3).astype(np.float32),
            "area": rng.random(7).astype(np.float32),
            "box": np.array([0.2, 0.3, 0.6, 0.7], np.float32), "study_uid": uid, "index": i,
            "number": i + 1, "fold": fold}
  if task == "cnn3d":
    return {"volume": rng.integers(0, 255, (size // 2, size, size, 1), dtype=np.uint8),
            "labels": (rng.random(8) < 0.3).astype(np.float32), "study_uid": uid, "fold": fold}
  if task == "slices2d":
    return {"image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
            "presence": (rng.random(7) < 0.3).astype(np.float32),
            "fracture": (rng.random(7) < 0.1).astype(np.float32), "study_uid": uid, "index": i,
            "fold": fold}
  raise ValueError(task)


def write_task_shards(out: pathlib.Path, task: str, n: int, size: int = 16, num_folds: int = 3,
                      records=None) -> pathlib.Path:
  """Writes ``n`` records of ``task`` as ``out/task`` (one shard per study + manifest); returns out."""
  folder = out / task
  folder.mkdir(parents=True, exist_ok=True)
  recs = records if records is not None else [make_record(task, i, size) for i in range(n)]
  by_study: dict[str, list] = {}
  for r in recs:
    by_study.setdefault(r["study_uid"], []).append(r)
  rows = []
  for uid, group in by_study.items():
    name = f"{uid}.array_record"
    count = shards.write_shard(folder / name, group)
    rows.append({"file": name, "study_uid": uid, "fold": group[0]["fold"] % num_folds,
                 "num_records": count})
  shards.write_json(folder / shards.MANIFEST, {
      "schema_version": schema.SCHEMA_VERSION, "task": task, "num_folds": num_folds,
      "num_records": len(recs), "shards": rows})
  return out


def open_source(out: pathlib.Path, task: str) -> loader_lib.RecordSource:
  return loader_lib.record_index(out, task).source()


def _ids(loader, limit=None):
  out = []
  for b, batch in enumerate(loader):
    if limit is not None and b >= limit:
      break
    out.append(batch["record_id"].tolist())
  return out


def _ids_per_process(src, count=2, **loader_kw):
  """Record ids per batch of each of ``count`` processes' stage-2 loaders."""
  for shard in range(count):
    opts = grain.sharding.ShardOptions(shard, count, drop_remainder=False)
    yield _ids(loader_lib.make_loader(src, "stage2", shard_options=opts, **loader_kw))


@pytest.mark.parametrize("count", [2, 3, 4])
def test_processes_read_the_one_process_batches_once_each(tmp_path, count):
  # 22 records, global batch 2 * count: each global batch is one process's batch of that size,
  # its rows split over the processes in order; no record twice in an epoch, the same remainder
  # left out.
  write_task_shards(tmp_path, "stage2", 22)
  src = open_source(tmp_path, "stage2")
  kw = dict(batch_size=2, train=True, seed=3, num_epochs=2)
  one = _ids(loader_lib.make_loader(src, "stage2", shard_options=grain.sharding.NoSharding(),
                                    **dict(kw, batch_size=2 * count)))
  parts = list(_ids_per_process(src, count, **kw))
  assert [len(p) for p in parts] == [len(one)] * count
  assert len(one) == 2 * (22 // (2 * count))
  for b, batch in enumerate(one):
    assert sum((p[b] for p in parts), []) == batch
  per_epoch = len(one) // 2
  for epoch in range(2):
    seen = sum((sum(p[epoch * per_epoch:(epoch + 1) * per_epoch], []) for p in parts), [])
    assert len(seen) == len(set(seen)) == per_epoch * 2 * count


def test_same_seed_same_order_other_seed_other_order(tmp_path):
  write_task_shards(tmp_path, "stage2", 16)
  src = open_source(tmp_path, "stage2")
  opts = grain.sharding.NoSharding()
  kw = dict(batch_size=4, train=True, num_epochs=2, shard_options=opts)
  a = _ids(loader_lib.make_loader(src, "stage2", seed=1, **kw))
  b = _ids(loader_lib.make_loader(src, "stage2", seed=1, **kw))
  c = _ids(loader_lib.make_loader(src, "stage2", seed=2, **kw))
  assert a == b and a != c
  assert len(a) == 8 and sorted(sum(a[:4], [])) == list(range(16))
  assert sorted(sum(a[4:], [])) == list(range(16)) and sum(a[4:], []) != sum(a[:4], [])


def test_uneven_held_out_split_reads_every_record_once(tmp_path):
  # 21 records, 2 processes x 4: 3 global batches; the last (5 records) is 4 + 1 rows.
  write_task_shards(tmp_path, "stage2", 21)
  src = open_source(tmp_path, "stage2")
  parts = list(_ids_per_process(src, batch_size=4, train=False, seed=0))
  assert [[len(b) for b in p] for p in parts] == [[4, 4, 4], [4, 4, 1]]
  assert sum((p[b] for b in range(3) for p in parts), []) == list(range(21))
  # 5 records over 4 processes x 2: one global batch, the last two processes' parts empty, with
  # the fields' shapes (evaluation pads them; every process runs the same steps)
  write_task_shards(tmp_path / "five", "stage2", 5)
  small = open_source(tmp_path / "five", "stage2")
  for shard, want in enumerate([[0, 1], [2, 3], [4], []]):
    loader = loader_lib.make_loader(small, "stage2", batch_size=2, train=False, seed=0,
                                    shard_options=grain.sharding.ShardOptions(shard, 4))
    (batch,) = list(loader)
    assert batch["record_id"].tolist() == want
    assert batch["images"].shape == (len(want), 8, 16, 16, 3)


def _pil_rotate_flip(images: np.ndarray, angle: float, flip: bool) -> np.ndarray:
  """The reference: PIL's bilinear rotation of each uint8 image (..., H, W, C), then a flip."""
  h, w, c = images.shape[-3:]
  flat = images.reshape((-1, h, w, c))
  out = np.stack([np.asarray(Image.fromarray(im[..., 0] if c == 1 else im)
                             .rotate(angle, resample=Image.BILINEAR)).reshape(h, w, c)
                  for im in flat]).reshape(images.shape)
  return out[..., ::-1, :] if flip else out


def _smooth_image(h: int, w: int) -> np.ndarray:
  yy, xx = np.mgrid[0:h, 0:w]
  g = 127 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
  return np.stack([g, g[::-1], 255 - g], -1).astype(np.uint8)


def test_rotation_matches_pil_and_the_flip_is_exact():
  img = _smooth_image(37, 45)  # odd, non-square: the centre and the axes are not interchangeable
  batch = np.stack([img] * 6)
  angles = np.array([0.0, 0.0, 3.3, -9.7, 10.0, -10.0], np.float32)
  flips = np.array([False, True, False, True, False, True])
  got = np.asarray(augment_lib.rotate_flip(jnp.asarray(batch), jnp.asarray(angles), jnp.asarray(flips)))
  assert got.dtype == np.float32 and got.shape == batch.shape
  np.testing.assert_array_equal(got[0], img)
  np.testing.assert_array_equal(got[1], img[:, ::-1])
  for k in range(2, 6):
    want = _pil_rotate_flip(img, float(angles[k]), bool(flips[k])).astype(np.float32)
    diff = np.abs(got[k] - want)
    # PIL rounds its output to uint8; the float result is within that rounding everywhere.
    assert diff.mean() < 0.6 and diff.max() < 1.0, (angles[k], diff.mean(), diff.max())
    assert np.abs(got[k] - img).mean() > 5  # it did turn


def test_one_turn_per_sample_shared_by_its_images():
  rng = np.random.default_rng(0)
  seq = rng.integers(0, 255, (2, 1, 16, 20, 3), dtype=np.uint8)
  seq = np.concatenate([seq] * 8, axis=1)  # (2, 8, 16, 20, 3): 8 equal images per sample
  angle, flip = jnp.array([7.0, -4.0]), jnp.array([True, False])
  out = np.asarray(augment_lib.rotate_flip(jnp.asarray(seq), angle, flip))
  for b in range(2):
    for k in range(1, 8):
      np.testing.assert_array_equal(out[b, k], out[b, 0])
    want = _pil_rotate_flip(seq[b, 0], float(angle[b]), bool(flip[b]))
    assert np.abs(out[b, 0] - want).max() < 1.0
  # A volume (B, D, H, W, 1) turns in its H, W plane, every slice alike.
  vol = rng.integers(0, 255, (1, 4, 16, 16, 1), dtype=np.uint8)
  out = np.asarray(augment_lib.rotate_flip(jnp.asarray(vol), jnp.array([9.0]), jnp.array([True])))
  for d in range(4):
    assert np.abs(out[0, d] - _pil_rotate_flip(vol[0, d], 9.0, True)).max() < 1.0


def test_draws_per_sample_and_per_key():
  opts = augment_lib.AugmentOptions(max_rotation_deg=10.0, flip_prob=0.5)
  angle, flip = augment_lib.augment_draws(jax.random.key(0), 256, opts)
  angle, flip = np.asarray(angle), np.asarray(flip)
  assert angle.min() >= -10 and angle.max() <= 10 and angle.std() > 4
  assert 0.35 < flip.mean() < 0.65
  again = np.asarray(augment_lib.augment_draws(jax.random.key(0), 256, opts)[0])
  other = np.asarray(augment_lib.augment_draws(jax.random.key(1), 256, opts)[0])
  np.testing.assert_array_equal(angle, again)
  assert not np.allclose(angle, other)
  none = augment_lib.augment_draws(jax.random.key(0), 64, augment_lib.AugmentOptions(0.0, 0.0))
  assert not np.any(np.asarray(none[0])) and not np.any(np.asarray(none[1]))


def _numbered_sequence(batch: int, slices: int = 24, channels: int = 3) -> np.ndarray:
  """(B, S/C, 4, 5, C) uint8 whose slice k (in (T, C) order) holds the value k everywhere."""
  k = np.arange(slices, dtype=np.uint8).reshape(slices // channels, channels)
  return np.broadcast_to(k[None, :, None, None, :], (batch, slices // channels, 4, 5, channels)).copy()


def _slice_values(images: np.ndarray) -> np.ndarray:
  """(B, T, H, W, C) -> (B, T*C): each slice's value (asserting it is constant over the slice)."""
  b, t, h, w, c = images.shape
  flat = np.moveaxis(np.asarray(images), -1, 2).reshape(b, t * c, h * w)
  assert np.all(flat == flat[..., :1])
  return flat[..., 0]


def test_coarse_slices_repeat_like_a_thick_slice_vertebra_in_the_records():
  from cspine_jax.pp import image as image_lib
  counts = np.array([0, 4, 5, 7, 12, 24, 40])
  out = _slice_values(augment_lib.coarsen_slices(jnp.asarray(_numbered_sequence(len(counts))),
                                            jnp.asarray(counts)))
  np.testing.assert_array_equal(out[0], np.arange(24))  # 0: untouched
  np.testing.assert_array_equal(out[5], np.arange(24))  # as many source slices as positions
  np.testing.assert_array_equal(out[6], np.arange(24))  # more: nothing to coarsen
  for row, n in zip(out[1:5], counts[1:5]):
    # The records' sampling of a vertebra that spans n slices (pp.image.evenly_spaced):
    # position i shows source slice want[i]. Here source j is the sample's own slice at j's
    # evenly spaced place, so the first and last stay and the order is kept.
    want = image_lib.evenly_spaced(0, n - 1, 24)
    values = np.unique(row)
    assert len(values) == n and row[0] == 0 and row[-1] == 23
    np.testing.assert_array_equal(np.searchsorted(values, row), want)
  # A volume (C = 1) is coarsened along its depth; 4-D stage-1 images are refused.
  vol = _numbered_sequence(1, 16, 1)
  got = _slice_values(augment_lib.coarsen_slices(jnp.asarray(vol), jnp.array([4])))[0]
  np.testing.assert_array_equal(got, [0, 0, 0] + [5] * 5 + [10] * 5 + [15] * 3)
  with pytest.raises(ValueError, match="sequences or volumes"):
    augment_lib.coarsen_slices(jnp.zeros((2, 8, 8, 3)), jnp.array([4, 4]))


def test_coarse_slice_draws_and_their_place_in_the_train_inputs():
  opts = augment_lib.AugmentOptions(coarse_slices_prob=0.5, coarse_slices=(4, 6))
  counts = np.asarray(augment_lib.coarse_slice_draws(jax.random.key(0), 512, opts))
  assert 0.4 < (counts > 0).mean() < 0.6
  assert set(np.unique(counts)) == {0, 4, 5, 6}
  with pytest.raises(ValueError, match="coarse_slices"):
    augment_lib.coarse_slice_draws(jax.random.key(0), 4, augment_lib.AugmentOptions(coarse_slices=(6, 4)))
  batch = {"images": _numbered_sequence(64)}
  key = jax.random.key(5)
  plain_opts = augment_lib.AugmentOptions(max_rotation_deg=0.0, flip_prob=0.0)
  coarse_opts = augment_lib.AugmentOptions(max_rotation_deg=0.0, flip_prob=0.0, coarse_slices_prob=0.5)
  plain = augment_lib.device_inputs(batch, "images", key=key, augment=plain_opts)["images"]
  coarse = augment_lib.device_inputs(batch, "images", key=key, augment=coarse_opts)["images"]
  np.testing.assert_allclose(np.asarray(plain), augment_lib.normalize(batch["images"]), atol=1e-6)
  # The samples drawn are coarsened before normalisation; the others are untouched.
  drawn = np.asarray(augment_lib.coarse_slice_draws(
      jax.random.fold_in(key, augment_lib.COARSE_SLICES_STREAM), 64, coarse_opts))
  want = augment_lib.normalize(np.asarray(augment_lib.coarsen_slices(jnp.asarray(batch["images"]),
                                                           jnp.asarray(drawn))))
  np.testing.assert_allclose(np.asarray(coarse), want, atol=1e-6)
  assert 0 < (drawn > 0).sum() < 64
  # With the turn and flip on, they are drawn from the step's key as without coarse slices, and
  # applied after the coarsening.
  both = augment_lib.AugmentOptions(coarse_slices_prob=0.5)
  got = augment_lib.device_inputs(batch, "images", key=key, augment=both)["images"]
  angle, flip = augment_lib.augment_draws(key, 64, augment_lib.AugmentOptions())
  want = augment_lib.normalize(np.asarray(augment_lib.rotate_flip(
      augment_lib.coarsen_slices(jnp.asarray(batch["images"]), jnp.asarray(drawn)), angle, flip)))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_box_follows_the_image():
  img = np.zeros((32, 40, 3), np.uint8)
  img[6:14, 5:21] = 255  # box x0=5,y0=6,x1=21,y1=14
  box = np.array([5 / 40, 6 / 32, 21 / 40, 14 / 32], np.float32)
  cases = [(0.0, True), (12.0, False), (-9.0, True), (10.0, True)]
  angles = jnp.array([a for a, _ in cases])
  flips = jnp.array([f for _, f in cases])
  out = np.asarray(augment_lib.rotate_flip(jnp.asarray(np.stack([img] * 4)), angles, flips))
  boxes = np.asarray(augment_lib.rotate_flip_boxes(jnp.asarray(np.stack([box] * 4)), angles, flips,
                                              32, 40))
  for k in range(4):
    ys, xs = np.nonzero(out[k, ..., 0] > 127)
    got = np.array([xs.min() / 40, ys.min() / 32, (xs.max() + 1) / 40, (ys.max() + 1) / 32])
    np.testing.assert_allclose(boxes[k], got, atol=2.5 / 32)
  np.testing.assert_allclose(boxes[0], [1 - 21 / 40, 6 / 32, 1 - 5 / 40, 14 / 32], atol=1e-6)
  # No vertebra shown: the all-zero box stays zero whatever the turn.
  zero = augment_lib.rotate_flip_boxes(jnp.zeros((4, 4)), angles, flips, 32, 40)
  assert not np.any(np.asarray(zero))


def test_device_inputs_augment_only_with_a_key_and_normalise_like_the_host():
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8),
           "box": np.tile(np.array([0.2, 0.3, 0.6, 0.7], np.float32), (4, 1)),
           "presence": np.ones((4, 7), np.float32)}
  host = augment_lib.normalize(batch["image"])
  plain = jax.jit(lambda b: augment_lib.device_inputs(b, "image"))(batch)
  np.testing.assert_allclose(np.asarray(plain["image"]), host, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(plain["box"]), batch["box"])
  opts = augment_lib.AugmentOptions()
  aug = jax.jit(lambda b, k: augment_lib.device_inputs(b, "image", key=k, augment=opts))(
      batch, jax.random.key(3))
  angle, flip = augment_lib.augment_draws(jax.random.key(3), 4, opts)
  want = augment_lib.normalize(np.asarray(augment_lib.rotate_flip(jnp.asarray(batch["image"]), angle, flip)))
  np.testing.assert_allclose(np.asarray(aug["image"]), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(aug["box"]), np.asarray(
      augment_lib.rotate_flip_boxes(jnp.asarray(batch["box"]), angle, flip, 16, 16)), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(aug["presence"]), batch["presence"])
  assert not np.allclose(np.asarray(aug["image"]), host)


def test_uint8_batches_and_the_one_normalisation(tmp_path):
  write_task_shards(tmp_path, "cnn3d", 6)
  src = open_source(tmp_path, "cnn3d")
  loader = loader_lib.make_loader(src, "cnn3d", batch_size=4, train=False, seed=0,
                              shard_options=grain.sharding.NoSharding())
  batches = list(loader)
  assert [b["volume"].shape[0] for b in batches] == [4, 2]  # eval keeps the short last batch
  v = batches[0]["volume"]
  assert v.dtype == np.uint8 and v.shape == (4, 8, 16, 16, 1)
  np.testing.assert_array_equal(v[0], src[0]["volume"])
  assert "study_uid" not in batches[0] and batches[0]["labels"].shape == (4, 8)
  x = augment_lib.normalize(v)
  assert x.dtype == np.float32 and -1.001 <= x.min() < x.max() <= 1.001
  np.testing.assert_allclose(x, (v / 255.0 - 0.5) / 0.5, atol=1e-6)
  rgb = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
  want = (rgb / 255.0 - np.array(augment_lib.IMAGENET_MEAN)) / np.array(augment_lib.IMAGENET_STD)
  np.testing.assert_allclose(augment_lib.normalize(rgb), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.jit(augment_lib.normalize)(rgb)), augment_lib.normalize(rgb),
                             atol=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_state_restore_resumes_the_exact_next_batch(tmp_path, workers):
  write_task_shards(tmp_path, "stage1", 20)
  src = open_source(tmp_path, "stage1")
  make = lambda: loader_lib.make_loader(src, "stage1", batch_size=3, train=True, seed=5,
                                    shard_options=grain.sharding.NoSharding(), workers=workers)
  it = iter(make())
  for _ in range(4):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as the checkpoint keeps it
  expected = [next(it) for _ in range(5)]  # crosses the epoch boundary (6 batches per epoch)
  it2 = iter(make())
  it2.set_state(state)
  for want in expected:
    got = next(it2)
    np.testing.assert_array_equal(got["record_id"], want["record_id"])
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["box"], want["box"])
  other = iter(loader_lib.make_loader(src, "stage1", batch_size=4, train=True, seed=5,
                                  shard_options=grain.sharding.NoSharding(), workers=workers))
  with pytest.raises(ValueError, match="batch_size=3"):  # a position in other batches is refused
    other.set_state(state)
  # ... and one of another worker count (grain's position is per worker)
  other = iter(loader_lib.make_loader(src, "stage1", batch_size=3, train=True, seed=5,
                                      shard_options=grain.sharding.NoSharding(),
                                      workers=0 if workers else 1))
  with pytest.raises(ValueError, match=f"{workers} worker processes"):
    other.set_state(state)
  it.close()
  it2.close()


def test_fold_filter_from_the_manifest(tmp_path):
  write_task_shards(tmp_path, "slices2d", 30)
  index = loader_lib.record_index(tmp_path, "slices2d")
  src = index.source()
  tr, va = index.ids(1, train=True), index.ids(1, train=False)
  assert sorted(np.concatenate([tr, va]).tolist()) == list(range(30))
  sub = src.subset(va)
  assert len(sub) == len(va) > 0 and all(sub[i]["fold"] == 1 for i in range(len(sub)))
  assert all(sub[i]["study_uid"] == index.study_uid[va[i]] for i in range(len(sub)))
  assert all(src.subset(tr)[i]["fold"] != 1 for i in range(len(tr)))
  assert len(index.ids(-1, train=False)) == 0 and len(index.ids(-1, train=True)) == 30
  with pytest.raises(ValueError, match="fold 5"):
    index.ids(5, train=True)


def test_missing_manifest_or_shard(tmp_path):
  write_task_shards(tmp_path, "stage2", 14)
  victim = sorted((tmp_path / "stage2").glob("*.array_record"))[0]
  victim.unlink()
  with pytest.raises(loader_lib.ShardError, match=victim.name):
    loader_lib.record_index(tmp_path, "stage2")
  (tmp_path / "stage2" / "manifest.json").unlink()
  with pytest.raises(ValueError, match="manifest"):
    loader_lib.record_index(tmp_path, "stage2")


def test_truncated_shard_is_named(tmp_path):
  write_task_shards(tmp_path, "stage2", 14)
  bad = sorted((tmp_path / "stage2").glob("*.array_record"))[1]
  data = bad.read_bytes()
  bad.write_bytes(data[: len(data) // 2])
  with pytest.raises(loader_lib.ShardError, match=bad.name):
    open_source(tmp_path, "stage2")


def test_corrupt_record_is_named(tmp_path):
  folder = tmp_path / "stage2"
  folder.mkdir()
  w = ArrayRecordWriter(str(folder / "x.array_record"), "group_size:1")
  for i in range(3):
    w.write(schema.encode(make_record("stage2", i)))
  w.write(schema.encode(make_record("stage2", 3))[:60])  # a record cut inside its header
  w.close()
  src = loader_lib.RecordSource([folder / "x.array_record"])
  assert src[0]["vertebra"] == 0
  with pytest.raises(loader_lib.ShardError, match=r"x\.array_record.*record 3"):
    src[3]


def test_workers_are_deterministic(tmp_path):
  # workers take whole batches in turn; the batches do not depend on the worker count or the run.
  write_task_shards(tmp_path, "stage2", 12)
  src = open_source(tmp_path, "stage2")
  kw = dict(batch_size=3, train=True, seed=0, num_epochs=1,
            shard_options=grain.sharding.NoSharding(), workers=2)
  a = list(loader_lib.make_loader(src, "stage2", **kw))
  b = list(loader_lib.make_loader(src, "stage2", **kw))
  in_process = list(loader_lib.make_loader(src, "stage2", **dict(kw, workers=0)))
  assert len(a) == len(b) == len(in_process) == 4
  assert sorted(np.concatenate([x["record_id"] for x in a]).tolist()) == list(range(12))
  for x, y, z in zip(a, b, in_process):
    assert set(x) == set(y) == set(z)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
      np.testing.assert_array_equal(x[key], z[key])


def test_each_epoch_drops_its_own_partial_batch(tmp_path):
  # 11 records, batches of 4: 2 full batches an epoch, the 3 left over differ between epochs.
  write_task_shards(tmp_path, "stage1", 11)
  src = open_source(tmp_path, "stage1")
  ids = _ids(loader_lib.make_loader(src, "stage1", batch_size=4, train=True, seed=0, num_epochs=3,
                                shard_options=grain.sharding.NoSharding()))
  assert [len(b) for b in ids] == [4] * 6
  epochs = [sum(ids[2 * e:2 * e + 2], []) for e in range(3)]
  assert all(len(set(e)) == 8 and set(e) <= set(range(11)) for e in epochs)
  assert len({tuple(sorted(e)) for e in epochs}) > 1  # each epoch leaves other records out
  batches = loader_lib.EpochBatches(src, 4, shuffle=True, seed=0, drop_remainder=True, num_epochs=3)
  assert len(batches) == 6 and batches.batches_per_epoch == 2
  np.testing.assert_array_equal(batches[5]["record_id"], ids[5])  # a batch is addressable alone
  with pytest.raises(IndexError, match="batch 6"):
    batches.positions(6)


def test_too_few_training_records_for_a_batch_fail_clearly(tmp_path):
  write_task_shards(tmp_path, "stage1", 5)
  src = open_source(tmp_path, "stage1")
  with pytest.raises(ValueError, match="5 training records make no full batch of 8"):
    loader_lib.make_loader(src, "stage1", batch_size=8, train=True, seed=0,
                       shard_options=grain.sharding.NoSharding())
  # evaluation keeps the short batch
  assert _ids(loader_lib.make_loader(src, "stage1", batch_size=8, train=False, seed=0,
                                 shard_options=grain.sharding.NoSharding())) == [list(range(5))]
  with pytest.raises(ValueError, match="5 training records .* no full batch of 8 .2 processes x 4"):
    loader_lib.make_loader(src, "stage1", batch_size=4, train=True, seed=0,
                           shard_options=grain.sharding.ShardOptions(1, 2))


def test_stack_records_batches_arrays_and_drops_strings():
  recs = [{"image": np.full((2, 3), i, np.uint8), "label": np.float32(i), "record_id": i,
           "present": bool(i), "study_uid": f"1.2.{i}", "extra": None} for i in range(3)]
  batch = loader_lib.stack_records(recs)
  assert set(batch) == {"image", "label", "record_id", "present"}
  assert batch["image"].shape == (3, 2, 3) and batch["image"].dtype == np.uint8
  np.testing.assert_array_equal(batch["image"][:, 0, 0], [0, 1, 2])
  assert batch["label"].dtype == np.float32 and batch["present"].dtype == np.bool_
  for key in ("image", "label", "record_id", "present"):  # what np.stack (grain's default) gives
    np.testing.assert_array_equal(batch[key], np.stack([np.asarray(r[key]) for r in recs]))
    assert batch[key].dtype == np.stack([np.asarray(r[key]) for r in recs]).dtype
  recs[2]["image"] = np.zeros((3,), np.uint8)
  with pytest.raises(ValueError, match="field 'image': record 2 has shape"):
    loader_lib.stack_records(recs)


# ---- the seed's albumentations transforms --------------------------------------------------------
SEED_AUGMENT = augment_lib.AugmentOptions(
    max_rotation_deg=0.0, brightness_contrast_prob=0.5, hsv_prob=0.5, ssr_prob=0.5,
    cutout_prob=0.5, fov_mask=True)


def test_brightness_contrast_is_albumentations_by_max():
  img = jnp.asarray(_smooth_image(8, 10)[None])
  out = np.asarray(augment_lib.brightness_contrast(img, jnp.array([1.2]), jnp.array([-0.1])))
  want = np.clip(np.asarray(img, np.float32) * 1.2 - 25.5, 0, 255)
  np.testing.assert_allclose(out, want, atol=1e-4)
  opts = augment_lib.AugmentOptions(brightness_contrast_prob=0.5)
  alpha, beta = (np.asarray(v) for v in augment_lib.brightness_contrast_draws(
      jax.random.key(0), 512, opts))
  on = alpha != 1.0
  assert 0.4 < on.mean() < 0.6 and (beta[~on] == 0).all()  # p 0.5, untouched when off
  assert 0.8 <= alpha.min() and alpha.max() <= 1.2 and np.abs(beta).max() <= 0.2


def test_hsv_shift_on_three_slices_as_the_seed():
  # Zero shifts give the image back; a hue shift of 60 (120 degrees) hands red to green.
  img = jnp.asarray(_smooth_image(9, 11)[None])
  same = np.asarray(augment_lib.shift_hsv(img, jnp.zeros((1, 3))))
  np.testing.assert_allclose(same, np.asarray(img, np.float32), atol=1e-3)
  red = jnp.asarray([[[[200, 10, 10]]]], jnp.uint8)
  np.testing.assert_allclose(np.asarray(augment_lib.shift_hsv(red, jnp.array([[60.0, 0, 0]]))),
                             [[[[10, 200, 10]]]], atol=1e-3)
  # Equal slices (a grey pixel) get saturation 40: the other two slices darken by 40/255 of it,
  # which is what the transform does to a 2.5D image: it mixes the slices.
  grey = jnp.full((1, 1, 1, 3), 150, jnp.uint8)
  out = np.asarray(augment_lib.shift_hsv(grey, jnp.array([[0.0, 40.0, 0.0]])))[0, 0, 0]
  np.testing.assert_allclose(out, [150, 150 * (1 - 40 / 255), 150 * (1 - 40 / 255)], atol=1e-3)
  # One draw per sample, shared by the images of a sequence.
  seq = jnp.asarray(np.repeat(_smooth_image(6, 6)[None, None], 4, axis=1))
  shifted = np.asarray(augment_lib.shift_hsv(seq, jnp.array([[25.0, -30.0, 0.0]])))
  for k in range(1, 4):
    np.testing.assert_array_equal(shifted[0, k], shifted[0, 0])


def test_shift_scale_rotate_moves_scales_and_its_box_follows():
  img = np.zeros((1, 32, 40, 3), np.uint8)
  img[:, 8:16, 10:20] = 200
  box = jnp.asarray([[10 / 40, 8 / 32, 20 / 40, 16 / 32]])
  zero = jnp.zeros(1)
  no = jnp.array([False])
  # A shift of a quarter of the width and an eighth of the height: whole pixels, exact.
  moved = np.asarray(augment_lib.rotate_flip(jnp.asarray(img), zero, no, jnp.ones(1),
                                             jnp.array([[0.25, 0.125]])))
  np.testing.assert_array_equal(moved[0, 12:20, 20:30], 200)
  assert moved[0].sum() == img[0].sum()
  np.testing.assert_allclose(augment_lib.rotate_flip_boxes(box, zero, no, 32, 40, jnp.ones(1),
                                                           jnp.array([[0.25, 0.125]])),
                             [[20 / 40, 12 / 32, 30 / 40, 20 / 32]], atol=1e-6)
  # Scale 2 about the centre (20, 16): the square doubles, pixels (0, 2) of it at (x-20)*2+20.
  big = np.asarray(augment_lib.rotate_flip(jnp.asarray(img), zero, no, jnp.array([2.0]), None))
  assert (big[0, 1:15, 1:19] == 200).all() and not big[0, 17:, :].any()
  np.testing.assert_allclose(augment_lib.rotate_flip_boxes(box, zero, no, 32, 40, jnp.array([2.0])),
                             [[0.0, 0.0, 20 / 40, 16 / 32]], atol=1e-6)
  # Without a scale or a shift it is the rotation alone, to the bit.
  angle = jnp.array([7.5])
  np.testing.assert_array_equal(
      np.asarray(augment_lib.rotate_flip(jnp.asarray(img), angle, no)),
      np.asarray(augment_lib.rotate_flip(jnp.asarray(img), angle, no, jnp.ones(1),
                                         jnp.zeros((1, 2)))))
  turn, scale, shift = (np.asarray(v) for v in augment_lib.ssr_draws(
      jax.random.key(1), 512, augment_lib.AugmentOptions(ssr_prob=0.5)))
  on = scale != 1.0
  assert 0.4 < on.mean() < 0.6 and not turn[~on].any() and not shift[~on].any()
  assert np.abs(turn).max() <= 30 and 0.7 <= scale.min() and scale.max() <= 1.3
  assert np.abs(shift).max() <= 0.2


def test_cutout_holes_and_the_field_of_view():
  opts = augment_lib.AugmentOptions(cutout_prob=1.0, cutout_holes=1, cutout_size=0.25)
  rect = np.asarray(augment_lib.cutout_draws(jax.random.key(2), 64, opts, 32, 40))
  assert rect.shape == (64, 1, 4)
  hh, hw = rect[..., 1] - rect[..., 0], rect[..., 3] - rect[..., 2]
  assert hh.max() == 8 and hw.max() == 10 and (hh <= 8).all() and (hw <= 10).all()  # clipped
  seq = jnp.full((1, 3, 32, 40, 3), 100, jnp.uint8)
  r = jnp.asarray([[[4, 12, 5, 15], [30, 32, 0, 3]]])
  out = np.asarray(augment_lib.cutout(seq, r))
  zero = out == 0
  assert zero.sum() == 3 * 3 * (8 * 10 + 2 * 3)  # two holes in each of the 3 images, 3 channels
  assert zero[0, :, 4:12, 5:15].all() and (out[~zero] == 100).all()
  masked = np.asarray(augment_lib.fov_mask(jnp.full((2, 16, 16, 3), 9.0)))
  from cspine_jax.pp import image as image_lib
  disc = image_lib.fov_mask((16, 16))
  assert (masked[:, disc] == 9).all() and not masked[:, ~disc].any()


def test_the_seeds_augmentation_is_keyed_by_the_step_and_leaves_the_old_draws_alone():
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 255, (16, 24, 24, 3), dtype=np.uint8),
           "box": np.tile(np.array([0.2, 0.3, 0.6, 0.7], np.float32), (16, 1))}
  run = jax.jit(lambda b, k: augment_lib.device_inputs(b, "image", key=k, augment=SEED_AUGMENT))
  a, again, other = run(batch, jax.random.key(3)), run(batch, jax.random.key(3)), run(
      batch, jax.random.key(4))
  np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(again["image"]))
  assert not np.allclose(np.asarray(a["image"]), np.asarray(other["image"]))
  # The circle was applied last: the corners hold the normalised zero.
  zero = augment_lib.normalize(np.zeros((1, 1, 1, 3), np.uint8))[0, 0, 0]
  np.testing.assert_allclose(np.asarray(a["image"])[:, 0, 0], np.tile(zero, (16, 1)), atol=1e-6)
  # The flip draws are those of a run without the seed's transforms (own streams).
  plain = augment_lib.AugmentOptions(max_rotation_deg=0.0)
  flips = [np.asarray(augment_lib.augment_draws(jax.random.key(3), 16, o)[1])
           for o in (plain, SEED_AUGMENT)]
  np.testing.assert_array_equal(*flips)
  # from_config: a config's fields, the rest at their defaults; off when disabled.
  got = augment_lib.from_config({"enabled": True, "hsv_prob": 0.5, "coarse_slices": [4, 12]})
  assert got.hsv_prob == 0.5 and got.ssr_prob == 0.0 and got.coarse_slices == (4, 12)
  assert augment_lib.from_config({"enabled": False}) is None
  with pytest.raises(ValueError, match="hsv_prob"):
    augment_lib.AugmentOptions(hsv_prob=2.0)
