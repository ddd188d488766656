"""grain input pipeline: sharding, order, shared augmentation, checkpointable state, bad shards."""
import pathlib

import grain
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from cspine_jax import input as cinput
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


def open_source(out: pathlib.Path, task: str) -> cinput.RecordSource:
  return cinput.record_index(out, task).source()


def _ids(loader, limit=None):
  out = []
  for b, batch in enumerate(loader):
    if limit is not None and b >= limit:
      break
    out.append(batch["record_id"].tolist())
  return out


def test_each_record_once_per_epoch_across_two_processes(tmp_path):
  write_task_shards(tmp_path, "stage2", 22)
  src = open_source(tmp_path, "stage2")
  seen = []
  for shard in range(2):
    opts = grain.sharding.ShardOptions(shard, 2, drop_remainder=False)
    loader = cinput.make_loader(src, "stage2", batch_size=1, train=True, seed=3, num_epochs=1,
                                shard_options=opts)
    ids = [i for b in _ids(loader) for i in b]
    assert len(ids) == cinput.local_num_records(22, opts)
    seen += ids
  assert sorted(seen) == list(range(22))


def test_same_seed_same_order_other_seed_other_order(tmp_path):
  write_task_shards(tmp_path, "stage2", 16)
  src = open_source(tmp_path, "stage2")
  opts = grain.sharding.NoSharding()
  kw = dict(batch_size=4, train=True, num_epochs=2, shard_options=opts)
  a = _ids(cinput.make_loader(src, "stage2", seed=1, **kw))
  b = _ids(cinput.make_loader(src, "stage2", seed=1, **kw))
  c = _ids(cinput.make_loader(src, "stage2", seed=2, **kw))
  assert a == b and a != c
  assert len(a) == 8 and sorted(sum(a[:4], [])) == list(range(16))


def test_augmentation_is_shared_across_a_sequence(tmp_path):
  # Eight identical images in a sequence must stay identical after augmentation.
  img = np.zeros((16, 16, 3), np.uint8)
  img[3:7, 2:12] = 200
  rec = make_record("stage2", 0)
  rec["images"] = np.stack([img] * 8)
  aug = cinput.Augment("stage2", cinput.AugmentOptions(max_rotation_deg=15, flip_prob=0.5))
  changed = 0
  for seed in range(6):
    out = aug.random_map(rec, np.random.default_rng(seed))["images"]
    assert out.shape == (8, 16, 16, 3)
    for k in range(1, 8):
      np.testing.assert_array_equal(out[k], out[0])
    changed += int(not np.array_equal(out[0], img))
  assert changed >= 5


def test_box_follows_the_image():
  img = np.zeros((32, 40, 3), np.uint8)
  img[6:14, 5:21] = 255  # box x0=5,y0=6,x1=21,y1=14
  box = np.array([5 / 40, 6 / 32, 21 / 40, 14 / 32], np.float32)
  for angle, flip in [(0.0, True), (12.0, False), (-9.0, True)]:
    out = cinput.augment_images(img, angle, flip)
    ys, xs = np.nonzero(out[..., 0] > 127)
    nb = cinput.augment_box(box, angle, flip, 32, 40)
    got = np.array([xs.min() / 40, ys.min() / 32, (xs.max() + 1) / 40, (ys.max() + 1) / 32])
    np.testing.assert_allclose(nb, got, atol=2.5 / 32)


def test_normalised_float_batches(tmp_path):
  write_task_shards(tmp_path, "cnn3d", 6)
  src = open_source(tmp_path, "cnn3d")
  loader = cinput.make_loader(src, "cnn3d", batch_size=4, train=False, seed=0,
                              shard_options=grain.sharding.NoSharding())
  batches = list(loader)
  assert [b["volume"].shape[0] for b in batches] == [4, 2]  # eval keeps the short last batch
  v = batches[0]["volume"]
  assert v.dtype == np.float32 and v.shape == (4, 8, 16, 16, 1) and -1.001 <= v.min() < v.max() <= 1.001
  assert "study_uid" not in batches[0] and batches[0]["labels"].shape == (4, 8)


def test_state_restore_resumes_the_exact_next_batch(tmp_path):
  write_task_shards(tmp_path, "stage1", 20)
  src = open_source(tmp_path, "stage1")
  make = lambda: cinput.make_loader(src, "stage1", batch_size=3, train=True, seed=5,
                                    augment=cinput.AugmentOptions(),
                                    shard_options=grain.sharding.NoSharding())
  it = iter(make())
  for _ in range(4):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]  # crosses the epoch boundary (6 batches per epoch)
  it2 = iter(make())
  it2.set_state(state)
  for want in expected:
    got = next(it2)
    np.testing.assert_array_equal(got["record_id"], want["record_id"])
    np.testing.assert_array_equal(got["image"], want["image"])  # same augmentation draws
    np.testing.assert_array_equal(got["box"], want["box"])


def test_fold_filter_from_the_manifest(tmp_path):
  write_task_shards(tmp_path, "slices2d", 30)
  index = cinput.record_index(tmp_path, "slices2d")
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
  with pytest.raises(cinput.ShardError, match=victim.name):
    cinput.record_index(tmp_path, "stage2")
  (tmp_path / "stage2" / "manifest.json").unlink()
  with pytest.raises(ValueError, match="manifest"):
    cinput.record_index(tmp_path, "stage2")


def test_truncated_shard_is_named(tmp_path):
  write_task_shards(tmp_path, "stage2", 14)
  bad = sorted((tmp_path / "stage2").glob("*.array_record"))[1]
  data = bad.read_bytes()
  bad.write_bytes(data[: len(data) // 2])
  with pytest.raises(cinput.ShardError, match=bad.name):
    open_source(tmp_path, "stage2")


def test_corrupt_record_is_named(tmp_path):
  folder = tmp_path / "stage2"
  folder.mkdir()
  w = ArrayRecordWriter(str(folder / "x.array_record"), "group_size:1")
  for i in range(3):
    w.write(schema.encode(make_record("stage2", i)))
  w.write(schema.encode(make_record("stage2", 3))[:60])  # a record cut inside its header
  w.close()
  src = cinput.RecordSource([folder / "x.array_record"])
  assert src[0]["vertebra"] == 0
  with pytest.raises(cinput.ShardError, match=r"x\.array_record.*record 3"):
    src[3]


def test_workers_are_deterministic(tmp_path):
  # grain batches inside each worker, so batches depend on the worker count, not on the run.
  write_task_shards(tmp_path, "stage2", 12)
  src = open_source(tmp_path, "stage2")
  kw = dict(batch_size=3, train=True, seed=0, num_epochs=1, augment=cinput.AugmentOptions(),
            shard_options=grain.sharding.NoSharding(), workers=2)
  a = list(cinput.make_loader(src, "stage2", **kw))
  b = list(cinput.make_loader(src, "stage2", **kw))
  assert len(a) == len(b) == 4
  assert sorted(np.concatenate([x["record_id"] for x in a]).tolist()) == list(range(12))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["images"], y["images"])
