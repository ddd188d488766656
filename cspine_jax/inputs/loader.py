"""grain input over the ArrayRecord record sets (``OUT/TASK/*.array_record``).

One pipeline for every task: a batch's records read by index from the task's shards, decoded with
``records.schema.decode`` and stacked (:class:`EpochBatches`); the images stay uint8 (the steps
normalise and augment on the device, ``inputs.augment``). The :class:`grain.DataLoader` reads
batches ahead in a thread or in worker processes; the records are shuffled by seed per epoch and
split by JAX process; the iterator state goes into the training checkpoint, so a resumed run gets
exactly the next batch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import sys
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from cspine_jax.records import schema, shards

# The image field each task's records carry (see docs/ARCHITECTURE.md).
IMAGE_FIELD = {"stage1": "image", "stage2": "images", "cnn3d": "volume", "slices2d": "image",
               "box_refine": "image"}


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


def stack_records(elements: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """A batch of :class:`EpochBatches`: the records' array and number fields stacked along a new
  first axis; string / None fields (study_uid) are dropped, so batches hold arrays only (ids
  travel as record_id). Each field is copied into one preallocated array: np.stack (grain's
  default) spent ~1.8 of ~4.5 ms per 16-record slice batch re-checking and expanding every
  element."""
  first = elements[0]
  out = {}
  for key, value in first.items():
    if isinstance(value, str) or value is None:
      continue
    value = np.asarray(value)
    field = np.empty((len(elements),) + value.shape, value.dtype)
    for i, element in enumerate(elements):
      item = element[key]
      if np.shape(item) != value.shape:  # assignment would broadcast it silently
        raise ValueError(f"field {key!r}: record {element.get('record_id', i)} has shape "
                         f"{np.shape(item)}, the batch's first record {value.shape}")
      field[i] = item
    out[key] = field
  return out


class EpochBatches:
  """A grain data source whose item k is the k-th batch this process reads, read whole in one call.

  Epoch ``k // batches_per_epoch`` visits the process's records (``source``, already its share) in
  one numpy permutation of ``(seed, epoch)`` (in order without ``shuffle``); its batch ``b`` holds
  positions ``b * batch_size ...`` of that order, decoded and stacked by :func:`stack_records`.
  ``drop_remainder``: full batches only (each epoch drops its own last partial batch); otherwise
  the epoch's last batch may be short. ``num_epochs=None`` repeats forever.

  Why batches, not records: grain hands each item through its read threads, futures and buffers
  (~0.1 ms an item on 2 cores), more than reading + decoding a small record costs (~0.02 ms for a
  64 px slice), so a record-level pipeline fed slice models at ~1.6x their CPU step rate; a batch
  per item pays that once per batch. Worker processes then take whole batches in turn.
  """

  def __init__(self, source: RecordSource, batch_size: int, *, shuffle: bool, seed: int,
               drop_remainder: bool, num_epochs: int | None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self._source = source
    self._batch_size = int(batch_size)
    self._shuffle = shuffle
    self._seed = int(seed)
    self._drop_remainder = drop_remainder
    self._num_epochs = num_epochs
    n = len(source)
    self.batches_per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
    self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) in use

  def __len__(self) -> int:
    if self.batches_per_epoch == 0:
      return 0
    if self._num_epochs is None:
      return sys.maxsize
    return self.batches_per_epoch * self._num_epochs

  def __repr__(self) -> str:
    # grain keeps this in saved iterator states: it names the batches, not the object.
    return (f"EpochBatches({self._source!r}, batch_size={self._batch_size}, "
            f"shuffle={self._shuffle}, seed={self._seed}, drop_remainder={self._drop_remainder}, "
            f"num_epochs={self._num_epochs})")

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_order"] = None
    return state

  def positions(self, index: int) -> np.ndarray:
    """The source positions that batch ``index`` holds."""
    if index < 0 or index >= len(self):
      raise IndexError(f"batch {index} out of range [0, {len(self)})")
    epoch, b = divmod(int(index), self.batches_per_epoch)
    pos = np.arange(b * self._batch_size, min((b + 1) * self._batch_size, len(self._source)))
    if not self._shuffle:
      return pos
    if self._order is None or self._order[0] != epoch:
      rng = np.random.default_rng((self._seed, epoch))
      self._order = (epoch, rng.permutation(len(self._source)))
    return self._order[1][pos]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return stack_records([self._source[int(p)] for p in self.positions(index)])


class _BatchIndexSampler:
  """grain sampler over the batches of :class:`EpochBatches`: item k -> batch k (no sharding:
  the source is already this process's share). Unlike grain's samplers it allows 0 items, so a
  process with no held-out records reads nothing."""

  def __init__(self, num_batches: int):
    self._num_batches = int(num_batches)
    self._shard_options = grain.sharding.NoSharding()

  def __len__(self) -> int:
    return self._num_batches

  def __repr__(self) -> str:
    return f"_BatchIndexSampler(num_batches={self._num_batches})"

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if index < 0 or index >= self._num_batches:
      raise IndexError(f"sampler index {index} out of range [0, {self._num_batches})")
    return grain.RecordMetadata(index=index, record_key=index)


# grain's default ReadOptions (16 threads, 500 prefetched items) suit remote disks; here an item is
# a batch of local reads, and one thread two batches ahead keeps ahead of the step (two threads
# contended for the GIL: box_refine:cpu 0.96 -> 1.3 ms a batch on 2 cores).
READ_THREADS = 1
READ_BUFFER_BATCHES = 2


def make_loader(source: RecordSource, task: str, *, batch_size: int, train: bool, seed: int,
                workers: int = 0, num_epochs: int | None = None,
                shard_options: grain.sharding.ShardOptions | None = None) -> grain.DataLoader:
  """A grain DataLoader of uint8 batches: this process's share of ``source``, shuffled per epoch
  (training) or in order, read a batch at a time (:class:`EpochBatches`).

  Augmentation and normalisation happen in the steps (:func:`device_inputs`).

  Training: shuffled by ``seed``, repeated (``num_epochs=None`` = forever), full batches only.
  Evaluation: in order, one pass, the last batch may be short (the caller pads it).
  ``shard_options`` defaults to this JAX process's share (``ShardByJaxProcess``): contiguous
  record ranges (:func:`local_num_records`).
  """
  if len(source) == 0:
    raise ValueError(f"no records to load for task {task!r} from {source.paths[:1]}...")
  if task not in IMAGE_FIELD:
    raise ValueError(f"unknown task {task!r}; expected one of {sorted(IMAGE_FIELD)}")
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=train)
  start, end = _even_split(len(source), shard_options)
  batches = EpochBatches(source.subset(source.indices[start:end]), batch_size, shuffle=train,
                         seed=seed, drop_remainder=train, num_epochs=num_epochs if train else 1)
  if train and batches.batches_per_epoch == 0:
    raise ValueError(f"{end - start} training records of this process make no full batch of "
                     f"{batch_size} (task {task!r}, {source.paths[:1]}...)")
  read = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_BUFFER_BATCHES)
  return grain.DataLoader(data_source=batches, sampler=_BatchIndexSampler(len(batches)),
                          worker_count=workers, worker_buffer_size=2, read_options=read)


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

