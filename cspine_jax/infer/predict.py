"""Two-stage inference from raw DICOM to the Kaggle submission (``python -m cspine_jax.predict``).

Per study folder (a ``test_images/`` folder of study folders, or one study folder of scanner
files): read (``io.dicom.read_series`` in decoder processes, ``infer.reader``, that decode the
next studies while the models run) -> stage 1 on every slice (the fold ensemble, batched over
slices) -> vertebra ranges and boxes (``localize.derive``) -> refined boxes (``localize.refine``)
-> crops (``pp.crops.vertebra_images``, the training preprocessing) -> stage 2 (fold ensemble,
batched over the vertebrae of several studies) -> patient_overall = top-N (``aggregate``).

A study that cannot be read or processed, in which stage 1 finds no vertebra with confidence
(``localize.derive.check_found``: a series of other anatomy), or whose stage-2 outputs are not
finite probabilities, gets the prior's probabilities and an error entry, and the run goes on; a
folder whose name is not a StudyInstanceUID and whose files carry none cannot be named in a
submission, so it is only reported, and so is a folder whose StudyInstanceUID an earlier folder
already has (the first keeps the study's rows). A folder of several series is read by its series
with the most axial slices (``series_uid``).

A long run resumes: each study's JSON (:func:`json_writer`) carries the run's
:func:`run_fingerprint`, and :func:`finished` turns the JSON files of the same run folder and
options back into results, which :func:`run` takes as ``done`` and does not predict again.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import time
from typing import Any
from typing import Callable
from typing import Mapping
from typing import Sequence

import numpy as np
import pandas as pd
import tqdm

from cspine_jax import aggregate
from cspine_jax import labels as labels_lib
from cspine_jax.infer import ensemble
from cspine_jax.infer import reader
from cspine_jax.infer import spec
from cspine_jax.io import dicom
from cspine_jax.io import files
from cspine_jax.io import vertebrae as vertebrae_lib
from cspine_jax.localize import derive as derive_lib
from cspine_jax.localize import refine as refine_lib
from cspine_jax.pp import crops as crops_lib
from cspine_jax.pp import options as options_lib
from cspine_jax.pp import study as study_lib

NUM_VERTEBRAE = labels_lib.NUM_VERTEBRAE
FINGERPRINT = "run_fingerprint"  # the key of a study JSON's :func:`run_fingerprint`
DUPLICATE_SUFFIX = ".duplicate.json"  # <folder name>.duplicate.json: a study given twice
# decode: the decoders' own time (summed over processes; stage-1 images included, made there);
# wait: the model thread blocked on the readers (nothing decoded yet).
STAGES = ("decode", "wait", "stage1", "refine", "crops", "stage2")


@dataclasses.dataclass
class StudyResult:
  """One study's outcome; ``error`` set means its probabilities are the prior's."""
  uid: str | None
  folder: str
  probs: np.ndarray | None = None  # (8,) patient_overall, C1..C7
  vertebrae: tuple[vertebrae_lib.VertebraPrediction, ...] | None = None
  shape: tuple[int, int, int] | None = None
  error: str | None = None
  notes: tuple[str, ...] = ()  # the reader's notes on the series (``dicom.Series.warnings``)
  # The earlier folder of the same StudyInstanceUID: this one has no rows (``error`` says why).
  duplicate_of: str | None = None

  @property
  def status(self) -> str:
    return "duplicate" if self.duplicate_of else "fallback" if self.error else "ok"

  def to_json(self, numbers: np.ndarray | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"StudyInstanceUID": self.uid, "folder": self.folder,
                           "status": self.status}
    if self.duplicate_of:
      out["duplicate_of"] = self.duplicate_of
    if self.error:
      out["error"] = self.error
    if self.probs is not None:
      out["probabilities"] = {t: float(p) for t, p in zip(labels_lib.TARGETS, self.probs)}
    if self.shape is not None:
      out["shape"] = list(self.shape)
    if self.notes:
      out["reader_notes"] = list(self.notes)
    if self.vertebrae is not None:
      out["vertebrae"] = {name: _vertebra_json(p, numbers, self.shape)
                          for name, p in zip(labels_lib.VERTEBRAE, self.vertebrae)}
    return out

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> StudyResult:
    """The result a study JSON holds (what a submission needs: no vertebra predictions); raises
    KeyError, TypeError or ValueError on a JSON of another shape."""
    probs, uid = data.get("probabilities"), data["StudyInstanceUID"]
    return cls(uid=None if uid is None else labels_lib.check_uid(uid), folder=str(data["folder"]),
               probs=None if probs is None else np.array([float(probs[t])
                                                          for t in labels_lib.TARGETS]),
               shape=tuple(data["shape"]) if data.get("shape") is not None else None,
               error=data.get("error"), notes=tuple(data.get("reader_notes", ())),
               duplicate_of=data.get("duplicate_of"))


@dataclasses.dataclass
class Run:
  """All studies' results plus the seconds spent per stage (decode is the reader thread's time)."""
  results: list[StudyResult]
  seconds: dict[str, float]

  def wide(self) -> pd.DataFrame:
    rows = [r for r in self.results if r.uid is not None and r.probs is not None]
    uids = [r.uid for r in rows]
    if len(set(uids)) != len(uids):  # :func:`run` leaves later folders of a UID without rows
      twice = sorted({u for u in uids if uids.count(u) > 1})
      raise ValueError(f"StudyInstanceUID given by several study folders: {twice}")
    probs = np.array([r.probs for r in rows]).reshape(-1, 8)
    return aggregate.wide_frame([r.uid for r in rows], probs[:, 1:], probs[:, 0])

  def errors(self) -> list[dict[str, str | None]]:
    return [{"StudyInstanceUID": r.uid, "folder": r.folder, "reason": r.error}
            for r in self.results if r.error]


def _vertebra_json(p: vertebrae_lib.VertebraPrediction, numbers, shape) -> dict[str, Any]:
  if not p.present:
    return {"present": False, "confidence": p.confidence}
  out = {"present": True, "first_index": p.first_index, "last_index": p.last_index,
         "first_number": p.first_number, "last_number": p.last_number,
         "box": [round(b, 6) for b in p.box], "confidence": p.confidence}
  if numbers is not None and shape is not None:
    out["box_pixels"] = list(vertebrae_lib.resolve(p, numbers, shape)[2])
  return out


# ----------------------------------------------------------------------------- studies and reading


def find_studies(path: str | os.PathLike) -> list[pathlib.Path]:
  """Study folders under ``path``: its sub-folders, or ``path`` itself when it holds files."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise ensemble.PredictError(f"{path}: not a folder of studies or of DICOM files")
  subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
  if subdirs:
    return subdirs
  if any(p.is_file() for p in path.iterdir()):
    return [path]
  raise ensemble.PredictError(f"{path}: empty (no study folders, no files)")


