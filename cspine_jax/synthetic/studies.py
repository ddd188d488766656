"""Seeded RSNA-format study generator: draw a study, render it, write the RSNA layout.

``generate`` writes ``train_images/<UID>/<n>.dcm``, ``test_images/<UID>/<n>.dcm``,
``segmentations/<UID>.nii`` (a subset of train), ``train.csv``, ``train_bounding_boxes.csv`` and
``ground_truth.json`` (contract in docs/ARCHITECTURE.md). Study i of a seed is drawn from its own
generator ``default_rng([seed, i])``, so the same seed gives byte-identical files and the first
studies do not change when more are asked for.

``difficulty`` names a level (``difficulty.LEVELS``). "easy" is the original generator, file for
file, ground_truth.json included (a file without a "difficulty" key is easy). The realistic levels
draw the same patient, labels and scanner settings from that generator and everything they add
(degeneration, mimics, pose, their fractures, metal, the scene) from a second one,
``default_rng([seed, i, REALISM_STREAM])``; their ground_truth.json also names the level, the mask
share and, per study, each fracture, mimic, degenerated disc, artifact, the pose and the scene.

Lower-level pieces for reuse: ``sample_study`` (one study's description), ``make_study`` (its HU,
labels and fracture voxels), ``write_study`` (its files and ground-truth entry).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import pathlib

import numpy as np
import pandas as pd

from cspine_jax import labels as labels_lib
from cspine_jax import workers as workers_lib
from cspine_jax.synthetic import anatomy as anat
from cspine_jax.synthetic import difficulty as difficulty_lib
from cspine_jax.synthetic import fractures as frac
from cspine_jax.synthetic import realism
from cspine_jax.synthetic import writers
from cspine_jax.synthetic.geometry import Geometry
from cspine_jax.synthetic.geometry import axial_geometry
from cspine_jax.synthetic.render import Phantom
from cspine_jax.synthetic.render import render

GROUND_TRUTH_VERSION = 1
PADDING_HU = -2000  # what some scanners store outside the reconstruction circle
REALISM_STREAM = 0x4EA1


@dataclasses.dataclass(frozen=True)
class SizeSpec:
  """Grid ranges of one --size: image sizes with weights, slice counts, z coverage (mm), in-plane FOV
  (mm), and (full only) the slice spacings to pick from."""
  images: tuple[tuple[int, float], ...]
  slices: tuple[int, int]
  coverage: tuple[float, float]
  fov: tuple[float, float]
  spacings: tuple[float, ...] = ()


SIZES = {
    "full": SizeSpec(images=((512, 0.84), (384, 0.08), (640, 0.08)), slices=(200, 400),
                     coverage=(190.0, 300.0), fov=(160.0, 260.0),
                     spacings=(0.625, 0.75, 0.8, 1.0, 1.25)),
    "small": SizeSpec(images=((128, 0.8), (112, 0.1), (144, 0.1)), slices=(60, 120),
                      coverage=(185.0, 250.0), fov=(150.0, 220.0)),
    "tiny": SizeSpec(images=((64, 0.5), (56, 0.25), (48, 0.25)), slices=(30, 50),
                     coverage=(180.0, 220.0), fov=(160.0, 210.0)),
}

# (short name, weight) of the transfer syntaxes and of the pixel storages (signed, intercept, bits).
SYNTAX_WEIGHTS = (("explicit", 0.45), ("implicit", 0.08), ("rle", 0.16), ("jpegls", 0.16),
                  ("j2k", 0.15))
STORAGE_WEIGHTS = (((True, -1024.0, 16), 0.45), ((True, 0.0, 16), 0.2), ((False, -1024.0, 12), 0.2),
                   ((False, -1024.0, 16), 0.15))


@dataclasses.dataclass(frozen=True, eq=False)
class StudySpec:
  """Everything that determines one study's files."""
  uid: str
  split: str
  anatomy: anat.Anatomy
  geometry: Geometry
  fractured: tuple[int, ...]
  breaks: tuple[frac.Break, ...]
  options: writers.SeriesOptions
  noise_seed: int | None  # None: noiseless (and, realistic, no texture or streaks)
  pad_circle: bool
  has_segmentation: bool
  corrupt: tuple[str, ...] = ()  # corruption modes of the last sorted slices (feet end), in order
  compressions: tuple[frac.Compression, ...] = ()
  scene: realism.Scene | None = None  # None: the easy level's rendering
  difficulty: str = "easy"
  notes: dict = dataclasses.field(default_factory=dict)  # bone density, degeneration, mimics, pose,
  # artifacts, as ground_truth.json describes them


