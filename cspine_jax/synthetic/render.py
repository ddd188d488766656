"""Render an ``Anatomy`` (with fractures) on a scanner ``Geometry``: HU, labels, fracture voxels.

Soft tissue is drawn slice by slice in 2D (the slices are axial); every bone is evaluated in 3D only
inside the index box its local bounds project to, so a 512 x 512 x 300 study costs a few seconds.
Edges get partial-volume blending over one pixel, cortical shells come from the signed distance.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from cspine_jax.synthetic import anatomy as anat
from cspine_jax.synthetic.fractures import Break
from cspine_jax.synthetic.geometry import Geometry
from cspine_jax.synthetic.shapes import ellipse

HU_MIN, HU_MAX = -1024, 3071
GAP_HU = 45.0  # hematoma / fracture cleft


@dataclasses.dataclass
class Phantom:
  """hu int16 (S, H, W); labels uint8 (S, H, W) (1..7 C1..C7, 8.. thoracic); fracture uint8 (S, H, W)
  with the vertebra label on voxels of a fracture line (0 elsewhere)."""
  hu: np.ndarray
  labels: np.ndarray
  fracture: np.ndarray


def _blend(dst: np.ndarray, sdf: np.ndarray, value, px: float) -> None:
  """dst <- value inside sdf < 0, blended over one pixel at the edge (in place)."""
  f = np.clip(0.5 - sdf / px, 0.0, 1.0)
  dst += f * (value - dst)


def _window(geom: Geometry, s: int, x_range, y_range) -> tuple[slice, slice] | None:
  """Rows and columns of slice s whose pixels can fall in the LPS box x_range x y_range."""
  z = geom.positions[s, 2]
  corners = np.array([[x, y, z] for x in x_range for y in y_range])
  idx = geom.to_index(corners)
  r0, c0 = np.floor(idx[:, 1:].min(axis=0)).astype(int) - 1
  r1, c1 = np.ceil(idx[:, 1:].max(axis=0)).astype(int) + 2
  h, w = geom.shape[1:]
  r0, c0, r1, c1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
  if r1 <= r0 or c1 <= c0:
    return None
  return slice(r0, r1), slice(c0, c1)


def _soft_tissue(a: anat.Anatomy, geom: Geometry, x: np.ndarray, y: np.ndarray, s: int,
                 px: float) -> np.ndarray:
  """One axial slice of soft tissue; x, y are the slice's LPS pixel coordinates."""
  p = a.profile(float(geom.positions[s, 2]))
  xc, yc = p["spine_x"], p["spine_y"]
  ant, post = yc + p["outline_ant"], min(yc + p["outline_post"], a.table_y)
  cy, ry = (ant + post) / 2, (post - ant) / 2
  out = np.full(x.shape, anat.AIR_HU, np.float32)

  def draw(cx, cy, rx, ry, value, margin=0.0):
    # Only the pixels near the ellipse can change: work on that window.
    win = _window(geom, s, (cx - rx - margin - px, cx + rx + margin + px),
                  (cy - ry - margin - px, cy + ry + margin + px))
    if win is None:
      return
    d = ellipse(x[win] - cx, y[win] - cy, rx, ry)
    if callable(value):
      value = value(d)
    _blend(out[win], d, value, px)

  # Fat under the skin, muscle inside; blended so the layer boundary is smooth.
  draw(xc, cy, p["outline_rx"], ry, lambda d: anat.FAT_HU + (anat.MUSCLE_HU - anat.FAT_HU)
       * np.clip((-d - a.fat_mm) / px + 0.5, 0.0, 1.0))
  if p["airway_rx"] > 1.0:
    draw(xc, yc - p["airway_off"], p["airway_rx"], p["airway_ry"], anat.AIR_HU)
  cy_canal = yc + p["canal_off"]
  draw(xc, cy_canal, p["canal_rx"], p["canal_ry"], anat.CSF_HU)
  draw(xc, cy_canal, p["canal_rx"] * 0.55, p["canal_ry"] * 0.65, anat.CORD_HU)
  # The table: carbon plates around a foam core.
  t = a.table_y + 1.0
  for lo, hi, hu in ((t, t + 2.5, anat.TABLE_HU), (t + 2.5, t + 22, anat.FOAM_HU),
                     (t + 22, t + 24.5, anat.TABLE_HU)):
    win = _window(geom, s, (xc - 190, xc + 190), (lo - px, hi + px))
    if win is not None:
      yy = y[win]
      d = np.where(np.abs(x[win] - xc) < 190, np.maximum(lo - yy, yy - hi), 1e3)
      _blend(out[win], d, hu, px)
  return out


