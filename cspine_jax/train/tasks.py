"""What differs between the trained models: inputs, loss, predictions, and the validation score.

A :class:`Task` tells the generic step/loop code which batch field feeds the model, how its outputs
become a loss (``losses``) and probabilities, which fields travel with the predictions through the
device (so every host sees the whole evaluated batch), and how the held-out predictions become the
per-study wide frame scored by ``metrics.competition_loss``.

Model outputs accepted (``models.make_model``): stage 2 ``(B,)``/``(B, 1)`` logits; 3D CNN ``(B, 8)``
logits; slice models a dict with ``presence`` (or ``vertebra``) (B, 7) and ``fracture`` (B, 7 or 8)
logits, or a ``(B, 14)`` array (presence then fracture); stage 1 a dict with ``presence`` (B, 7)
logits, ``box`` (B, 4) normalised box and optionally ``area_logits`` (or ``area`` as logits), or
the seed's head: ``box`` (B, 4) and ``ratio`` (B, 7), both regressed as they are.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any
from typing import Callable
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from cspine_jax import aggregate
from cspine_jax import labels as labels_lib
from cspine_jax import metrics
from cspine_jax.pp import refine_input
from cspine_jax.train import losses

Array = jax.Array
NV = labels_lib.NUM_VERTEBRAE


def _unpack(outputs: Any, names: tuple[str, ...], sizes: tuple[int, ...]) -> dict[str, Array]:
  """A model's outputs as a dict: from a dict, a tuple in ``names`` order, or one concatenated array."""
  if isinstance(outputs, Mapping):
    missing = [n for n in names if n not in outputs]
    if missing:
      raise ValueError(f"model outputs lack {missing}; got {sorted(outputs)}")
    return {n: outputs[n] for n in outputs}
  if isinstance(outputs, (tuple, list)):
    return dict(zip(names, outputs))
  if outputs.shape[-1] != sum(sizes):
    raise ValueError(f"model output of shape {outputs.shape}; expected last axis {sum(sizes)} "
                     f"({dict(zip(names, sizes))}) or a dict")
  out, start = {}, 0
  for n, k in zip(names, sizes):
    out[n] = outputs[..., start:start + k]
    start += k
  return out


def _log1m_prod(fracture_logits: Array) -> tuple[Array, Array]:
  """log p and log(1 - p) of ``1 - prod(1 - sigmoid(z))`` (any vertebra), computed stably."""
  log_none = jnp.sum(jax.nn.log_sigmoid(-fracture_logits), axis=-1)
  log_any = jnp.log(-jnp.expm1(jnp.minimum(log_none, -1e-7)))
  return log_any, log_none


