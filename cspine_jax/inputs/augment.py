"""The per-pixel input work, done on the device inside the jitted steps (:func:`device_inputs`).

At train time one random rotation + horizontal flip per sample (shared by every image of a
stage-2 sequence or 3D volume; stage-1 boxes follow), optionally coarser slices, drawn from a key
of (seed, optimizer step) so a resumed run draws the same; then the one normalisation
(:func:`normalize`) that evaluation and inference use too. The host pipeline stays uint8, a
quarter of the bytes of float32 batches to copy.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# ImageNet statistics for 3-channel (2.5D) images; single-channel volumes are centred at 0.5.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
  """Train-time augmentation (the seed method: small random rotation, random horizontal flip)."""
  max_rotation_deg: float = 10.0
  flip_prob: float = 0.5
  # Share of samples whose slices are re-sampled as if the sample had been cut from a thicker-slice
  # study: its S slices spread over only n source slices, n uniform in ``coarse_slices``
  # (:func:`coarsen_slices`). Sequence and volume samples only (stage 2, 3D CNN).
  coarse_slices_prob: float = 0.0
  coarse_slices: tuple[int, int] = (4, 12)

  def __post_init__(self):  # a bad range fails when the run builds its options, not in a step
    lo, hi = (int(v) for v in self.coarse_slices)
    if not 2 <= lo <= hi:
      raise ValueError(f"coarse_slices must be (lo, hi) with 2 <= lo <= hi; got {(lo, hi)}")


# ---- normalisation: the one definition for training, evaluation and inference -----------------
def _norm_affine(channels: int) -> tuple[np.ndarray, np.ndarray]:
  """(scale, offset) with ``(x / 255 - mean) / std == x * scale + offset`` per channel."""
  if channels == 3:
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
  else:
    mean, std = np.full(channels, 0.5, np.float32), np.full(channels, 0.5, np.float32)
  return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def normalize(images: Any) -> Any:
  """Pixel values in 0..255 (uint8, or float after :func:`rotate_flip`) (..., C) -> float32
  ``(x / 255 - mean) / std`` as one multiply-add: ImageNet statistics for 3 channels, 0.5/0.5
  otherwise. numpy in, numpy out; a jax array in (inside a jitted step), a jax array out.
  """
  scale, offset = _norm_affine(images.shape[-1])
  return images.astype(np.float32) * scale + offset


# ---- device side: augmentation and normalisation inside the jitted steps ------------------------
def augment_draws(key: jax.Array, batch_size: int, options: AugmentOptions
                  ) -> tuple[jax.Array, jax.Array]:
  """One rotation angle (degrees, uniform in +-max) and one flip decision per sample."""
  k_angle, k_flip = jax.random.split(key)
  m = float(options.max_rotation_deg)
  angle = jax.random.uniform(k_angle, (batch_size,), jnp.float32, -m, m)
  flip = jax.random.uniform(k_flip, (batch_size,)) < options.flip_prob
  return angle, flip


def coarse_slice_draws(key: jax.Array, batch_size: int, options: AugmentOptions) -> jax.Array:
  """Per sample the number of source slices to re-sample it from (0: left as it is)."""
  k_apply, k_count = jax.random.split(key)
  lo, hi = (int(v) for v in options.coarse_slices)
  count = jax.random.randint(k_count, (batch_size,), lo, hi + 1)
  return jnp.where(jax.random.uniform(k_apply, (batch_size,)) < options.coarse_slices_prob, count, 0)


def coarsen_slices(images: jax.Array, count: jax.Array) -> jax.Array:
  """Each sample's S slices as a thicker-slice study would have given them: ``count[b]`` source
  slices spread over the S positions by nearest neighbour, as the records' evenly spaced sampling
  (``pp.image.evenly_spaced``) repeats the slices of a vertebra that spans only ``count``
  of them. ``count[b]`` = 0 (or >= S) leaves the sample as it is. float32 out, same values.

  ``images`` is (B, T, H, W, C) with the slices in (T, C) order: a stage-2 sequence of T 2.5D
  images of C consecutive slices each, or a volume of T slices (C = 1). The source slices are
  taken from the sample's own S at their evenly spaced positions, so the first and last slice stay.
  """
  if images.ndim != 5:
    raise ValueError(f"coarse slices need (B, T, H, W, C) sequences or volumes; got {images.shape}")
  b, t, h, w, c = images.shape
  s = t * c
  pos = jnp.arange(s, dtype=jnp.float32)[None]
  n = jnp.clip(count, 2, s)[:, None].astype(jnp.float32)
  source = jnp.round(pos * (n - 1) / (s - 1))  # which of the n source slices position i shows
  index = jnp.round(source * (s - 1) / (n - 1)).astype(jnp.int32)  # where that slice is among S
  index = jnp.where((count[:, None] > 0) & (count[:, None] < s), index,
                    jnp.arange(s, dtype=jnp.int32)[None])
  # A per-sample 0/1 selection matrix, not a gather: XLA:CPU fuses a slice gather into the
  # rotation's pixel gather that follows, which slows both. Exact: one product per output.
  select = jax.nn.one_hot(index, s, dtype=jnp.float32).reshape(b, t, c, t, c)
  out = jnp.einsum("bTCtc,btpc->bTpC", select, images.reshape(b, t, h * w, c).astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(images.shape)


def rotate_flip(images: jax.Array, angle: jax.Array, flip: jax.Array) -> jax.Array:
  """Rotates each sample by ``angle[b]`` degrees (counter-clockwise on screen) about the image
  centre, then flips it left-right where ``flip[b]``; float32 out, in the input's units.

  ``images`` is (B, ..., H, W, C): every image of a sample (a stage-2 sequence, a volume's slices)
  gets the sample's turn. Bilinear, PIL's ``Image.rotate(angle, BILINEAR)`` conventions (pixel
  centres at +0.5; a source point outside the image gives 0, one inside reads clamped
  neighbours). Vectorised as one row gather: the sample's images and channels are laid out as one
  row per pixel, so each of the 4 bilinear taps fetches T*C contiguous values.
  """
  b = images.shape[0]
  h, w, c = images.shape[-3:]
  x = images.reshape((b, -1, h, w, c))
  t = x.shape[1]
  rows = jnp.moveaxis(x, 1, 3).reshape(b * h * w, t * c)  # (B*H*W, T*C), input dtype
  rad = jnp.deg2rad(angle.astype(jnp.float32))[:, None, None]
  cos, sin = jnp.cos(rad), jnp.sin(rad)
  xs = jnp.arange(w, dtype=jnp.float32) + 0.5 - w / 2
  ys = (jnp.arange(h, dtype=jnp.float32) + 0.5 - h / 2)[:, None]
  # The output's column x after a flip is the rotated image's column w-1-x: its centred x negates.
  xs = jnp.where(flip[:, None, None], -xs, xs)  # (B, 1, W)
  src_x = cos * xs - sin * ys + w / 2  # (B, H, W): where the output pixel reads the input
  src_y = sin * xs + cos * ys + h / 2
  inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
  fx, fy = src_x - 0.5, src_y - 0.5
  x0, y0 = jnp.floor(fx), jnp.floor(fy)
  dx, dy = (fx - x0)[..., None], (fy - y0)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  xa, xb = jnp.clip(x0, 0, w - 1), jnp.clip(x0 + 1, 0, w - 1)
  ya, yb = jnp.clip(y0, 0, h - 1), jnp.clip(y0 + 1, 0, h - 1)
  base = (jnp.arange(b, dtype=jnp.int32) * (h * w))[:, None, None]
  idx = jnp.stack([ya * w + xa, ya * w + xb, yb * w + xa, yb * w + xb]) + base  # (4, B, H, W)
  # Indices are clipped above, so the gather may skip its own bounds handling.
  taps = rows.at[idx.reshape(-1)].get(mode="promise_in_bounds")
  taps = taps.astype(jnp.float32).reshape((4, b, h, w, t * c))
  top = taps[0] + (taps[1] - taps[0]) * dx
  bottom = taps[2] + (taps[3] - taps[2]) * dx
  out = jnp.where(inside[..., None], top + (bottom - top) * dy, 0.0)  # (B, H, W, T*C)
  out = jnp.moveaxis(out.reshape((b, h, w, t, c)), 3, 1)
  return out.reshape(images.shape)


def rotate_flip_boxes(boxes: jax.Array, angle: jax.Array, flip: jax.Array, h: int, w: int
                      ) -> jax.Array:
  """Normalised boxes (B, 4) = (x0, y0, x1, y1) after :func:`rotate_flip`: the box of the turned
  corners, clipped to the image; an all-zero box (no vertebra shown) stays zero."""
  boxes = boxes.astype(jnp.float32)
  x0, y0, x1, y1 = boxes[:, 0] * w, boxes[:, 1] * h, boxes[:, 2] * w, boxes[:, 3] * h
  xs = jnp.stack([x0, x1, x1, x0], -1) - w / 2
  ys = jnp.stack([y0, y0, y1, y1], -1) - h / 2
  rad = jnp.deg2rad(angle.astype(jnp.float32))[:, None]
  # Image rows grow downwards, so a counter-clockwise turn on screen maps (x, y) -> this.
  rx = xs * jnp.cos(rad) + ys * jnp.sin(rad) + w / 2
  ry = -xs * jnp.sin(rad) + ys * jnp.cos(rad) + h / 2
  nx0, nx1 = rx.min(-1), rx.max(-1)
  nx0, nx1 = jnp.where(flip, w - nx1, nx0), jnp.where(flip, w - nx0, nx1)
  out = jnp.clip(jnp.stack([nx0 / w, ry.min(-1) / h, nx1 / w, ry.max(-1) / h], -1), 0.0, 1.0)
  return jnp.where(jnp.any(boxes != 0, axis=-1, keepdims=True), out, boxes)


COARSE_SLICES_STREAM = 2


def device_inputs(batch: Mapping[str, jax.Array], field: str, *, key: jax.Array | None = None,
                  augment: AugmentOptions | None = None) -> dict[str, jax.Array]:
  """A host batch as the model sees it, computed inside the jitted step.

  With ``augment`` and ``key`` (training): where the options ask, coarser slices for some samples
  (:func:`coarse_slice_draws`, :func:`coarsen_slices`), then one random rotation + flip per sample
  (:func:`augment_draws`, :func:`rotate_flip`) applied to the uint8 pixels, stage-1 ``box``
  following. Then uint8 images are normalised (:func:`normalize`). Float images are taken as
  already normalised (hand-made batches) and only augmented.
  """
  out = dict(batch)
  x = out[field]
  raw = x.dtype == jnp.uint8
  if augment is not None and key is not None and augment.coarse_slices_prob > 0:
    # Its own stream, so the rotation and flip draws are those of runs without it.
    count = coarse_slice_draws(jax.random.fold_in(key, COARSE_SLICES_STREAM), x.shape[0], augment)
    x = coarsen_slices(x, count)
  if augment is not None and key is not None:
    angle, flip = augment_draws(key, x.shape[0], augment)
    x = rotate_flip(x, angle, flip)
    if "box" in out:
      out["box"] = rotate_flip_boxes(out["box"], angle, flip, *x.shape[-3:-1])
  out[field] = normalize(x) if raw else x
  return out

