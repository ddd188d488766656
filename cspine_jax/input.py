"""grain input pipelines over the ArrayRecord record sets (``OUT/TASK/*.array_record``).

One pipeline for every task: read a record by index from the task's shards, decode it with
``records.schema.decode``, augment it at train time (one random rotation + horizontal flip per record,
shared by every image of a stage-2 sequence or 3D volume), normalise uint8 -> float32, batch.
The :class:`grain.DataLoader` shuffles by seed, shards by JAX process and runs worker processes; its
iterator state (``get_state``/``set_state``) goes into the training checkpoint so a resumed run gets
exactly the next batch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import grain
import numpy as np
from PIL import Image
from scipy import ndimage

from cspine_jax.records import schema, shards

# The image field each task's records carry (see docs/ARCHITECTURE.md).
IMAGE_FIELD = {"stage1": "image", "stage2": "images", "cnn3d": "volume", "slices2d": "image"}
# ImageNet statistics for 3-channel (2.5D) images; single-channel volumes are centred at 0.5.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ShardError(RuntimeError):
  """A shard (or one record in it) that cannot be read; the message names the shard file."""


@dataclasses.dataclass(frozen=True)
class RecordIndex:
  """What the manifest says about every record of a task, in global record-id order.

  A shard holds one study (``records.pipeline``), so a record's study and fold are its shard's.
  """
  task: str
  paths: list[pathlib.Path]
  study_uid: np.ndarray  # (N,) str
  fold: np.ndarray       # (N,) int
  num_folds: int

  def __len__(self) -> int:
    return len(self.fold)

  def ids(self, fold: int, train: bool) -> np.ndarray:
    """Record ids of the training part (fold != k) or the held-out part (fold == k).

    ``fold < 0`` means no hold-out: everything trains and the held-out part is empty.
    """
    all_ids = np.arange(len(self))
    if fold < 0:
      return all_ids if train else all_ids[:0]
    if fold >= self.num_folds:
      raise ValueError(f"fold {fold} out of range: the {self.task} records have {self.num_folds} folds")
    return all_ids[self.fold != fold] if train else all_ids[self.fold == fold]

  def source(self) -> "RecordSource":
    """A :class:`RecordSource` over all the shards, checked against the manifest's counts."""
    src = RecordSource(self.paths)
    if len(src) != len(self):
      raise ShardError(f"{self.paths[0].parent}: shards hold {len(src)} records, the manifest "
                       f"{len(self)}; re-run data_prep.prepare")
    return src


def record_index(records_dir: str | os.PathLike, task: str) -> RecordIndex:
  """Reads ``records_dir/task/manifest.json`` (written last by data_prep.prepare)."""
  if task not in IMAGE_FIELD:
    raise ValueError(f"unknown task {task!r}; expected one of {sorted(IMAGE_FIELD)}")
  task_dir = pathlib.Path(records_dir) / task
  manifest = shards.read_manifest(task_dir)
  if manifest.get("task", task) != task:
    raise ShardError(f"{task_dir}/{shards.MANIFEST}: holds task {manifest.get('task')!r}, not {task!r}")
  rows = manifest.get("shards") or []
  if not rows:
    raise ShardError(f"{task_dir}/{shards.MANIFEST}: lists no shards")
  paths, uids, folds = [], [], []
  for row in rows:
    path = task_dir / row["file"]
    if not path.is_file():
      raise ShardError(f"{path}: listed in the manifest but missing")
    paths.append(path)
    uids += [row["study_uid"]] * int(row["num_records"])
    folds += [int(row["fold"])] * int(row["num_records"])
  return RecordIndex(task, paths, np.asarray(uids), np.asarray(folds, np.int64),
                     int(manifest.get("num_folds", max(folds) + 1)))


