"""2D per-slice baselines: fracture and vertebra logits for C1..C7 from one 2.5D image.

- single head (the seed's ConvNeXt-Tiny model): one linear layer gives 14 logits, split into
  fracture (7) and vertebra (7).
- multi head (the seed's EfficientNetV2-S model): two parallel heads on the shared features,
  fracture (7) and vertebra (7), optimised together; optional hidden layer per head.
Study-level aggregation lives in `cspine_jax.aggregate`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cspine_jax.models import layers

Array = jax.Array
NUM_VERTEBRAE = 7
HEADS = ("single", "multi")


class _Head(nnx.Module):
  """Linear, or Linear -> GELU -> Linear when `hidden` > 0."""

  def __init__(self, din: int, dout: int, hidden: int, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(kernel_init=layers.trunc_normal, param_dtype=param_dtype, rngs=rngs)
    self.hidden = nnx.Linear(din, hidden, **kw) if hidden > 0 else nnx.data(None)
    self.out = nnx.Linear(hidden if hidden > 0 else din, dout, **kw)

  def __call__(self, x: Array) -> Array:
    if self.hidden is not None:
      x = jax.nn.gelu(self.hidden(x), approximate=False)
    return self.out(x)


class SliceClassifier(nnx.Module):
  """`__call__(images (N,H,W,C)) -> {"fracture": (N,7) logits, "vertebra": (N,7) logits}`.

  Args:
    encoder: an image encoder following the contract in `cspine_jax.models`.
    heads: "single" (one 14-logit layer) or "multi" (two parallel heads).
    head_hidden: hidden width of each multi head (0 = a plain linear layer).
    dropout: dropout on the pooled features.
  """

  def __init__(self, encoder: nnx.Module, *, heads: str = "single", head_hidden: int = 0,
               dropout: float = 0.0, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if heads not in HEADS:
      raise ValueError(f"heads must be one of {HEADS}; got {heads!r}")
    if heads == "single" and head_hidden:
      raise ValueError("head_hidden applies to heads='multi' only")
    self.encoder = encoder
    self.heads = heads
    f = encoder.num_features
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    if heads == "single":
      self.head = _Head(f, 2 * NUM_VERTEBRAE, 0, param_dtype, rngs)
      self.fracture_head = nnx.data(None)
      self.vertebra_head = nnx.data(None)
    else:
      self.head = nnx.data(None)
      self.fracture_head = _Head(f, NUM_VERTEBRAE, head_hidden, param_dtype, rngs)
      self.vertebra_head = _Head(f, NUM_VERTEBRAE, head_hidden, param_dtype, rngs)

  def __call__(self, images: Array) -> dict[str, Array]:
    feats = self.dropout(self.encoder(images))
    if self.head is not None:
      logits = self.head(feats)
      return {"fracture": logits[:, :NUM_VERTEBRAE], "vertebra": logits[:, NUM_VERTEBRAE:]}
    return {"fracture": self.fracture_head(feats), "vertebra": self.vertebra_head(feats)}
