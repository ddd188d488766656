"""Which vertebrae are fractured (RSNA-like prevalence) and what each fracture looks like.

A fracture is one or more ``Break``s: a plane through one part of a vertebra (body, dens, arch, ring,
spinous process, lateral mass). Voxels of that part within ``gap / 2`` of the plane get hematoma-like HU
(a dark line through the cortex and the cancellous bone), and a convex part may have the fragment on
the positive side of the plane displaced by ``shift``.

The "easy" breaks (``sample_breaks``) have steep planes (their normal mostly in the axial plane) so a
break crosses every slice of its part; the gap scales with the pixel size so a 64-pixel crop of the
vertebra shows it, and the cleft is a flat 45 HU. The realistic ones (``sample_realistic``) have
physical widths (hairlines of about a millimetre, on a few slices), planes of any orientation
(near-axial for type II dens fractures), a cleft whose contrast is a share of the local bone's
(``depth``), and ``Compression``s: a vertebral body that lost height, with a sclerotic band under
the collapsed endplate.
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
  depth:         None: the cleft is GAP_HU (easy); else the share of the way from the local bone
                 value to hematoma HU, blended by the share of each voxel the gap covers.
  kind, subtype: for the ground truth: "cleft" | "dens"; "hairline" | "displaced" | "type II" ...
  """
  label: int
  part: str
  point: tuple[float, float, float]
  normal: tuple[float, float, float]
  gap: float
  shift: tuple[float, float, float]
  radius: float
  depth: float | None = None
  kind: str = "cleft"
  subtype: str = "displaced"

  def describe(self) -> dict:
    """The ground-truth entry: kind, part, width and shift (mm), the plane's angle to the axial
    plane (degrees, in the vertebra's frame: 90 = a steep plane crossing every slice)."""
    tilt = float(np.degrees(np.arcsin(min(abs(self.normal[2]), 1.0))))
    kind = "dens" if self.part == "dens" else self.kind
    return {"kind": kind, "subtype": self.subtype, "part": self.part,
            "width_mm": round(self.gap, 3), "shift_mm": round(float(np.linalg.norm(self.shift)), 3),
            "depth": None if self.depth is None else round(self.depth, 3),
            "plane_to_axial_deg": round(90.0 - tilt, 1), "radius_mm": round(self.radius, 2)}