class RecordSource:
  """A random-access grain data source over a task's shards, optionally restricted to some records.

  Items are decoded records (numpy arrays and scalars) plus ``record_id``: the record's index in the
  whole shard set, which stays valid across folds and processes (evaluation gathers by it).
  Picklable (grain worker processes get a copy): the readers open lazily in each process.
  """

  def __init__(self, paths: Sequence[str | pathlib.Path], indices: Sequence[int] | None = None):
    self.paths = [str(p) for p in paths]
    self._reader = None
    self._counts = self._count_records()
    self._offsets = np.cumsum([0] + self._counts)
    total = int(self._offsets[-1])
    self.indices = np.arange(total) if indices is None else np.asarray(indices, np.int64)
    if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= total):
      raise IndexError(f"record indices out of range for {total} records in {self.paths[:1]}...")

  def _count_records(self) -> list[int]:
    counts = []
    for p in self.paths:
      try:
        counts.append(len(grain.sources.ArrayRecordDataSource([p])))
      except Exception as e:  # array_record raises a bare RuntimeError on truncated files.
        raise ShardError(f"{p}: unreadable ArrayRecord shard (truncated or corrupt): "
                         f"{type(e).__name__} {e}") from e
    return counts

  def subset(self, indices: Sequence[int]) -> "RecordSource":
    """The same shards restricted to the given global record ids."""
    out = object.__new__(RecordSource)
    out.paths, out._reader, out._counts, out._offsets = self.paths, None, self._counts, self._offsets
    out.indices = np.asarray(indices, np.int64)
    return out

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_reader"] = None
    return state

  def __len__(self) -> int:
    return len(self.indices)

  def __repr__(self) -> str:
    # grain compares this in saved iterator states: it names the records, not the object.
    digest = hashlib.sha1(np.asarray(self.indices, np.int64).tobytes())
    for p in self.paths:
      digest.update(pathlib.Path(p).name.encode())
    return (f"RecordSource({pathlib.Path(self.paths[0]).parent.name}, shards={len(self.paths)}, "
            f"records={len(self.indices)}, sha1={digest.hexdigest()[:16]})")

  def shard_of(self, record_id: int) -> str:
    return self.paths[int(np.searchsorted(self._offsets, record_id, side="right")) - 1]

  def read(self, record_id: int) -> bytes:
    """Raw bytes of one record by global id (errors name the shard)."""
    if self._reader is None:
      self._reader = grain.sources.ArrayRecordDataSource(self.paths)
    try:
      return self._reader[int(record_id)]
    except Exception as e:
      raise ShardError(f"{self.shard_of(record_id)}: cannot read record {record_id}: "
                       f"{type(e).__name__} {e}") from e

  def __getitem__(self, index: int) -> dict[str, Any]:
    record_id = int(self.indices[index])
    data = self.read(record_id)
    try:
      record = schema.decode(data)
    except schema.RecordError as e:
      raise ShardError(f"{self.shard_of(record_id)}: record {record_id}: {e}") from e
    record["record_id"] = record_id
    return record


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
  """Train-time augmentation (the seed method: small random rotation, random horizontal flip)."""
  max_rotation_deg: float = 10.0
  flip_prob: float = 0.5


class Augment(grain.transforms.RandomMap):
  """One rotation angle and one flip decision per record, applied to all of its images.

  The image array is (..., H, W, C); rows/columns are the last spatial axes, so a stage-2 sequence
  (8, H, W, 3) or a volume (D, H, W, 1) is rotated/flipped as a whole. Stage-1 normalised boxes
  follow the image (the box of the rotated corners, clipped to the image).
  """

  def __init__(self, task: str, options: AugmentOptions):
    self.field = IMAGE_FIELD[task]
    self.options = options

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    angle = float(rng.uniform(-self.options.max_rotation_deg, self.options.max_rotation_deg))
    flip = bool(rng.random() < self.options.flip_prob)
    element = dict(element)
    element[self.field] = augment_images(element[self.field], angle, flip)
    if "box" in element:
      h, w = element[self.field].shape[-3:-1]
      element["box"] = augment_box(element["box"], angle, flip, h, w)
    return element


def augment_images(images: np.ndarray, angle: float, flip: bool) -> np.ndarray:
  """Rotates (degrees, counter-clockwise on screen) then flips left-right uint8 images (..., H, W, C).

  Bilinear rotation about the image centre, zeros outside; PIL does one 2D image in microseconds
  (scipy.ndimage is ~100x slower here), so every image of a sequence/volume gets the same turn.
  """
  out = images
  if angle:
    h, w, c = images.shape[-3:]
    flat = images.reshape((-1, h, w, c))
    rotated = np.empty_like(flat)
    for i, img in enumerate(flat):
      if c in (1, 3) and img.dtype == np.uint8:
        pil = Image.fromarray(img[..., 0] if c == 1 else img)
        rotated[i] = np.asarray(pil.rotate(angle, resample=Image.BILINEAR)).reshape(h, w, c)
      else:
        rotated[i] = ndimage.rotate(img, angle, axes=(1, 0), reshape=False, order=1, prefilter=False)
    out = rotated.reshape(images.shape)
  if flip:
    out = out[..., ::-1, :]
  return np.ascontiguousarray(out)


