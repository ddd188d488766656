"""grain input over the ArrayRecord record sets (``OUT/TASK/*.array_record``).

One pipeline for every task, in grain's dataset API: ``MapDataset.source`` over
:class:`EpochBatches` (item k: this process's k-th batch, its records read by index from the
task's shards, decoded with ``records.schema.decode`` and stacked) -> ``to_iter_dataset`` (a read
thread a couple of batches ahead) -> ``mp_prefetch`` (worker processes taking whole batches in
turn). The images stay uint8 (the steps normalise and augment on the device, ``inputs.augment``).
The records are shuffled by seed per epoch into global batches; each JAX process reads its slice
of every global batch, so the batches (and the losses) do not depend on how many processes share
them. The iterator state goes into the training checkpoint, so a resumed run gets exactly the next
batch, with the same or another number of processes.
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
  options: dict[str, Any] | None = None  # the preprocessing options the records were made with

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
                     int(manifest.get("num_folds", max(folds) + 1)), manifest.get("options"))


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
    # Part of EpochBatches' repr, which saved iterator states are checked against.
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
  travel as record_id). Each field is copied into one preallocated array, which costs less than
  np.stack's checks and expansion of every element."""
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
  """A grain data source whose item k is this process's part of the k-th global batch.

  Epoch ``k // batches_per_epoch`` visits ``source`` in one numpy permutation of ``(seed, epoch)``
  (in order without ``shuffle``); its global batch ``b`` holds positions ``b * G ... (b + 1) * G``
  of that order, ``G = batch_size * shard_count``, and process ``shard_index`` reads its rows
  ``shard_index * batch_size ...`` of it, decoded and stacked by :func:`stack_records`. Every
  record of an epoch is read by one process, and the global batches are the ones a single process
  with batch ``G`` reads. ``drop_remainder``: full global batches only (each epoch drops its own
  last partial batch); otherwise the last global batch may be short, and a process's part of it
  short or empty. ``num_epochs=None`` repeats forever.

  Why batches, not records: grain's per-item hand-over (read threads, futures, buffers) costs more
  than reading and decoding a small record, so an item per batch pays it once per batch.
  """

  def __init__(self, source: RecordSource, batch_size: int, *, shuffle: bool, seed: int,
               drop_remainder: bool, num_epochs: int | None, shard_index: int = 0,
               shard_count: int = 1):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index {shard_index} out of range for {shard_count} shards")
    self._source = source
    self._batch_size = int(batch_size)
    self._global_batch = int(batch_size) * int(shard_count)
    self._shard_index = int(shard_index)
    self._shuffle = shuffle
    self._seed = int(seed)
    self._drop_remainder = drop_remainder
    self._num_epochs = num_epochs
    self.batches_per_epoch = batches_per_epoch(len(source), self._global_batch, drop_remainder)
    self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) in use

  def __len__(self) -> int:
    if self.batches_per_epoch == 0:
      return 0
    if self._num_epochs is None:
      return sys.maxsize
    return self.batches_per_epoch * self._num_epochs

  def __repr__(self) -> str:
    # Saved iterator states carry this and are checked against it: it names the global batches,
    # which are the same whichever process, and however many, read them.
    return (f"EpochBatches({self._source!r}, batch_size={self._global_batch}, "
            f"shuffle={self._shuffle}, seed={self._seed}, drop_remainder={self._drop_remainder}, "
            f"num_epochs={self._num_epochs})")

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_order"] = None
    return state

  def positions(self, index: int) -> np.ndarray:
    """The source positions that this process's part of batch ``index`` holds."""
    if index < 0 or index >= len(self):
      raise IndexError(f"batch {index} out of range [0, {len(self)})")
    epoch, b = divmod(int(index), self.batches_per_epoch)
    start = b * self._global_batch + self._shard_index * self._batch_size
    pos = np.arange(min(start, len(self._source)), min(start + self._batch_size, len(self._source)))
    if not self._shuffle:
      return pos
    if self._order is None or self._order[0] != epoch:
      rng = np.random.default_rng((self._seed, epoch))
      self._order = (epoch, rng.permutation(len(self._source)))
    return self._order[1][pos]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    pos = self.positions(index)
    if len(pos) == 0:  # this process's part of a short last batch: no rows, the fields' shapes
      return {k: v[:0] for k, v in stack_records([self._source[0]]).items()}
    return stack_records([self._source[int(p)] for p in pos])