def _pick(rng: np.random.Generator, weighted):
  values = [v for v, _ in weighted]
  p = np.array([w for _, w in weighted], np.float64)
  return values[int(rng.choice(len(values), p=p / p.sum()))]


def study_uid(seed: int, index: int) -> str:
  """Distinct RSNA-style StudyInstanceUIDs 1.2.826.0.1.3680043.<n> (n = 10000..99999) per seed."""
  n = np.random.default_rng([seed, 0x51D]).permutation(90000)[index] + 10000
  return f"{writers.UID_ROOT}.{n}"


def sample_study(seed: int, index: int, size: str = "small", *, split: str = "train",
                 has_segmentation: bool = False, uid: str | None = None, difficulty: str = "easy",
                 **overrides) -> StudySpec:
  """Draw study `index` of `seed` at a difficulty level. overrides replace drawn fields (e.g.
  fractured=(1,), reversed=True, transfer_syntax="j2k") for tests that need a particular case."""
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
  level = difficulty_lib.level(difficulty)
  spec = SIZES[size]
  rng = np.random.default_rng([seed, index])
  more = np.random.default_rng([seed, index, REALISM_STREAM]) if level.realistic else None
  # Scanner coordinates: arbitrary table position, the neck near the image centre.
  origin = (float(rng.uniform(-30, 30)), float(rng.uniform(-180, 40)))
  z_c1 = float(rng.uniform(-250, 150))
  disc_scale = realism.sample_disc_scale(more, level) if more is not None else None
  anatomy = anat.sample_anatomy(rng, center=origin, z_c1=z_c1, disc_scale=disc_scale)
  notes: dict = {}
  if more is not None:
    anatomy, notes = realism.dress(more, level, anatomy, disc_scale)
  top, bottom = anat.spine_extent(anatomy)

  side = int(_pick(rng, spec.images))
  if spec.spacings:
    spacing = float(rng.choice(spec.spacings))
    lo = max(spec.slices[0], int(np.ceil(spec.coverage[0] / spacing)))
    hi = min(spec.slices[1], int(spec.coverage[1] / spacing))
    num = int(rng.integers(lo, hi + 1))
  else:
    num = int(rng.integers(spec.slices[0], spec.slices[1] + 1))
    spacing = round(float(rng.uniform(*spec.coverage)) / num, 3)
  fov = float(rng.uniform(*spec.fov))
  px = round(fov / side, 6)
  # Skull base above C1, then C1..C7 and the first thoracic vertebrae below.
  z_top = round(top + float(rng.uniform(6.0, 25.0)), 3)
  if z_top - (num - 1) * spacing > bottom - 20.0:
    raise AssertionError(f"study {index}: the field of view misses the bottom of C7")
  angle = 0.0 if rng.random() < 0.85 else round(float(rng.uniform(-6, 6)), 1)
  center = (origin[0] + float(rng.uniform(-8, 8)), origin[1] + float(rng.uniform(5, 25)))
  geometry = axial_geometry((num, side, side), (px, px), spacing, center, z_top, angle)

  fractured = overrides.pop("fractured", None)
  if fractured is None:
    fractured = frac.sample_fractured(rng)
  # Drawn at every level, so the draws after it (storage, order, noise seed) are the easy level's;
  # the realistic levels replace these breaks below.
  breaks = frac.sample_breaks(rng, anatomy, tuple(fractured), px)
  signed, intercept, bits = _pick(rng, STORAGE_WEIGHTS)
  r = rng.random()
  first_number = 1 if r < 0.7 else (0 if r < 0.8 else int(rng.integers(2, 500)))
  thickness = None if rng.random() < 0.8 else round(spacing * float(rng.choice([0.5, 1.5, 2.0])), 3)
  options = writers.SeriesOptions(
      study_uid=uid or study_uid(seed, index),
      transfer_syntax=_pick(rng, SYNTAX_WEIGHTS), signed=signed, intercept=intercept,
      bits_stored=bits, reversed=bool(rng.random() < 0.25), first_number=first_number,
      instance_mode=_pick(rng, (("match", 0.8), ("reversed", 0.1), ("offset", 0.1))),
      slice_thickness=thickness)
  pad_circle = bool(rng.random() < 0.3)
  noise_seed = int(rng.integers(2**31))
  opt_fields = {f.name for f in dataclasses.fields(writers.SeriesOptions)}
  options = dataclasses.replace(
      options, **{k: overrides.pop(k) for k in list(overrides) if k in opt_fields})
  pad_circle = overrides.pop("pad_circle", pad_circle)
  compressions, scene = (), None
  if more is not None:
    if level.slab_scale != 1.0:
      slab = (options.slice_thickness or geometry.slice_spacing) * level.slab_scale
      options = dataclasses.replace(options, slice_thickness=round(slab, 3))
    breaks, compressions = frac.sample_realistic(more, anatomy, tuple(sorted(fractured)), level)
    anatomy, scene, notes["artifacts"] = realism.scene(more, level, anatomy, geometry,
                                                       options.slice_thickness)
  study = StudySpec(uid=options.study_uid, split=split, anatomy=anatomy, geometry=geometry,
                    fractured=tuple(sorted(fractured)), breaks=breaks, options=options,
                    noise_seed=noise_seed,
                    # Padding below -1024 HU needs signed storage.
                    pad_circle=bool(pad_circle and options.signed),
                    has_segmentation=has_segmentation, compressions=compressions, scene=scene,
                    difficulty=level.name, notes=notes)
  if overrides:
    study = dataclasses.replace(study, **overrides)
  labels_lib.check_uid(study.uid)
  return study


