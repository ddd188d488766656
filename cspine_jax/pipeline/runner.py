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

import jax
import ml_collections

from cspine_jax.pipeline import method
from cspine_jax.pipeline import model
from cspine_jax.pipeline import steps as steps_lib
from cspine_jax.train import runtime


def check_one_process(count: int) -> None:
  """The method's data, pseudo-label and evaluation steps run in one process; several processes
  would each run them over the same workdir."""
  if count > 1:
    raise ValueError(
        f"a method config (the whole pipeline) runs in one JAX process, not {count}: run its "
        "steps that train on several processes with their model configs (launch.py "
        "--config=configs/stage2.py --config.records_dir=... on every process), and the others "
        "(records, pseudo-labels, evaluation, predict) in one process")


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
    check_one_process(jax.process_count())
    outcome = steps_lib.run(method.build(config, workdir, log), workdir, log=log,
                            only=steps_of(config))
    return method.summarize(outcome, config, workdir, log)
  if "task" not in config:
    raise ValueError("a config needs 'models' (the whole method) or 'task' (one model)")
  runtime.start()
  outcome = steps_lib.run(model.build(config, workdir, log), workdir, log=log)
  return outcome.results["train"]