def fracture_losses(fracture_logits: Array, targets8: Array) -> Array:
  """Per-study metric-weighted BCE over 8 targets from 7 (overall = 1 - prod) or 8 fracture logits."""
  z = fracture_logits.astype(jnp.float32)
  y = targets8.astype(jnp.float32)
  if z.shape[-1] == NV + 1:
    per = losses.bce(z, y)
  else:
    log_any, log_none = _log1m_prod(z)
    overall = -(y[..., 0] * log_any + (1 - y[..., 0]) * log_none)
    per = jnp.concatenate([overall[..., None], losses.bce(z, y[..., 1:])], axis=-1)
  return metrics.weighted_mean(y, per)


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  input_field: str
  # (outputs, batch, mask) -> (loss, metrics dict); runs under jit.
  loss: Callable[[Any, Mapping[str, Array], Array], tuple[Array, dict[str, Array]]]
  # outputs -> dict of probabilities (and boxes), names distinct from the batch fields; under jit.
  predict: Callable[[Any], dict[str, Array]]
  # Batch fields returned with the predictions (labels, ids) for the host-side evaluation.
  carry: tuple[str, ...]
  # Extra model keyword arguments taken from batch fields (kwarg name -> field).
  kwargs: tuple[tuple[str, str], ...] = ()

  def model_inputs(self, batch: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
    return batch[self.input_field], {k: batch[f] for k, f in self.kwargs}


# ---- stage 2: one vertebra sequence per sample --------------------------------------------------
def _stage2_logits(outputs: Any) -> Array:
  z = outputs["logits"] if isinstance(outputs, Mapping) else outputs
  return z.reshape(z.shape[0])


def _stage2_loss(outputs, batch, mask, positive_weight: float | None = None):
  z = _stage2_logits(outputs)
  loss = losses.vertebra_bce(z, batch["label"], mask, positive_weight)
  return loss, {"loss": loss}


STAGE2 = Task("stage2", "images", _stage2_loss,
              lambda out: {"prob": jax.nn.sigmoid(_stage2_logits(out).astype(jnp.float32))},
              ("label", "vertebra"), kwargs=(("vertebra", "vertebra"),))


# ---- 3D CNN: one study per sample, 8 targets ----------------------------------------------------
def _cnn3d_logits(outputs: Any) -> Array:
  return outputs["logits"] if isinstance(outputs, Mapping) else outputs


def _cnn3d_loss(outputs, batch, mask):
  loss = losses.target_bce(_cnn3d_logits(outputs), batch["labels"], mask)
  return loss, {"loss": loss}


CNN3D = Task("cnn3d", "volume", _cnn3d_loss,
             lambda out: {"prob": jax.nn.sigmoid(_cnn3d_logits(out).astype(jnp.float32))},
             ("labels",))


# ---- 2D slice models (single-/multi-head): presence + fracture per slice ------------------------
def _slice_outputs(outputs: Any) -> dict[str, Array]:
  if isinstance(outputs, Mapping) and "vertebra" in outputs and "presence" not in outputs:
    outputs = dict(outputs, presence=outputs["vertebra"])  # models.slice2d names it "vertebra"
  return _unpack(outputs, ("presence", "fracture"), (NV, NV))


def _slices2d_loss(outputs, batch, mask):
  out = _slice_outputs(outputs)
  presence = losses.presence_bce(out["presence"], batch["presence"], mask)
  per = fracture_losses(out["fracture"], losses.slice_targets(batch["fracture"]))
  fracture = jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  loss = presence + fracture
  return loss, {"loss": loss, "presence_bce": presence, "fracture_bce": fracture}


def _slices2d_predict(outputs):
  out = _slice_outputs(outputs)
  frac = out["fracture"].astype(jnp.float32)
  return {"presence_prob": jax.nn.sigmoid(out["presence"].astype(jnp.float32)),
          "fracture_prob": jax.nn.sigmoid(frac[..., -NV:])}


SLICES2D = Task("slices2d", "image", _slices2d_loss, _slices2d_predict, ("presence", "fracture"))


# ---- stage 1: presence (+ area) + box per slice -------------------------------------------------
def _stage1_outputs(outputs: Any) -> dict[str, Array]:
  return _unpack(outputs, ("presence", "box", "area"), (NV, 4, NV))


def _stage1_loss(outputs, batch, mask, box_kind: str = "smooth_l1", box_weight: float = 1.0,
                 presence_pos_weight: float = 1.0, ratio_weight: float = 0.5):
  if isinstance(outputs, Mapping) and "ratio" in outputs:
    return _stage1_ratio_loss(outputs, batch, mask, box_kind, box_weight, ratio_weight)
  out = _stage1_outputs(outputs)
  presence = losses.presence_bce(out["presence"], batch["presence"], mask, presence_pos_weight)
  shown = (jnp.max(batch["presence"], axis=-1) > 0).astype(jnp.float32) * mask
  box = losses.box_loss(out["box"], batch["box"], shown, box_kind)
  loss = presence + box_weight * box
  metrics_ = {"presence_bce": presence, "box_loss": box}
  # models.stage1 returns probabilities as "area" and the logits as "area_logits".
  area_logits = out.get("area_logits", out.get("area"))
  if area_logits is not None and "area" in batch:
    area = losses.presence_bce(area_logits, batch["area"], mask)
    loss = loss + area
    metrics_["area_bce"] = area
  metrics_["loss"] = loss
  return loss, metrics_


def _stage1_ratio_loss(outputs, batch, mask, box_kind: str, box_weight: float,
                       ratio_weight: float):
  """The seed's stage-1 loss ("box_ratio"): ``box_weight`` x the box loss over the images whose
  largest area ratio exceeds 0.5 + ``ratio_weight`` x the L1 of the seven ratios."""
  shown = (jnp.max(batch["area"], axis=-1) > 0.5).astype(jnp.float32) * mask
  box = losses.box_loss(outputs["box"], batch["box"], shown, box_kind)
  ratio = losses.ratio_l1(outputs["ratio"], batch["area"], mask)
  loss = box_weight * box + ratio_weight * ratio
  return loss, {"box_loss": box, "ratio_l1": ratio, "loss": loss}


def _stage1_predict(outputs):
  if isinstance(outputs, Mapping) and "ratio" in outputs:
    # The seed's rule: its regressed ratios stand for presence, clipped like the boxes.
    return {"presence_prob": jnp.clip(outputs["ratio"].astype(jnp.float32), 0.0, 1.0),
            "box_pred": jnp.clip(outputs["box"].astype(jnp.float32), 0.0, 1.0)}
  out = _stage1_outputs(outputs)
  return {"presence_prob": jax.nn.sigmoid(out["presence"].astype(jnp.float32)),
          "box_pred": out["box"].astype(jnp.float32)}


STAGE1 = Task("stage1", "image", _stage1_loss, _stage1_predict, ("presence", "box"))


# ---- box refinement: one vertebra's box in its crop ---------------------------------------------
def _own_box(outputs: Array, vertebra: Array) -> Array:
  """(B, 7, 4) boxes -> (B, 4): the row of the vertebra each crop was made for."""
  v = jnp.clip(vertebra.astype(jnp.int32), 0, NV - 1)
  return jnp.take_along_axis(outputs, v[:, None, None], axis=1)[:, 0]


def _box_refine_loss(outputs, batch, mask, box_kind: str = "smooth_l1"):
  box = losses.box_loss(_own_box(outputs, batch["vertebra"]), batch["box"], mask, box_kind)
  return box, {"box_loss": box, "loss": box}


def _box_refine_predict(outputs):
  return {"boxes_pred": outputs.astype(jnp.float32)}


BOX_REFINE = Task("box_refine", "image", _box_refine_loss, _box_refine_predict,
                  ("box", "vertebra"))

TASKS = {t.name: t for t in (STAGE1, STAGE2, CNN3D, SLICES2D, BOX_REFINE)}


def get(name: str, *, box_loss: str = "smooth_l1", box_weight: float = 1.0,
        presence_pos_weight: float = 1.0, ratio_weight: float = 0.5,
        positive_weight: float | None = None) -> Task:
  """The task by name; ``box_loss``/``box_weight`` configure stage 1's box regression,
  ``presence_pos_weight`` the weight of its positive presence targets and ``ratio_weight`` the
  seed head's ratio L1; ``positive_weight`` stage 2's weight of a fractured vertebra (None: the
  metric's 2, against 1 for a negative)."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
  if name == "stage1":
    return dataclasses.replace(STAGE1, loss=functools.partial(
        _stage1_loss, box_kind=box_loss, box_weight=box_weight,
        presence_pos_weight=presence_pos_weight, ratio_weight=ratio_weight))
  if name == "stage2" and positive_weight is not None:
    return dataclasses.replace(STAGE2, loss=functools.partial(_stage2_loss,
                                                              positive_weight=positive_weight))
  if name == "box_refine":
    return dataclasses.replace(BOX_REFINE, loss=functools.partial(_box_refine_loss,
                                                                  box_kind=box_loss))
  return TASKS[name]


# ---- host-side validation -----------------------------------------------------------------------
def _wide_labels(uids, y8: np.ndarray) -> pd.DataFrame:
  df = pd.DataFrame(np.asarray(y8, np.float64), columns=list(labels_lib.TARGETS))
  df.insert(0, "StudyInstanceUID", list(uids))
  return df


def patient_overall(task: str, vertebra_probs: np.ndarray, *, overall: str = "top_n",
                    top_n: int = aggregate.DEFAULT_TOP_N) -> np.ndarray | None:
  """patient_overall as ``task`` derives it from (S, 7) vertebra probabilities: stage 2 by
  1 - prod over the top-N; the slice models by ``overall`` ("max" or "top_n"); None for the 3D
  CNN, which predicts it itself."""
  if task == "stage2":
    return aggregate.top_n_overall(vertebra_probs, top_n)
  if task == "slices2d":
    return (aggregate.max_overall(vertebra_probs) if overall == "max" else
            aggregate.top_n_overall(vertebra_probs, top_n))
  return None


def study_frames(task: str, collected: Mapping[str, np.ndarray], study_uid: np.ndarray,
                 overall: str = "top_n", top_n: int = aggregate.DEFAULT_TOP_N
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
  """(labels, predictions) wide frames, one row per study, from the gathered evaluation outputs.

  ``collected`` holds ``record_id`` plus the task's predictions and carried fields (padding rows
  already removed); ``study_uid`` maps record ids to studies. ``overall`` is how slice models
  derive patient_overall: "max" (single-head) or "top_n" (1 - prod over the top-N vertebrae).
  """
  uids = np.asarray(study_uid)[np.asarray(collected["record_id"], np.int64)]
  order = list(dict.fromkeys(uids.tolist()))  # studies in first-seen order
  row = {u: i for i, u in enumerate(order)}
  rows = np.array([row[u] for u in uids], np.int64)
  if task == "cnn3d":
    p = np.zeros((len(order), 8))
    y = np.zeros((len(order), 8))
    p[rows], y[rows] = collected["prob"], collected["labels"]
    pred = aggregate.wide_frame(order, p[:, 1:], p[:, 0])
    return _wide_labels(order, y), pred
  if task == "stage2":
    p = np.full((len(order), NV), np.nan)
    y = np.zeros((len(order), NV))
    v = np.asarray(collected["vertebra"], np.int64)
    p[rows, v], y[rows, v] = collected["prob"], collected["label"]
    if np.isnan(p).any():  # A vertebra without a record: its column's mean stands in.
      p = np.where(np.isnan(p), np.nanmean(p, axis=0, keepdims=True), p)
      p = np.nan_to_num(p, nan=0.5)
    pred = aggregate.wide_frame(order, p, patient_overall(task, p, top_n=top_n))
  elif task == "slices2d":
    p = np.zeros((len(order), NV))
    y = np.zeros((len(order), NV))
    for i in range(len(order)):
      sel = rows == i
      p[i] = aggregate.pool_slices(collected["fracture_prob"][sel], collected["presence_prob"][sel])
      y[i] = np.max(collected["fracture"][sel], axis=0)
    pred = aggregate.wide_frame(order, p, patient_overall(task, p, overall=overall, top_n=top_n))
  else:
    raise ValueError(f"task {task!r} has no per-study predictions")
  y8 = np.concatenate([y.max(axis=1, keepdims=True), y], axis=1)
  return _wide_labels(order, y8), pred


def box_refine_scores(collected: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Held-out refiner figures: mean IoU and L1 of each crop's own-vertebra box, and the IoU of
  the crop's starting box (its frame's inner box: no refinement) for comparison."""
  v = np.asarray(collected["vertebra"], np.int64)
  pred = np.asarray(collected["boxes_pred"])[np.arange(len(v)), v]
  truth = np.asarray(collected["box"], np.float64)
  start = np.tile(refine_input.INNER_BOX, (len(v), 1))
  return {"box_iou": float(np.mean(labels_lib.box_iou(pred, truth))) if len(v) else 0.0,
          "start_box_iou": float(np.mean(labels_lib.box_iou(start, truth))) if len(v) else 0.0,
          "box_l1": float(np.mean(np.abs(pred - truth))) if len(v) else 0.0}


def stage1_scores(collected: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Held-out stage-1 figures: presence BCE, accuracy at 0.5, box L1 on slices showing a vertebra."""
  p = np.clip(collected["presence_prob"], 1e-7, 1 - 1e-7)
  y = collected["presence"]
  bce = float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))
  acc = float(np.mean((p >= 0.5) == (y >= 0.5)))
  shown = y.max(axis=1) > 0
  box = float(np.mean(np.abs(collected["box_pred"][shown] - collected["box"][shown]))) if shown.any() else 0.0
  return {"presence_bce": bce, "presence_accuracy": acc, "box_l1": box}