def make_study(spec: StudySpec) -> Phantom:
  """Render the study: HU (with scanner noise and, for some scanners, padding outside the
  reconstruction circle), labels and fracture voxels, in sorted order."""
  if spec.scene is None and not spec.compressions:
    ph = render(spec.anatomy, spec.geometry, spec.breaks, noise_seed=spec.noise_seed)
  else:
    ph = render(spec.anatomy, spec.geometry, spec.breaks, noise_seed=spec.noise_seed,
                compressions=spec.compressions, scene=spec.scene)
  if spec.pad_circle:
    s, h, w = ph.hu.shape
    r = np.arange(h)[:, None] - (h - 1) / 2
    c = np.arange(w)[None, :] - (w - 1) / 2
    outside = r * r + c * c > (min(h, w) / 2) ** 2
    ph.hu[:, outside] = PADDING_HU
  return ph


def fracture_boxes(fracture: np.ndarray, numbers: np.ndarray, pixel_mm: float
                   ) -> list[tuple[int, int, tuple[int, int, int, int]]]:
  """(vertebra label, file number, pixel box x0, y0, x1, y1) per slice a fracture line crosses,
  with a margin of about 3 mm around the line."""
  _, h, w = fracture.shape
  margin = max(2, int(round(3.0 / pixel_mm)))
  out = []
  for label in np.unique(fracture[fracture > 0]):
    hit = fracture == label
    for s in np.flatnonzero(hit.any(axis=(1, 2))):
      rows, cols = np.flatnonzero(hit[s].any(1)), np.flatnonzero(hit[s].any(0))
      box = (max(int(cols[0]) - margin, 0), max(int(rows[0]) - margin, 0),
             min(int(cols[-1]) + 1 + margin, w), min(int(rows[-1]) + 1 + margin, h))
      out.append((int(label), int(numbers[s]), box))
  return out


def _truncated(geometry: Geometry, num: int) -> Geometry:
  return dataclasses.replace(geometry, shape=(num, *geometry.shape[1:]),
                             positions=geometry.positions[:num])


