"""The per-pixel input work, done on the device inside the jitted steps (:func:`device_inputs`).

At train time one random rotation + horizontal flip per sample (shared by every image of a
stage-2 sequence or 3D volume; stage-1 boxes follow), optionally coarser slices, drawn from a key
of (seed, optimizer step) so a resumed run draws the same; then the one normalisation
(:func:`normalize`) that evaluation and inference use too. The host pipeline stays uint8, a
quarter of the bytes of float32 batches to copy.

The seed's albumentations pipeline is here too, each transform off unless its probability is
set, each from its own stream of the same key (so the draws above stay those of runs without
them), each draw shared by a sample's images: brightness/contrast, hue/saturation/value (on the
three slices of a 2.5D image taken as RGB, as the seed does), shift-scale-rotate (merged with the
rotation and flip into one resampling; boxes follow), cutout, and the circular field-of-view mask
re-applied after them.
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
  # albumentations RandomBrightnessContrast (by max): x * (1 + U(+-contrast)) + 255 U(+-brightness).
  brightness: float = 0.2
  contrast: float = 0.2
  brightness_contrast_prob: float = 0.0
  # albumentations HueSaturationValue on 3-channel images, OpenCV's 8-bit units (hue 0..180).
  hue: float = 40.0
  saturation: float = 40.0
  value: float = 0.0
  hsv_prob: float = 0.0
  # albumentations ShiftScaleRotate, border 0: shift U(+-shift) of the size, scale 1 + U(+-scale),
  # turn U(+-ssr_rotation_deg), on top of the rotation and flip above.
  shift: float = 0.2
  scale: float = 0.3
  ssr_rotation_deg: float = 30.0
  ssr_prob: float = 0.0
  # albumentations Cutout: ``cutout_holes`` zeroed squares of ``cutout_size`` x the image's sides.
  cutout_holes: int = 4
  cutout_size: float = 0.2
  cutout_prob: float = 0.0
  # The circular field of view (pp.image.fov_mask) zeroed again after the transforms above.
  fov_mask: bool = False

  def __post_init__(self):  # a bad range fails when the run builds its options, not in a step
    lo, hi = (int(v) for v in self.coarse_slices)
    if not 2 <= lo <= hi:
      raise ValueError(f"coarse_slices must be (lo, hi) with 2 <= lo <= hi; got {(lo, hi)}")
    for name in ("brightness_contrast_prob", "hsv_prob", "ssr_prob", "cutout_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)}")
    if not 0.0 <= self.scale < 1.0 or not 0.0 < self.cutout_size <= 1.0 or self.cutout_holes < 0:
      raise ValueError(f"scale must be in [0, 1), cutout_size in (0, 1], cutout_holes >= 0; got "
                       f"{self.scale}, {self.cutout_size}, {self.cutout_holes}")


def from_config(aug: Mapping[str, Any]) -> AugmentOptions | None:
  """A config's ``input.augment`` fields as options (None when ``enabled`` is off); fields a
  config lacks keep their defaults."""
  if not aug.get("enabled", True):
    return None
  names = {f.name for f in dataclasses.fields(AugmentOptions)}
  kw = {k: aug[k] for k in aug if k in names}
  if "coarse_slices" in kw:
    kw["coarse_slices"] = tuple(kw["coarse_slices"])
  return AugmentOptions(**kw)


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


def rotate_flip(images: jax.Array, angle: jax.Array, flip: jax.Array,
                scale: jax.Array | None = None, shift: jax.Array | None = None) -> jax.Array:
  """Rotates each sample by ``angle[b]`` degrees (counter-clockwise on screen) about the image
  centre, then flips it left-right where ``flip[b]``; float32 out, in the input's units.
  With ``scale`` (B,) and ``shift`` (B, 2) (fractions of W, H) the turn is shift-scale-rotate:
  scaled by ``scale[b]`` about the centre and turned, then moved by the shift, then flipped.

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
  if scale is None and shift is None:
    src_x = cos * xs - sin * ys + w / 2  # (B, H, W): where the output pixel reads the input
    src_y = sin * xs + cos * ys + h / 2
  else:  # undo the shift, the turn, the scale, in that order
    shift = jnp.zeros((b, 2), jnp.float32) if shift is None else shift.astype(jnp.float32)
    scale = jnp.ones((b,), jnp.float32) if scale is None else scale.astype(jnp.float32)
    xs = xs - shift[:, 0, None, None] * w
    ys = ys[None] - shift[:, 1, None, None] * h  # (B, H, 1)
    inv = 1.0 / scale[:, None, None]
    src_x = (cos * xs - sin * ys) * inv + w / 2
    src_y = (sin * xs + cos * ys) * inv + h / 2
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