def _index_box(bone: anat.Bone, geom: Geometry) -> tuple[slice, slice, slice] | None:
  corners = geom.to_index(bone.lps_corners())
  lo = np.floor(corners.min(axis=0)).astype(int)
  hi = np.ceil(corners.max(axis=0)).astype(int) + 1
  lo = np.maximum(lo, 0)
  hi = np.minimum(hi, geom.shape)
  if np.any(hi <= lo):
    return None
  return tuple(slice(int(l), int(h)) for l, h in zip(lo, hi))


class _Block:
  """The index box of one bone on the grid, with its local coordinates; evaluates primitives only
  inside their own sub-box (the rest keeps a far distance), which is most of the speed."""

  def __init__(self, bone: anat.Bone, geom: Geometry, box: tuple[slice, ...], x, y, z, px: float):
    self.bone, self.geom, self.box, self.px = bone, geom, box, px
    self.u, self.v, self.w = bone.local(x, y, z)

  def sub(self, bounds: np.ndarray) -> tuple[slice, ...] | None:
    """Slices (relative to the block) that cover the local box `bounds` (2, 3) plus a margin."""
    if self.bone.max_bounds is not None:
      bounds = np.stack([np.maximum(bounds[0], self.bone.max_bounds[0]),
                         np.minimum(bounds[1], self.bone.max_bounds[1])])
    margin = 2.0 * self.px + 2.0
    b = bounds + np.array([[-margin], [margin]])
    idx = np.array(np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij")).reshape(3, -1).T
    local = np.stack([b[idx[:, 0], 0], b[idx[:, 1], 1], b[idx[:, 2], 2]], axis=1)
    ind = self.geom.to_index(self.bone.center + local @ self.bone.axes)
    out = []
    for d, sl in enumerate(self.box):
      lo = max(int(np.floor(ind[:, d].min())), sl.start) - sl.start
      hi = min(int(np.ceil(ind[:, d].max())) + 1, sl.stop) - sl.start
      if hi <= lo:
        return None
      out.append(slice(lo, hi))
    return tuple(out)

  def union(self, prims, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    out = np.full(self.u.shape, _FAR, np.float32)
    sh = np.asarray(shift, np.float64)
    for prim in prims:
      sl = self.sub(prim.bounds() + sh)
      if sl is not None:
        out[sl] = np.minimum(out[sl], prim.sdf(self.u[sl] - sh[0], self.v[sl] - sh[1],
                                               self.w[sl] - sh[2]))
    return out


_FAR = 1e3


def _draw_bone(blk: _Block, breaks: list[Break], vol, lab, frac) -> None:
  """Draw one bone into the views vol / lab / frac (the block's box)."""
  bone, px = blk.bone, blk.px
  u, v, w = blk.u, blk.v, blk.w
  for prim, hu in bone.soft:
    _blend(vol, blk.union((prim,)), hu, px)
  part_sdf = {name: blk.union(prims) for name, prims in bone.parts.items()}
  sides = []
  for br in breaks:
    side = ((u - br.point[0]) * br.normal[0] + (v - br.point[1]) * br.normal[1]
            + (w - br.point[2]) * br.normal[2])
    sides.append(side)
    if any(br.shift):
      # The fragment on the positive side is the part evaluated at shifted coordinates.
      moved = blk.union(bone.parts[br.part], br.shift)
      part_sdf[br.part] = np.where(side > 0, moved, part_sdf[br.part])
  sdf = None
  for d in part_sdf.values():
    sdf = d if sdf is None else np.minimum(sdf, d)
  for hole in bone.holes:
    sdf = np.maximum(sdf, -blk.union((hole,)))
  # Cortical shell within cortex_mm of the surface, cancellous inside.
  cortex = max(bone.cortex_mm, 0.75 * px)
  wc = np.clip((sdf + cortex) / px + 0.5, 0.0, 1.0)
  value = bone.cancellous_hu + (bone.cortical_hu - bone.cancellous_hu) * wc
  region = None
  for br, side in zip(breaks, sides):
    near = ((u - br.point[0]) ** 2 + (v - br.point[1]) ** 2 + (w - br.point[2]) ** 2
            < br.radius ** 2)
    gw = (np.clip(0.5 + (br.gap / 2 - np.abs(side)) / px, 0.0, 1.0)
          * (near & (part_sdf[br.part] < px)))
    value += gw * (GAP_HU - value)
    hit = (gw >= 0.5) & (part_sdf[br.part] < 0) & (sdf < 0)
    region = hit if region is None else region | hit
  _blend(vol, sdf, value, px)
  if bone.label > 0:
    lab[sdf < 0] = bone.label
    if region is not None:
      frac[region] = bone.label


def render(anatomy: anat.Anatomy, geometry: Geometry, breaks: tuple[Break, ...] = (),
           noise_seed: int | None = None, chunk: int = 24) -> Phantom:
  """Render the phantom on the geometry's grid (sorted order: index 0 = top slice).

  noise_seed: seed of the scanner noise (None = noiseless); the same seed gives the same noise, so
  two renders that differ only in `breaks` differ only where the fractures are.
  """
  if abs(geometry.normal[2]) < 0.999:
    raise ValueError("render supports axial slices only (ImageOrientationPatient in the x-y plane)")
  s_total, h, w = geometry.shape
  px = float(min(geometry.pixel_spacing))
  x0, y0 = geometry.in_plane_xy()
  pos = geometry.positions.astype(np.float32)
  hu = np.empty((s_total, h, w), np.int16)
  labels = np.zeros((s_total, h, w), np.uint8)
  fracture = np.zeros((s_total, h, w), np.uint8)
  boxes = [(bone, _index_box(bone, geometry)) for bone in anatomy.bones]
  by_label: dict[int, list[Break]] = {}
  for br in breaks:
    by_label.setdefault(br.label, []).append(br)
  noise_rng = None if noise_seed is None else np.random.default_rng(noise_seed)
  for s0 in range(0, s_total, chunk):
    s1 = min(s0 + chunk, s_total)
    vol = np.stack([_soft_tissue(anatomy, geometry, x0 + pos[s, 0], y0 + pos[s, 1], s, px)
                    for s in range(s0, s1)])
    for bone, box in boxes:
      if box is None or box[0].stop <= s0 or box[0].start >= s1:
        continue
      a, b = max(box[0].start, s0), min(box[0].stop, s1)
      rs, cs = box[1], box[2]
      x = (x0[rs, cs][None] + pos[a:b, 0, None, None])
      y = (y0[rs, cs][None] + pos[a:b, 1, None, None])
      z = np.broadcast_to(pos[a:b, 2, None, None], x.shape)
      blk = _Block(bone, geometry, (slice(a, b), rs, cs), x, y, z, px)
      _draw_bone(blk, by_label.get(bone.label, []) if bone.label else [],
                 vol[a - s0:b - s0, rs, cs], labels[a:b, rs, cs], fracture[a:b, rs, cs])
    if noise_rng is not None:
      vol += anatomy.noise_hu * noise_rng.standard_normal(vol.shape, dtype=np.float32)
    hu[s0:s1] = np.clip(np.rint(vol), HU_MIN, HU_MAX)
  return Phantom(hu=hu, labels=labels, fracture=fracture)