def write_study(spec: StudySpec, root: pathlib.Path | str, phantom: Phantom | None = None
                ) -> tuple[dict, list[tuple]]:
  """Write one study under root (train_images/ or test_images/, segmentations/); returns its
  ground-truth entry and its train_bounding_boxes.csv rows."""
  root = pathlib.Path(root)
  ph = phantom if phantom is not None else make_study(spec)
  folder = root / f"{spec.split}_images" / spec.uid
  names = writers.write_series(folder, ph.hu, spec.geometry, spec.options)
  num = spec.geometry.shape[0]
  readable = num - len(spec.corrupt)
  numbers = writers.file_numbers(num, spec.options.first_number, spec.options.reversed)
  extents = labels_lib.vertebra_extents(ph.labels)
  corrupt_rng = np.random.default_rng(spec.noise_seed)
  for k, mode in enumerate(spec.corrupt):
    s = num - 1 - k
    if any(e is not None and e.last >= s for e in extents):
      raise ValueError(f"{folder}: slice {s} to corrupt holds a cervical vertebra")
    writers.corrupt_file(folder / names[s], mode, corrupt_rng)
  if spec.has_segmentation:
    writers.write_nifti(root / "segmentations" / f"{spec.uid}.nii", ph.labels[:readable],
                        _truncated(spec.geometry, readable))
  vertebrae = {}
  for name, e in zip(anat.CERVICAL, extents):
    vertebrae[name] = None if e is None else {
        "first": e.first, "last": e.last, "first_number": int(numbers[e.first]),
        "last_number": int(numbers[e.last]), "box": list(e.box)}
  boxes = fracture_boxes(ph.fracture[:readable], numbers, min(spec.geometry.pixel_spacing))
  fracture_slices: dict[str, list[int]] = {}
  for label, n, _ in boxes:
    fracture_slices.setdefault(anat.CERVICAL[label - 1], []).append(n)
  parts: dict[str, list[str]] = {}
  described: dict[str, list[dict]] = {}
  for b in spec.breaks:
    parts.setdefault(anat.CERVICAL[b.label - 1], []).append(b.part)
    described.setdefault(anat.CERVICAL[b.label - 1], []).append(b.describe())
  for c in spec.compressions:
    parts.setdefault(anat.CERVICAL[c.label - 1], []).append("body")
    described.setdefault(anat.CERVICAL[c.label - 1], []).append(c.describe())
  sc = spec.scene
  o = spec.options
  entry = {
      "split": spec.split,
      "num_slices": readable,
      "num_files": num,
      "shape": [readable, *spec.geometry.shape[1:]],
      "reversed": o.reversed,
      "first_number": o.first_number,
      "transfer_syntax": writers.TRANSFER_SYNTAXES[o.transfer_syntax],
      "has_segmentation": spec.has_segmentation,
      "fractured": [anat.CERVICAL[i] for i in spec.fractured],
      "corrupt_files": [names[num - 1 - k] for k in range(len(spec.corrupt))],
      "vertebrae": vertebrae,
      "pixel_spacing": list(spec.geometry.pixel_spacing),
      "slice_spacing": round(spec.geometry.slice_spacing, 6),
      "orientation": [float(x) for x in spec.geometry.orientation],
      "signed": o.signed,
      "rescale_intercept": o.intercept,
      "instance_number": o.instance_mode,
      "padding_outside_circle": spec.pad_circle,
      "fracture_slices": fracture_slices,
      "fracture_parts": parts,
  }
  rows = [(spec.uid, float(x0), float(y0), float(x1 - x0), float(y1 - y0), n)
          for _, n, (x0, y0, x1, y1) in boxes] if spec.split == "train" else []
  if not difficulty_lib.level(spec.difficulty).realistic:  # the original generator's entry
    return entry, rows
  entry.update({
      "difficulty": spec.difficulty,
      "fractures": described,
      "slice_thickness": o.slice_thickness,
      "scene": None if sc is None else {
          "slab_mm": round(sc.slab_mm, 4), "slab_samples": sc.slab_samples,
          "noise_hu": round(sc.noise_hu, 2), "noise_corr_px": round(sc.noise_corr_px, 3),
          "texture_hu": round(sc.texture_hu, 2), "marrow_hu": round(sc.marrow_hu, 2)},
      "artifacts": spec.notes.get("artifacts", []),
      "mimics": spec.notes.get("mimics", []),
      "degeneration": spec.notes.get("degeneration", []),
      "pose": spec.notes.get("pose"),
      "bone_density": spec.notes.get("bone_density"),
  })
  return entry, rows


