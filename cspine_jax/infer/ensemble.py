"""Fold ensembles of trained models, as inference and the pseudo-labels call them.

A :class:`FoldEnsemble` holds the fold models of one task (their checkpoints' best steps) and
averages their predictions, or answers with the one model that held a fold out; the scorers wrap
it as the plain callables ``localize`` takes.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any
from typing import Callable
from typing import Mapping
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from cspine_jax import aggregate
from cspine_jax.inputs import augment as augment_lib
from cspine_jax.localize import derive as derive_lib
from cspine_jax.localize import refine as refine_lib
from cspine_jax.pp import options as options_lib
from cspine_jax.train import checkpoints as ckpt_lib
from cspine_jax.train import steps as steps_lib
from cspine_jax.train import tasks as tasks_lib


class PredictError(ValueError):
  """Inference that cannot start (no studies, a bad run folder, a bad prior)."""


# ----------------------------------------------------------------------------- the two stages


def in_batches(fn: Callable[..., Any], arrays: Sequence[np.ndarray],
               batch_size: int) -> list[np.ndarray]:
  """``fn(*chunks)`` over fixed-size batches of the equally long ``arrays`` (the last batch padded
  by repeating its final row, so a jitted model sees one shape); each output trimmed back and
  concatenated."""
  outs = []
  for start in range(0, len(arrays[0]), batch_size):
    chunks = [a[start:start + batch_size] for a in arrays]
    n = len(chunks[0])
    if n < batch_size:
      chunks = [np.concatenate([c, np.repeat(c[-1:], batch_size - n, 0)]) for c in chunks]
    got = fn(*chunks)
    got = got if isinstance(got, tuple) else (got,)
    outs.append(tuple(np.asarray(g)[:n] for g in got))
  return [np.concatenate(parts) for parts in zip(*outs)]


def fold_dirs(stage_dir: str | os.PathLike) -> list[pathlib.Path]:
  """Run folders of a stage: ``fold_k/`` sub-folders with checkpoints, or the folder itself."""
  stage_dir = pathlib.Path(stage_dir)
  folds = sorted((d for d in stage_dir.glob("fold_*") if (d / "checkpoints").is_dir()),
                 key=lambda d: d.name)
  if folds:
    return folds
  if (stage_dir / "checkpoints").is_dir():
    return [stage_dir]
  raise PredictError(f"{stage_dir}: no trained model (expected fold_*/checkpoints/ or "
                     "checkpoints/)")


def restore_model(run_dir: str | os.PathLike, step: int | None = None):
  """``train.checkpoints.restore_model`` with its errors worded as a :class:`PredictError`."""
  try:
    return ckpt_lib.restore_model(run_dir, step)
  except (ckpt_lib.NoCheckpointError, ckpt_lib.CheckpointMismatchError) as e:
    raise PredictError(str(e)) from e


class FoldEnsemble:
  """The fold models of one task; calling it averages their probabilities (the method's rule).

  ``ensemble(batch)`` takes a dict of numpy arrays holding the task's uint8 image field (and the
  fields its model reads, e.g. stage 2's ``vertebra``) and returns the task's predictions averaged
  over the folds (``train.tasks``: stage 1 ``presence_prob``/``box_pred``, stage 2 ``prob``, ...).
  Images are normalised exactly as in training, on the device (``inputs.augment.device_inputs``).
  """

  def __init__(self, members: Sequence[tuple[Any, Mapping[str, Any]]], task: str):
    """``members``: (model, meta) pairs (meta: the checkpoint's, holding "fold" and "task")."""
    if not members:
      raise PredictError(f"a {task} ensemble needs at least one model")
    self.metas = [dict(m) for _, m in members]
    wrong = [m.get("task") for m in self.metas if m.get("task") not in (None, task)]
    if wrong:
      raise PredictError(f"fold models of task {wrong[0]!r} given for a {task} ensemble")
    self.task = tasks_lib.get(task)
    self.field = self.task.input_field
    for model, _ in members:
      model.eval()
    self.graphdef, _ = nnx.split(members[0][0])
    self.states = [nnx.split(m)[1] for m, _ in members]

    def forward(state, batch):
      model = nnx.merge(self.graphdef, state)
      x, kwargs = self.task.model_inputs(augment_lib.device_inputs(batch, self.field))
      return self.task.predict(model(x, **kwargs))

    # The train steps' CPU compiler options: predict on CPU runs the same programs as validation.
    self._forward = jax.jit(forward,
                            compiler_options=steps_lib.compiler_options(jax.devices()[0].platform))

  @classmethod
  def load(cls, stage_dir: str | os.PathLike, task: str) -> "FoldEnsemble":
    """Every fold model trained under ``stage_dir`` (fold_*/checkpoints, best step each)."""
    return cls([restore_model(d) for d in fold_dirs(stage_dir)], task)

  def __len__(self) -> int:
    return len(self.states)

  def record_options(self) -> options_lib.Options | None:
    """The preprocessing options of the records the members trained on (their checkpoints'
    meta); None for checkpoints that predate the field. Members that disagree are refused."""
    found = {json.dumps(m.get("record_options"), sort_keys=True) for m in self.metas}
    if len(found) > 1:
      raise PredictError(f"the {self.task.name} fold models were trained on records made with "
                         f"different options: {sorted(found)}")
    options = self.metas[0].get("record_options")
    return None if options is None else options_lib.Options.from_json(options)

  @property
  def folds(self) -> list[int | None]:
    """The held-out fold of each member (from its checkpoint meta)."""
    return [m.get("fold") for m in self.metas]

  def __call__(self, batch: Mapping[str, np.ndarray],
               fold: int | None = None) -> dict[str, np.ndarray]:
    """Averaged predictions; ``fold=k`` uses only the model that held fold k out (out-of-fold)."""
    images = np.asarray(batch[self.field])
    if images.dtype != np.uint8:
      raise TypeError(f"{self.field} is {images.dtype}, expected uint8 pixels")
    batch = dict(batch, **{self.field: images})
    states = self.states
    if fold is not None:
      states = [s for s, f in zip(self.states, self.folds) if f == fold]
      if not states:
        raise PredictError(f"no fold model held out fold {fold} (members: {self.folds})")
    # One host->device copy for every member, all members dispatched before any result is read.
    batch = jax.device_put(batch)
    outs = jax.device_get([self._forward(s, batch) for s in states])
    return {k: aggregate.ensemble_mean([o[k] for o in outs]) for k in outs[0]}


def stage1_scorer(stage1: FoldEnsemble, fold: int | None = None) -> derive_lib.Stage1Fn:
  """The stage-1 ensemble (or, ``fold=k``, the model that held fold k out) as a scorer: uint8
  images -> (presence probabilities, normalised boxes)."""

  def fn(images):
    out = stage1({"image": images}, fold=fold)
    return out["presence_prob"], out["box_pred"]

  return fn


def refine_scorer(refiner: FoldEnsemble, fold: int | None = None) -> refine_lib.RefineFn:
  """The box-refiner ensemble (or, ``fold=k``, the model that held fold k out) as a refiner:
  uint8 crops -> boxes (N, 7, 4) in crop coordinates."""

  def fn(images):
    return refiner({"image": images}, fold=fold)["boxes_pred"]

  return fn
