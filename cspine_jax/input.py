"""grain input pipelines over the ArrayRecord record sets (``OUT/TASK/*.array_record``).

One pipeline for every task: a batch's records read by index from the task's shards, decoded with
``records.schema.decode`` and stacked (:class:`EpochBatches`); the images stay uint8. The
:class:`grain.DataLoader` reads batches ahead in a thread or in worker processes; the records are
shuffled by seed per epoch and split by JAX process; the iterator state (``get_state``/
``set_state``) goes into the training checkpoint so a resumed run gets exactly the next batch.

The per-pixel work runs on the device, inside the jitted steps (:func:`device_inputs`): at train
time one random rotation + horizontal flip per sample (shared by every image of a stage-2 sequence
or 3D volume; stage-1 boxes follow), drawn from a key of (seed, optimizer step) so a resumed run
draws the same; then the one normalisation (:func:`normalize`) that evaluation and inference use
too. The host pipeline stays light (a quarter of the bytes of float32 batches to copy), which is
what keeps an accelerator fed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import sys
from typing import Any, Iterable, Mapping, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from cspine_jax.records import schema, shards

# The image field each task's records carry (see docs/ARCHITECTURE.md).
IMAGE_FIELD = {"stage1": "image", "stage2": "images", "cnn3d": "volume", "slices2d": "image",
               "box_refine": "image"}
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
  # Share of samples whose slices are re-sampled as if the sample had been cut from a thicker-slice
  # study: its S slices spread over only n source slices, n uniform in ``coarse_slices``
  # (:func:`coarsen_slices`). Sequence and volume samples only (stage 2, 3D CNN).
  coarse_slices_prob: float = 0.0
  coarse_slices: tuple[int, int] = (4, 12)

  def __post_init__(self):  # a bad range fails when the run builds its options, not in a step
    lo, hi = (int(v) for v in self.coarse_slices)
    if not 2 <= lo <= hi:
      raise ValueError(f"coarse_slices must be (lo, hi) with 2 <= lo <= hi; got {(lo, hi)}")


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


# ---- normalisation: the one definition for training, evaluation and inference -----------------
def _norm_affine(channels: int) -> tuple[np.ndarray, np.ndarray]:
  """(scale, offset) with ``(x / 255 - mean) / std == x * scale + offset`` per channel."""
  if channels == 3:
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
  else:
    mean, std = np.full(channels, 0.5, np.float32), np.full(channels, 0.5, np.float32)
  return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def normalize(images: Any) -> Any:
  """Pixel values in 0..255 (uint8, or float after :func:`rotate_flip`) (..., C) -> float32
  ``(x / 255 - mean) / std`` as one multiply-add: ImageNet statistics for 3 channels, 0.5/0.5
  otherwise. numpy in, numpy out; a jax array in (inside a jitted step), a jax array out.
  """
  scale, offset = _norm_affine(images.shape[-1])
  return images.astype(np.float32) * scale + offset


# ---- device side: augmentation and normalisation inside the jitted steps ------------------------
def augment_draws(key: jax.Array, batch_size: int, options: AugmentOptions
                  ) -> tuple[jax.Array, jax.Array]:
  """One rotation angle (degrees, uniform in +-max) and one flip decision per sample."""
  k_angle, k_flip = jax.random.split(key)
  m = float(options.max_rotation_deg)
  angle = jax.random.uniform(k_angle, (batch_size,), jnp.float32, -m, m)
  flip = jax.random.uniform(k_flip, (batch_size,)) < options.flip_prob
  return angle, flip


def coarse_slice_draws(key: jax.Array, batch_size: int, options: AugmentOptions) -> jax.Array:
  """Per sample the number of source slices to re-sample it from (0: left as it is)."""
  k_apply, k_count = jax.random.split(key)
  lo, hi = (int(v) for v in options.coarse_slices)
  count = jax.random.randint(k_count, (batch_size,), lo, hi + 1)
  return jnp.where(jax.random.uniform(k_apply, (batch_size,)) < options.coarse_slices_prob, count, 0)


def coarsen_slices(images: jax.Array, count: jax.Array) -> jax.Array:
  """Each sample's S slices as a thicker-slice study would have given them: ``count[b]`` source
  slices spread over the S positions by nearest neighbour, as the records' evenly spaced sampling
  (``records.study.evenly_spaced``) repeats the slices of a vertebra that spans only ``count``
  of them. ``count[b]`` = 0 (or >= S) leaves the sample as it is. float32 out, same values.

  ``images`` is (B, T, H, W, C) with the slices in (T, C) order: a stage-2 sequence of T 2.5D
  images of C consecutive slices each, or a volume of T slices (C = 1). The source slices are
  taken from the sample's own S at their evenly spaced positions, so the first and last slice stay.
  """
  if images.ndim != 5:
    raise ValueError(f"coarse slices need (B, T, H, W, C) sequences or volumes; got {images.shape}")
  b, t, h, w, c = images.shape
  s = t * c
  pos = jnp.arange(s, dtype=jnp.float32)[None]
  n = jnp.clip(count, 2, s)[:, None].astype(jnp.float32)
  source = jnp.round(pos * (n - 1) / (s - 1))  # which of the n source slices position i shows
  index = jnp.round(source * (s - 1) / (n - 1)).astype(jnp.int32)  # where that slice is among S
  index = jnp.where((count[:, None] > 0) & (count[:, None] < s), index,
                    jnp.arange(s, dtype=jnp.int32)[None])
  # A per-sample 0/1 selection matrix, not a gather: XLA:CPU fused a slice gather into the
  # rotation's pixel gather that follows and ran both ~5x slower (stage-2 batch of 8: 12.9 vs 2.4
  # ms with the flip; the selection alone is 0.4 ms either way). Exact: one product per output.
  select = jax.nn.one_hot(index, s, dtype=jnp.float32).reshape(b, t, c, t, c)
  out = jnp.einsum("bTCtc,btpc->bTpC", select, images.reshape(b, t, h * w, c).astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(images.shape)


def rotate_flip(images: jax.Array, angle: jax.Array, flip: jax.Array) -> jax.Array:
  """Rotates each sample by ``angle[b]`` degrees (counter-clockwise on screen) about the image
  centre, then flips it left-right where ``flip[b]``; float32 out, in the input's units.

  ``images`` is (B, ..., H, W, C): every image of a sample (a stage-2 sequence, a volume's slices)
  gets the sample's turn. Bilinear, PIL's ``Image.rotate(angle, BILINEAR)`` conventions (pixel
  centres at +0.5; a source point outside the image gives 0, one inside reads clamped
  neighbours). Vectorised as one row gather: the sample's images and channels are laid out as one
  row per pixel, so each of the 4 bilinear taps fetches T*C contiguous values.
  """
  b = images.shape[0]
  h, w, c = images.shape[-3:]
  x = images.reshape((b, -1, h, w, c))
  t = x.shape[1]
  rows = jnp.moveaxis(x, 1, 3).reshape(b * h * w, t * c)  # (B*H*W, T*C), input dtype
  rad = jnp.deg2rad(angle.astype(jnp.float32))[:, None, None]
  cos, sin = jnp.cos(rad), jnp.sin(rad)
  xs = jnp.arange(w, dtype=jnp.float32) + 0.5 - w / 2
  ys = (jnp.arange(h, dtype=jnp.float32) + 0.5 - h / 2)[:, None]
  # The output's column x after a flip is the rotated image's column w-1-x: its centred x negates.
  xs = jnp.where(flip[:, None, None], -xs, xs)  # (B, 1, W)
  src_x = cos * xs - sin * ys + w / 2  # (B, H, W): where the output pixel reads the input
  src_y = sin * xs + cos * ys + h / 2
  inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
  fx, fy = src_x - 0.5, src_y - 0.5
  x0, y0 = jnp.floor(fx), jnp.floor(fy)
  dx, dy = (fx - x0)[..., None], (fy - y0)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  xa, xb = jnp.clip(x0, 0, w - 1), jnp.clip(x0 + 1, 0, w - 1)
  ya, yb = jnp.clip(y0, 0, h - 1), jnp.clip(y0 + 1, 0, h - 1)
  base = (jnp.arange(b, dtype=jnp.int32) * (h * w))[:, None, None]
  idx = jnp.stack([ya * w + xa, ya * w + xb, yb * w + xa, yb * w + xb]) + base  # (4, B, H, W)
  # Indices are clipped above, so the gather may skip its own bounds handling (~20% faster).
  taps = rows.at[idx.reshape(-1)].get(mode="promise_in_bounds")
  taps = taps.astype(jnp.float32).reshape((4, b, h, w, t * c))
  top = taps[0] + (taps[1] - taps[0]) * dx
  bottom = taps[2] + (taps[3] - taps[2]) * dx
  out = jnp.where(inside[..., None], top + (bottom - top) * dy, 0.0)  # (B, H, W, T*C)
  out = jnp.moveaxis(out.reshape((b, h, w, t, c)), 3, 1)
  return out.reshape(images.shape)


def rotate_flip_boxes(boxes: jax.Array, angle: jax.Array, flip: jax.Array, h: int, w: int
                      ) -> jax.Array:
  """Normalised boxes (B, 4) = (x0, y0, x1, y1) after :func:`rotate_flip`: the box of the turned
  corners, clipped to the image; an all-zero box (no vertebra shown) stays zero."""
  boxes = boxes.astype(jnp.float32)
  x0, y0, x1, y1 = boxes[:, 0] * w, boxes[:, 1] * h, boxes[:, 2] * w, boxes[:, 3] * h
  xs = jnp.stack([x0, x1, x1, x0], -1) - w / 2
  ys = jnp.stack([y0, y0, y1, y1], -1) - h / 2
  rad = jnp.deg2rad(angle.astype(jnp.float32))[:, None]
  # Image rows grow downwards, so a counter-clockwise turn on screen maps (x, y) -> this.
  rx = xs * jnp.cos(rad) + ys * jnp.sin(rad) + w / 2
  ry = -xs * jnp.sin(rad) + ys * jnp.cos(rad) + h / 2
  nx0, nx1 = rx.min(-1), rx.max(-1)
  nx0, nx1 = jnp.where(flip, w - nx1, nx0), jnp.where(flip, w - nx0, nx1)
  out = jnp.clip(jnp.stack([nx0 / w, ry.min(-1) / h, nx1 / w, ry.max(-1) / h], -1), 0.0, 1.0)
  return jnp.where(jnp.any(boxes != 0, axis=-1, keepdims=True), out, boxes)


COARSE_SLICES_STREAM = 2


def device_inputs(batch: Mapping[str, jax.Array], field: str, *, key: jax.Array | None = None,
                  augment: AugmentOptions | None = None) -> dict[str, jax.Array]:
  """A host batch as the model sees it, computed inside the jitted step.

  With ``augment`` and ``key`` (training): where the options ask, coarser slices for some samples
  (:func:`coarse_slice_draws`, :func:`coarsen_slices`), then one random rotation + flip per sample
  (:func:`augment_draws`, :func:`rotate_flip`) applied to the uint8 pixels, stage-1 ``box``
  following. Then uint8 images are normalised (:func:`normalize`). Float images are taken as
  already normalised (hand-made batches) and only augmented.
  """
  out = dict(batch)
  x = out[field]
  raw = x.dtype == jnp.uint8
  if augment is not None and key is not None and augment.coarse_slices_prob > 0:
    # Its own stream, so the rotation and flip draws are those of runs without it.
    count = coarse_slice_draws(jax.random.fold_in(key, COARSE_SLICES_STREAM), x.shape[0], augment)
    x = coarsen_slices(x, count)
  if augment is not None and key is not None:
    angle, flip = augment_draws(key, x.shape[0], augment)
    x = rotate_flip(x, angle, flip)
    if "box" in out:
      out["box"] = rotate_flip_boxes(out["box"], angle, flip, *x.shape[-3:-1])
  out[field] = normalize(x) if raw else x
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
