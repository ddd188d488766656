"""Render an ``Anatomy`` (with fractures) on a scanner ``Geometry``: HU, labels, fracture voxels.

Soft tissue is drawn slice by slice in 2D (the slices are axial); every bone is evaluated in 3D only
inside the index box its local bounds project to, so a 512 x 512 x 300 study costs a few seconds.
Edges get partial-volume blending over one pixel, cortical shells come from the signed distance.

Without a ``Scene`` (the "easy" level) slices are point-sampled and noise is white. With one, each
slice averages sub-slices across its slab (bones are drawn at every sub-slice over soft tissue drawn
at the slice's centre; labels come from the centre sub-slice, fracture voxels from any), bones get
their texture, pits, densities and compressions, clefts their covered share of each voxel, and
metal / shoulder streaks and correlated noise come last (``artifacts``).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from cspine_jax.synthetic import anatomy as anat
from cspine_jax.synthetic import artifacts
from cspine_jax.synthetic import texture as texture_lib
from cspine_jax.synthetic.fractures import Break
from cspine_jax.synthetic.fractures import Compression
from cspine_jax.synthetic.geometry import Geometry
from cspine_jax.synthetic.realism import Scene
from cspine_jax.synthetic.shapes import Prim
from cspine_jax.synthetic.shapes import ellipse

HU_MIN, HU_MAX = -1024, 3071
GAP_HU = 45.0  # hematoma / fracture cleft (easy level)
HEMATOMA_HU = 60.0  # what a realistic cleft tends to
_TEXTURE_STREAM = 3


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

  def union(self, prims, shift=(0.0, 0.0, 0.0), warp=None) -> np.ndarray:
    """Distance to the union of prims (moved by shift; warp maps the block's local coordinates to
    the primitives', for a compressed body whose bounds the warp only shrinks)."""
    out = np.full(self.u.shape, _FAR, np.float32)
    sh = np.asarray(shift, np.float64)
    for prim in prims:
      sl = self.sub(prim.bounds() + sh)
      if sl is not None:
        if warp is None:
          out[sl] = np.minimum(out[sl], prim.sdf(self.u[sl] - sh[0], self.v[sl] - sh[1],
                                                 self.w[sl] - sh[2]))
        else:
          out[sl] = np.minimum(out[sl], prim.sdf(*warp(self.u[sl] - sh[0], self.v[sl] - sh[1],
                                                       self.w[sl] - sh[2])))
    return out


_FAR = 1e3


def _compressed_soft(bone: anat.Bone, comp: Compression) -> tuple[tuple[Prim, float], ...]:
  """The bone's soft blobs with the disc above reaching down into the collapsed height."""
  if not bone.soft:
    return bone.soft
  disc, hu = bone.soft[0]
  p = list(disc.params)
  p[4] -= comp.loss * comp.body[2]
  return ((dataclasses.replace(disc, params=tuple(p)), hu),) + bone.soft[1:]


def _cleft_cover(side: np.ndarray, gap: float, footprint: float) -> np.ndarray:
  """Share of a voxel (of extent `footprint` across the plane) that a gap of width `gap` covers;
  its sum over a line across the plane is the gap, whatever the voxel size."""
  a = np.abs(side)
  return np.clip((np.minimum(a + footprint / 2, gap / 2) - np.maximum(a - footprint / 2, -gap / 2))
                 / footprint, 0.0, 1.0)


def _draw_bone(blk: _Block, breaks: list[Break], vol, lab, frac, *, comp: Compression | None = None,
               texture: texture_lib.Texture | None = None, dz: float = 0.0) -> None:
  """Draw one bone into the views vol / lab / frac (the block's box).

  comp: the bone's compression; texture: its trabecular texture; dz: the sub-slice spacing, the
  voxels' extent along z for the clefts of realistic breaks (those with a depth).
  """
  bone, px = blk.bone, blk.px
  u, v, w = blk.u, blk.v, blk.w
  for prim, hu in (bone.soft if comp is None else _compressed_soft(bone, comp)):
    _blend(vol, blk.union((prim,)), hu, px)
  part_sdf = {name: blk.union(prims, warp=comp.warp if comp is not None and name == "body" else None)
              for name, prims in bone.parts.items()}
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
  for pit, rim in bone.pits:  # cut out, with a thin cortical rim of its own
    d = blk.union((pit,))
    wc = np.maximum(wc, np.clip((rim - d) / px + 0.5, 0.0, 1.0))
    sdf = np.maximum(sdf, -d)
  value = bone.cancellous_hu + (bone.cortical_hu - bone.cancellous_hu) * wc
  if texture is not None:
    inside = sdf < 0.5 * px  # where the bone's value shows
    value[inside] += texture.sample(u[inside], v[inside], w[inside]) * (1.0 - 0.6 * wc[inside])
  for prim, hu in bone.densities:
    value += hu * np.clip(0.5 - blk.union((prim,)) / px, 0.0, 1.0)
  region = None
  if comp is not None:
    below = comp.top(u, v) - w  # depth under the collapsed endplate
    band = (np.clip(0.5 + (comp.band_mm / 2 - np.abs(below - comp.band_mm / 2)) / px, 0.0, 1.0)
            * (part_sdf["body"] < 0))
    value += comp.band_hu * band
    region = (band >= 0.5) & (sdf < 0)
  axes = np.asarray(bone.axes, np.float64)
  for br, side in zip(breaks, sides):
    near = ((u - br.point[0]) ** 2 + (v - br.point[1]) ** 2 + (w - br.point[2]) ** 2
            < br.radius ** 2)
    if br.depth is None:
      gw = (np.clip(0.5 + (br.gap / 2 - np.abs(side)) / px, 0.0, 1.0)
            * (near & (part_sdf[br.part] < px)))
      value += gw * (GAP_HU - value)
      hit = (gw >= 0.5) & (part_sdf[br.part] < 0) & (sdf < 0)
    else:
      n = axes.T @ np.asarray(br.normal)  # the plane's normal in LPS
      footprint = px * (abs(n[0]) + abs(n[1])) + max(dz, 0.1 * px) * abs(n[2])
      cover = _cleft_cover(side, br.gap, footprint)
      gw = cover * (near & (part_sdf[br.part] < px))
      value += gw * br.depth * (HEMATOMA_HU - value)
      hit = ((cover >= 0.5 * min(1.0, br.gap / footprint)) & near & (part_sdf[br.part] < 0)
             & (sdf < 0))
    region = hit if region is None else region | hit
  _blend(vol, sdf, value, px)
  if bone.label > 0:
    lab[sdf < 0] = bone.label
    if region is not None:
      frac[region] = bone.label


def render(anatomy: anat.Anatomy, geometry: Geometry, breaks: tuple[Break, ...] = (),
           noise_seed: int | None = None, chunk: int = 24, *,
           compressions: tuple[Compression, ...] = (), scene: Scene | None = None) -> Phantom:
  """Render the phantom on the geometry's grid (sorted order: index 0 = top slice).

  noise_seed: seed of the scanner noise (None = noiseless); the same seed gives the same noise, so
  two renders that differ only in `breaks` differ only where the fractures are.
  compressions, scene: a realistic study's compression fractures and rendering (module docstring);
  scene None is the easy level's renderer. With a scene, noise_seed None also drops the texture,
  the streaks and the noise, leaving the noiseless anatomy.
  """
  if abs(geometry.normal[2]) < 0.999:
    raise ValueError("render supports axial slices only (ImageOrientationPatient in the x-y plane)")
  if scene is not None:
    return _render_scene(anatomy, geometry, breaks, compressions, scene, noise_seed, chunk)
  if compressions:
    raise ValueError("compression fractures need a realistic scene")
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


def _shifted(geometry: Geometry, dz: float) -> Geometry:
  """The same grid moved dz mm along z (a sub-slice of every slice)."""
  return dataclasses.replace(geometry, positions=geometry.positions + np.array([0.0, 0.0, dz]))


def _render_scene(anatomy: anat.Anatomy, geometry: Geometry, breaks: tuple[Break, ...],
                  compressions: tuple[Compression, ...], scene: Scene, noise_seed: int | None,
                  chunk: int) -> Phantom:
  s_total, h, w = geometry.shape
  px = float(min(geometry.pixel_spacing))
  x0, y0 = geometry.in_plane_xy()
  pos = geometry.positions.astype(np.float32)
  hu = np.empty((s_total, h, w), np.int16)
  labels = np.zeros((s_total, h, w), np.uint8)
  fracture = np.zeros((s_total, h, w), np.uint8)
  n = max(int(scene.slab_samples), 1)
  dz = scene.slab_mm / n
  centre = n // 2
  subs = [_shifted(geometry, scene.slab_mm * ((j + 0.5) / n - 0.5)) for j in range(n)]
  boxes = [[(bone, _index_box(bone, g)) for bone in anatomy.bones] for g in subs]
  by_label: dict[int, list[Break]] = {}
  for br in breaks:
    by_label.setdefault(br.label, []).append(br)
  comp_of = {c.label: c for c in compressions}
  textured = noise_seed is not None and (scene.texture_hu > 0 or scene.marrow_hu > 0)
  textures = {id(bone): texture_lib.make(bone, np.random.default_rng([scene.seed, _TEXTURE_STREAM, i]),
                                         scene.texture_hu, scene.marrow_hu, px)
              for i, bone in enumerate(anatomy.bones) if textured and bone.name != "metal"}
  overlap = max(round(scene.slab_mm / max(geometry.slice_spacing, 1e-3)), 1)
  for s0 in range(0, s_total, chunk):
    s1 = min(s0 + chunk, s_total)
    soft = np.stack([_soft_tissue(anatomy, geometry, x0 + pos[s, 0], y0 + pos[s, 1], s, px)
                     for s in range(s0, s1)])
    acc = np.zeros_like(soft)
    for j, g in enumerate(subs):
      vol = soft.copy()
      lab = labels[s0:s1] if j == centre else np.zeros(soft.shape, np.uint8)
      frac_j = np.zeros(soft.shape, np.uint8)
      zj = g.positions[:, 2].astype(np.float32)
      for bone, box in boxes[j]:
        if box is None or box[0].stop <= s0 or box[0].start >= s1:
          continue
        a, b = max(box[0].start, s0), min(box[0].stop, s1)
        rs, cs = box[1], box[2]
        x = (x0[rs, cs][None] + pos[a:b, 0, None, None])
        y = (y0[rs, cs][None] + pos[a:b, 1, None, None])
        z = np.broadcast_to(zj[a:b, None, None], x.shape)
        blk = _Block(bone, g, (slice(a, b), rs, cs), x, y, z, px)
        view = (slice(a - s0, b - s0), rs, cs)
        _draw_bone(blk, by_label.get(bone.label, []) if bone.label else [], vol[view], lab[view],
                   frac_j[view], comp=comp_of.get(bone.label) if bone.label else None,
                   texture=textures.get(id(bone)), dz=dz)
      acc += vol
      np.copyto(fracture[s0:s1], frac_j, where=frac_j > 0)
    vol = acc / np.float32(n)
    if noise_seed is not None:
      for s in range(s0, s1):
        _artifacts(anatomy, scene, vol[s - s0], x0 + pos[s, 0], y0 + pos[s, 1], float(pos[s, 2]),
                   s, px, overlap, noise_seed)
    hu[s0:s1] = np.clip(np.rint(vol), HU_MIN, HU_MAX)
  return Phantom(hu=hu, labels=labels, fracture=fracture)


def _artifacts(anatomy: anat.Anatomy, scene: Scene, sl: np.ndarray, x: np.ndarray, y: np.ndarray,
               z: float, s: int, px: float, overlap: int, noise_seed: int) -> None:
  """Streaks and noise of one slice, in place."""
  ramp = artifacts.shoulder_ramp(z, scene.shoulder_z)
  body = None
  streaks = artifacts.metal_streaks(x, y, z, scene.metal, scene.slab_mm, px)
  if scene.streak_hu > 0 and ramp > 0:
    more = artifacts.shoulder_streaks(noise_seed, s, x, y, anatomy.profile(z)["spine_y"],
                                      scene.streak_hu * ramp, px)
    streaks = more if streaks is None else streaks + more
  if streaks is not None:
    body = artifacts.inside_body(sl)
    sl += streaks * body
  sigma = scene.noise_hu * (1.0 + scene.shoulder_gain * ramp)
  sl += np.float32(sigma) * artifacts.noise(noise_seed, s, sl.shape, scene.noise_corr_px, overlap)
