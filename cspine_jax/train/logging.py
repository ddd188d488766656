"""Run logs: JSON lines (``workdir/log.jsonl``) and TensorBoard events (tensorboardX), process 0 only."""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any
from typing import Mapping

import jax
import tensorboardX

from cspine_jax.io import files


def _plain(v: Any) -> Any:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return f if math.isfinite(f) else str(f)


class MetricWriter:
  """Appends ``{"step": s, **scalars}`` lines to log.jsonl and the same scalars to TensorBoard."""

  def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / "log.jsonl"
    self.active = jax.process_index() == 0
    self._tb = None
    if self.active:
      self.workdir.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        self._tb = tensorboardX.SummaryWriter(str(self.workdir / "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, Any], **fields: Any) -> None:
    if not self.active:
      return
    row = {"step": int(step), **fields, **{k: _plain(v) for k, v in scalars.items()}}
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        v = _plain(v)
        if isinstance(v, float):
          self._tb.add_scalar(k, v, int(step))

  def truncate_after(self, step: int) -> None:
    """Drops lines logged after ``step`` (a resumed run repeats them from its checkpoint)."""
    if not self.active or not self.path.exists():
      return
    keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    files.write_text(self.path, "".join(line + "\n" for line in keep))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
