"""Training losses on logits, weighted like the competition metric (metrics.py holds the weights).

* stage 2 (one vertebra per sample): BCE weighted 1 for a negative, 2 for a positive vertebra (or
  another positive weight: the seed's weighted BCE normalises each sample by its own weight, so
  with one target per sample it is the plain BCE, a positive weight of 1).
* 3D CNN and the 2D slice models: 8 targets (patient_overall, C1..C7) with the metric's 7/14 and
  1/2 weights (``metrics.weighted_mean``), averaged over the batch.
* stage 1: BCE on the 7 presence targets (positives optionally up-weighted) + L1 / smooth-L1 on
  the normalised box for the slices that show any vertebra; or the seed's: L1 on the box of the
  images with an area ratio above 0.5 and L1 on the 7 ratios (:func:`ratio_l1`).
All losses take an optional per-sample ``mask`` (0 for padding rows) and run under jit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cspine_jax import metrics

Array = jax.Array


def _masked_mean(values: Array, weights: Array) -> Array:
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def bce(logits: Array, labels: Array) -> Array:
  """Elementwise sigmoid binary cross-entropy, computed in float32."""
  return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels.astype(jnp.float32))


def vertebra_bce(logits: Array, labels: Array, mask: Array | None = None,
                 positive_weight: float | None = None) -> Array:
  """Per-vertebra samples: BCE weighted like the metric's vertebra targets (1 neg / 2 pos), or 1
  for a negative and ``positive_weight`` for a positive."""
  labels = labels.astype(jnp.float32)
  pos = metrics.POSITIVE_WEIGHTS[1] if positive_weight is None else positive_weight
  w = metrics.NEGATIVE_WEIGHTS[1] + labels * (pos - metrics.NEGATIVE_WEIGHTS[1])
  if mask is not None:
    w = w * mask
  return _masked_mean(bce(logits, labels), w)


def target_bce(logits: Array, labels: Array, mask: Array | None = None) -> Array:
  """(B, 8) logits and labels ordered like labels.TARGETS -> the metric-weighted BCE, mean over B."""
  if logits.shape[-1] != len(metrics.TARGETS):
    raise ValueError(f"expected {len(metrics.TARGETS)} target logits, got shape {logits.shape}")
  labels = labels.astype(jnp.float32)
  per_study = metrics.weighted_mean(labels, bce(logits, labels))
  return _masked_mean(per_study, jnp.ones_like(per_study) if mask is None else mask)


def slice_targets(fracture: Array) -> Array:
  """Per-slice (B, 7) fracture labels -> (B, 8) with patient_overall = any vertebra fractured."""
  fracture = fracture.astype(jnp.float32)
  return jnp.concatenate([jnp.max(fracture, axis=-1, keepdims=True), fracture], axis=-1)


def box_loss(pred: Array, target: Array, weight: Array, kind: str = "smooth_l1",
             beta: float = 0.05) -> Array:
  """Mean box regression loss over rows with ``weight`` > 0 (normalised coordinates)."""
  diff = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
  if kind == "l1":
    per = diff
  elif kind == "smooth_l1":
    per = jnp.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta)
  else:
    raise ValueError(f"unknown box loss {kind!r}; expected 'l1' or 'smooth_l1'")
  return _masked_mean(jnp.mean(per, axis=-1), weight)


def ratio_l1(pred: Array, target: Array, mask: Array | None = None) -> Array:
  """Mean absolute error over (B, 7) area ratios (the seed regresses them without a sigmoid)."""
  per = jnp.mean(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
  return _masked_mean(per, jnp.ones_like(per) if mask is None else mask)


def presence_bce(logits: Array, labels: Array, mask: Array | None = None,
                 pos_weight: float = 1.0) -> Array:
  """Mean BCE over (B, 7) presence targets; positives weighted by ``pos_weight``.

  A vertebra shows on about a tenth of a study's slices, so unweighted BCE is minimised early by
  calling every vertebra absent; ``pos_weight`` ~ negatives / positives counters that (the
  weighted loss is the plain one when ``pos_weight`` is 1).
  """
  labels = labels.astype(jnp.float32)
  w = 1.0 + (pos_weight - 1.0) * labels
  per = jnp.mean(w * bce(logits, labels), axis=-1)
  return _masked_mean(per, jnp.ones_like(per) if mask is None else mask)


def is_finite(loss: Array) -> Array:
  """True when the loss is neither NaN nor infinite (the train loop stops otherwise)."""
  return jnp.isfinite(loss)
