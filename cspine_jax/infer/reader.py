"""Reading DICOM studies ahead of the models: a thread, or a pool of decoder processes.

Decoding is the slowest part of inference from raw DICOM (pydicom parsing and the JPEG decoders
hold the GIL, so threads do not scale). With ``workers > 0`` whole studies are decoded in spawned
processes; each hands its volume back through a shared-memory block instead of a pipe, so a
300 x 512 x 512 float32 volume costs one memcpy, not a pickle of 300 MB. Order is kept, at most
``workers + depth`` studies are in flight (bounded memory), and an exception of one study is
handed back with it instead of stopping the stream.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import multiprocessing
import pathlib
import queue
import threading
import time
from multiprocessing import shared_memory
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from cspine_jax.io import dicom

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


def _read_to_shared(folder: pathlib.Path) -> tuple[dicom.Series, Block, float]:
  """Worker side: read the series, move its volume into a new shared-memory block."""
  start = time.perf_counter()
  series = dicom.read_series(folder, warn=False)
  vol = np.ascontiguousarray(series.volume)
  shm = shared_memory.SharedMemory(create=True, size=max(vol.nbytes, 1))
  try:
    np.ndarray(vol.shape, vol.dtype, buffer=shm.buf)[...] = vol
    name = shm.name
  finally:
    shm.close()
  header = dataclasses.replace(series, volume=np.empty((0,) + vol.shape[1:], vol.dtype))
  return header, (name, vol.dtype.str, vol.shape), time.perf_counter() - start


def _take_shared(block: Block) -> np.ndarray:
  """Parent side: copy the block out, then free it (the worker only created it)."""
  name, dtype, shape = block
  shm = shared_memory.SharedMemory(name=name)
  try:
    return np.ndarray(shape, np.dtype(dtype), buffer=shm.buf).copy()
  finally:
    shm.close()
    shm.unlink()


def _discard(future: cf.Future) -> None:
  """Frees the shared block of a study that will not be consumed (the stream was closed)."""
  try:
    _, block, _ = future.result()
    _take_shared(block)
  except BaseException:  # noqa: BLE001 - nothing to free
    pass


def read_studies(folders: Sequence[pathlib.Path], workers: int = 0, depth: int = 2
                 ) -> Iterator[Item]:
  """Yields (folder, Series or None, error or None, decode seconds) in the order of ``folders``.

  ``workers == 0`` reads in one background thread (overlaps with the models only); ``workers > 0``
  decodes that many studies at once in spawned processes.
  """
  folders = list(folders)
  if workers <= 0 or len(folders) <= 1:
    yield from prefetched(folders, lambda f: dicom.read_series(f, warn=False), depth)
    return
  # spawn: the parent has JAX's threads running, which fork must not copy.
  ctx = multiprocessing.get_context("spawn")
  with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
    ahead = workers + max(depth, 0)
    futures = collections.deque(pool.submit(_read_to_shared, f) for f in folders[:ahead])
    submitted = len(futures)
    try:
      for folder in folders:
        future = futures.popleft()
        try:
          header, block, seconds = future.result()
          series = dataclasses.replace(header, volume=_take_shared(block))
          got: Item = (folder, series, None, seconds)
        except Exception as e:  # noqa: BLE001 - handed to the consumer with its folder
          got = (folder, None, e, 0.0)
        if submitted < len(folders):
          futures.append(pool.submit(_read_to_shared, folders[submitted]))
          submitted += 1
        yield got
    finally:
      for future in futures:
        if not future.cancel():
          _discard(future)
