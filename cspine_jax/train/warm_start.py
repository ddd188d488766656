"""Where a model's image encoder starts: ImageNet weights, or another run's encoder of the same fold.

``config.model.pretrained`` names ImageNet weights by their timm tag (``"timm:<tag>"``, found in
the local caches that ``python -m cspine_jax.weights fetch <tag>`` fills; never downloaded here), a
timm file or an imported folder (``models.pretrained``), or a training run folder (one holding
``checkpoints/``), whose model's encoder is copied. ``{fold}`` in the path becomes the fold being
trained, so stage 2 of fold k can start from the encoder another model learned on fold k's
training studies; a run of another fold is refused, since its model trained on this fold's
validation studies. ``"none"`` (like None) is a random start, said explicitly.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from absl import logging
from flax import nnx

from cspine_jax.models import pretrained
from cspine_jax.train import checkpoints


def read_run_folder(folder: str | pathlib.Path) -> tuple[dict[str, Any], pretrained.Converted]:
  """The image encoder of a training run folder (``<workdir>/fold_k``, which holds
  ``checkpoints/``): (its checkpoint meta plus "family", {Flax path: (array, origin)}).

  The best-scored kept step, else the latest (``checkpoints.restore_model``). Raises
  WeightsError when nothing can be restored or the model has no image encoder.
  """
  folder = pathlib.Path(folder).resolve()
  try:
    model, meta = checkpoints.restore_model(folder)
  except (checkpoints.NoCheckpointError, checkpoints.CheckpointMismatchError) as e:
    raise pretrained.WeightsError(f"{folder}: cannot restore its model: {e}") from e
  name = meta.get("model", {}).get("name", "?")
  encoder = getattr(model, "encoder", None)
  if encoder is None:
    raise pretrained.WeightsError(f"{folder}: its {name!r} model has no image encoder to take "
                                  "weights from")
  meta = dict(meta, model=name, family=pretrained.family_of(encoder).name)
  arrays = pretrained.encoder_arrays(encoder)
  return meta, {k: (v, f"{folder.name}@{meta['step']}:{k}") for k, v in arrays.items()}


# config.model.pretrained: a random start, said explicitly (a method that requires pretrained
# encoders accepts it where it refuses an unset field).
RANDOM_INIT = "none"


def load_encoder(encoder: nnx.Module, path: str | pathlib.Path) -> pretrained.LoadReport:
  """Copies weights into ``encoder`` from a timm tag (``"timm:<tag>"``), a timm file, an imported
  folder or a run folder; the report's ``fold`` is the run's held-out fold (None for ImageNet
  weights)."""
  if not (pathlib.Path(path).is_dir() and (pathlib.Path(path) / "checkpoints").is_dir()):
    return pretrained.load_pretrained(encoder, path)  # "timm:<tag>" stays a string
  path = pathlib.Path(path)
  meta, converted = read_run_folder(path)
  family = pretrained.family_of(encoder).name
  if meta["family"] != family:
    raise pretrained.WeightsError(f"{path}: its {meta['model']} model has a {meta['family']} "
                                  f"encoder; this encoder is {family}")
  return dataclasses.replace(pretrained.assign(encoder, converted, str(path)),
                             fold=meta.get("fold"))


def init_encoder(model: nnx.Module, path: str, fold: int | None,
                 model_name: str | None = None) -> pretrained.LoadReport | None:
  """``model``'s encoder from ``path`` (``{fold}`` filled in), refusing a run of another fold;
  None (the model left as built) for ``"none"``."""
  if path == RANDOM_INIT:
    logging.info("encoder of %s: random init (model.pretrained=%r)", model_name, path)
    return None
  if "{fold}" in path:
    if fold is None:
      raise ValueError(f"model.pretrained={path}: '{{fold}}' needs a fold to train")
    path = path.replace("{fold}", str(fold))
  encoder = getattr(model, "encoder", None)
  if encoder is None:
    raise ValueError(f"model.pretrained={path}: model {model_name!r} has no image encoder to load "
                     "weights into")
  report = load_encoder(encoder, path)
  if fold is not None and report.fold is not None and report.fold != fold:
    raise ValueError(f"model.pretrained={path}: a model trained for fold {report.fold} (it saw "
                     f"fold {fold}'s validation studies) cannot start fold {fold}; use "
                     "'fold_{fold}' in the path")
  logging.info("encoder weights from %s (%d tensors)", report.source, report.num_tensors)
  return report
