"""Reconstruction artifacts of a realistic study, one axial slice at a time.

Scanner noise is correlated in plane (a Gaussian kernel standing in for the reconstruction filter)
and, where slabs overlap, between slices; it grows towards the shoulders. Metal sends streaks along
fixed directions through each object (bright and dark, fading with distance) and a dark band between
two objects in the same slice; the shoulders add near-lateral photon-starvation streaks that change
from slice to slice. Every draw is seeded by (scene seed, slice index), so a slice's artifacts do
not depend on how the volume is chunked.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from cspine_jax.synthetic.realism import MetalSource

_NOISE, _SHOULDER = 7, 11  # seed streams
_BODY_HU = -400.0  # streaks show inside the patient (and the table), not in the air around


def shoulder_ramp(z: float, shoulder_z: tuple[float, float]) -> float:
  """0 above the shoulders, rising to 1 where they are full."""
  top, full = shoulder_z
  return float(np.clip((top - z) / max(top - full, 1e-3), 0.0, 1.0))


def _white(seed: int, s: int, shape: tuple[int, int]) -> np.ndarray:
  """White noise of slice s (s may be a little negative: the slabs above the first slice)."""
  return np.random.default_rng([seed, _NOISE, s + 64]).standard_normal(shape, dtype=np.float32)


def noise(seed: int, s: int, shape: tuple[int, int], corr_px: float, overlap: int) -> np.ndarray:
  """Unit-variance noise of slice s: white noise blurred in plane by a Gaussian of corr_px pixels,
  averaged with the `overlap - 1` slices before it (slabs thicker than the spacing share noise)."""
  m = min(max(int(overlap), 1), 64)
  white = sum(_white(seed, s - k, shape) for k in range(m)) / np.float32(np.sqrt(m))
  if corr_px <= 0:
    return white
  out = ndimage.gaussian_filter(white, corr_px, mode="reflect", truncate=4.0)
  radius = int(4.0 * corr_px + 0.5)
  k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / corr_px) ** 2)
  k /= k.sum()
  return out / np.float32(np.sum(k * k))  # the 2-D kernel's sum of squares, square-rooted


def _line(x: np.ndarray, y: np.ndarray, cx: float, cy: float, angle: float
          ) -> tuple[np.ndarray, np.ndarray]:
  """Distances across and along the line through (cx, cy) at `angle`."""
  dx, dy = x - cx, y - cy
  c, s = np.cos(angle), np.sin(angle)
  return np.abs(dx * s - dy * c), dx * c + dy * s


def metal_streaks(x: np.ndarray, y: np.ndarray, z: float, sources: tuple[MetalSource, ...],
                  slab_mm: float, px: float) -> np.ndarray | None:
  """The streak pattern (HU) of the metal objects whose extent meets this slice's slab."""
  active = [m for m in sources if abs(z - m.center[2]) <= m.half_z + slab_mm / 2]
  if not active:
    return None
  out = np.zeros(x.shape, np.float32)
  width = 1.2 * px
  for m in active:
    for angle, amp in zip(m.angles, m.amplitudes):
      across, along = _line(x, y, m.center[0], m.center[1], angle)
      out += amp * np.exp(-(across / width) ** 2) / (1.0 + np.abs(along) / 40.0)
  for i, a in enumerate(active):  # beam hardening: a dark band joining two objects
    for b in active[i + 1:]:
      angle = np.arctan2(b.center[1] - a.center[1], b.center[0] - a.center[0])
      length = np.hypot(b.center[0] - a.center[0], b.center[1] - a.center[1])
      across, along = _line(x, y, a.center[0], a.center[1], angle)
      inside = np.clip(np.minimum(along, length - along) / 3.0 + 0.5, 0.0, 1.0)
      depth = 0.4 * float(np.mean(np.abs(a.amplitudes)) + np.mean(np.abs(b.amplitudes)))
      out -= depth * np.exp(-(across / (2.5 * width)) ** 2) * inside
  return out


def shoulder_streaks(seed: int, s: int, x: np.ndarray, y: np.ndarray, spine_y: float,
                     amplitude: float, px: float) -> np.ndarray:
  """Near-lateral bright and dark streaks of slice s (amplitude HU at full shoulders)."""
  rng = np.random.default_rng([seed, _SHOULDER, s])
  out = np.zeros(x.shape, np.float32)
  cx = float(np.mean(x))
  for _ in range(int(rng.integers(2, 6))):
    angle = np.deg2rad(rng.uniform(-12.0, 12.0))
    across, _ = _line(x, y, cx, spine_y + float(rng.uniform(-30.0, 40.0)), angle)
    amp = amplitude * float(rng.uniform(0.4, 1.0)) * float(rng.choice([-1.0, 1.0]))
    out += amp * np.exp(-(across / (float(rng.uniform(0.8, 2.5)) * px)) ** 2)
  return out


def inside_body(vol: np.ndarray) -> np.ndarray:
  """Soft weight (0..1) of pixels inside the patient, where streaks show."""
  return np.clip((vol - _BODY_HU) / 200.0, 0.0, 1.0)