def augment_box(box: np.ndarray, angle: float, flip: bool, h: int, w: int) -> np.ndarray:
  """The normalised box (x0, y0, x1, y1) after :func:`augment_images`; an all-zero box stays zero."""
  box = np.asarray(box, np.float32)
  if not np.any(box):
    return box
  x0, y0, x1, y1 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
  xs = np.array([x0, x1, x1, x0]) - w / 2
  ys = np.array([y0, y0, y1, y1]) - h / 2
  t = np.deg2rad(angle)
  # Image rows grow downwards, so a counter-clockwise turn on screen maps (x, y) -> this.
  rx = xs * np.cos(t) + ys * np.sin(t) + w / 2
  ry = -xs * np.sin(t) + ys * np.cos(t) + h / 2
  nx0, nx1 = rx.min(), rx.max()
  if flip:
    nx0, nx1 = w - nx1, w - nx0
  out = np.array([nx0 / w, ry.min() / h, nx1 / w, ry.max() / h], np.float32)
  return np.clip(out, 0.0, 1.0)


class DropStrings(grain.transforms.Map):
  """Drops string/None fields (study_uid): batches hold arrays only; ids travel as record_id."""

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in element.items() if not (isinstance(v, str) or v is None)}


class Normalize(grain.transforms.Map):
  """uint8 images -> float32 ``(x / 255 - mean) / std`` as one multiply-add.

  Runs on whole batches (after ``Batch``): one vectorised pass instead of one per record.
  """

  def __init__(self, task: str):
    self.field = IMAGE_FIELD[task]

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    out = dict(element)
    img = np.asarray(out[self.field])
    if img.dtype != np.uint8:
      raise TypeError(f"records {out.get('record_id')}: {self.field} is {img.dtype}, expected uint8")
    if img.shape[-1] == 3:
      mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    else:
      mean, std = np.float32(0.5), np.float32(0.5)
    scale, offset = 1.0 / (255.0 * std), -mean / std
    out[self.field] = img.astype(np.float32) * scale + offset
    return out


def make_loader(source: RecordSource, task: str, *, batch_size: int, train: bool, seed: int,
                augment: AugmentOptions | None = None, workers: int = 0,
                num_epochs: int | None = None,
                shard_options: grain.sharding.ShardOptions | None = None) -> grain.DataLoader:
  """A grain DataLoader: (shuffle, shard, decode, augment, normalise, batch).

  Training: shuffled by ``seed``, repeated (``num_epochs=None`` = forever), full batches only.
  Evaluation: in order, one pass, the last batch may be short (the caller pads it).
  ``shard_options`` defaults to this JAX process's share (``ShardByJaxProcess``).
  """
  if len(source) == 0:
    raise ValueError(f"no records to load for task {task!r} from {source.paths[:1]}...")
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=train)
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=shard_options, shuffle=train,
      num_epochs=num_epochs if train else 1, seed=seed)
  ops: list = []
  if train and augment is not None:
    ops.append(Augment(task, augment))
  ops += [DropStrings(), grain.transforms.Batch(batch_size, drop_remainder=train), Normalize(task)]
  return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                          worker_count=workers, worker_buffer_size=2)


def local_num_records(num_records: int, shard_options: grain.sharding.ShardOptions) -> int:
  """How many of ``num_records`` this process's shard holds (grain's contiguous split)."""
  start, end = _even_split(num_records, shard_options)
  return end - start


def _even_split(n: int, opts: grain.sharding.ShardOptions) -> tuple[int, int]:
  # Same split as grain's (private) core.sharding.even_split used by IndexSampler.
  if opts.drop_remainder:
    per = n // opts.shard_count
    return opts.shard_index * per, (opts.shard_index + 1) * per
  per, rem = divmod(n, opts.shard_count)
  start = opts.shard_index * per + min(opts.shard_index, rem)
  return start, start + per + (1 if opts.shard_index < rem else 0)