def study_uid(folder: pathlib.Path, series: dicom.Series | None) -> str | None:
  """The folder's name when it is a UID (the RSNA layout), else the files' StudyInstanceUID."""
  for candidate in (folder.name, series.study_uid if series is not None else ""):
    try:
      return labels_lib.check_uid(candidate)
    except ValueError:
      continue
  return None


def locate(
    series: dicom.Series,
    models: spec.Models,
    batch_size: int,
    images: np.ndarray | None = None
) -> tuple[tuple[vertebrae_lib.VertebraPrediction, ...], np.ndarray, np.ndarray]:
  """Stage 1 on every slice -> (7 vertebra predictions, presence (S, 7), boxes (S, 4)), the
  boxes as derived (:func:`refine_boxes` then refines them when the models have a refiner).
  ``images``: the slices' stage-1 images when already made (``reader.stage1_inputs``)."""
  if images is None:
    images = reader.stage1_inputs(series, models.stage1_options)["stage1_images"]
  presence, boxes = ensemble.in_batches(models.stage1, [images], batch_size)
  preds = derive_lib.derive(presence, boxes, series.numbers, models.rules)
  return preds, presence, boxes


def refine_boxes(series: dicom.Series, preds: Sequence[vertebrae_lib.VertebraPrediction],
                 models: spec.Models) -> tuple[vertebrae_lib.VertebraPrediction, ...]:
  """The boxes refined by the models' box refiner, when they have one (else unchanged)."""
  if models.refiner is None:
    return tuple(preds)
  o = models.refine_options  # the HU volume: only the crops' blocks get windowed
  return refine_lib.refine(preds,
                           series.volume,
                           models.refiner,
                           o.image_size,
                           window=(o.window_level, o.window_width),
                           passes=models.refine_passes)


