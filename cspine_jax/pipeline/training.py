"""The pipeline's training step: a model config resolved against the run folder, trained, plotted."""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections

from cspine_jax.models import pretrained
from cspine_jax.report import plots
from cspine_jax.train import loop
from cspine_jax.train import warm_start


def model_config(config: ml_collections.ConfigDict, name: str,
                 run_dir: pathlib.Path) -> ml_collections.ConfigDict:
  """``config.models[name]`` as a plain config (references resolved), its encoder starting from
  the same fold of the model ``config.init_from[name]`` names (a run folder of this pipeline).

  With ``config.require_pretrained``, a full-size encoder (not a test size) must start from
  weights: ``model.pretrained`` unset is refused (``"none"`` says a random start is meant)."""
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
  if config.get("require_pretrained", False):
    _check_pretrained(name, m.model)
  return m


def _check_pretrained(name: str, model: ml_collections.ConfigDict) -> None:
  """Refuses a full-size encoder that would start from random weights without saying so."""
  encoder = model.get("encoder")
  if not encoder or model.get("pretrained") or pretrained.is_test_size(encoder):
    return
  tag = pretrained.SEED_TAGS.get(encoder, "<timm tag>")
  raise ValueError(
      f"models.{name}: its {encoder} encoder would start from random weights, and this method "
      f"requires pretrained ones (require_pretrained=True): set models.{name}.model.pretrained="
      f"'{pretrained.TIMM_SCHEME}{tag}' (after `{pretrained.fetch_command(tag)}`), or "
      f"'{warm_start.RANDOM_INIT}' for a random start on purpose")


def learning_curves(run_dir: pathlib.Path, name: str) -> None:
  """learning_curves.png beside every log of a trained model, and one over all its runs (a panel
  per fold and member)."""
  logs = [p for p in sorted(run_dir.rglob("log.jsonl")) if p.stat().st_size > 0]
  for log in logs:
    fold = log.parent.name if log.parent != run_dir else "fold"
    plots.learning_curves({f"{name}/{fold}": log}, log.parent / "learning_curves.png")
  runs = {f"{name}/{p.parent.name}": p for p in logs if p.parent.name.startswith("fold_")}
  if runs:
    plots.learning_curves(runs, run_dir / "learning_curves.png")


def train(config: ml_collections.ConfigDict, run_dir: pathlib.Path,
          records_dir: pathlib.Path) -> dict[str, Any]:
  """Trains (or resumes) the model and draws its learning curves (process 0)."""
  result = loop.train_and_evaluate(config, run_dir, records_dir)
  if jax.process_index() == 0:
    learning_curves(run_dir, config.model.get("name", config.task))
  return result
