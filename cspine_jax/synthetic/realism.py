"""What a realistic study adds to the phantom: pose, degeneration, mimics, metal, the scene.

``dress`` changes a sampled ``Anatomy``: bone density, degenerative change (disc narrowing is drawn
before the anatomy, by ``disc_scale``), fracture mimics (vascular channels, C1 posterior arch clefts,
Schmorl's nodes, bone islands), then the pose (axial head rotation, mostly at C1-C2; scoliosis and a
coronal tilt). ``scene`` adds metal (dental fillings or an anterior plate with screws) and says how the
study is rendered: slab thickness, texture, correlated noise, streaks. Mimics are drawn the same way
in fractured and intact patients, so they are no cue to the label. Every draw comes from the
caller's generator, so a study stays a pure function of its seed.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from cspine_jax.synthetic import anatomy as anat
from cspine_jax.synthetic.difficulty import Level
from cspine_jax.synthetic.geometry import Geometry
from cspine_jax.synthetic.shapes import Prim

METAL_HU = 30000.0  # before clipping: slab- and edge-averaged metal voxels still saturate
GAS_HU = -800.0
# Levels whose disc (the one above the named vertebra) degenerates, most often the lower ones.
DEGENERATION_LEVELS = (("C4", 0.3), ("C5", 0.55), ("C6", 0.65), ("C7", 0.45))


@dataclasses.dataclass(frozen=True)
class MetalSource:
  """Streaks of one metal object: its LPS centre, half extent along z, and the streak directions
  (radians in the axial plane) with their amplitudes (HU, signed)."""
  center: tuple[float, float, float]
  half_z: float
  angles: tuple[float, ...]
  amplitudes: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Scene:
  """How a realistic study is rendered (``render.render``'s ``scene``).

  slab_mm, slab_samples: each slice averages this many sub-slices over [z - slab/2, z + slab/2].
  noise_hu, noise_corr_px: scanner noise and its in-plane correlation (Gaussian sigma, pixels).
  texture_hu, marrow_hu: trabecular texture and slow marrow heterogeneity amplitudes.
  seed: texture, noise and streak draws.
  shoulder_z: (z where the shoulders start, z where they are full): noise grows by shoulder_gain
      and, when streak_hu > 0, lateral photon-starvation streaks of that amplitude appear.
  metal: streak sources.
  """
  slab_mm: float
  slab_samples: int
  noise_hu: float
  noise_corr_px: float
  texture_hu: float
  marrow_hu: float
  seed: int
  shoulder_z: tuple[float, float]
  shoulder_gain: float
  streak_hu: float
  metal: tuple[MetalSource, ...] = ()


def sample_disc_scale(rng: np.random.Generator, level: Level) -> dict[str, float]:
  """Narrowing factors of degenerated discs (vertebra below -> factor), drawn before the anatomy."""
  out: dict[str, float] = {}
  if rng.random() < level.degenerative:
    for name, p in DEGENERATION_LEVELS:
      if rng.random() < p:
        out[name] = round(float(rng.uniform(0.3, 0.75)), 3)
  return out


def _replace_bone(a: anat.Anatomy, bone: anat.Bone, **changes) -> anat.Anatomy:
  new = dataclasses.replace(bone, **changes)
  return dataclasses.replace(a, bones=tuple(new if b is bone else b for b in a.bones))


def _add(a: anat.Anatomy, name: str, *, part: tuple[str, Prim] | None = None,
         pit: tuple[Prim, float] | None = None, density: tuple[Prim, float] | None = None,
         soft: tuple[Prim, float] | None = None) -> anat.Anatomy:
  """The anatomy with one primitive added to bone `name` (a part, a pit, a density or soft)."""
  bone = a.vertebra(name)
  changes: dict = {}
  if part is not None:
    parts = dict(bone.parts)
    parts[part[0]] = parts.get(part[0], ()) + (part[1],)
    changes["parts"] = parts
  if pit is not None:
    changes["pits"] = bone.pits + (pit,)
  if density is not None:
    changes["densities"] = bone.densities + (density,)
  if soft is not None:
    changes["soft"] = bone.soft + (soft,)
  return _replace_bone(a, bone, **changes)


def _degenerate(rng: np.random.Generator, a: anat.Anatomy, below: str) -> tuple[anat.Anatomy, dict]:
  """Osteophytes, endplate sclerosis and sometimes disc gas at the disc above vertebra `below`."""
  above = anat.CERVICAL[anat.CERVICAL.index(below) - 1]
  note: dict = {"level": f"{above}-{below}", "osteophytes": 0}
  for name, sign in ((below, 1.0), (above, -1.0)):  # the lower one's top, the upper one's bottom
    _, _, _, ba, bb, h = a.vertebra(name).landmarks["body"]
    w = sign * (h / 2 - 0.5)
    for _ in range(int(rng.integers(0, 3))):  # anterior spurs
      length, u = float(rng.uniform(1.5, 5.0)), float(rng.uniform(-0.5, 0.5) * ba)
      spur = Prim("capsule", (u, -0.92 * bb, w, 1.1 * u, -bb - length,
                              w + sign * 0.6 * length, float(rng.uniform(1.0, 1.8))))
      a = _add(a, name, part=("osteophyte", spur))
      note["osteophytes"] += 1
    if sign > 0 and rng.random() < 0.5:  # uncovertebral hypertrophy, both sides
      length = float(rng.uniform(1.5, 3.5))
      spur = Prim("capsule", (0.9 * ba, 0.0, w, ba + 0.6 * length, 0.0, w + 0.8 * length, 1.4),
                  mirror=True)
      a = _add(a, name, part=("osteophyte", spur))
      note["osteophytes"] += 2
    t = float(rng.uniform(1.5, 3.0))
    band = Prim("cyl", (0.0, 0.0, 0.9 * ba, 0.9 * bb, min(sign * h / 2, sign * (h / 2 - t)),
                        max(sign * h / 2, sign * (h / 2 - t))))
    a = _add(a, name, density=(band, float(rng.uniform(80, 220))))
  if rng.random() < 0.3:
    bone = a.vertebra(below)
    lo, hi = bone.soft[0][0].params[4:6]
    _, _, _, ba, bb, _ = bone.landmarks["body"]
    gas = Prim("ellipsoid", (float(rng.uniform(-0.3, 0.3) * ba), float(rng.uniform(-0.4, 0.2) * bb),
                             (lo + hi) / 2, float(rng.uniform(2.0, 5.0)),
                             float(rng.uniform(1.5, 3.0)), max((hi - lo) / 2 - 0.8, 0.5)))
    a = _add(a, below, soft=(gas, GAS_HU))
    note["vacuum"] = True
  return a, note


def _mimics(rng: np.random.Generator, level: Level, a: anat.Anatomy) -> tuple[anat.Anatomy, list]:
  notes = []
  for name in anat.CERVICAL[1:]:
    _, _, _, ba, bb, h = a.vertebra(name).landmarks["body"]
    if rng.random() < level.vascular_channel:
      # Basivertebral channel: from the posterior wall into the body, roughly in an axial plane.
      w0, r = float(rng.uniform(-0.2, 0.2) * h), float(rng.uniform(0.45, 0.9))
      end = (float(rng.uniform(-0.15, 0.15) * ba), float(rng.uniform(0.0, 0.3) * bb),
             w0 + float(rng.uniform(-0.8, 0.8)))
      a = _add(a, name, pit=(Prim("capsule", (0.0, 1.05 * bb, w0) + end + (r,)), 0.4))
      branches = int(rng.random() < 0.5) * 2
      for side in (-1.0, 1.0)[:branches]:
        tip = (side * float(rng.uniform(0.3, 0.55)) * ba, -float(rng.uniform(0.1, 0.4)) * bb,
               end[2])
        a = _add(a, name, pit=(Prim("capsule", end + tip + (0.8 * r,)), 0.4))
      notes.append({"kind": "vascular_channel", "vertebra": name, "diameter_mm": round(2 * r, 2),
                    "branches": branches})
    if rng.random() < level.schmorl:
      sign = float(rng.choice([-1.0, 1.0]))
      node = Prim("ellipsoid", (float(rng.uniform(-0.4, 0.4) * ba), float(rng.uniform(-0.3, 0.4) * bb),
                                sign * h / 2, float(rng.uniform(2.0, 4.0)),
                                float(rng.uniform(2.0, 3.5)), float(rng.uniform(1.5, 3.0))))
      a = _add(a, name, pit=(node, 0.8))
      notes.append({"kind": "schmorl_node", "vertebra": name,
                    "endplate": "superior" if sign > 0 else "inferior"})
    if rng.random() < level.bone_island:
      r = float(rng.uniform(1.5, 4.0))
      island = Prim("ellipsoid", (float(rng.uniform(-0.5, 0.5) * ba), float(rng.uniform(-0.5, 0.5) * bb),
                                  float(rng.uniform(-0.3, 0.3) * h), r, r * 0.8, r * 0.9))
      a = _add(a, name, density=(island, float(rng.uniform(500, 900))))
      notes.append({"kind": "bone_island", "vertebra": name, "diameter_mm": round(2 * r, 2)})
  if rng.random() < level.c1_cleft:
    _, cv, _, _, rb, _ = a.vertebra("C1").landmarks["ring"]
    width = float(rng.uniform(1.5, 4.0))
    cleft = Prim("cyl", (float(rng.uniform(-1.0, 1.0)), cv + rb, width / 2, 7.0, -15.0, 15.0))
    a = _add(a, "C1", pit=(cleft, 0.6))
    notes.append({"kind": "c1_posterior_arch_cleft", "vertebra": "C1", "width_mm": round(width, 2)})
  return a, notes


def _rot_z(t: float) -> np.ndarray:
  c, s = np.cos(t), np.sin(t)
  return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rot_y(t: float) -> np.ndarray:
  c, s = np.cos(t), np.sin(t)
  return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _pose(rng: np.random.Generator, level: Level, a: anat.Anatomy) -> tuple[anat.Anatomy, dict]:
  """Axial head rotation (C1 and the skull turn most, fading to C7) and a lateral curve with a
  coronal tilt (each vertebra shifted and tilted along it)."""
  rot = float(np.clip(rng.normal(0.0, level.head_rotation_deg), -25.0, 25.0))
  amp = float(rng.uniform(*level.scoliosis_mm)) * float(rng.choice([-1.0, 1.0]))
  tilt = float(rng.normal(0.0, level.coronal_tilt_deg))
  c1 = a.vertebra("C1")
  z1, z_end = c1.center[2], a.vertebra("T4").center[2]
  pivot = c1.center.copy()

  def dx(z):
    t = np.clip((z1 - z) / (z1 - z_end), 0.0, 1.0)
    return amp * np.sin(np.pi * t) + (z - z1) * np.tan(np.deg2rad(tilt))

  share = {"C1": 1.0, "C2": 0.45, "C3": 0.3, "C4": 0.2, "C5": 0.12, "C6": 0.06, "C7": 0.02}
  bones = []
  for b in a.bones:
    z = b.center[2] if b.label > 0 else z1
    turn = _rot_z(np.deg2rad(rot * share.get(b.name, 1.0 if b.label == 0 else 0.0)))
    slope = float(dx(z + 0.5) - dx(z - 0.5))
    lean = _rot_y(np.arctan(slope)) if b.label > 0 else np.eye(3)
    r = lean @ turn
    center = pivot + turn @ (b.center - pivot) if b.label == 0 else b.center.copy()
    center = center + np.array([float(dx(z)), 0.0, 0.0])
    bones.append(dataclasses.replace(b, center=center, axes=b.axes @ r.T))
  a = dataclasses.replace(a, bones=tuple(bones), spine_x=a.spine_x + dx(a.spine_z))
  return a, {"head_rotation_deg": round(rot, 1), "scoliosis_mm": round(amp, 1),
             "coronal_tilt_deg": round(tilt, 1)}


def dress(rng: np.random.Generator, level: Level, a: anat.Anatomy, disc_scale: dict[str, float]
          ) -> tuple[anat.Anatomy, dict]:
  """The anatomy with density, degeneration, mimics and pose applied, and their description."""
  density = float(rng.uniform(*level.density))
  bones = []
  for b in a.bones:
    if b.label > 0:
      own = float(rng.uniform(0.92, 1.08))  # vertebrae differ a little within a patient
      b = dataclasses.replace(b, cancellous_hu=b.cancellous_hu * density * own,
                              cortical_hu=b.cortical_hu * np.sqrt(density))
    bones.append(b)
  a = dataclasses.replace(a, bones=tuple(bones))
  degeneration = []
  for name, factor in disc_scale.items():
    a, note = _degenerate(rng, a, name)
    degeneration.append({**note, "disc_height_factor": factor})
  a, mimics = _mimics(rng, level, a)
  a, pose = _pose(rng, level, a)
  return a, {"bone_density": round(density, 3), "degeneration": degeneration, "mimics": mimics,
             "pose": pose}


def _metal_bone(name: str, frame: anat.Bone, prims: tuple[Prim, ...]) -> anat.Bone:
  return anat.Bone(label=0, name=name, center=frame.center, axes=frame.axes,
                   parts={"metal": prims}, cortical_hu=METAL_HU, cancellous_hu=METAL_HU,
                   cortex_mm=0.5)


def _streaks(rng: np.random.Generator, center, half_z: float, strength: float) -> MetalSource:
  n = int(rng.integers(6, 14))
  angles = tuple(float(x) for x in rng.uniform(0, np.pi, n))
  amps = tuple(float(x) for x in strength * rng.uniform(0.3, 1.0, n) * rng.choice([-1.0, 1.0], n))
  return MetalSource(tuple(float(c) for c in center), half_z, angles, amps)


def _metal(rng: np.random.Generator, a: anat.Anatomy) -> tuple[anat.Anatomy, list[MetalSource],
                                                                   dict]:
  """Dental fillings (most metal in neck CT) or an anterior cervical plate with screws."""
  if rng.random() < 0.7:
    mand = a.vertebra("mandible")
    k = mand.parts["body"][0].params[2] / 44.0
    prims, sources = [], []
    for _ in range(int(rng.integers(1, 5))):
      phi = float(rng.uniform(35, 70)) * float(rng.choice([-1.0, 1.0]))
      u, v = 40.5 * k * np.sin(np.deg2rad(phi)), -39.5 * k * np.cos(np.deg2rad(phi))
      w = 8 * k + float(rng.uniform(3.0, 7.0))
      prims.append(Prim("ellipsoid", (u, v, w, float(rng.uniform(2.0, 3.5)),
                                      float(rng.uniform(2.0, 3.0)), float(rng.uniform(1.5, 2.5)))))
      sources.append(_streaks(rng, mand.center + np.array([u, v, w]), 2.5,
                              float(rng.uniform(150, 450))))
    bone = _metal_bone("metal", mand, tuple(prims))
    return (dataclasses.replace(a, bones=a.bones + (bone,)), sources,
            {"kind": "metal", "source": "dental", "objects": len(prims)})
  top = int(rng.integers(3, 6))  # the plate spans C4-C5 .. C6-C7
  names = (anat.CERVICAL[top], anat.CERVICAL[top + 1])
  upper, lower = a.vertebra(names[0]), a.vertebra(names[1])
  _, _, _, _, bb, h = upper.landmarks["body"]
  span = float((upper.center - lower.center) @ upper.axes[2]) + lower.landmarks["body"][5] / 2
  plate = Prim("cyl", (0.0, -bb - 1.6, 7.5, 1.0, -span + 1.0, h / 2 - 1.0))
  bones, sources = [], []
  for frame in (upper, lower):
    fb = frame.landmarks["body"][4]
    screws = tuple(Prim("capsule", (s * 4.0, -fb - 1.0, 0.0, s * 3.0, 0.35 * fb, 0.0, 1.8))
                   for s in (-1.0, 1.0))
    prims = screws + ((plate,) if frame is upper else ())
    bones.append(_metal_bone("metal", frame, prims))
    sources.append(_streaks(rng, frame.center + (-0.5 * fb) * frame.axes[1], 3.0,
                            float(rng.uniform(200, 500))))
  return (dataclasses.replace(a, bones=a.bones + tuple(bones)), sources,
          {"kind": "metal", "source": "plate", "levels": list(names)})


def scene(rng: np.random.Generator, level: Level, a: anat.Anatomy, geometry: Geometry,
          thickness: float | None) -> tuple[anat.Anatomy, Scene, list[dict]]:
  """Metal (added to the anatomy), the rendering settings and the artifacts' description.

  thickness: the series' SliceThickness (None = the slice spacing): the slab each slice averages.
  """
  artifacts: list[dict] = []
  sources: list[MetalSource] = []
  if rng.random() < level.metal:
    a, sources, note = _metal(rng, a)
    artifacts.append(note)
  slab = float(thickness or geometry.slice_spacing)
  px = float(min(geometry.pixel_spacing))
  # Sub-slices no further apart than a pixel (and 1 mm), an odd count so one sits at the centre.
  n = int(np.ceil(slab / max(min(px, 1.0), 0.5))) if level.slab else 1
  n += 1 - n % 2
  c6, t1 = a.vertebra("C6"), a.vertebra("T1")
  shoulder = (float(c6.center[2] - c6.landmarks["body"][5] / 2), float(t1.center[2]))
  streak = 0.0
  if rng.random() < level.shoulder_streaks:
    streak = float(rng.uniform(*level.streak_hu))
    artifacts.append({"kind": "shoulder_streaks", "amplitude_hu": round(streak, 1)})
  sc = Scene(slab_mm=slab, slab_samples=n, noise_hu=float(rng.uniform(*level.noise_hu)),
             noise_corr_px=float(rng.uniform(*level.noise_corr_px)),
             texture_hu=float(rng.uniform(*level.texture_hu)),
             marrow_hu=float(rng.uniform(*level.marrow_hu)), seed=int(rng.integers(2**31)),
             shoulder_z=shoulder, shoulder_gain=float(rng.uniform(0.3, 1.0)), streak_hu=streak,
             metal=tuple(sources))
  return a, sc, artifacts