def batches_per_epoch(num_records: int, global_batch: int, drop_remainder: bool) -> int:
  """Global batches of ``global_batch`` in one pass over ``num_records`` (full ones only with
  ``drop_remainder``)."""
  return num_records // global_batch if drop_remainder else -(-num_records // global_batch)


# An item is a batch of local reads: one thread two batches ahead keeps ahead of the step, where
# grain's defaults (16 threads, 500 items, made for remote disks) contend for the GIL.
READ_THREADS = 1
READ_BUFFER_BATCHES = 2
WORKER_BUFFER_BATCHES = 2


class BatchLoader(grain.IterDataset):
  """The grain pipeline over an :class:`EpochBatches`; its iterators' state names the batches.

  grain's own state is only a position, so the state also carries ``repr(batches)`` and the worker
  count, and ``set_state`` refuses a position saved for other batches or another worker count.
  """

  def __init__(self, batches: EpochBatches, workers: int):
    ds = grain.MapDataset.source(batches).to_iter_dataset(
        grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_BUFFER_BATCHES))
    if workers > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=workers, per_worker_buffer_size=WORKER_BUFFER_BATCHES))
    super().__init__(ds)
    self.batches = batches
    self.workers = int(workers)

  def __str__(self) -> str:
    return f"BatchLoader({self.batches!r}, workers={self.workers})"

  def __iter__(self) -> "BatchIterator":
    return BatchIterator(self._parent.__iter__(), repr(self.batches), self.workers)


class BatchIterator(grain.DatasetIterator):
  """Iterator of a :class:`BatchLoader` (``get_state`` / ``set_state`` as JSON-able dicts)."""

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent: grain.DatasetIterator, batches: str, workers: int):
    super().__init__(parent)
    self._batches = batches
    self._workers = workers

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {"batches": self._batches, "workers": self._workers,
            "position": self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("batches") != self._batches or state.get("workers") != self._workers:
      raise ValueError(f"the saved input position is one of {state.get('batches')} with "
                       f"{state.get('workers')} worker processes, not of {self._batches} with "
                       f"{self._workers}; use the run's own config (input.batch_size, "
                       "input.workers, seed, records)")
    self._parent.set_state(state["position"])

  def __str__(self) -> str:
    return f"BatchIterator({self._batches}, workers={self._workers})"


def make_loader(source: RecordSource, task: str, *, batch_size: int, train: bool, seed: int,
                workers: int = 0, num_epochs: int | None = None,
                shard_options: grain.sharding.ShardOptions | None = None) -> BatchLoader:
  """A grain pipeline of uint8 batches: this process's part (``batch_size`` rows) of each global
  batch of ``source`` (:class:`EpochBatches`), shuffled per epoch (training) or in order, read a
  batch at a time; iterate it for batches.

  Augmentation and normalisation happen in the steps (:func:`device_inputs`).

  Training: shuffled by ``seed``, repeated (``num_epochs=None`` = forever), full global batches
  only. Evaluation: in order, one pass; the last global batch may be short, so a process's last
  batch may be short or empty (the caller pads it); every process reads the same number of
  batches. ``shard_options`` (its index and count; the remainder rule is ``train``'s) defaults to
  this JAX process among all (``ShardByJaxProcess``).
  """
  if len(source) == 0:
    raise ValueError(f"no records to load for task {task!r} from {source.paths[:1]}...")
  if task not in IMAGE_FIELD:
    raise ValueError(f"unknown task {task!r}; expected one of {sorted(IMAGE_FIELD)}")
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess()
  batches = EpochBatches(source, batch_size, shuffle=train, seed=seed, drop_remainder=train,
                         num_epochs=num_epochs if train else 1,
                         shard_index=shard_options.shard_index,
                         shard_count=shard_options.shard_count)
  if train and batches.batches_per_epoch == 0:
    count = shard_options.shard_count
    split = f"{count} processes x {batch_size}; " if count > 1 else ""
    raise ValueError(f"{len(source)} training records make no full batch of {batch_size * count} "
                     f"({split}task {task!r}, {source.paths[:1]}...)")
  return BatchLoader(batches, workers)
