"""One versioned, explicit encoding for every record set (writers and readers share it).

A record is a flat ``dict`` of named numpy arrays and plain scalars/strings. On disk:

    b"CSPR" | uint16 schema version | uint32 header length | JSON header | raw array bytes

The JSON header lists each array's name, dtype, shape and byte range, plus the non-array fields.
Nothing is pickled: decoding only ever calls ``np.frombuffer`` on whitelisted dtypes, so a record
read back from disk can never execute code.
"""
from __future__ import annotations

import json
import struct
from typing import Any, Mapping

import numpy as np

MAGIC = b"CSPR"
SCHEMA_VERSION = 1
_HEAD = struct.Struct("<4sHI")  # magic, version, header length
_ALLOWED_DTYPES = frozenset(
    ["uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64", "bool"])


class RecordError(ValueError):
  """A record that cannot be decoded (truncated, foreign, or from another schema version)."""


def encode(record: Mapping[str, Any]) -> bytes:
  """Serialises a flat dict of arrays / scalars / strings."""
  arrays, meta, chunks, offset = [], {}, [], 0
  for name, value in record.items():
    if isinstance(value, np.ndarray):
      dtype = value.dtype.name
      if dtype not in _ALLOWED_DTYPES:
        raise TypeError(f"field {name!r}: dtype {dtype} is not allowed in records")
      buf = np.ascontiguousarray(value).tobytes()
      arrays.append({"name": name, "dtype": dtype, "shape": list(value.shape),
                     "offset": offset, "nbytes": len(buf)})
      chunks.append(buf)
      offset += len(buf)
    elif isinstance(value, (bool, int, float, str)) or value is None:
      meta[name] = value
    elif isinstance(value, (np.integer, np.floating, np.bool_)):
      meta[name] = value.item()
    else:
      raise TypeError(f"field {name!r}: type {type(value).__name__} cannot be encoded")
  header = json.dumps({"arrays": arrays, "meta": meta}, separators=(",", ":")).encode()
  return _HEAD.pack(MAGIC, SCHEMA_VERSION, len(header)) + header + b"".join(chunks)


def decode(data: bytes) -> dict[str, Any]:
  """Inverse of :func:`encode`; raises :class:`RecordError` on anything malformed."""
  if len(data) < _HEAD.size:
    raise RecordError(f"record of {len(data)} bytes is shorter than its header")
  magic, version, header_len = _HEAD.unpack_from(data, 0)
  if magic != MAGIC:
    raise RecordError(f"not a cspine_jax record (magic {magic!r})")
  if version != SCHEMA_VERSION:
    raise RecordError(f"record schema version {version}, this code reads version {SCHEMA_VERSION}; "
                      "re-run data_prep.prepare")
  start = _HEAD.size + header_len
  if len(data) < start:
    raise RecordError("record truncated inside its header")
  try:
    header = json.loads(data[_HEAD.size:start])
  except ValueError as e:
    raise RecordError(f"record header is not valid JSON: {e}") from e
  out: dict[str, Any] = dict(header["meta"])
  body = memoryview(data)[start:]
  for spec in header["arrays"]:
    if spec["dtype"] not in _ALLOWED_DTYPES:
      raise RecordError(f"field {spec['name']!r}: dtype {spec['dtype']} not allowed")
    lo, n = spec["offset"], spec["nbytes"]
    if lo + n > len(body):
      raise RecordError(f"field {spec['name']!r} truncated ({len(body) - lo} of {n} bytes)")
    arr = np.frombuffer(body[lo:lo + n], dtype=spec["dtype"]).reshape(spec["shape"])
    out[spec["name"]] = arr
  return out
