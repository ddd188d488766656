"""A plausible neck CT phantom: body outline, airway, canal, skull base, mandible and vertebrae.

Everything is described in patient coordinates (LPS, mm) and rendered by ``render.py`` on any scanner
grid. Vertebrae are unions of signed-distance primitives (``shapes.Prim``) in a local frame: u lateral
(+ = patient left), v posterior, w along the spine towards the head; the frame follows the lordotic
curve of the cervical spine. Labels: 1..7 = C1..C7, 8.. = T1.. (the RSNA segmentation convention);
other bones carry label 0.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from cspine_jax.synthetic.shapes import Prim, union_bounds

CERVICAL = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
THORACIC = ("T1", "T2", "T3", "T4")
LEVELS = CERVICAL + THORACIC

# Hounsfield units of the soft tissues (the bones draw theirs per structure).
AIR_HU = -1000.0
FAT_HU = -95.0
MUSCLE_HU = 45.0
CSF_HU = 8.0
CORD_HU = 35.0
DISC_HU = 85.0
TABLE_HU = 250.0
FOAM_HU = -750.0


@dataclasses.dataclass(frozen=True, eq=False)
class Bone:
  """A bone in its own local frame.

  label:        segmentation label (1..7 C1..C7, 8.. thoracic; 0 = not segmented, e.g. the skull).
  name:         "C1".."T4", "skull", "mandible".
  center:       (3,) LPS origin of the local frame.
  axes:         (3, 3) rows = the u, v, w unit vectors in LPS.
  parts:        part name -> primitives (the union of all parts is the bone; fractures act on a part).
  holes:        primitives cut out of the whole bone (the spinal canal).
  soft:         (primitive, HU) soft-tissue blobs drawn before the bone (the disc above the body).
  cortical_hu, cancellous_hu, cortex_mm: the shell and the interior.
  landmarks:    named local points/sizes the fracture sampler aims at.
  max_bounds:   optional (2, 3) local box the bone is clipped to (only part of the skull is drawn).
  pits:         (primitive, rim mm) cut out of the bone with a thin cortical rim of their own
                (vascular channels, congenital clefts, Schmorl's nodes; also out of the mask).
  densities:    (primitive, HU) added to the bone's value inside the primitive (bone islands,
                endplate sclerosis).
  """
  label: int
  name: str
  center: np.ndarray
  axes: np.ndarray
  parts: dict[str, tuple[Prim, ...]]
  holes: tuple[Prim, ...] = ()
  soft: tuple[tuple[Prim, float], ...] = ()
  cortical_hu: float = 950.0
  cancellous_hu: float = 280.0
  cortex_mm: float = 1.3
  landmarks: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
  max_bounds: np.ndarray | None = None
  pits: tuple[tuple[Prim, float], ...] = ()
  densities: tuple[tuple[Prim, float], ...] = ()

  def local(self, x: np.ndarray, y: np.ndarray, z: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS coordinates -> local (u, v, w)."""
    dx, dy, dz = x - self.center[0], y - self.center[1], z - self.center[2]
    a = self.axes.astype(np.float32)
    return tuple(dx * a[i, 0] + dy * a[i, 1] + dz * a[i, 2] for i in range(3))

  def local_bounds(self, margin: float = 2.0) -> np.ndarray:
    prims = [p for ps in self.parts.values() for p in ps] + [p for p, _ in self.soft]
    b = union_bounds(tuple(prims))
    if self.max_bounds is not None:
      b = np.stack([np.maximum(b[0], self.max_bounds[0]), np.minimum(b[1], self.max_bounds[1])])
    return b + np.array([[-margin], [margin]])

  def lps_corners(self, margin: float = 2.0) -> np.ndarray:
    """(8, 3) LPS corners of the local bounding box."""
    b = self.local_bounds(margin)
    idx = np.array(np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij")).reshape(3, -1).T
    local = np.stack([b[idx[:, 0], 0], b[idx[:, 1], 1], b[idx[:, 2], 2]], axis=1)
    return self.center + local @ self.axes


@dataclasses.dataclass(frozen=True, eq=False)
class Anatomy:
  """The whole phantom.

  bones:        vertebrae (labels 1..) and unlabelled bones, drawn in this order.
  spine_z:      increasing z knots of the spine centreline; spine_x, spine_y its LPS x, y there.
  outline_*:    per-knot body outline (at spine_z): half width, anterior and posterior skin offsets
                from the spine centreline (y).
  airway_*:     per-knot airway half axes and the offset of its centre in front of the spine.
  canal_*:      per-knot canal (CSF) half axes and the offset of its centre behind the spine.
  fat_mm:       subcutaneous fat thickness.
  table_y:      LPS y of the CT table top (posterior of the patient).
  noise_hu:     standard deviation of the scanner noise.
  """
  bones: tuple[Bone, ...]
  spine_z: np.ndarray
  spine_x: np.ndarray
  spine_y: np.ndarray
  outline_rx: np.ndarray
  outline_ant: np.ndarray
  outline_post: np.ndarray
  airway_rx: np.ndarray
  airway_ry: np.ndarray
  airway_off: np.ndarray
  canal_rx: np.ndarray
  canal_ry: np.ndarray
  canal_off: np.ndarray
  fat_mm: float
  table_y: float
  noise_hu: float

  def vertebra(self, name: str) -> Bone:
    for b in self.bones:
      if b.name == name:
        return b
    raise KeyError(name)

  @property
  def vertebrae(self) -> tuple[Bone, ...]:
    return tuple(b for b in self.bones if b.label > 0)

  def profile(self, z: float) -> dict[str, float]:
    """Soft-tissue cross-section parameters at height z (linear between knots, flat outside)."""
    keys = ("spine_x", "spine_y", "outline_rx", "outline_ant", "outline_post", "airway_rx",
            "airway_ry", "airway_off", "canal_rx", "canal_ry", "canal_off")
    return {k: float(np.interp(z, self.spine_z, getattr(self, k))) for k in keys}


def _frame(tilt: float) -> np.ndarray:
  """Local axes for a vertebra whose long axis leans by `tilt` radians towards posterior (+y)."""
  s, c = np.sin(tilt), np.cos(tilt)
  return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _atlas(k: float) -> tuple[dict, tuple, dict]:
  """C1: a ring with lateral masses and long transverse processes, no body (origin on the dens axis)."""
  ring = Prim("annulus", (0, 9 * k, 18 * k, 19.5 * k, 14 * k, 15.5 * k, -4.5 * k, 4.5 * k))
  masses = Prim("ellipsoid", (14.5 * k, 3 * k, 0, 7 * k, 9.5 * k, 6 * k), mirror=True)
  foramen = Prim("cyl", (25 * k, 3.5 * k, 2.8 * k, 2.8 * k, -20, 20))
  tp = Prim("capsule", (19 * k, 3 * k, 0, 34 * k, 4.5 * k, 0, 4.5 * k), mirror=True,
            holes=(foramen,))
  tubercles = (Prim("ellipsoid", (0, -10 * k, 0, 5 * k, 3 * k, 5 * k)),
               Prim("ellipsoid", (0, 28 * k, 0, 4 * k, 4 * k, 5 * k)))
  parts = {"ring": (ring,) + tubercles, "lateral_mass": (masses,), "tp": (tp,)}
  marks = {"ring": (0, 9 * k, 0, 16 * k, 17.5 * k, 4 * k),  # centre, mid-ring radii, thickness
            "lateral_mass": (14.5 * k, 3 * k, 0)}
  return parts, (), marks


def _typical(level: int, k: float, h: float, thoracic: bool) -> tuple[dict, tuple, dict]:
  """C2..C7 (level 1..6, the 0-based cervical index) or T1.. (thoracic=True, level 0-based).

  h is the body height (mm); the other sizes scale with k.
  """
  if thoracic:
    t = level
    a, b = (12 + 0.8 * t) * k, (9 + 0.8 * t) * k
    ca, cb, th = 8.5 * k, 7.5 * k, 4.5 * k
  elif level == 1:  # C2
    a, b = 8.5 * k, 8 * k
    ca, cb, th = 12 * k, 8 * k, 4.5 * k
  else:
    t = (level - 2) / 4.0  # C3 -> 0, C7 -> 1
    a, b = (8 + 2.5 * t) * k, (7 + 1.2 * t) * k
    ca, cb, th = (11.5 + 0.5 * t) * k, 6.5 * k, (3.2 + 0.6 * t) * k
  vc = b + cb + 0.5 * k  # canal centre, just behind the body
  body = Prim("cyl", (0, 0, a, b, -h / 2, h / 2))
  arch = Prim("annulus", (0, vc, ca + th, cb + th, ca, cb, -h / 2 + 1.5 * k, h / 2 - 1.0 * k),
              v_min=b - 2 * k)
  sp0 = vc + cb + th - 1.0 * k
  parts: dict[str, tuple[Prim, ...]] = {"body": (body,), "arch": (arch,)}
  marks: dict[str, tuple[float, ...]] = {"body": (0, 0, 0, a, b, h), "arch": (vc, ca, cb, th)}
  if thoracic:
    parts["pillar"] = (Prim("ellipsoid", (ca + 2.5 * k, vc, 0, 5.5 * k, 6.5 * k, h / 2 + 1.8 * k),
                            mirror=True),)
    parts["tp"] = (Prim("capsule", (ca + 3 * k, vc + 2 * k, 1 * k, ca + 26 * k, vc + 10 * k, 1 * k,
                                    5 * k), mirror=True),)
    length = 30 * k
    sp1 = (0, sp0 + 0.7 * length, -1 * k - 0.7 * length)
    sp_r = 3.5 * k
  else:
    c2 = level == 1
    parts["pillar"] = (Prim("ellipsoid", (ca + 1.5 * k, vc - 1 * k, -3 * k if c2 else 0, 5.5 * k,
                                          7 * k, (5.5 if c2 else h / 2 / k + 1.8) * k),
                            mirror=True),)
    tw = (5 if c2 else 7 + 2 * max(level - 2, 0) / 4) * k
    foramen = Prim("cyl", (a + 4.5 * k, 0.1 * b, 2.6 * k, 2.6 * k, -20, 20))
    parts["tp"] = (Prim("cyl", (a + tw - 1.5 * k, 0.1 * b, tw, 4.2 * k, -3.5 * k, 2.5 * k),
                        mirror=True, holes=(foramen,)),)
    length = (18 if c2 else 10 + 15 * ((level - 2) / 4.0) ** 2) * k
    sp1 = (0, sp0 + length, -1 * k - 0.45 * length)
    sp_r = (4.5 if c2 else 3.0 + 0.5 * (level - 2) / 4.0) * k
    if c2:
      parts["dens"] = (Prim("capsule", (0, 0.5 * k, 4 * k, 0, 0.5 * k, 14 * k, 5 * k)),)
      parts["facet"] = (Prim("ellipsoid", (12.5 * k, 2 * k, 3.5 * k, 7 * k, 8 * k, 3.5 * k),
                             mirror=True),)
      marks["dens"] = (0, 0.5 * k, 4 * k, 0, 0.5 * k, 14 * k, 5 * k)
  sp_start = (0, sp0, -1 * k)
  parts["spinous"] = (Prim("capsule", sp_start + sp1 + (sp_r,)),)
  marks["spinous"] = sp_start + sp1 + (sp_r,)
  holes = (Prim("cyl", (0, vc, ca, cb, -40, 40)),)
  return parts, holes, marks


def _lordosis(z: np.ndarray, z1: float, z7: float, y0: float, depth: float) -> np.ndarray:
  """Spine centreline y: the cervical segment bows anteriorly (-y) by `depth` mm at mid-neck."""
  return y0 - depth * np.sin(np.pi * (z1 - z) / (z1 - z7))


def sample_anatomy(rng: np.random.Generator, *, center: tuple[float, float] = (0.0, 0.0),
                   z_c1: float = 0.0, disc_scale: dict[str, float] | None = None) -> Anatomy:
  """Draw one patient: size, lordosis, vertebral heights, bone densities, soft tissue.

  disc_scale: level name -> factor on the height of the disc above it (degenerative narrowing);
  the draws from rng are the same with or without it.
  """
  k = float(rng.uniform(0.92, 1.08))
  depth = float(rng.uniform(3.0, 11.0)) * k
  cx = center[0] + float(rng.uniform(-4, 4))
  # Vertebral heights (bodies) and discs, top to bottom, to place the levels along z.
  zc = {"C1": z_c1}
  zc["C2"] = z_c1 - 14 * k
  heights = {"C2": 15 * k}
  bottom = zc["C2"] - 7.5 * k
  for i, name in enumerate(LEVELS[2:], start=2):
    if name.startswith("C"):
      h = (13 + 1.5 * (i - 2) / 4.0) * k * float(rng.uniform(0.95, 1.05))
    else:
      h = (16.5 + 0.8 * (i - 7)) * k * float(rng.uniform(0.95, 1.05))
    disc = float(rng.uniform(4.0, 5.5)) * k
    if disc_scale and name in disc_scale:
      disc *= disc_scale[name]
    heights[name] = h
    zc[name] = bottom - disc - h / 2
    bottom = zc[name] - h / 2
  z1, z7 = zc["C1"], zc["C7"]
  y0 = center[1] + float(rng.uniform(-6, 6))
  ycurve = lambda z: _lordosis(np.asarray(z, np.float64), z1, z7, y0, depth)  # noqa: E731
  bone_density = float(rng.uniform(0.85, 1.15))  # osteopenic .. dense patients

  bones: list[Bone] = []
  prev_bottom_w = None
  for i, name in enumerate(LEVELS):
    z = zc[name]
    slope = float((ycurve(z + 0.5) - ycurve(z - 0.5)))  # dy/dz
    axes = _frame(np.arctan(slope))
    center3 = np.array([cx, float(ycurve(z)), z])
    if name == "C1":
      parts, holes, marks = _atlas(k)
    elif name.startswith("C"):
      parts, holes, marks = _typical(i, k, heights[name], thoracic=False)
    else:
      parts, holes, marks = _typical(i - 7, k, heights[name], thoracic=True)
    soft: tuple[tuple[Prim, float], ...] = ()
    if "body" in parts and prev_bottom_w is not None:
      a, b, h = marks["body"][3:6]
      gap_top = (zc[LEVELS[i - 1]] - z) - prev_bottom_w  # distance to the body above, along z
      soft = ((Prim("cyl", (0, 0, a * 0.97, b * 0.97, h / 2 - 0.5, gap_top + 0.5)), DISC_HU),)
    if "body" in parts:
      prev_bottom_w = marks["body"][5] / 2
    cort = float(rng.uniform(800, 1150)) * bone_density
    canc = float(rng.uniform(220, 330)) * bone_density
    bones.append(Bone(label=i + 1, name=name, center=center3, axes=axes, parts=parts, holes=holes,
                      soft=soft, cortical_hu=cort, cancellous_hu=canc,
                      cortex_mm=float(rng.uniform(1.1, 1.6)), landmarks=marks))

  # Skull base: the bottom of a thick ellipsoidal bowl with the foramen magnum and the condyles.
  yc1 = float(ycurve(z1))
  sk_r = np.array([72, 88, 56]) * k
  skull_c = np.array([cx, yc1 + 14 * k, z1 + 6 * k + sk_r[2]])
  shell = Prim("ellipsoid", (0, 0, 0, *sk_r))
  inner = Prim("ellipsoid", (0, 0, 0, *(sk_r - 7 * k)))
  foramen = Prim("cyl", (0, -6 * k, 15 * k, 18 * k, -200, 200))
  skull_parts = {
      "vault": (dataclasses.replace(shell, holes=(inner, foramen)),),
      "condyle": (Prim("ellipsoid", (12 * k, -11 * k, -sk_r[2] + 5.5 * k, 6 * k, 9 * k, 4 * k),
                       mirror=True),),
  }
  # Only the lower part of the bowl can be in view: clipping the box keeps the work near the base.
  skull_box = np.array([[-sk_r[0], -sk_r[1], -sk_r[2]], [sk_r[0], sk_r[1], -sk_r[2] + 45 * k]])
  skull = Bone(label=0, name="skull", center=skull_c, axes=np.eye(3), parts=skull_parts,
               cortical_hu=1250 * bone_density, cancellous_hu=500 * bone_density, cortex_mm=2.0,
               max_bounds=skull_box)
  # Mandible: a U-shaped body in front of C2-C3 and two rami rising to the skull base.
  zm = zc["C3"] + 2 * k
  mand_c = np.array([cx, float(ycurve(zc["C2"])) - 12 * k, zm])
  mand_body = Prim("annulus", (0, 0, 44 * k, 42 * k, 39 * k, 37 * k, -8 * k, 8 * k))
  mand_body = dataclasses.replace(mand_body, holes=(Prim("cyl", (0, 30 * k, 60 * k, 30 * k, -50,
                                                                  50)),))
  ramus = Prim("cyl", (44 * k, 8 * k, 3.5 * k, 11 * k, 0, 45 * k), mirror=True)
  mandible = Bone(label=0, name="mandible", center=mand_c, axes=np.eye(3),
                  parts={"body": (mand_body,), "ramus": (ramus,)},
                  cortical_hu=1300 * bone_density, cancellous_hu=400 * bone_density, cortex_mm=2.0)
  bones += [skull, mandible]

  # Soft-tissue knots along z (increasing), relative to the spine centreline.
  zs = np.array([zc["T4"] - 40, zc["C7"] - 60, zc["C7"] - 25, zc["C7"], zc["C5"], zc["C3"],
                 zc["C1"], zc["C1"] + 20, zc["C1"] + 80])
  s = k * float(rng.uniform(0.93, 1.1))  # soft-tissue build
  rx = np.array([185, 175, 120, 64, 55, 60, 68, 78, 82]) * s
  ant = -np.array([85, 85, 70, 50, 48, 62, 88, 100, 100]) * s
  post = np.array([88, 88, 84, 78, 76, 76, 80, 86, 95]) * s
  air_rx = np.array([9, 9, 9, 9, 11, 15, 14, 12, 0.1]) * k
  air_ry = np.array([8, 8, 8, 8, 9, 7, 8, 9, 0.1]) * k
  air_off = np.array([32, 30, 28, 26, 24, 19, 18, 20, 20]) * k
  canal_rx = np.array([8, 8, 8, 11.5, 12, 12, 15, 15, 15]) * k
  canal_ry = np.array([7, 7, 7, 6.5, 6.5, 6.5, 11, 12, 12]) * k
  canal_off = np.array([18, 17, 17, 16, 15, 15, 9, 8, 8]) * k
  spine_y = ycurve(zs)
  table_y = float(np.max(spine_y + post)) + float(rng.uniform(1.0, 8.0))
  return Anatomy(bones=tuple(bones), spine_z=zs, spine_x=np.full_like(zs, cx), spine_y=spine_y,
                 outline_rx=rx, outline_ant=ant, outline_post=post, airway_rx=air_rx,
                 airway_ry=air_ry, airway_off=air_off, canal_rx=canal_rx, canal_ry=canal_ry,
                 canal_off=canal_off, fat_mm=float(rng.uniform(3.0, 9.0)), table_y=table_y,
                 noise_hu=float(rng.uniform(8.0, 20.0)))


def spine_extent(anatomy: Anatomy) -> tuple[float, float]:
  """(z of the top of C1, z of the bottom of C7), for placing the field of view."""
  c1, c7 = anatomy.vertebra("C1"), anatomy.vertebra("C7")
  top = c1.center[2] + c1.local_bounds(0)[1, 2]
  bottom = c7.center[2] - c7.landmarks["body"][5] / 2
  return float(top), float(bottom)
