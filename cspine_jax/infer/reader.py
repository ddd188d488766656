"""Reading DICOM studies ahead of the models: a thread, or a pool of decoder processes.

Decoding is the slowest part of inference from raw DICOM (pydicom parsing and the JPEG decoders
hold the GIL, so threads do not scale). With ``workers > 0`` whole studies are decoded in spawned
processes; each hands its volume back through a shared-memory block instead of a pipe, which the
parent maps (a 300 x 512 x 512 float32 volume costs one memcpy in the worker, not a pickle of
300 MB and not a second copy in the parent, whose thread feeds the models). Order is kept, at most
``workers + depth`` studies are in flight (bounded memory), and an exception of one study is
handed back with it instead of stopping the stream.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import math
import mmap
import multiprocessing
import os
import pathlib
import queue
import threading
import time
from multiprocessing import shared_memory
from typing import Any
from typing import Callable
from typing import Iterator
from typing import Sequence

import numpy as np

from cspine_jax import workers as workers_lib
from cspine_jax.io import dicom
from cspine_jax.pp import options as options_lib
from cspine_jax.pp import study as study_lib

Item = tuple[Any, Any, BaseException | None, float]  # (item, loaded, error, seconds)
Block = tuple[str, str, tuple[int, ...]]  # a shared-memory volume: (name, dtype, shape)


def prefetched(items: Sequence[Any], load: Callable[[Any], Any], depth: int = 2) -> Iterator[Item]:
  """Yields (item, loaded, error, seconds) in order while a thread loads up to ``depth`` ahead."""
  q: queue.Queue = queue.Queue(maxsize=max(1, depth))
  stop = threading.Event()

  def worker():
    for item in items:
      if stop.is_set():
        return
      start = time.perf_counter()
      try:
        out = (item, load(item), None)
      except Exception as e:  # noqa: BLE001 - handed to the consumer with its item
        out = (item, None, e)
      q.put(out + (time.perf_counter() - start,))
    q.put(None)

  thread = threading.Thread(target=worker, name="dicom-prefetch", daemon=True)
  thread.start()
  try:
    while (got := q.get()) is not None:
      yield got
  finally:
    stop.set()
    while thread.is_alive():  # unblock a worker waiting on a full queue
      try:
        q.get_nowait()
      except queue.Empty:
        thread.join(0.05)


Prepare = Callable[[dicom.Series], dict[str, np.ndarray]]


def stage1_inputs(series: dicom.Series, options: options_lib.Options) -> dict[str, np.ndarray]:
  """Inference's host-side stage-1 work on a decoded series, as a ``prepare``: it runs where the
  study was decoded (in the decoder processes when there are some, which import no JAX)."""
  loaded = study_lib.Loaded(study=None, series=series, mask=None)
  return {"stage1_images": study_lib.slice_images(loaded, options)}


def _load(folder: pathlib.Path, prepare: Prepare | None, series_uid: str | None = None) -> Any:
  """The series, or (series, prepare(series)) when there is host-side work to do beside decoding;
  ``series_uid`` as in ``dicom.read_series``."""
  series = dicom.read_series(folder, warn=False, series_uid=series_uid)
  return series if prepare is None else (series, prepare(series))


def _to_shared(array: np.ndarray) -> Block:
  """Copies ``array`` into a new shared-memory block (which the parent maps and frees)."""
  array = np.ascontiguousarray(array)
  shm = shared_memory.SharedMemory(create=True, size=max(array.nbytes, 1))
  try:
    np.ndarray(array.shape, array.dtype, buffer=shm.buf)[...] = array
    return shm.name, array.dtype.str, array.shape
  finally:
    shm.close()


def _read_to_shared(folder: pathlib.Path, prepare: Prepare | None = None,
                    series_uid: str | None = None
                    ) -> tuple[dicom.Series, Block, dict[str, Block], float]:
  """Worker side: read the series (and run ``prepare`` on it), move the arrays into shared memory."""
  start = time.perf_counter()
  loaded = _load(folder, prepare, series_uid)
  series, extras = loaded if prepare is not None else (loaded, {})
  volume = _to_shared(series.volume)
  blocks = {k: _to_shared(v) for k, v in extras.items()}
  header = dataclasses.replace(series, volume=np.empty((0,) + series.volume.shape[1:],
                                                       series.volume.dtype))
  return header, volume, blocks, time.perf_counter() - start


def _unlink(name: str) -> None:
  """Removes a block's name (as ``SharedMemory.unlink``); its mappings stay valid until dropped."""
  shm = shared_memory.SharedMemory(name=name)
  try:
    shm.unlink()
  finally:
    shm.close()


