"""3D CNN baseline: whole-volume classifier giving 8 logits (patient_overall, C1..C7).

Three blocks of (3x3x3 conv -> ReLU -> 2x2x2 max pool -> BatchNorm), the seed's order, then
global average pooling and dense layers. Global pooling (instead of flattening) keeps the dense
layers small at the seed's 224^3 input and lets any volume size through.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
NUM_TARGETS = 8


class Conv3DBlock(nnx.Module):
  """conv -> ReLU -> max pool -> BatchNorm (BatchNorm follows `use_running_average`)."""

  def __init__(self, din: int, dout: int, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.conv = nnx.Conv(din, dout, (3, 3, 3), padding="SAME", dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    self.norm = nnx.BatchNorm(dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    x = jax.nn.relu(self.conv(x))
    x = nnx.max_pool(x, (2, 2, 2), strides=(2, 2, 2), padding="VALID")
    return self.norm(x)


class CNN3D(nnx.Module):
  """`__call__(volume (B, D, H, W, C)) -> logits (B, 8)` ordered like `labels.TARGETS`.

  Args:
    in_chans: volume channels (1 for HU volumes).
    channels: output channels of the three conv blocks.
    hidden: widths of the dense layers before the 8-logit output.
    dropout: dropout before each dense layer.
  """

  def __init__(self, *, in_chans: int = 1, channels: Sequence[int] = (32, 64, 128),
               hidden: Sequence[int] = (256,), dropout: float = 0.3,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if len(channels) != 3:
      raise ValueError(f"CNN3D has three conv blocks; got channels={tuple(channels)}")
    self.in_chans = in_chans
    self.dtype = dtype
    dims = (in_chans, *channels)
    self.blocks = nnx.List([Conv3DBlock(dims[i], dims[i + 1], dtype=dtype,
                                        param_dtype=param_dtype, rngs=rngs) for i in range(3)])
    widths = (channels[-1], *hidden)
    self.dense = nnx.List([nnx.Linear(widths[i], widths[i + 1], param_dtype=param_dtype,
                                      rngs=rngs) for i in range(len(hidden))])
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.out = nnx.Linear(widths[-1], NUM_TARGETS, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, volume: Array) -> Array:
    if volume.ndim != 5 or volume.shape[-1] != self.in_chans:
      raise ValueError(f"CNN3D wants (B, D, H, W, {self.in_chans}); got {volume.shape}")
    x = volume.astype(self.dtype)
    for block in self.blocks:
      x = block(x)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))
    for layer in self.dense:
      x = jax.nn.relu(layer(self.dropout(x)))
    return self.out(self.dropout(x))