def rotate_flip_boxes(boxes: jax.Array, angle: jax.Array, flip: jax.Array, h: int, w: int,
                      scale: jax.Array | None = None, shift: jax.Array | None = None
                      ) -> jax.Array:
  """Normalised boxes (B, 4) = (x0, y0, x1, y1) after :func:`rotate_flip`: the box of the turned
  corners, clipped to the image; an all-zero box (no vertebra shown) stays zero."""
  boxes = boxes.astype(jnp.float32)
  x0, y0, x1, y1 = boxes[:, 0] * w, boxes[:, 1] * h, boxes[:, 2] * w, boxes[:, 3] * h
  xs = jnp.stack([x0, x1, x1, x0], -1) - w / 2
  ys = jnp.stack([y0, y0, y1, y1], -1) - h / 2
  rad = jnp.deg2rad(angle.astype(jnp.float32))[:, None]
  # Image rows grow downwards, so a counter-clockwise turn on screen maps (x, y) -> this.
  if scale is None and shift is None:
    rx = xs * jnp.cos(rad) + ys * jnp.sin(rad) + w / 2
    ry = -xs * jnp.sin(rad) + ys * jnp.cos(rad) + h / 2
  else:
    s = (jnp.ones(boxes.shape[:1]) if scale is None else scale.astype(jnp.float32))[:, None]
    d = jnp.zeros((boxes.shape[0], 2)) if shift is None else shift.astype(jnp.float32)
    rx = s * (xs * jnp.cos(rad) + ys * jnp.sin(rad)) + w / 2 + d[:, :1] * w
    ry = s * (-xs * jnp.sin(rad) + ys * jnp.cos(rad)) + h / 2 + d[:, 1:] * h
  nx0, nx1 = rx.min(-1), rx.max(-1)
  nx0, nx1 = jnp.where(flip, w - nx1, nx0), jnp.where(flip, w - nx0, nx1)
  out = jnp.clip(jnp.stack([nx0 / w, ry.min(-1) / h, nx1 / w, ry.max(-1) / h], -1), 0.0, 1.0)
  return jnp.where(jnp.any(boxes != 0, axis=-1, keepdims=True), out, boxes)


# ---- the seed's albumentations transforms (each off unless its probability is set) ------------
def _per_sample(v: jax.Array, x: jax.Array) -> jax.Array:
  """(B,) values shaped to broadcast over a (B, ..., H, W, C) batch."""
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _chance(key: jax.Array, b: int, prob: float) -> jax.Array:
  return jax.random.uniform(key, (b,)) < prob


def brightness_contrast_draws(key: jax.Array, b: int, options: AugmentOptions
                              ) -> tuple[jax.Array, jax.Array]:
  """Per sample (alpha, beta): x -> x * alpha + 255 * beta; (1, 0) where not applied."""
  k_on, k_a, k_b = jax.random.split(key, 3)
  on = _chance(k_on, b, options.brightness_contrast_prob)
  alpha = 1.0 + jax.random.uniform(k_a, (b,), jnp.float32, -options.contrast, options.contrast)
  beta = jax.random.uniform(k_b, (b,), jnp.float32, -options.brightness, options.brightness)
  return jnp.where(on, alpha, 1.0), jnp.where(on, beta, 0.0)


def brightness_contrast(x: jax.Array, alpha: jax.Array, beta: jax.Array) -> jax.Array:
  """Pixel values 0..255 -> clip(x * alpha + 255 * beta) per sample (albumentations, by max)."""
  x = x.astype(jnp.float32) * _per_sample(alpha, x) + 255.0 * _per_sample(beta, x)
  return jnp.clip(x, 0.0, 255.0)


