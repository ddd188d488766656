"""``run(config, workdir)``: what ``launch.py`` does with one config.

A method config (one with ``models``, e.g. ``configs/demo.py``) runs the whole method
(``pipeline.method``); a model config (one with ``task``, e.g. ``configs/stage2.py``) trains that
model (``pipeline.model``). Either way the process is set up once first (``train.runtime``).
"""
from __future__ import annotations

import os
import pathlib
from typing import Any
from typing import Callable

import ml_collections

from cspine_jax.pipeline import method
from cspine_jax.pipeline import model
from cspine_jax.pipeline import steps as steps_lib
from cspine_jax.train import runtime


def is_method(config: ml_collections.ConfigDict) -> bool:
  return "models" in config


def steps_of(config: ml_collections.ConfigDict) -> list[str] | None:
  """``config.steps`` ("stage2,evaluate": those steps alone, whatever their state) as a list;
  None (every step that is not done) when empty."""
  names = [s.strip() for s in str(config.get("steps", "") or "").split(",") if s.strip()]
  return names or None


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
        log: Callable[[str], None] = print) -> Any:
  """Runs the config's steps in ``workdir``; returns the method's figures (also in
  WORKDIR/results.json) or the model's training summary (WORKDIR/result.json)."""
  workdir = pathlib.Path(workdir).absolute()
  if is_method(config):
    runtime.start(cache_dir=workdir / "jax_cache")
    outcome = steps_lib.run(method.build(config, workdir, log), workdir, log=log,
                            only=steps_of(config))
    return method.summarize(outcome, config, workdir, log)
  if "task" not in config:
    raise ValueError("a config needs 'models' (the whole method) or 'task' (one model)")
  runtime.start()
  outcome = steps_lib.run(model.build(config, workdir, log), workdir, log=log)
  return outcome.results["train"]
