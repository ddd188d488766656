"""Which vertebrae are fractured (RSNA-like prevalence) and what each fracture looks like.

A fracture is one or more ``Break``s: a plane through one part of a vertebra (body, dens, arch, ring,
spinous process, lateral mass). Voxels of that part within ``gap / 2`` of the plane get hematoma-like HU
(a dark line through the cortex and the cancellous bone), and a convex part may have the fragment on
the positive side of the plane displaced by ``shift``. Planes are steep (their normal mostly in the
axial plane) so a break crosses every slice of its part; the gap scales with the pixel size so a
64-pixel crop of the vertebra shows it, while it stays a few millimetres wide and local.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from cspine_jax.synthetic.anatomy import CERVICAL, Anatomy, Bone

# Share of studies with a fracture of each vertebra in the RSNA 2022 training set (2,019 studies),
# and of positive patients; per positive patient 1, 2, 3 or 4 fractured vertebrae.
VERTEBRA_RATES = (0.072, 0.141, 0.036, 0.053, 0.080, 0.137, 0.195)
POSITIVE_RATE = 0.476
COUNT_PROBS = (0.64, 0.25, 0.08, 0.03)
# Adjacent levels fracture together more often (C1+C2, C6+C7).
ADJACENT_BOOST = 1.5


@dataclasses.dataclass(frozen=True)
class Break:
  """One fracture plane in the local frame of vertebra `label` (1..7).

  point, normal: the plane (local u, v, w mm; normal unit length).
  gap:           width (mm) of the dark line.
  shift:         local displacement of the fragment on the positive side (zeros = none).
  radius:        the line is drawn only within this distance (mm) of `point` (keeps it local).
  """
  label: int
  part: str
  point: tuple[float, float, float]
  normal: tuple[float, float, float]
  gap: float
  shift: tuple[float, float, float]
  radius: float


def sample_fractured(rng: np.random.Generator) -> tuple[int, ...]:
  """Sorted 0-based vertebra indices (0 = C1) fractured in one patient; () for a negative patient."""
  if rng.random() >= POSITIVE_RATE:
    return ()
  count = int(rng.choice(len(COUNT_PROBS), p=COUNT_PROBS)) + 1
  weights = np.asarray(VERTEBRA_RATES, np.float64)
  chosen: list[int] = []
  for _ in range(count):
    w = weights.copy()
    w[chosen] = 0.0
    for c in chosen:
      for n in (c - 1, c + 1):
        if 0 <= n < len(w) and n not in chosen:
          w[n] *= ADJACENT_BOOST
    chosen.append(int(rng.choice(len(w), p=w / w.sum())))
  return tuple(sorted(chosen))


def _unit(v) -> tuple[float, float, float]:
  v = np.asarray(v, np.float64)
  return tuple(float(x) for x in v / np.linalg.norm(v))


def _steep_normal(rng: np.random.Generator, azimuth: float, max_tilt_deg: float = 30.0):
  """A plane normal mostly in the axial (u, v) plane: the break then crosses all slices of its part."""
  tilt = np.deg2rad(rng.uniform(-max_tilt_deg, max_tilt_deg))
  return _unit([np.cos(tilt) * np.cos(azimuth), np.cos(tilt) * np.sin(azimuth), np.sin(tilt)])


def _break_for(rng: np.random.Generator, bone: Bone, part: str, gap: float, shift_mm: float
               ) -> Break:
  m = bone.landmarks
  side = float(rng.choice([-1.0, 1.0]))
  no_shift = (0.0, 0.0, 0.0)
  if part == "body":
    _, _, _, a, b, h = m["body"]
    point = (rng.uniform(-0.45, 0.45) * a, rng.uniform(-0.45, 0.45) * b,
             rng.uniform(-0.15, 0.15) * h)
    normal = _steep_normal(rng, rng.uniform(0, np.pi))
    # Displace along the plane (a step in the cortex) and slightly apart (an opening).
    n = np.asarray(normal)
    along = np.cross(n, [0.0, 0.0, 1.0])
    along = along / max(np.linalg.norm(along), 1e-6)
    shift = tuple(float(x) for x in shift_mm * (0.8 * side * along + 0.5 * n))
    return Break(bone.label, "body", point, normal, gap, shift, radius=2.5 * max(a, b, h / 2))
  if part == "dens":
    u0, v0, w0, _, _, w1, r = m["dens"]
    point = (u0, v0, w0 + rng.uniform(0.35, 0.6) * (w1 - w0))
    # A type II/III line, steep (50-70 degrees from the axial plane) so that it shows as a line
    # across the dens in many axial slices.
    tilt = np.deg2rad(rng.uniform(50, 70))
    az = rng.uniform(0, 2 * np.pi)
    normal = _unit([np.sin(tilt) * np.cos(az), np.sin(tilt) * np.sin(az), np.cos(tilt)])
    shift = (0.0, side * max(shift_mm, 3.0), 0.0)
    return Break(bone.label, "dens", point, normal, gap, shift, radius=3 * r)
  if part in ("arch", "ring"):
    if part == "arch":
      vc, ca, cb, th = m["arch"]
      ra, rb, cv = ca + th / 2, cb + th / 2, vc
      theta = rng.uniform(np.deg2rad(25), np.deg2rad(80)) * side  # from the posterior midline
    else:
      _, cv, _, ra, rb, _ = m["ring"]
      # The anterior arch (around pi) or the posterior arch (around 0).
      theta = ((np.pi if rng.random() < 0.5 else 0.0)
               + rng.uniform(np.deg2rad(15), np.deg2rad(50)) * side)
    point = (ra * np.sin(theta), cv + rb * np.cos(theta), 0.0)
    # Normal = the ring's tangent there, so the plane cuts across the bar.
    tangent = [ra * np.cos(theta), -rb * np.sin(theta), 0.0]
    normal = _steep_normal(rng, np.arctan2(tangent[1], tangent[0]), 20.0)
    # No fragment shift on a ring (the plane meets it twice); a wider cleft instead.
    return Break(bone.label, part, point, normal, gap * 1.5, no_shift, radius=max(ra, rb) * 0.45)
  if part == "spinous":
    p0, p1, r = np.asarray(m["spinous"][:3]), np.asarray(m["spinous"][3:6]), m["spinous"][6]
    point = tuple(float(x) for x in p0 + rng.uniform(0.45, 0.7) * (p1 - p0))
    normal = _unit(p1 - p0)
    return Break(bone.label, part, point, normal, gap, (0.0, 0.0, -shift_mm), radius=3 * r)
  if part == "lateral_mass":
    u, v, w = m["lateral_mass"]
    point = (side * u, v, w)
    normal = _steep_normal(rng, rng.uniform(0, np.pi))
    shift = tuple(float(x) for x in shift_mm * np.asarray([side * 0.8, 0.3, 0.0]))
    return Break(bone.label, part, point, normal, gap, shift, radius=12.0)
  raise ValueError(f"no fracture model for part {part!r} of {bone.name}")


# Where the (first) break goes, per vertebra kind: (part, probability).
_MAJOR = {"C1": (("ring", 0.7), ("lateral_mass", 0.3)),
          "C2": (("dens", 0.35), ("body", 0.55), ("arch", 0.1))}
_MAJOR_TYPICAL = (("body", 0.85), ("arch", 0.15))
_MINOR = {"C1": ("ring",), "C2": ("arch", "body"), "C7": ("arch", "spinous")}
_MINOR_TYPICAL = ("arch",)


def sample_breaks(rng: np.random.Generator, anatomy: Anatomy, fractured: tuple[int, ...],
                  pixel_mm: float) -> tuple[Break, ...]:
  """Breaks for the fractured vertebrae (0-based indices) on a grid of in-plane pixel size pixel_mm.

  The gap is at least 2.5 mm and about two pixels, capped at 5 mm; the fragment shift 2-3.5 mm, at
  least 1.5 pixels. Each fractured vertebra gets one major break and sometimes a second one.
  """
  gap = float(np.clip(2.0 * pixel_mm, 2.5, 5.0))
  breaks = []
  for idx in fractured:
    name = CERVICAL[idx]
    bone = anatomy.vertebra(name)
    options = _MAJOR.get(name, _MAJOR_TYPICAL)
    parts = [p for p, _ in options]
    probs = np.array([q for _, q in options])
    shift_mm = max(float(rng.uniform(2.0, 3.5)), 1.5 * pixel_mm)
    major = str(rng.choice(parts, p=probs / probs.sum()))
    breaks.append(_break_for(rng, bone, major, gap * float(rng.uniform(1.0, 1.25)), shift_mm))
    # C1 breaks in two places (a Jefferson-type ring fracture) more often than the others.
    if rng.random() < (0.8 if name == "C1" else 0.35):
      minor = str(rng.choice(_MINOR.get(name, _MINOR_TYPICAL)))
      breaks.append(_break_for(rng, bone, minor, gap, shift_mm * 0.6))
  return tuple(breaks)
