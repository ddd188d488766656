"""Trabecular texture: a smooth random field in a bone's own frame (it moves with the bone).

Two octaves of trilinearly interpolated Gaussian values: a fine one (cells of about a pixel, but not
under 0.9 mm in plane and longer along the spine's axis, as trabeculae run mostly vertically) and a
coarse one (4 mm: marrow heterogeneity). A coarse pixel averages many trabeculae, so the fine
octave's amplitude shrinks with the pixel size.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from cspine_jax.synthetic.anatomy import Bone

# Standard deviation of trilinear interpolation of unit white noise at uniform positions: (2/3)^1.5.
_TRILINEAR_STD = (2.0 / 3.0) ** 1.5
_MIN_CELL_MM = 0.9
_MARROW_CELL_MM = 4.0


@dataclasses.dataclass(frozen=True, eq=False)
class Texture:
  """Gridded octaves over a bone's local box: origin (3,) mm, per octave cell (3,) mm, values
  (scaled to HU)."""
  origin: np.ndarray
  cells: tuple[np.ndarray, ...]
  values: tuple[np.ndarray, ...]

  def sample(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """HU at local points (any matching shapes), trilinear within each octave."""
    out = np.zeros(u.shape, np.float32)
    for cell, grid in zip(self.cells, self.values):
      out += _trilinear(grid, [(c - o) / s for c, o, s in zip((u, v, w), self.origin, cell)])
    return out


def _trilinear(grid: np.ndarray, coords: list[np.ndarray]) -> np.ndarray:
  """Trilinear interpolation of grid at fractional indices (clamped to the grid)."""
  flat = grid.reshape(-1)
  base = np.zeros(coords[0].shape, np.int64)
  fracs = []
  for d, c in enumerate(coords):
    i = np.clip(np.floor(c), 0, grid.shape[d] - 2).astype(np.int64)
    fracs.append(np.clip(c - i, 0.0, 1.0).astype(np.float32))
    base = base + i * grid.strides[d] // grid.itemsize
  out = np.zeros(coords[0].shape, np.float32)
  st = [grid.strides[d] // grid.itemsize for d in range(3)]
  for du in (0, 1):
    wu = fracs[0] if du else 1.0 - fracs[0]
    for dv in (0, 1):
      wuv = wu * (fracs[1] if dv else 1.0 - fracs[1])
      for dw in (0, 1):
        weight = wuv * (fracs[2] if dw else 1.0 - fracs[2])
        out += weight * flat[base + du * st[0] + dv * st[1] + dw * st[2]]
  return out


def make(bone: Bone, rng: np.random.Generator, texture_hu: float, marrow_hu: float,
         pixel_mm: float) -> Texture:
  """The texture of one bone: fine octave texture_hu (at 1 mm pixels), coarse octave marrow_hu."""
  bounds = bone.local_bounds(3.0)
  extent = bounds[1] - bounds[0]
  fine = max(pixel_mm, _MIN_CELL_MM)
  cells, values = [], []
  for cell, amp in ((np.array([fine, fine, 1.6 * fine]), texture_hu * min(1.0, 1.0 / pixel_mm)),
                    (np.full(3, _MARROW_CELL_MM), marrow_hu)):
    shape = tuple(int(np.ceil(e / c)) + 2 for e, c in zip(extent, cell))
    grid = rng.standard_normal(shape, dtype=np.float32) * np.float32(amp / _TRILINEAR_STD)
    cells.append(cell)
    values.append(grid)
  return Texture(bounds[0].astype(np.float64), tuple(cells), tuple(values))