def _take_shared(block: Block) -> np.ndarray:
  """Parent side: the block as an array, then freed. Where the blocks are files (/dev/shm) the
  array maps the block privately (copy-on-write, no copy of a 300 MB volume; the memory goes when
  the array does); elsewhere it is copied out."""
  name, dtype, shape = block
  dtype = np.dtype(dtype)
  path = pathlib.Path("/dev/shm") / name.lstrip("/")
  count = math.prod(shape)
  if path.exists() and count:
    fd = os.open(path, os.O_RDONLY)
    try:
      mapped = mmap.mmap(fd, count * dtype.itemsize, access=mmap.ACCESS_COPY)
    finally:
      os.close(fd)
    _unlink(name)
    return np.frombuffer(mapped, dtype, count).reshape(shape)
  shm = shared_memory.SharedMemory(name=name)
  try:
    return np.ndarray(shape, dtype, buffer=shm.buf).copy()
  finally:
    shm.close()
    shm.unlink()


def _discard(future: cf.Future) -> None:
  """Frees the shared blocks of a study that will not be consumed (the stream was closed)."""
  try:
    _, volume, blocks, _ = future.result()
  except BaseException:  # noqa: BLE001 - nothing to free
    return
  for block in (volume, *blocks.values()):
    try:
      _unlink(block[0])
    except OSError:
      pass


def read_studies(folders: Sequence[pathlib.Path], workers: int = 0, depth: int = 2,
                 prepare: Prepare | None = None, series_uid: str | None = None) -> Iterator[Item]:
  """Yields (folder, Series or None, error or None, seconds) in the order of ``folders``.

  ``workers == 0`` reads in one background thread (overlaps with the models only); ``workers > 0``
  decodes that many studies at once in spawned processes. ``prepare`` (a picklable function of
  the series returning named arrays, e.g. the stage-1 images) runs where the study was decoded,
  so that host work leaves the model's thread too; each item then holds (series, arrays) instead
  of the series, and the seconds count decoding and preparing. ``series_uid``: which series of a
  folder that mixes several (``dicom.read_series``; ``dicom.AUTO_SERIES`` picks one).
  """
  folders = list(folders)
  if workers <= 0 or len(folders) <= 1:
    yield from prefetched(folders, lambda f: _load(f, prepare, series_uid), depth)
    return
  # spawn: the parent has JAX's threads running, which fork must not copy.
  ctx = multiprocessing.get_context("spawn")
  with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                              initializer=workers_lib.end_with_parent,
                              initargs=(os.getpid(),)) as pool:
    ahead = workers + max(depth, 0)
    futures = collections.deque(pool.submit(_read_to_shared, f, prepare, series_uid)
                                for f in folders[:ahead])
    submitted = len(futures)
    try:
      for folder in folders:
        future = futures.popleft()
        try:
          header, volume, blocks, seconds = future.result()
          series = dataclasses.replace(header, volume=_take_shared(volume))
          extras = {k: _take_shared(b) for k, b in blocks.items()}
          got: Item = (folder, series if prepare is None else (series, extras), None, seconds)
        except Exception as e:  # noqa: BLE001 - handed to the consumer with its folder
          got = (folder, None, e, 0.0)
        if submitted < len(folders):
          futures.append(pool.submit(_read_to_shared, folders[submitted], prepare, series_uid))
          submitted += 1
        yield got
    finally:
      for future in futures:
        if not future.cancel():
          _discard(future)