def crops(series: dicom.Series, preds: Sequence[vertebrae_lib.VertebraPrediction],
          options: options_lib.Options) -> np.ndarray:
  """The 7 stage-2 sequences (7, n/3, H, W, 3) uint8; an absent vertebra gets zeros (as in
  training)."""
  h, w = options.image_size
  out = np.zeros((NUM_VERTEBRAE, options.stage2_slices // 3, h, w, 3), np.uint8)
  for v, p in enumerate(preds):
    span = vertebrae_lib.resolve(p, series.numbers, series.volume.shape)
    if span is not None:
      out[v] = crops_lib.vertebra_images(series.volume, study_lib.Extent(*span), options)
  return out


def default_decode_workers() -> int:
  """Half the cores for decoder processes where that leaves room for the models; on smaller
  machines one reader thread (a process there only competes with the models for the cores)."""
  cores = os.cpu_count() or 1
  return cores // 2 if cores >= 4 else 0


def run(folders: Sequence[pathlib.Path],
        models: spec.Models,
        prior: np.ndarray,
        *,
        batch_size: int = 32,
        studies_per_batch: int = 4,
        decode_workers: int = 0,
        on_study: Callable[[StudyResult, dicom.Series | None], None] | None = None,
        progress: bool = False,
        series_uid: str | None = dicom.AUTO_SERIES,
        done: Mapping[str, StudyResult] | None = None) -> Run:
  """Predicts every study folder; failures fall back to ``prior`` (8 probabilities).

  ``decode_workers`` > 0 decodes that many studies at once in separate processes (the reader is
  the bottleneck on a GPU host); 0 reads in one background thread. ``series_uid``: which series
  of a folder that holds several (``dicom.read_series``; by default the one with the most axial
  slices, the choice in the study's ``reader_notes``; None: such a folder falls back).
  ``done``: results already known by folder (``str(folder)``, :func:`finished`), taken as they
  are; the run's results are in the order of ``folders`` either way.
  """
  prior = np.asarray(prior, np.float64)
  seconds = dict.fromkeys(STAGES, 0.0)
  done = dict(done or {})
  by_folder: dict[str, StudyResult] = {}
  pending: list[tuple[StudyResult, dicom.Series, np.ndarray]] = []
  # StudyInstanceUID -> the first folder that gave it (that folder's rows are the study's).
  first: dict[str, str] = {}
  for folder in folders:
    res = done.get(str(folder))
    if res is not None and res.uid is not None and res.duplicate_of is None:
      first.setdefault(res.uid, res.folder)

  def fall_back(res: StudyResult, series: dicom.Series | None, error: str) -> None:
    res.error = error
    res.probs = prior.copy() if res.uid is not None else None
    if res.uid is None:
      res.error += " (and no StudyInstanceUID: neither the folder name nor the files give one)"
    if on_study:
      on_study(res, series)

  def stage2(seqs: list[np.ndarray]) -> list[np.ndarray | Exception]:
    """(7,) probabilities per study, or the exception that stage 2 raised on it alone."""
    try:
      x = np.concatenate(seqs)
      vertebra = np.tile(np.arange(NUM_VERTEBRAE), len(seqs))
      (probs,) = ensemble.in_batches(models.stage2, [x, vertebra], batch_size)
      return list(np.asarray(probs, np.float64).reshape(len(seqs), NUM_VERTEBRAE))
    except Exception as e:  # noqa: BLE001 - find the study it fails on; the others go on
      if len(seqs) == 1:
        return [e]
      return [out for one in seqs for out in stage2([one])]

  def flush():
    if not pending:
      return
    start = time.perf_counter()
    outputs = stage2([c for _, _, c in pending])
    seconds["stage2"] += time.perf_counter() - start
    for (res, series, _), p in zip(pending, outputs):
      if isinstance(p, Exception):
        fall_back(res, series, f"stage 2 failed: {type(p).__name__}: {p}")
        continue
      if not np.all(np.isfinite(p)):
        bad = [v for v, x in zip(labels_lib.VERTEBRAE, p) if not np.isfinite(x)]
        fall_back(res, series, f"Stage2Error: stage 2 gave non-finite probabilities for "
                  f"{', '.join(bad)}")
        continue
      p = np.clip(p, 0.0, 1.0)
      res.probs = np.concatenate([aggregate.top_n_overall(p, models.top_n)[None], p])
      if on_study:
        on_study(res, series)
    pending.clear()

  todo = [f for f in folders if str(f) not in done]
  bar = tqdm.tqdm(total=len(todo), unit="study", desc="predict", disable=not progress)
  prepare = functools.partial(reader.stage1_inputs, options=models.stage1_options)
  stream = reader.read_studies(todo, workers=decode_workers, prepare=prepare,
                               series_uid=series_uid)
  while True:
    t0 = time.perf_counter()
    item = next(stream, None)
    seconds["wait"] += time.perf_counter() - t0
    if item is None:
      break
    folder, loaded, error, dt = item
    series, inputs = loaded if loaded is not None else (None, {})
    seconds["decode"] += dt
    res = StudyResult(uid=study_uid(folder, series), folder=str(folder))
    by_folder[str(folder)] = res
    bar.update()
    if res.uid is not None and first.setdefault(res.uid, res.folder) != res.folder:
      res.duplicate_of = first[res.uid]
      res.error = (f"DuplicateStudy: StudyInstanceUID {res.uid} is also that of "
                   f"{res.duplicate_of}, whose rows the submission has; {res.folder} is left out")
      if on_study:
        on_study(res, series)
      continue
    try:
      if error is not None:
        raise error
      res.shape = tuple(series.volume.shape)
      res.notes = tuple(series.warnings)
      t0 = time.perf_counter()
      res.vertebrae, _, _ = locate(series, models, batch_size, inputs.get("stage1_images"))
      t1 = time.perf_counter()
      seconds["stage1"] += t1 - t0
      derive_lib.check_found(res.vertebrae, models.rules.threshold)
      res.vertebrae = refine_boxes(series, res.vertebrae, models)
      t2 = time.perf_counter()
      seqs = crops(series, res.vertebrae, models.options)
      seconds["refine"] += t2 - t1
      seconds["crops"] += time.perf_counter() - t2
    except Exception as e:  # noqa: BLE001 - one bad study must not stop the run
      fall_back(res, series, f"{type(e).__name__}: {e}")
      continue
    if res.uid is None:
      res.error = "no StudyInstanceUID: neither the folder name nor the files give one"
      if on_study:
        on_study(res, series)
      continue
    pending.append((res, series, seqs))
    if len(pending) >= studies_per_batch:
      flush()
  flush()
  bar.close()
  by_folder.update(done)
  return Run([by_folder[str(f)] for f in folders], seconds)


def run_fingerprint(run_dir: str | os.PathLike, *, top_n: int, prior: np.ndarray,
                    series_uid: str | None) -> str:
  """What a study's prediction depends on besides its own files: RUN/inference.json's bytes, the
  run's checkpoints (every file under a ``checkpoints/`` folder of RUN/stage1, stage2 and
  box_refine, by its path, size and modification time: a retrained or replaced model changes
  it; a copied run folder only costs predicting again), top-N, the prior and the series choice."""
  run_dir = pathlib.Path(run_dir)
  h = hashlib.sha256()
  spec_path = run_dir / spec.SPEC
  h.update(spec_path.read_bytes() if spec_path.exists() else b"no inference.json")
  for stage in ("stage1", "stage2", "box_refine"):
    for path in sorted((run_dir / stage).rglob("*")):
      rel = path.relative_to(run_dir)
      if path.is_file() and "checkpoints" in rel.parts:
        st = path.stat()
        h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
  h.update(json.dumps({"top_n": int(top_n), "prior": np.asarray(prior, np.float64).tolist(),
                       "series": series_uid}).encode())
  return h.hexdigest()


def finished(folders: Sequence[pathlib.Path], json_dir: str | os.PathLike,
             fingerprint: str) -> dict[str, StudyResult]:
  """The results (by ``str(folder)``) that the study JSON files in ``json_dir`` hold for
  ``folders`` and that a run of the same ``fingerprint`` wrote; a JSON that cannot be read, or
  of another run folder or options, is ignored (its study is predicted again)."""
  json_dir = pathlib.Path(json_dir)
  wanted = {os.path.abspath(f): str(f) for f in folders}
  out: dict[str, StudyResult] = {}
  if not json_dir.is_dir():
    return out
  for path in sorted(json_dir.glob("*.json")):
    try:
      data = json.loads(path.read_text())
      if not isinstance(data, dict) or data.get(FINGERPRINT) != fingerprint:
        continue
      res = StudyResult.from_json(data)
    except (OSError, ValueError, KeyError, TypeError):
      continue
    key = wanted.get(os.path.abspath(res.folder))
    if key is not None:
      out[key] = dataclasses.replace(res, folder=key)
  return out


def write_outputs(result: Run, out: str | os.PathLike) -> dict[str, pathlib.Path]:
  """Submission CSV (long format) and ``<out>.errors.json``; returns their paths."""
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  files.write_csv(aggregate.to_long(result.wide()), out, index=False, float_format="%.6f")
  errors = out.with_name(out.name + ".errors.json")
  files.write_json(errors, result.errors())
  return {"submission": out, "errors": errors}


def json_writer(json_dir: str | os.PathLike, fingerprint: str | None = None
                ) -> Callable[[StudyResult, dicom.Series | None], None]:
  """A callback writing each finished study's JSON as soon as it is known (``<uid>.json``;
  ``<folder>.json`` without a UID, ``<folder>.duplicate.json`` for a UID given twice), with the
  run's ``fingerprint`` (:func:`run_fingerprint`) when given, so that a rerun can resume."""
  json_dir = pathlib.Path(json_dir)
  json_dir.mkdir(parents=True, exist_ok=True)

  def write(res: StudyResult, series: dicom.Series | None) -> None:
    folder = pathlib.Path(res.folder).name
    name = (f"{folder}{DUPLICATE_SUFFIX}" if res.duplicate_of else
            f"{res.uid or folder}.json")
    numbers = series.numbers if series is not None else None
    data = res.to_json(numbers)
    if fingerprint is not None:
      data[FINGERPRINT] = fingerprint
    files.write_json(json_dir / name, data)

  return write