def generate(out_dir: pathlib.Path | str, num_studies: int, seed: int, size: str = "small", *,
             num_test: int | None = None, segmented_fraction: float | None = None, corrupt: int = 0,
             progress: bool = False, workers: int = 1, difficulty: str = "easy") -> pathlib.Path:
  """Write a synthetic RSNA 2022 folder with num_studies train and num_test test studies.

  num_test:            default max(1, num_studies // 10) (0 allowed).
  segmented_fraction:  share of train studies with segmentations/<UID>.nii (at least one if > 0);
                       None: the difficulty's (easy 0.5, realistic and hard the RSNA share, 87 of
                       2,019).
  corrupt:             number of damaged .dcm files (truncated / garbled / empty), placed at the
                       feet end of train studies (preferring ones without a mask), listed in
                       ground_truth.json's corrupt_files and excluded from num_slices / shape.
  workers:             studies written by this many spawned processes (each study depends only
                       on its own seed and index, so the files are the same for any count).
  difficulty:          "easy" (the original generator, byte-identical files), "realistic" or
                       "hard" (``difficulty.LEVELS``).
  """
  if num_studies < 1:
    raise ValueError(f"num_studies must be >= 1, got {num_studies}")
  level = difficulty_lib.level(difficulty)
  if segmented_fraction is None:
    segmented_fraction = level.segmented_fraction
  out = pathlib.Path(out_dir)
  num_test = max(1, num_studies // 10) if num_test is None else num_test
  total = num_studies + num_test
  plan = np.random.default_rng([seed, 0xDA7A])
  n_seg = 0 if segmented_fraction <= 0 else max(1, int(round(segmented_fraction * num_studies)))
  segmented = set(plan.permutation(num_studies)[:min(n_seg, num_studies)].tolist())
  # Damaged files: round-robin over train studies, those without a mask first, at most 2 each.
  order = sorted(plan.permutation(num_studies).tolist(), key=lambda i: i in segmented)
  modes = [writers.CORRUPTIONS[int(plan.integers(len(writers.CORRUPTIONS)))]
           for _ in range(corrupt)]
  if corrupt > 2 * num_studies:
    raise ValueError(f"--corrupt {corrupt}: at most 2 per train study ({2 * num_studies})")
  corrupt_of: dict[int, list[str]] = {}
  for k, mode in enumerate(modes):
    corrupt_of.setdefault(order[k % num_studies], []).append(mode)

  out.mkdir(parents=True, exist_ok=True)
  studies, train_rows, box_rows = {}, [], []
  jobs = [(seed, i, size, "train" if i < num_studies else "test", i in segmented,
           tuple(corrupt_of.get(i, ())), out, level.name) for i in range(total)]
  if workers > 1:
    # spawn, not fork: the caller may have started JAX (threads) already. Workers end with this
    # process, so a killed command leaves none writing into the folder.
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=workers_lib.end_with_parent, initargs=(os.getpid(),))
    done = pool.map(_write_one, jobs)
  else:
    pool, done = None, map(_write_one, jobs)
  try:
    for i, (uid, entry, rows) in enumerate(done):  # in study order
      split = jobs[i][3]
      studies[uid] = {"index": i, **entry}
      if split == "train":
        flags = [int(v in entry["fractured"]) for v in anat.CERVICAL]
        train_rows.append((uid, int(any(flags)), *flags))
        box_rows += rows
      if progress:
        print(f"[{i + 1}/{total}] {split} {uid} {entry['shape']} {entry['fractured']}")
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)
  writers.write_csv(out / "train.csv", writers.TRAIN_COLUMNS, train_rows)
  writers.write_csv(out / "train_bounding_boxes.csv", writers.BOX_COLUMNS, box_rows)
  truth = {"version": GROUND_TRUTH_VERSION, "seed": seed, "size": size}
  if level.realistic:  # an easy set's file stays the original generator's (no key: easy)
    truth.update(difficulty=level.name, segmented_fraction=segmented_fraction)
  (out / "ground_truth.json").write_text(json.dumps({**truth, "studies": studies}, indent=1) + "\n")
  return out


def _write_one(job) -> tuple[str, dict, list]:
  """Samples and writes study ``index`` (a picklable job for the worker processes)."""
  seed, i, size, split, has_segmentation, corrupt, out, difficulty = job
  spec = sample_study(seed, i, size, split=split, has_segmentation=has_segmentation,
                      uid=study_uid(seed, i), difficulty=difficulty)
  if corrupt:
    spec = dataclasses.replace(spec, corrupt=corrupt)
  entry, rows = write_study(spec, out)
  return spec.uid, entry, rows


def test_labels(data_dir: str | pathlib.Path) -> pd.DataFrame:
  """Wide labels (StudyInstanceUID, patient_overall, C1..C7) of a generated set's held-out test
  studies, from its ground_truth.json (the real data has no test labels)."""
  truth = json.loads((pathlib.Path(data_dir) / "ground_truth.json").read_text())["studies"]
  rows = []
  for uid, s in sorted(truth.items()):
    if s.get("split") != "test":
      continue
    y = [int(v in s.get("fractured", [])) for v in labels_lib.VERTEBRAE]
    rows.append([uid, max(y)] + y)
  return pd.DataFrame(rows, columns=["StudyInstanceUID", *labels_lib.TARGETS])
