"""Stage-2 sequence model: image encoder per 2.5D image -> BiLSTM -> attention pooling -> 1 logit.

Input (B, T, H, W, C) (T = 8 images of one vertebra, C = 3 slices) is folded to (B*T, H, W, C)
for the encoder, the T feature vectors run through a bidirectional LSTM, MLP attention pooling
(tanh projection, softmax over T) makes one vector, and a linear head gives one fracture logit
per vertebra sample. Optionally a learned embedding of the vertebra index (0..6 = C1..C7) joins
the pooled vector before the head.

The LSTM is hand-rolled over the (short, static) sequence: the input projections of all steps are
one matmul, then T small recurrent matmuls; this is cheaper on CPU than `nnx.RNN`'s scan. Each
direction's parameters are named like `nnx.OptimizedLSTMCell` (`dense_i.kernel`, `dense_h.kernel`,
`dense_h.bias`; gate order i, f, g, o).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cspine_jax.models import layers

Array = jax.Array
Dtype = Any
NUM_VERTEBRAE = 7


class LSTMDirection(nnx.Module):
  """One direction of one LSTM layer (parameters like `nnx.OptimizedLSTMCell`)."""

  def __init__(self, in_features: int, hidden: int, *, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.hidden = hidden
    self.dense_i = nnx.Linear(in_features, 4 * hidden, use_bias=False, param_dtype=param_dtype,
                              rngs=rngs)
    self.dense_h = nnx.Linear(hidden, 4 * hidden, kernel_init=nnx.initializers.orthogonal(),
                              param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: Array, reverse: bool = False) -> Array:
    """x (B, T, F) -> hidden states (B, T, hidden) in input order."""
    b, t, _ = x.shape
    xi = self.dense_i(x)  # all steps' input projections in one matmul
    c = jnp.zeros((b, self.hidden), xi.dtype)
    h = jnp.zeros((b, self.hidden), xi.dtype)
    outs = [None] * t
    for step in (range(t - 1, -1, -1) if reverse else range(t)):
      gates = xi[:, step] + self.dense_h(h)
      i, f, g, o = jnp.split(gates, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      outs[step] = h
    return jnp.stack(outs, axis=1)


class BiLSTMLayer(nnx.Module):
  """Forward and backward LSTM over the sequence, outputs concatenated (B, T, 2*hidden)."""

  def __init__(self, in_features: int, hidden: int, *, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.forward_lstm = LSTMDirection(in_features, hidden, param_dtype=param_dtype, rngs=rngs)
    self.backward_lstm = LSTMDirection(in_features, hidden, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return jnp.concatenate([self.forward_lstm(x), self.backward_lstm(x, reverse=True)], axis=-1)


class Stage2Model(nnx.Module):
  """Encoder + BiLSTM + attention pooling; `__call__(images, vertebra=None) -> logits (B,)`.

  Args:
    encoder: an image encoder following the contract in `cspine_jax.models`.
    lstm_hidden: LSTM hidden size per direction; None = the encoder's width (the seed method).
    lstm_layers: number of stacked BiLSTM layers.
    attention_hidden: width of the attention tanh projection; None = 2 * lstm_hidden.
    vertebra_embedding: size of the vertebra-index embedding; 0 turns it off.
    dropout: dropout on the pooled vector before the head (0 = none).
  """

  def __init__(self, encoder: nnx.Module, *, lstm_hidden: int | None = None,
               lstm_layers: int = 1, attention_hidden: int | None = None,
               vertebra_embedding: int = 0, dropout: float = 0.0,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if lstm_layers < 1:
      raise ValueError(f"lstm_layers must be >= 1; got {lstm_layers}")
    self.encoder = encoder
    hidden = encoder.num_features if lstm_hidden is None else lstm_hidden
    self.lstm = nnx.List([
        BiLSTMLayer(encoder.num_features if i == 0 else 2 * hidden, hidden,
                    param_dtype=param_dtype, rngs=rngs) for i in range(lstm_layers)])
    self.attention = layers.AttentionPool(2 * hidden, attention_hidden, param_dtype=param_dtype,
                                          rngs=rngs)
    if vertebra_embedding > 0:
      self.vertebra_embed = nnx.Embed(NUM_VERTEBRAE, vertebra_embedding,
                                      param_dtype=param_dtype, rngs=rngs)
    else:
      self.vertebra_embed = nnx.data(None)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(2 * hidden + vertebra_embedding, 1, kernel_init=layers.trunc_normal,
                           param_dtype=param_dtype, rngs=rngs)

  def __call__(self, images: Array, vertebra: Array | None = None, *,
               return_attention: bool = False) -> Array | tuple[Array, Array]:
    """images (B, T, H, W, C), vertebra int (B,) -> logits (B,) [, attention weights (B, T)]."""
    if images.ndim != 5:
      raise ValueError(f"Stage2Model wants images (B, T, H, W, C); got {images.shape}")
    b, t = images.shape[:2]
    feats = self.encoder(images.reshape((b * t,) + images.shape[2:])).reshape(b, t, -1)
    seq = feats
    for layer in self.lstm:
      seq = layer(seq)
    pooled, weights = self.attention(seq)
    if self.vertebra_embed is not None:
      if vertebra is None:
        raise ValueError("this Stage2Model uses a vertebra embedding: pass vertebra (B,) ints")
      pooled = jnp.concatenate([pooled, self.vertebra_embed(vertebra).astype(pooled.dtype)], -1)
    logits = self.head(self.dropout(pooled))[:, 0]
    return (logits, weights) if return_attention else logits