def hsv_draws(key: jax.Array, b: int, options: AugmentOptions) -> jax.Array:
  """Per sample (hue, saturation, value) shifts, (B, 3); zeros where not applied."""
  k_on, k_s = jax.random.split(key)
  on = _chance(k_on, b, options.hsv_prob)
  limits = jnp.asarray([options.hue, options.saturation, options.value], jnp.float32)
  shifts = jax.random.uniform(k_s, (b, 3), jnp.float32, -1.0, 1.0) * limits
  return jnp.where(on[:, None], shifts, 0.0)


def shift_hsv(x: jax.Array, shifts: jax.Array) -> jax.Array:
  """Channels (R, G, B) 0..255 -> OpenCV 8-bit HSV (H in 0..180, S, V in 0..255), hue moved
  modulo 180, saturation and value clipped, back to RGB; per sample (B, 3) shifts.

  On a 2.5D image the channels are three neighbouring slices, so this is the seed's slice mixing:
  S is the spread of the three slices at a pixel over their maximum, H which slice is brightest,
  so a saturation shift widens or narrows the slice-to-slice differences (and tints equal slices
  by the hue: a grey pixel gets S > 0 and its two other slices darker), a hue shift hands the
  brightest value to another slice.
  """
  x = x.astype(jnp.float32)
  r, g, bl = x[..., 0], x[..., 1], x[..., 2]
  v = jnp.maximum(jnp.maximum(r, g), bl)
  spread = v - jnp.minimum(jnp.minimum(r, g), bl)
  safe = jnp.where(spread > 0, spread, 1.0)
  hue = jnp.where(v == r, (g - bl) / safe, jnp.where(v == g, 2.0 + (bl - r) / safe,
                                                   4.0 + (r - g) / safe))
  hue = jnp.where(spread > 0, jnp.mod(hue * 30.0, 180.0), 0.0)  # OpenCV: degrees / 2
  sat = jnp.where(v > 0, spread / jnp.where(v > 0, v, 1.0) * 255.0, 0.0)
  d = shifts.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 2) + (3,))
  hue = jnp.mod(hue + d[..., 0], 180.0)
  sat = jnp.clip(sat + d[..., 1], 0.0, 255.0) / 255.0
  v = jnp.clip(v + d[..., 2], 0.0, 255.0)
  sector = hue / 30.0  # hue in sixths of the circle
  out = []
  for n in (5.0, 3.0, 1.0):  # R, G, B
    k = jnp.mod(n + sector, 6.0)
    out.append(v - v * sat * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
  return jnp.stack(out, axis=-1)


def ssr_draws(key: jax.Array, b: int, options: AugmentOptions
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per sample shift-scale-rotate: (angle degrees, scale, shift (B, 2)); (0, 1, 0) where off."""
  k_on, k_a, k_s, k_d = jax.random.split(key, 4)
  on = _chance(k_on, b, options.ssr_prob)
  m = float(options.ssr_rotation_deg)
  angle = jax.random.uniform(k_a, (b,), jnp.float32, -m, m)
  scale = 1.0 + jax.random.uniform(k_s, (b,), jnp.float32, -options.scale, options.scale)
  shift = jax.random.uniform(k_d, (b, 2), jnp.float32, -options.shift, options.shift)
  return (jnp.where(on, angle, 0.0), jnp.where(on, scale, 1.0),
          jnp.where(on[:, None], shift, 0.0))


def cutout_draws(key: jax.Array, b: int, options: AugmentOptions, h: int, w: int) -> jax.Array:
  """Per sample and hole the (y0, y1, x0, x1) pixel rectangle, (B, holes, 4): albumentations'
  Cutout, a hole of int(size x side) centred on a uniform point, clipped; empty where off."""
  k_on, k_y, k_x = jax.random.split(key, 3)
  n = int(options.cutout_holes)
  hh, hw = int(h * options.cutout_size), int(w * options.cutout_size)
  on = _chance(k_on, b, options.cutout_prob)
  y = jax.random.randint(k_y, (b, n), 0, h + 1)
  x = jax.random.randint(k_x, (b, n), 0, w + 1)
  y0 = jnp.clip(y - hh // 2, 0, h)
  x0 = jnp.clip(x - hw // 2, 0, w)
  rect = jnp.stack([y0, jnp.clip(y0 + hh, 0, h), x0, jnp.clip(x0 + hw, 0, w)], -1)
  return jnp.where(on[:, None, None], rect, 0)


def cutout(x: jax.Array, rect: jax.Array) -> jax.Array:
  """Zeroes each sample's rectangles (:func:`cutout_draws`) in every image and channel."""
  h, w = x.shape[-3:-1]
  ys = jnp.arange(h)[None, None, :, None]
  xs = jnp.arange(w)[None, None, None, :]
  r = rect[..., None, None]  # (B, holes, 1, 1) per edge
  hole = ((ys >= r[:, :, 0]) & (ys < r[:, :, 1]) & (xs >= r[:, :, 2]) & (xs < r[:, :, 3])).any(1)
  hole = hole.reshape((x.shape[0],) + (1,) * (x.ndim - 4) + (h, w, 1))
  return jnp.where(hole, 0.0, x.astype(jnp.float32))


def fov_mask(x: jax.Array) -> jax.Array:
  """Zeroes the pixels outside the inscribed circle (``pp.image.fov_mask``'s disc)."""
  h, w = x.shape[-3:-1]
  y, xx = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  r = min(h, w) // 2
  inside = ((xx - w // 2) ** 2 + (y - h // 2) ** 2 <= r * r)[..., None]
  return jnp.where(inside, x.astype(jnp.float32), 0.0)


COARSE_SLICES_STREAM = 2
BRIGHTNESS_CONTRAST_STREAM = 3
HSV_STREAM = 4
SSR_STREAM = 5
CUTOUT_STREAM = 6


def device_inputs(batch: Mapping[str, jax.Array], field: str, *, key: jax.Array | None = None,
                  augment: AugmentOptions | None = None) -> dict[str, jax.Array]:
  """A host batch as the model sees it, computed inside the jitted step.

  With ``augment`` and ``key`` (training): where the options ask, coarser slices for some samples
  (:func:`coarse_slice_draws`, :func:`coarsen_slices`), brightness/contrast and HSV, then one
  random rotation + flip per sample (:func:`augment_draws`, :func:`rotate_flip`; with
  shift-scale-rotate merged in) applied to the pixels, stage-1 ``box`` following, then cutout and
  the field-of-view mask. Then uint8 images are normalised (:func:`normalize`). Float images are
  taken as already normalised (hand-made batches) and only augmented.
  """
  out = dict(batch)
  x = out[field]
  raw = x.dtype == jnp.uint8
  if augment is not None and key is not None and augment.coarse_slices_prob > 0:
    # Its own stream, so the rotation and flip draws are those of runs without it.
    count = coarse_slice_draws(jax.random.fold_in(key, COARSE_SLICES_STREAM), x.shape[0], augment)
    x = coarsen_slices(x, count)
  if augment is not None and key is not None:
    b = x.shape[0]
    if augment.brightness_contrast_prob > 0:
      x = brightness_contrast(x, *brightness_contrast_draws(
          jax.random.fold_in(key, BRIGHTNESS_CONTRAST_STREAM), b, augment))
    if augment.hsv_prob > 0 and x.shape[-1] == 3:
      x = shift_hsv(x, hsv_draws(jax.random.fold_in(key, HSV_STREAM), b, augment))
    angle, flip = augment_draws(key, b, augment)
    scale = shift = None
    if augment.ssr_prob > 0:
      turn, scale, shift = ssr_draws(jax.random.fold_in(key, SSR_STREAM), b, augment)
      angle = angle + turn
    x = rotate_flip(x, angle, flip, scale, shift)
    if "box" in out:
      out["box"] = rotate_flip_boxes(out["box"], angle, flip, *x.shape[-3:-1], scale, shift)
    if augment.cutout_prob > 0 and augment.cutout_holes > 0:
      x = cutout(x, cutout_draws(jax.random.fold_in(key, CUTOUT_STREAM), b, augment,
                                 *x.shape[-3:-1]))
    if augment.fov_mask:
      x = fov_mask(x)
  out[field] = normalize(x) if raw else x
  return out
