"""The pipeline's training step: a model config resolved against the run folder, trained, plotted."""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections

from cspine_jax.report import plots
from cspine_jax.train import loop


def model_config(config: ml_collections.ConfigDict, name: str,
                 run_dir: pathlib.Path) -> ml_collections.ConfigDict:
  """``config.models[name]`` as a plain config (references resolved), its encoder starting from
  the same fold of the model ``config.init_from[name]`` names (a run folder of this pipeline)."""
  m = ml_collections.ConfigDict(config.models[name].to_dict())
  init_from = config.get("init_from", {}).get(name, "")
  if init_from:
    if init_from not in config.models:
      raise ValueError(f"init_from.{name}={init_from!r}: no such model in config.models")
    if init_from == "box_refine" and not config.get("refine_boxes", False):
      raise ValueError(f"init_from.{name}='box_refine' needs refine_boxes=True (without it no box "
                       "refiner is trained)")
    source = config.models[init_from]
    # train_and_evaluate trains a single fold with one model in the run folder itself.
    one_folder = source.fold >= 0 and source.train.get("members", 1) == 1
    m.model.pretrained = str(run_dir / init_from / ("" if one_folder else "fold_{fold}"))
  return m


def learning_curves(run_dir: pathlib.Path, name: str) -> None:
  """learning_curves.png beside every log of a trained model, and one over its folds."""
  logs = [p for p in sorted(run_dir.rglob("log.jsonl")) if p.stat().st_size > 0]
  for log in logs:
    fold = log.parent.name if log.parent != run_dir else "fold"
    plots.learning_curves({f"{name}/{fold}": log}, log.parent / "learning_curves.png")
  folds = {
      f"{name}/{p.parent.name}": p for p in logs
      if p.parent.name.startswith("fold_") and "_member_" not in p.parent.name
  }
  if folds:
    plots.learning_curves(folds, run_dir / "learning_curves.png")


def train(config: ml_collections.ConfigDict, run_dir: pathlib.Path,
          records_dir: pathlib.Path) -> dict[str, Any]:
  """Trains (or resumes) the model and draws its learning curves (process 0)."""
  result = loop.train_and_evaluate(config, run_dir, records_dir)
  if jax.process_index() == 0:
    learning_curves(run_dir, config.model.get("name", config.task))
  return result
