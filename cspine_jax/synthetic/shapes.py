"""Signed-distance primitives for the phantom (millimetres, negative inside).

Every primitive is evaluated on float32 coordinate arrays of any (matching) shape, so a whole block of
voxels is one vectorised numpy expression. Distances are first-order approximations (exact for spheres
and circles, close near the surface of ellipses), which is all the cortical shell and partial-volume
blending need. A ``Prim`` is a frozen description that can be evaluated and bounded; ``mirror`` makes
it bilaterally symmetric (evaluated on ``|u|``), which halves the description of paired processes.
"""
from __future__ import annotations

import dataclasses

import numpy as np

_EPS = 1e-6


def ellipse(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
  """Approximate signed distance to an axis-aligned ellipse with half-axes a (x) and b (y)."""
  k = np.sqrt((x / a) ** 2 + (y / b) ** 2)
  g = np.sqrt((x / (a * a)) ** 2 + (y / (b * b)) ** 2)
  # (k - 1) / |grad k| with |grad k| = g / k; the ratio k / g depends only on the direction, and at the
  # centre (0 / 0) the distance is the shorter half-axis.
  ratio = np.where(g > _EPS, k / np.maximum(g, _EPS), min(a, b))
  return (k - 1.0) * ratio


def ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, rx: float, ry: float,
              rz: float) -> np.ndarray:
  """Approximate signed distance to an axis-aligned ellipsoid centred at the origin."""
  k = np.sqrt((x / rx) ** 2 + (y / ry) ** 2 + (z / rz) ** 2)
  g = np.sqrt((x / (rx * rx)) ** 2 + (y / (ry * ry)) ** 2 + (z / (rz * rz)) ** 2)
  ratio = np.where(g > _EPS, k / np.maximum(g, _EPS), min(rx, ry, rz))
  return (k - 1.0) * ratio


def slab(z: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """Signed distance to the slab lo <= z <= hi."""
  return np.maximum(lo - z, z - hi)


def capsule(x: np.ndarray, y: np.ndarray, z: np.ndarray, p0: tuple[float, float, float],
            p1: tuple[float, float, float], radius: float) -> np.ndarray:
  """Exact signed distance to the segment p0-p1 thickened by radius."""
  d = np.asarray(p1, np.float64) - np.asarray(p0, np.float64)
  dd = float(d @ d)
  px, py, pz = x - p0[0], y - p0[1], z - p0[2]
  t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / max(dd, _EPS), 0.0, 1.0)
  return np.sqrt((px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2) - radius


@dataclasses.dataclass(frozen=True)
class Prim:
  """One primitive in a local (u, v, w) frame.

  kind:    "cyl" (elliptic cylinder: centre (u, v), radii (a, b), w range), "ellipsoid" (centre (u, v,
           w), radii), "capsule" (p0, p1 as 6 numbers, radius), "annulus" (a cylinder minus a thinner
           inner one: centre (u, v), outer radii, inner radii, w range).
  params:  the numbers, in that order.
  mirror:  evaluate on |u| (a left/right pair).
  v_min:   clip to v >= v_min (e.g. keep only the posterior part of a ring); None = no clip.
  holes:   primitives subtracted from this one only.
  """
  kind: str
  params: tuple[float, ...]
  mirror: bool = False
  v_min: float | None = None
  holes: tuple["Prim", ...] = ()

  def sdf(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    if self.mirror:
      u = np.abs(u)
    p = self.params
    if self.kind == "cyl":
      cu, cv, a, b, lo, hi = p
      d = np.maximum(ellipse(u - cu, v - cv, a, b), slab(w, lo, hi))
    elif self.kind == "ellipsoid":
      cu, cv, cw, ru, rv, rw = p
      d = ellipsoid(u - cu, v - cv, w - cw, ru, rv, rw)
    elif self.kind == "capsule":
      d = capsule(u, v, w, p[0:3], p[3:6], p[6])
    elif self.kind == "annulus":
      cu, cv, ao, bo, ai, bi, lo, hi = p
      d = np.maximum(np.maximum(ellipse(u - cu, v - cv, ao, bo), -ellipse(u - cu, v - cv, ai, bi)),
                     slab(w, lo, hi))
    else:
      raise ValueError(f"unknown primitive kind {self.kind!r}")
    if self.v_min is not None:
      d = np.maximum(d, self.v_min - v)
    for hole in self.holes:
      d = np.maximum(d, -hole.sdf(u, v, w))
    return d

  def bounds(self) -> np.ndarray:
    """Local axis-aligned bounds [[u0, v0, w0], [u1, v1, w1]] (holes ignored: they only remove)."""
    p = self.params
    if self.kind == "cyl":
      lo = [p[0] - p[2], p[1] - p[3], p[4]]
      hi = [p[0] + p[2], p[1] + p[3], p[5]]
    elif self.kind == "ellipsoid":
      lo = [p[0] - p[3], p[1] - p[4], p[2] - p[5]]
      hi = [p[0] + p[3], p[1] + p[4], p[2] + p[5]]
    elif self.kind == "capsule":
      lo = list(np.minimum(p[0:3], p[3:6]) - p[6])
      hi = list(np.maximum(p[0:3], p[3:6]) + p[6])
    elif self.kind == "annulus":
      lo = [p[0] - p[2], p[1] - p[3], p[6]]
      hi = [p[0] + p[2], p[1] + p[3], p[7]]
    else:
      raise ValueError(f"unknown primitive kind {self.kind!r}")
    lo, hi = np.array(lo, np.float64), np.array(hi, np.float64)
    if self.mirror:
      m = max(abs(lo[0]), abs(hi[0]))
      lo[0], hi[0] = -m, m
    if self.v_min is not None:
      lo[1] = max(lo[1], self.v_min)
    return np.stack([lo, hi])


def union_sdf(prims: tuple[Prim, ...], u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Signed distance to the union of prims (min of the distances)."""
  d = prims[0].sdf(u, v, w)
  for prim in prims[1:]:
    d = np.minimum(d, prim.sdf(u, v, w))
  return d


def union_bounds(prims: tuple[Prim, ...]) -> np.ndarray:
  b = np.stack([p.bounds() for p in prims])
  return np.stack([b[:, 0].min(axis=0), b[:, 1].max(axis=0)])
