"""Box refiner: an image encoder and one box head per vertebra (the second look at stage 1's boxes).

Per crop image (N, H, W, 3) of ``records.box_refine`` (projections of a vertebra's slice range around
its derived box) it predicts, for each of C1..C7, where that vertebra's box lies in the crop
(sigmoid-free normalised x0, y0, x1, y1, since the true box may reach past the crop when the derived
one was too small); the loss and inference take the row of the vertebra the crop was made for.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cspine_jax.pp import refine_input

Array = jax.Array
NUM_VERTEBRAE = 7


class BoxRefiner(nnx.Module):
  """`__call__(images) -> boxes (N, 7, 4)`: per vertebra, its box in the crop's coordinates."""

  def __init__(self, encoder: nnx.Module, *, dropout: float = 0.0,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.encoder = encoder
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    # Zero kernel and a bias at the crop's inner box: training starts from "the derived box is
    # right", the crop frame's own answer (refine_input.MARGIN on each side).
    self.head = nnx.Linear(encoder.num_features, NUM_VERTEBRAE * 4, param_dtype=param_dtype,
                           kernel_init=nnx.initializers.zeros_init(),
                           bias_init=lambda *_: jnp.tile(
                               jnp.array(refine_input.INNER_BOX, param_dtype), NUM_VERTEBRAE),
                           rngs=rngs)

  def __call__(self, images: Array) -> Array:
    feats = self.dropout(self.encoder(images))
    return self.head(feats).astype(jnp.float32).reshape(-1, NUM_VERTEBRAE, 4)
