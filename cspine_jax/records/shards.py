"""ArrayRecord shards written atomically, and the manifest that describes a record set.

A shard is written under a temporary name in the same folder and renamed into place only when it is
complete and closed, so a killed run leaves either a whole shard or a temporary file (removed by
the next run), never a half shard under a final name. The manifest is written last, the same way.
Shards use ``group_size:1`` so grain / tfds can read any record directly (random access).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from array_record.python import array_record_module

from cspine_jax.io import files
from cspine_jax.records import schema

SHARD_SUFFIX = ".array_record"
MANIFEST = "manifest.json"
TMP_MARK = files.TMP_MARK
# Random access per record; snappy costs little CPU and shrinks padded / dark images.
WRITER_OPTIONS = "group_size:1,snappy"


def write_shard(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
  """Encodes and writes ``records`` to ``path`` atomically; returns how many were written.

  If the iterable raises, the temporary file is removed and the exception propagates.
  """
  path = pathlib.Path(path)
  tmp = files.temporary(path)
  writer = array_record_module.ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
  count = 0
  try:
    for record in records:
      writer.write(schema.encode(record))
      count += 1
  except BaseException:
    writer.close()
    tmp.unlink(missing_ok=True)
    raise
  writer.close()
  os.replace(tmp, path)
  return count


def num_records(path: str | os.PathLike) -> int:
  reader = array_record_module.ArrayRecordReader(str(path))
  try:
    return reader.num_records()
  finally:
    reader.close()


def read_shard(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
  """Decodes every record of one shard, in order."""
  reader = array_record_module.ArrayRecordReader(str(path))
  try:
    n = reader.num_records()
    for start in range(0, n, 64):
      for data in reader.read(list(range(start, min(n, start + 64)))):
        yield schema.decode(data)
  finally:
    reader.close()


def read_records(paths: Sequence[str | os.PathLike]) -> Iterator[dict[str, Any]]:
  for p in paths:
    yield from read_shard(p)


def canonical(record: dict[str, Any]) -> tuple:
  """A hashable, order-free form of a decoded record (compare record sets as multisets).

  Arrays become (dtype, shape, bytes); bytes become str (TFDS returns strings as bytes); numpy
  scalars become Python values.
  """
  out = []
  for k, v in sorted(record.items()):
    if isinstance(v, np.ndarray) and v.ndim > 0:
      v = (v.dtype.name, v.shape, v.tobytes())
    elif isinstance(v, (np.ndarray, np.generic)):
      v = v.item()
    if isinstance(v, bytes):
      v = v.decode()
    out.append((k, v))
  return tuple(out)


def write_json(path: str | os.PathLike, data: Any) -> None:
  """Writes JSON atomically (temporary name, then rename)."""
  files.write_json(path, data, sort_keys=True)


def read_json(path: str | os.PathLike) -> Any:
  try:
    return json.loads(pathlib.Path(path).read_text())
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON: {e}") from e


def remove_temporaries(folder: str | os.PathLike) -> list[str]:
  """Deletes files left by a killed writer (``*.tmp-<pid>``); returns their names."""
  removed = []
  for p in pathlib.Path(folder).iterdir():
    if TMP_MARK in p.name and p.is_file():
      p.unlink()
      removed.append(p.name)
  return removed


def read_manifest(task_dir: str | os.PathLike) -> dict[str, Any]:
  """The manifest of a finished record set; ValueError when missing or from another schema."""
  path = pathlib.Path(task_dir) / MANIFEST
  if not path.is_file():
    raise ValueError(f"{path}: no manifest; the record set is unfinished "
                     "(re-run data_prep.prepare)")
  manifest = read_json(path)
  if manifest.get("schema_version") != schema.SCHEMA_VERSION:
    raise ValueError(f"{path}: schema_version {manifest.get('schema_version')}, this code reads "
                     f"{schema.SCHEMA_VERSION}; re-run data_prep.prepare")
  return manifest


def shard_paths(task_dir: str | os.PathLike) -> list[pathlib.Path]:
  """The shards listed in a finished record set's manifest, in manifest order."""
  task_dir = pathlib.Path(task_dir)
  return [task_dir / s["file"] for s in read_manifest(task_dir)["shards"]]
