"""Files written whole or not at all: under a temporary name in the same folder, then renamed.

A reader (the next step, a resumed run) finds either the old file or the complete new one, never
a torn one. A killed writer leaves only a ``<name>.tmp-<pid>`` file, which the next writer of the
same name does not read.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
from typing import Any, Iterator

import pandas as pd

TMP_MARK = ".tmp-"


def temporary(path: str | os.PathLike) -> pathlib.Path:
  """The temporary name ``path`` is written under by this process."""
  path = pathlib.Path(path)
  return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[Any]:
  """``open`` on a temporary name; renamed over ``path`` when the block ends without an error,
  removed when it raises."""
  tmp = temporary(path)
  try:
    with open(tmp, mode, **open_kwargs) as f:
      yield f
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  with replacing(path, encoding="utf-8") as f:
    f.write(text)
  return pathlib.Path(path)


def write_json(path: str | os.PathLike, data: Any, **json_kwargs: Any) -> pathlib.Path:
  """``data`` as JSON (indented one space unless ``indent`` says otherwise), newline-terminated."""
  json_kwargs.setdefault("indent", 1)
  return write_text(path, json.dumps(data, **json_kwargs) + "\n")


def write_csv(frame: pd.DataFrame, path: str | os.PathLike, **to_csv_kwargs: Any) -> pathlib.Path:
  with replacing(path, newline="") as f:
    frame.to_csv(f, **to_csv_kwargs)
  return pathlib.Path(path)
