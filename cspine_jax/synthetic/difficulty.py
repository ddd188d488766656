"""Named difficulty levels of the generator: what a study may contain and how it is rendered.

"easy" is the original generator (wide, flat 45 HU clefts with steep planes through constant-valued
cancellous bone, point-sampled slices, white noise): its files stay byte-identical for a seed.
"realistic" (the default for new sets) adds what makes real cervical-spine CT hard: hairline and
near-axial fractures, compression fractures, slab-averaged slices, trabecular texture, correlated
noise, metal and shoulder streaks, head rotation and scoliosis, degenerative change and fracture
mimics; masks for a realistic share of studies unless the caller asks for more. "hard" pushes the
same knobs further (subtler fractures, more artifacts and mimics, thicker slabs).

Ranges are (low, high) of a uniform draw; rates are per study unless named per vertebra.
"""
from __future__ import annotations

import dataclasses

# Share of the RSNA 2022 training studies that come with a segmentation (87 of 2,019).
RSNA_SEGMENTED_FRACTION = 87 / 2019


@dataclasses.dataclass(frozen=True)
class Level:
  """One difficulty level.

  name:               "easy" | "realistic" | "hard".
  segmented_fraction: share of train studies with a mask when the caller gives none.
  realistic:          False = the original generator, every field below unused.

  Fractures (per fractured vertebra; C3-C7 and the C2 body draw a kind from body_kinds):
  body_kinds:         (kind, weight): "hairline" | "displaced" | "compression" | "arch" |
                      "spinous" for C3-C7 (C2: compression, arch and spinous map to its parts).
  hairline_width/shift, displaced_width/shift: mm.
  cleft_depth:        share of the way from the local bone value to hematoma HU in the cleft.
  hairline_radius:    mm around the break point the line reaches (a few slices).
  height_loss:        compression: share of the body height lost where it collapses most.
  band_hu, band_mm:   compression: the sclerotic (impaction) band under the collapsed endplate.
  dens_type2:         share of dens fractures that are type II (near-axial, at the dens base).

  Rendering:
  slab:               slices integrate their slab (SliceThickness) instead of point sampling.
  slab_scale:         factor on the drawn slab (the SliceThickness tag says the result).
  texture_hu:         trabecular texture amplitude (standard deviation at 1 mm pixels).
  marrow_hu:          slow marrow heterogeneity amplitude.
  noise_hu, noise_corr_px: scanner noise standard deviation and in-plane correlation (pixels).
  density:            bone density factor range (osteopenic .. dense).

  Anatomy:
  head_rotation_deg:  standard deviation of the axial head rotation (mostly at C1-C2).
  scoliosis_mm:       lateral curvature amplitude range; coronal_tilt_deg: the whole neck's tilt.
  degenerative:       share of patients with degenerated lower discs (narrowing, osteophytes,
                      endplate sclerosis, sometimes gas in the disc).
  Mimics (all independent of the labels):
  vascular_channel:   per C2-C7 body; schmorl: per body; bone_island: per body;
  c1_cleft:           per study (congenital C1 posterior arch cleft).
  Artifacts:
  metal:              per study (dental fillings or an anterior plate with screws).
  shoulder_streaks:   per study; streak_hu: their amplitude range.
  """
  name: str
  segmented_fraction: float
  realistic: bool = True
  body_kinds: tuple[tuple[str, float], ...] = ()
  hairline_width: tuple[float, float] = (0.5, 1.5)
  hairline_shift: tuple[float, float] = (0.0, 1.0)
  displaced_width: tuple[float, float] = (1.5, 3.5)
  displaced_shift: tuple[float, float] = (1.0, 3.5)
  hairline_share: float = 0.6  # C1 ring / lateral mass and dens breaks: hairline vs displaced
  cleft_depth: tuple[float, float] = (0.4, 0.9)
  hairline_radius: tuple[float, float] = (4.0, 9.0)
  height_loss: tuple[float, float] = (0.15, 0.45)
  band_hu: tuple[float, float] = (90.0, 260.0)
  band_mm: tuple[float, float] = (2.0, 4.0)
  dens_type2: float = 0.7
  slab: bool = True
  slab_scale: float = 1.0
  texture_hu: tuple[float, float] = (25.0, 55.0)
  marrow_hu: tuple[float, float] = (8.0, 25.0)
  noise_hu: tuple[float, float] = (10.0, 25.0)
  noise_corr_px: tuple[float, float] = (0.6, 1.2)
  density: tuple[float, float] = (0.75, 1.15)
  head_rotation_deg: float = 7.0
  scoliosis_mm: tuple[float, float] = (0.0, 6.0)
  coronal_tilt_deg: float = 3.0
  degenerative: float = 0.45
  vascular_channel: float = 0.5
  schmorl: float = 0.05
  bone_island: float = 0.04
  c1_cleft: float = 0.08
  metal: float = 0.1
  shoulder_streaks: float = 0.5
  streak_hu: tuple[float, float] = (25.0, 110.0)


LEVELS = {
    "easy": Level("easy", segmented_fraction=0.5, realistic=False),
    "realistic": Level(
        "realistic", segmented_fraction=RSNA_SEGMENTED_FRACTION,
        body_kinds=(("hairline", 0.3), ("displaced", 0.2), ("compression", 0.3), ("arch", 0.13),
                    ("spinous", 0.07))),
    "hard": Level(
        "hard", segmented_fraction=RSNA_SEGMENTED_FRACTION,
        body_kinds=(("hairline", 0.45), ("displaced", 0.08), ("compression", 0.27), ("arch", 0.13),
                    ("spinous", 0.07)),
        hairline_width=(0.4, 1.0), hairline_shift=(0.0, 0.6), displaced_width=(1.0, 2.5),
        displaced_shift=(0.8, 2.5), hairline_share=0.8, cleft_depth=(0.3, 0.7),
        hairline_radius=(3.0, 7.0), height_loss=(0.1, 0.3), band_hu=(60.0, 180.0),
        dens_type2=0.8, slab_scale=1.5, texture_hu=(35.0, 70.0), marrow_hu=(12.0, 35.0), noise_hu=(15.0, 35.0),
        noise_corr_px=(0.8, 1.5), density=(0.65, 1.1), head_rotation_deg=10.0,
        scoliosis_mm=(0.0, 10.0), coronal_tilt_deg=5.0, degenerative=0.65,
        vascular_channel=0.75, schmorl=0.1, bone_island=0.08, c1_cleft=0.15, metal=0.2,
        shoulder_streaks=0.75, streak_hu=(40.0, 160.0)),
}
DEFAULT = "realistic"


def level(name: str) -> Level:
  """The named level; a clear error for an unknown name."""
  if name not in LEVELS:
    raise ValueError(f"unknown difficulty {name!r}; expected one of {sorted(LEVELS)}")
  return LEVELS[name]