@dataclasses.dataclass(frozen=True)
class Compression:
  """A compression fracture of vertebral body `label`: the superior endplate collapsed by
  ``loss * f(u, v) * h`` (f = 1 where it collapses most), the disc above filling the space, and a
  sclerotic band (impacted trabeculae) of ``band_mm`` under the new endplate.

  pattern: "wedge" (anterior collapse), "crush" (uniform), "biconcave" (the endplate's centre).
  body:    (a, b, h) of the body primitive (local half axes and height, mm).
  """
  label: int
  loss: float
  pattern: str
  band_mm: float
  band_hu: float
  body: tuple[float, float, float]

  def collapse(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Share f(u, v) of the full loss at each point of the endplate."""
    a, b, _ = self.body
    if self.pattern == "wedge":
      return np.clip(0.55 - 0.45 * v / b, 0.1, 1.0)
    if self.pattern == "crush":
      return np.ones_like(u)
    if self.pattern == "biconcave":
      return np.clip(1.0 - (u / a) ** 2 - (v / b) ** 2, 0.0, 1.0)
    raise ValueError(f"unknown compression pattern {self.pattern!r}")

  def top(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Local w of the collapsed superior endplate."""
    h = self.body[2]
    return h / 2 - self.loss * h * self.collapse(u, v)

  def warp(self, u: np.ndarray, v: np.ndarray, w: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compressed local coordinates -> the intact body's (the inferior endplate stays)."""
    h = self.body[2]
    scale = 1.0 - self.loss * self.collapse(u, v)
    return u, v, -h / 2 + (w + h / 2) / scale

  def describe(self) -> dict:
    h = self.body[2]
    return {"kind": "compression", "subtype": self.pattern, "part": "body",
            "height_loss": round(self.loss, 3), "height_loss_mm": round(self.loss * h, 2),
            "height_mm": round(h, 2), "band_mm": round(self.band_mm, 2),
            "band_hu": round(self.band_hu, 1)}


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


def _sphere_normal(rng: np.random.Generator) -> tuple[float, float, float]:
  """A plane normal of any orientation (uniform on the sphere, pointing up)."""
  v = rng.standard_normal(3)
  v = v * (1.0 if v[2] >= 0 else -1.0)
  return _unit(v)


def _in_plane(normal, rng: np.random.Generator) -> np.ndarray:
  """A random unit direction within the plane of `normal`."""
  n = np.asarray(normal)
  d = rng.standard_normal(3)
  d -= (d @ n) * n
  return d / max(np.linalg.norm(d), 1e-6)


def _cleft_size(rng: np.random.Generator, level, hairline: bool) -> tuple[float, float, float]:
  """(width mm, shift mm, depth) of a hairline or a displaced break."""
  if hairline:
    width, shift = rng.uniform(*level.hairline_width), rng.uniform(*level.hairline_shift)
  else:
    width, shift = rng.uniform(*level.displaced_width), rng.uniform(*level.displaced_shift)
  return float(width), float(shift), float(rng.uniform(*level.cleft_depth))


def _real_break(rng: np.random.Generator, level, bone: Bone, part: str, hairline: bool) -> Break:
  """A break of `part` with a physical width, any plane orientation the part allows, a cleft
  contrast relative to the bone, and (hairlines) a short reach."""
  m = bone.landmarks
  width, shift_mm, depth = _cleft_size(rng, level, hairline)
  subtype = "hairline" if hairline else "displaced"
  short = float(rng.uniform(*level.hairline_radius))
  side = float(rng.choice([-1.0, 1.0]))
  zero = (0.0, 0.0, 0.0)
  if part == "body":
    _, _, _, a, b, h = m["body"]
    point = (float(rng.uniform(-0.45, 0.45) * a), float(rng.uniform(-0.45, 0.45) * b),
             float(rng.uniform(-0.3, 0.3) * h))
    normal = _sphere_normal(rng)
    shift = tuple(float(x) for x in shift_mm * (0.9 * _in_plane(normal, rng)
                                                 + 0.3 * np.asarray(normal)))
    radius = short if hairline else 2.5 * max(a, b, h / 2)
    return Break(bone.label, part, point, normal, width, shift, radius, depth, "cleft", subtype)
  if part in ("arch", "ring"):
    if part == "arch":
      vc, ca, cb, th = m["arch"]
      ra, rb, cv = ca + th / 2, cb + th / 2, vc
      theta = rng.uniform(np.deg2rad(25), np.deg2rad(80)) * side
    else:
      _, cv, _, ra, rb, _ = m["ring"]
      theta = ((np.pi if rng.random() < 0.5 else 0.0)
               + rng.uniform(np.deg2rad(15), np.deg2rad(50)) * side)
    point = (float(ra * np.sin(theta)), float(cv + rb * np.cos(theta)), 0.0)
    tangent = [ra * np.cos(theta), -rb * np.sin(theta), 0.0]
    # Across the bar, tilted up to 60 degrees out of the axial plane.
    normal = _steep_normal(rng, np.arctan2(tangent[1], tangent[0]), 60.0)
    radius = min(short, max(ra, rb) * 0.45) if hairline else max(ra, rb) * 0.45
    return Break(bone.label, part, point, normal, width, zero, radius, depth, "cleft", subtype)
  if part == "spinous":
    p0, p1, r = np.asarray(m["spinous"][:3]), np.asarray(m["spinous"][3:6]), m["spinous"][6]
    point = tuple(float(x) for x in p0 + rng.uniform(0.45, 0.7) * (p1 - p0))
    axis = (p1 - p0) / np.linalg.norm(p1 - p0)
    normal = _unit(axis + 0.45 * rng.standard_normal(3))
    return Break(bone.label, part, point, normal, width, (0.0, 0.0, -shift_mm), 3 * r, depth,
                 "cleft", subtype)
  if part == "lateral_mass":
    u, v, w = m["lateral_mass"]
    normal = _sphere_normal(rng)
    shift = tuple(float(x) for x in shift_mm * np.asarray([side * 0.8, 0.3, 0.0]))
    return Break(bone.label, part, (side * u, v, w), normal, width, shift,
                 short if hairline else 12.0, depth, "cleft", subtype)
  raise ValueError(f"no fracture model for part {part!r} of {bone.name}")


def _dens_break(rng: np.random.Generator, level, bone: Bone) -> Break:
  """Type II (near-axial, at the base of the dens: on one or two axial slices) or type III (an
  oblique line into the upper C2 body)."""
  _, v0, _, _, _, _, r = bone.landmarks["dens"]
  _, _, _, a, b, h = bone.landmarks["body"]
  hairline = bool(rng.random() < level.hairline_share)
  width, shift_mm, depth = _cleft_size(rng, level, hairline)
  az = rng.uniform(0, 2 * np.pi)
  if rng.random() < level.dens_type2:
    tilt = np.deg2rad(rng.uniform(0, 20))  # of the normal from the spine's axis
    w = h / 2 + float(rng.uniform(-0.5, 2.0))
    normal = _unit([np.sin(tilt) * np.cos(az), np.sin(tilt) * np.sin(az), np.cos(tilt)])
    # The dens moves as a whole, mostly forwards or backwards.
    shift = (0.0, float(rng.choice([-1.0, 1.0])) * shift_mm, 0.0)
    return Break(bone.label, "dens", (0.0, v0, w), normal, width, shift, 3 * r, depth, "dens",
                 "type II")
  tilt = np.deg2rad(rng.uniform(20, 45))
  normal = _unit([np.sin(tilt) * np.cos(az), np.sin(tilt) * np.sin(az), np.cos(tilt)])
  point = (0.0, float(rng.uniform(-0.3, 0.3) * b), float(rng.uniform(0.1, 0.35) * h))
  return Break(bone.label, "body", point, normal, width, (0.0, 0.0, 0.0), 1.3 * max(a, b), depth,
               "dens", "type III")


def _compression(rng: np.random.Generator, level, bone: Bone) -> Compression:
  _, _, _, a, b, h = bone.landmarks["body"]
  pattern = str(rng.choice(["wedge", "crush", "biconcave"], p=[0.6, 0.2, 0.2]))
  return Compression(bone.label, float(rng.uniform(*level.height_loss)), pattern,
                     float(rng.uniform(*level.band_mm)), float(rng.uniform(*level.band_hu)),
                     (float(a), float(b), float(h)))


def sample_realistic(rng: np.random.Generator, anatomy: Anatomy, fractured: tuple[int, ...], level
                     ) -> tuple[tuple[Break, ...], tuple[Compression, ...]]:
  """Breaks and compressions for the fractured vertebrae (0-based) at a realistic ``level``
  (``difficulty.Level``): C1 ring / lateral mass breaks (often two), C2 dens (type II / III), body
  or arch, C3-C7 by ``level.body_kinds``; sometimes a second, minor break."""
  breaks: list[Break] = []
  compressions: list[Compression] = []
  kinds = [k for k, _ in level.body_kinds]
  weights = np.array([w for _, w in level.body_kinds], np.float64)
  for idx in fractured:
    name = CERVICAL[idx]
    bone = anatomy.vertebra(name)
    hairline = bool(rng.random() < level.hairline_share)
    if name == "C1":
      part = "ring" if rng.random() < 0.7 else "lateral_mass"
      breaks.append(_real_break(rng, level, bone, part, hairline))
      if rng.random() < 0.6:  # Jefferson-type: the ring breaks in two places
        breaks.append(_real_break(rng, level, bone, "ring", bool(rng.random() < 0.5)))
      continue
    if name == "C2":
      r = rng.random()
      if r < 0.4:
        breaks.append(_dens_break(rng, level, bone))
        continue
      body = np.array([k in ("hairline", "displaced", "compression") for k in kinds])
      kind = ("arch" if r > 0.85 else
              str(rng.choice(np.asarray(kinds)[body], p=weights[body] / weights[body].sum())))
    else:
      kind = str(rng.choice(kinds, p=weights / weights.sum()))
    if kind == "compression":
      compressions.append(_compression(rng, level, bone))
    elif kind in ("hairline", "displaced"):
      breaks.append(_real_break(rng, level, bone, "body", kind == "hairline"))
    else:
      breaks.append(_real_break(rng, level, bone, kind, hairline))
    if rng.random() < 0.25:
      minor = "spinous" if name in ("C6", "C7") and rng.random() < 0.5 else "arch"
      breaks.append(_real_break(rng, level, bone, minor, True))
  return tuple(breaks), tuple(compressions)
