"""One model's training as pipeline steps (``configs/stage2.py`` and the other model configs).

data (``config.data_dir``; none: a small synthetic set generated once beside the workdir and
shared by later runs) -> the task's records (``config.records_dir``, default WORKDIR/records;
prepared when missing) -> training (every fold with ``config.fold=-1``) -> WORKDIR/result.json.
Process 0 makes what is missing while the others wait for it, and alone writes the result and
says what the training did (where it resumed, or that it had nothing left to train).
"""
from __future__ import annotations

import pathlib
from typing import Callable

import jax
import ml_collections

from cspine_jax.io import files
from cspine_jax.pipeline import data
from cspine_jax.pipeline import steps as steps_lib
from cspine_jax.pipeline import training
from cspine_jax.train import loop

RESULT = "result.json"


def locations(config: ml_collections.ConfigDict,
              workdir: pathlib.Path) -> tuple[pathlib.Path | None, pathlib.Path, bool]:
  """(data folder or None, records folder, whether the data folder is a generated one)."""
  data_dir, records_dir = config.get("data_dir"), config.get("records_dir")
  if records_dir is None and data_dir is None:
    syn = config.synthetic
    cache = workdir.absolute().parent / (f"synthetic_{syn.num_studies}_{syn.seed}_{syn.size}_"
                                         f"{syn.segmented_fraction:g}")
    return cache / "rsna", cache / "records", True
  records_dir = pathlib.Path(records_dir) if records_dir else workdir / "records"
  return (pathlib.Path(data_dir) if data_dir else None), records_dir, False


def build(config: ml_collections.ConfigDict, workdir: pathlib.Path,
          log: Callable[[str], None] = print) -> list[steps_lib.Step]:
  data_dir, records_dir, generated = locations(config, workdir)
  task = config.task
  out = []
  if generated:
    out.append(
        steps_lib.Step(
            "data", "generate synthetic studies", lambda: data.on_first_process(
                lambda: data.generate(config.synthetic, data_dir), "data"),
            outputs=(str(data_dir / "train.csv"),), identity=config.synthetic.to_dict()))

  def records():
    if data.has_records(records_dir, task):
      return None
    if data_dir is None:
      raise FileNotFoundError(f"{records_dir / task}: no records (manifest.json) and no data_dir "
                              "to prepare them from")
    options = data.options_of(config.prepare)
    vf = config.get("vertebrae_file")
    return data.on_first_process(
        lambda: data.prepare(data_dir, records_dir, task, options, workers=max(
            1, config.input.workers), vertebrae_file=pathlib.Path(vf)
                             if vf else None, log=log), f"records {task}")

  out.append(
      steps_lib.Step(
          f"records_{task}", f"{task} records", records, inputs=(str(data_dir),) if data_dir else
          (), outputs=(str(records_dir / task / "manifest.json"),), identity={
              "prepare": config.prepare.to_dict(), "records": str(records_dir),
              "vertebrae": config.get("vertebrae_file")
          }))

  def train():
    # The loop's notes (resumed at step N, nothing left to train) through this pipeline's log.
    result = loop.train_and_evaluate(config, workdir, records_dir, log=log)
    if jax.process_index() == 0:
      training.learning_curves(workdir, config.model.get("name", task))
      files.write_json(workdir / RESULT, result, default=str)
      log(f"result: {workdir / RESULT}")
    return result

  out.append(
      steps_lib.Step("train", f"train {config.model.get('name', task)}", train, inputs=(str(
          records_dir / task),), outputs=(str(workdir / RESULT),), identity=config.to_dict()))
  return out
