"""Stage-1 model: an image encoder with heads for vertebra presence, area ratio and box.

Per 2.5D slice image (N, H, W, 3) it predicts, for C1..C7, whether the vertebra is visible
(presence logits), its area ratio (sigmoid, this slice's pixel count / the vertebra's largest
per-slice count) and the normalised box of all visible vertebrae (sigmoid, x0, y0, x1, y1 divided
by W or H), matching the stage-1 record fields `presence`, `area` and `box`.

``head="ratio"`` is the seed's head instead: one linear layer of 11 outputs, the box (4) and the
seven area ratios, regressed as they are (no presence head, no sigmoid; ``train.tasks`` clips
them to [0, 1] for prediction).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cspine_jax.models import layers

Array = jax.Array
NUM_VERTEBRAE = 7
HEADS = ("presence", "ratio")


class Stage1Model(nnx.Module):
  """`__call__(images) -> {"presence": logits (N,7), "area": (N,7) in [0,1], "box": (N,4)}`.

  The area and box heads are linear layers followed by a sigmoid; their pre-sigmoid values are
  also returned as "area_logits" and "box_logits" for losses that want logits. With
  ``head="ratio"``: `{"box": (N,4), "ratio": (N,7)}`, both the raw outputs of one linear layer.
  """

  def __init__(self, encoder: nnx.Module, *, dropout: float = 0.0, head: str = "presence",
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if head not in HEADS:
      raise ValueError(f"stage-1 head must be one of {HEADS}, got {head!r}")
    self.encoder = encoder
    self.head = head
    f = encoder.num_features
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    if head == "ratio":
      self.box_ratio_head = self._head(f, 4 + NUM_VERTEBRAE, param_dtype, rngs)
      return
    self.presence_head = self._head(f, NUM_VERTEBRAE, param_dtype, rngs)
    self.area_head = self._head(f, NUM_VERTEBRAE, param_dtype, rngs)
    self.box_head = self._head(f, 4, param_dtype, rngs)

  @staticmethod
  def _head(f: int, out: int, param_dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(f, out, kernel_init=layers.trunc_normal, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, images: Array) -> dict[str, Array]:
    feats = self.dropout(self.encoder(images))
    if self.head == "ratio":
      out = self.box_ratio_head(feats)
      return {"box": out[:, :4], "ratio": out[:, 4:]}
    area_logits = self.area_head(feats)
    box_logits = self.box_head(feats)
    return {"presence": self.presence_head(feats), "area": jax.nn.sigmoid(area_logits),
            "box": jax.nn.sigmoid(box_logits), "area_logits": area_logits,
            "box_logits": box_logits}
