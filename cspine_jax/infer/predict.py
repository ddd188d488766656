"""Two-stage inference from raw DICOM to the Kaggle submission.

    python -m cspine_jax.predict --studies DIR --workdir RUN --out submission.csv
        [--prior train.csv|prior.json] [--top_n 7] [--json_dir D] [--png_dir D] [--batch_size 32]
        [--decode_workers N] [--series auto|strict|UID]

DIR is a ``test_images/`` folder of study folders or one study folder of scanner files. Per study:
read (``io.dicom.read_series`` in decoder processes, ``infer.reader``, that decode the next studies
while the models run) -> stage 1 on every slice (the fold ensemble, batched over slices) -> vertebra ranges and boxes
(``infer.pseudo_labels.derive``) -> crops (``records.stage2.vertebra_images``, the training
preprocessing) -> stage 2 (fold ensemble, batched over the vertebrae of several studies) ->
per-vertebra probabilities -> patient_overall = top-N (``infer.aggregate``).

Writes the long-format submission (``row_id,fractured``; 8 rows per study), one JSON per study
(probabilities, ranges, boxes) and ``<out>.errors.json`` listing every study that fell back to the
prior (with the reason). A study that cannot be read or processed, or in which stage 1 finds no
vertebra with confidence (``pseudo_labels.check_found``: a series of other anatomy), gets the
prior's probabilities and the run goes on; a folder whose name is not a StudyInstanceUID and whose
files carry none cannot be named in a submission, so it is only reported. A folder of several
series is read by its series with the most axial slices (``--series``).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from cspine_jax import labels as labels_lib
from cspine_jax.infer import aggregate
from cspine_jax.infer import pseudo_labels
from cspine_jax.infer import reader
from cspine_jax.io import dicom
from cspine_jax.records import stage2 as stage2_lib
from cspine_jax.records import study as study_lib
from cspine_jax.records import vertebrae as vertebrae_lib

NUM_VERTEBRAE = labels_lib.NUM_VERTEBRAE
# uint8 stage-2 sequences (N, n/3, H, W, 3) and their vertebra indices (N,) -> (N,) probabilities.
Stage2Fn = Callable[[np.ndarray, np.ndarray], np.ndarray]
# decode: the decoders' own time (summed over processes; stage-1 images included, made there);
# wait: the model thread blocked on the readers (nothing decoded yet).
STAGES = ("decode", "wait", "stage1", "refine", "crops", "stage2")


class PredictError(ValueError):
  """Inference that cannot start (no studies, a bad run folder, a bad prior)."""


@dataclasses.dataclass
class Models:
  """Everything inference needs from a training run."""
  stage1: pseudo_labels.Stage1Fn
  stage2: Stage2Fn
  options: study_lib.Options  # stage 2's preprocessing (as its records were made)
  rules: pseudo_labels.Rules = pseudo_labels.Rules()
  top_n: int = aggregate.DEFAULT_TOP_N
  stage1_options: study_lib.Options | None = None  # stage 1's, when it differs from stage 2's
  # The box refiner (a box_refine run) and its records' options; None: the derived boxes stand.
  refiner: pseudo_labels.RefineFn | None = None
  refine_options: study_lib.Options | None = None
  refine_passes: int = 1  # as the pseudo-labels stage 2 trained on were refined

  def __post_init__(self):
    if (self.refiner is None) != (self.refine_options is None):
      raise ValueError("a box refiner needs its options (and options need a refiner)")
    if self.stage1_options is None:
      self.stage1_options = self.options


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

  def to_json(self, numbers: np.ndarray | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"StudyInstanceUID": self.uid, "folder": self.folder,
                           "status": "fallback" if self.error else "ok"}
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


@dataclasses.dataclass
class Run:
  """All studies' results plus the seconds spent per stage (decode is the reader thread's time)."""
  results: list[StudyResult]
  seconds: dict[str, float]

  def wide(self) -> pd.DataFrame:
    rows = [r for r in self.results if r.uid is not None and r.probs is not None]
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
    raise PredictError(f"{path}: not a folder of studies or of DICOM files")
  subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
  if subdirs:
    return subdirs
  if any(p.is_file() for p in path.iterdir()):
    return [path]
  raise PredictError(f"{path}: empty (no study folders, no files)")


def study_uid(folder: pathlib.Path, series: dicom.Series | None) -> str | None:
  """The folder's name when it is a UID (the RSNA layout), else the files' StudyInstanceUID."""
  for candidate in (folder.name, series.study_uid if series is not None else ""):
    try:
      return labels_lib.check_uid(candidate)
    except ValueError:
      continue
  return None


# ----------------------------------------------------------------------------- the two stages


def in_batches(fn: Callable[..., Any], arrays: Sequence[np.ndarray], batch_size: int
               ) -> list[np.ndarray]:
  """``fn(*chunks)`` over fixed-size batches of the equally long ``arrays`` (the last batch padded
  by repeating its final row, so a jitted model sees one shape); each output trimmed back and
  concatenated."""
  outs = []
  for start in range(0, len(arrays[0]), batch_size):
    chunks = [a[start:start + batch_size] for a in arrays]
    n = len(chunks[0])
    if n < batch_size:
      chunks = [np.concatenate([c, np.repeat(c[-1:], batch_size - n, 0)]) for c in chunks]
    got = fn(*chunks)
    got = got if isinstance(got, tuple) else (got,)
    outs.append(tuple(np.asarray(g)[:n] for g in got))
  return [np.concatenate(parts) for parts in zip(*outs)]


def stage1_inputs(series: dicom.Series, options: study_lib.Options) -> dict[str, np.ndarray]:
  """Host-side stage-1 work on a decoded series (the reader's ``prepare``: it runs where the
  study was decoded, in the decoder processes when there are some)."""
  loaded = study_lib.Loaded(study=None, series=series, mask=None)
  return {"stage1_images": study_lib.slice_images(loaded, options)}


def locate(series: dicom.Series, models: Models, batch_size: int, images: np.ndarray | None = None
           ) -> tuple[tuple[vertebrae_lib.VertebraPrediction, ...], np.ndarray, np.ndarray]:
  """Stage 1 on every slice -> (7 vertebra predictions, presence (S, 7), boxes (S, 4)), the
  boxes as derived (:func:`refine_boxes` then refines them when the models have a refiner).
  ``images``: the slices' stage-1 images when already made (:func:`stage1_inputs`)."""
  if images is None:
    images = stage1_inputs(series, models.stage1_options)["stage1_images"]
  presence, boxes = in_batches(models.stage1, [images], batch_size)
  preds = pseudo_labels.derive(presence, boxes, series.numbers, models.rules)
  return preds, presence, boxes


def refine_boxes(series: dicom.Series, preds: Sequence[vertebrae_lib.VertebraPrediction],
                 models: Models) -> tuple[vertebrae_lib.VertebraPrediction, ...]:
  """The boxes refined by the models' box refiner, when they have one (else unchanged)."""
  if models.refiner is None:
    return tuple(preds)
  o = models.refine_options  # the HU volume: only the crops' blocks get windowed
  return pseudo_labels.refine(preds, series.volume, models.refiner, o.image_size,
                              window=(o.window_level, o.window_width), passes=models.refine_passes)


def crops(series: dicom.Series, preds: Sequence[vertebrae_lib.VertebraPrediction],
          options: study_lib.Options) -> np.ndarray:
  """The 7 stage-2 sequences (7, n/3, H, W, 3) uint8; an absent vertebra gets zeros (as in
  training)."""
  h, w = options.image_size
  out = np.zeros((NUM_VERTEBRAE, options.stage2_slices // 3, h, w, 3), np.uint8)
  for v, p in enumerate(preds):
    span = vertebrae_lib.resolve(p, series.numbers, series.volume.shape)
    if span is not None:
      out[v] = stage2_lib.vertebra_images(series.volume, study_lib.Extent(*span), options)
  return out


def default_decode_workers() -> int:
  """Half the cores for decoder processes where that leaves room for the models; on smaller
  machines one reader thread (a process there only competes with the models for the cores)."""
  cores = os.cpu_count() or 1
  return cores // 2 if cores >= 4 else 0


def run(folders: Sequence[pathlib.Path], models: Models, prior: np.ndarray, *,
        batch_size: int = 32, studies_per_batch: int = 4, decode_workers: int = 0,
        on_study: Callable[[StudyResult, dicom.Series | None], None] | None = None,
        progress: bool = False, series_uid: str | None = dicom.AUTO_SERIES) -> Run:
  """Predicts every study folder; failures fall back to ``prior`` (8 probabilities).

  ``decode_workers`` > 0 decodes that many studies at once in separate processes (the reader is
  the bottleneck on a GPU host); 0 reads in one background thread. ``series_uid``: which series
  of a folder that holds several (``dicom.read_series``; by default the one with the most axial
  slices, the choice in the study's ``reader_notes``; None: such a folder falls back).
  """
  prior = np.asarray(prior, np.float64)
  seconds = dict.fromkeys(STAGES, 0.0)
  results: list[StudyResult] = []
  pending: list[tuple[StudyResult, dicom.Series, np.ndarray]] = []

  def flush():
    if not pending:
      return
    start = time.perf_counter()
    seqs = np.concatenate([c for _, _, c in pending])
    vertebra = np.tile(np.arange(NUM_VERTEBRAE), len(pending))
    (probs,) = in_batches(models.stage2, [seqs, vertebra], batch_size)
    probs = np.clip(probs.reshape(len(pending), NUM_VERTEBRAE), 0.0, 1.0)
    seconds["stage2"] += time.perf_counter() - start
    for (res, series, _), p in zip(pending, probs):
      res.probs = np.concatenate([aggregate.top_n_overall(p, models.top_n)[None], p])
      if on_study:
        on_study(res, series)
    pending.clear()

  from tqdm import tqdm
  bar = tqdm(total=len(folders), unit="study", desc="predict", disable=not progress)
  prepare = functools.partial(stage1_inputs, options=models.stage1_options)
  stream = reader.read_studies(folders, workers=decode_workers, prepare=prepare,
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
    results.append(res)
    try:
      if error is not None:
        raise error
      res.shape = tuple(series.volume.shape)
      res.notes = tuple(series.warnings)
      t0 = time.perf_counter()
      res.vertebrae, _, _ = locate(series, models, batch_size, inputs.get("stage1_images"))
      t1 = time.perf_counter()
      seconds["stage1"] += t1 - t0
      pseudo_labels.check_found(res.vertebrae, models.rules.threshold)
      res.vertebrae = refine_boxes(series, res.vertebrae, models)
      t2 = time.perf_counter()
      seqs = crops(series, res.vertebrae, models.options)
      seconds["refine"] += t2 - t1
      seconds["crops"] += time.perf_counter() - t2
    except Exception as e:  # noqa: BLE001 - one bad study must not stop the run
      res.error = f"{type(e).__name__}: {e}"
      res.probs = prior.copy() if res.uid is not None else None
      if res.uid is None:
        res.error += " (and no StudyInstanceUID: neither the folder name nor the files give one)"
      if on_study:
        on_study(res, series)
      bar.update()
      continue
    if res.uid is None:
      res.error = "no StudyInstanceUID: neither the folder name nor the files give one"
      if on_study:
        on_study(res, series)
      bar.update()
      continue
    pending.append((res, series, seqs))
    if len(pending) >= studies_per_batch:
      flush()
    bar.update()
  flush()
  bar.close()
  return Run(results, seconds)


# ----------------------------------------------------------------------------- prior and outputs


def load_prior(path: str | os.PathLike) -> np.ndarray:
  """The fallback probabilities (8,): label means of a train.csv, or a prior.json {target: p}."""
  path = pathlib.Path(path)
  if path.suffix.lower() == ".json":
    try:
      data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise PredictError(f"{path}: cannot read the prior: {e}") from e
    try:
      prior = np.array([float(data[t]) for t in labels_lib.TARGETS])
    except (KeyError, TypeError, ValueError) as e:
      raise PredictError(f"{path}: needs a probability for each of {labels_lib.TARGETS}: {e}"
                         ) from e
  else:
    prior = labels_lib.read_train_csv(path)[list(labels_lib.TARGETS)].to_numpy(np.float64).mean(0)
  if not np.all((prior >= 0) & (prior <= 1)):
    raise PredictError(f"{path}: prior probabilities must lie in [0, 1], got {prior.tolist()}")
  return prior


def write_prior(path: str | os.PathLike, train_labels: pd.DataFrame) -> None:
  """Saves the training label means as prior.json (what a run folder keeps for fallbacks)."""
  means = train_labels[list(labels_lib.TARGETS)].to_numpy(np.float64).mean(0)
  pathlib.Path(path).write_text(json.dumps(dict(zip(labels_lib.TARGETS, means.tolist())), indent=1))


def write_outputs(result: Run, out: str | os.PathLike) -> dict[str, pathlib.Path]:
  """Submission CSV (long format) and ``<out>.errors.json``; returns their paths."""
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  aggregate.to_long(result.wide()).to_csv(out, index=False, float_format="%.6f")
  errors = out.with_name(out.name + ".errors.json")
  errors.write_text(json.dumps(result.errors(), indent=1))
  return {"submission": out, "errors": errors}


def study_writer(json_dir: str | os.PathLike | None, png_dir: str | os.PathLike | None
                 ) -> Callable[[StudyResult, dicom.Series | None], None]:
  """A callback writing each finished study's JSON (and PNG) as soon as it is known."""
  json_dir = pathlib.Path(json_dir) if json_dir else None
  png_dir = pathlib.Path(png_dir) if png_dir else None
  for d in (json_dir, png_dir):
    if d:
      d.mkdir(parents=True, exist_ok=True)

  def write(res: StudyResult, series: dicom.Series | None) -> None:
    name = res.uid or pathlib.Path(res.folder).name
    numbers = series.numbers if series is not None else None
    if json_dir:
      (json_dir / f"{name}.json").write_text(json.dumps(res.to_json(numbers), indent=1))
    if png_dir and series is not None and res.vertebrae is not None and not res.error:
      from cspine_jax.report import study_png
      spans = [vertebrae_lib.resolve(p, series.numbers, series.volume.shape)
               for p in res.vertebrae]
      study_png.render_study(
          series.volume, png_dir / f"{name}.png",
          ranges=[None if s is None else s[:2] for s in spans],
          boxes=[None if s is None else s[2] for s in spans], probs=res.probs[1:],
          overall=float(res.probs[0]), pixel_spacing=series.pixel_spacing,
          slice_spacing=series.slice_spacing, title=name)

  return write


# ----------------------------------------------------------------------------- trained models

SPEC = "inference.json"  # RUN/inference.json: the preprocessing and the patient_overall rule
PRIOR = "prior.json"     # RUN/prior.json: training label means, the fallback probabilities


def fold_dirs(stage_dir: str | os.PathLike) -> list[pathlib.Path]:
  """Run folders of a stage: ``fold_k/`` sub-folders with checkpoints, or the folder itself."""
  stage_dir = pathlib.Path(stage_dir)
  folds = sorted((d for d in stage_dir.glob("fold_*") if (d / "checkpoints").is_dir()),
                 key=lambda d: d.name)
  if folds:
    return folds
  if (stage_dir / "checkpoints").is_dir():
    return [stage_dir]
  raise PredictError(f"{stage_dir}: no trained model (expected fold_*/checkpoints/ or "
                     "checkpoints/)")


def restore_model(run_dir: str | os.PathLike, step: int | None = None):
  """``train.checkpoints.restore_model`` with its errors worded as a :class:`PredictError`."""
  from cspine_jax.train import checkpoints as ckpt_lib
  try:
    return ckpt_lib.restore_model(run_dir, step)
  except (ckpt_lib.NoCheckpointError, ckpt_lib.CheckpointMismatchError) as e:
    raise PredictError(str(e)) from e


class FoldEnsemble:
  """The fold models of one task; calling it averages their probabilities (the method's rule).

  ``ensemble(batch)`` takes a dict of numpy arrays holding the task's uint8 image field (and the
  fields its model reads, e.g. stage 2's ``vertebra``) and returns the task's predictions averaged
  over the folds (``train.tasks``: stage 1 ``presence_prob``/``box_pred``, stage 2 ``prob``, ...).
  Images are normalised exactly as in training, on the device (``input.device_inputs``).
  """

  def __init__(self, members: Sequence[tuple[Any, Mapping[str, Any]]], task: str):
    """``members``: (model, meta) pairs (meta: the checkpoint's, holding "fold" and "task")."""
    import jax
    from flax import nnx
    from cspine_jax import input as input_lib
    from cspine_jax.train import steps as steps_lib
    from cspine_jax.train import tasks as tasks_lib

    if not members:
      raise PredictError(f"a {task} ensemble needs at least one model")
    self.metas = [dict(m) for _, m in members]
    wrong = [m.get("task") for m in self.metas if m.get("task") not in (None, task)]
    if wrong:
      raise PredictError(f"fold models of task {wrong[0]!r} given for a {task} ensemble")
    self.task = tasks_lib.get(task)
    self.field = input_lib.IMAGE_FIELD[task]
    for model, _ in members:
      model.eval()
    self.graphdef, _ = nnx.split(members[0][0])
    self.states = [nnx.split(m)[1] for m, _ in members]

    def forward(state, batch):
      model = nnx.merge(self.graphdef, state)
      x, kwargs = self.task.model_inputs(input_lib.device_inputs(batch, self.field))
      return self.task.predict(model(x, **kwargs))

    # The train steps' CPU compiler options: predict on CPU runs the same programs as validation.
    self._forward = jax.jit(forward, compiler_options=steps_lib.compiler_options(
        jax.devices()[0].platform))

  @classmethod
  def load(cls, stage_dir: str | os.PathLike, task: str) -> "FoldEnsemble":
    """Every fold model trained under ``stage_dir`` (fold_*/checkpoints, best step each)."""
    return cls([restore_model(d) for d in fold_dirs(stage_dir)], task)

  def __len__(self) -> int:
    return len(self.states)

  @property
  def folds(self) -> list[int | None]:
    """The held-out fold of each member (from its checkpoint meta)."""
    return [m.get("fold") for m in self.metas]

  def __call__(self, batch: Mapping[str, np.ndarray], fold: int | None = None
               ) -> dict[str, np.ndarray]:
    """Averaged predictions; ``fold=k`` uses only the model that held fold k out (out-of-fold)."""
    import jax
    images = np.asarray(batch[self.field])
    if images.dtype != np.uint8:
      raise TypeError(f"{self.field} is {images.dtype}, expected uint8 pixels")
    batch = dict(batch, **{self.field: images})
    states = self.states
    if fold is not None:
      states = [s for s, f in zip(self.states, self.folds) if f == fold]
      if not states:
        raise PredictError(f"no fold model held out fold {fold} (members: {self.folds})")
    # One host->device copy for every member, all members dispatched before any result is read.
    batch = jax.device_put(batch)
    outs = jax.device_get([self._forward(s, batch) for s in states])
    return {k: aggregate.ensemble_mean([o[k] for o in outs]) for k in outs[0]}


def write_spec(run_dir: str | os.PathLike, stage1_options: study_lib.Options,
               stage2_options: study_lib.Options, *, top_n: int = aggregate.DEFAULT_TOP_N,
               rules: pseudo_labels.Rules = pseudo_labels.Rules(),
               refine_options: study_lib.Options | None = None,
               refine_passes: int = 1) -> pathlib.Path:
  """Saves RUN/inference.json: what :func:`load_models` needs besides the checkpoints
  (``refine_options``: the box refiner's records' options when RUN/box_refine is used, and
  ``refine_passes`` its passes per box)."""
  path = pathlib.Path(run_dir) / SPEC
  path.parent.mkdir(parents=True, exist_ok=True)
  spec = {"stage1_options": stage1_options.to_json(), "stage2_options": stage2_options.to_json(),
          "top_n": top_n, "rules": dataclasses.asdict(rules)}
  if refine_options is not None:
    spec["refine_options"] = refine_options.to_json()
    spec["refine_passes"] = int(refine_passes)
  path.write_text(json.dumps(spec, indent=1))
  return path


def load_models(run_dir: str | os.PathLike, top_n: int | None = None) -> Models:
  """RUN/stage1 and RUN/stage2 fold ensembles plus RUN/inference.json -> :class:`Models`."""
  run_dir = pathlib.Path(run_dir)
  spec_path = run_dir / SPEC
  try:
    spec = json.loads(spec_path.read_text())
    stage1_options, stage2_options = (study_lib.Options.from_json(spec["stage1_options"]),
                                      study_lib.Options.from_json(spec["stage2_options"]))
    rules = pseudo_labels.Rules(**spec.get("rules", {}))
    refine_options = (study_lib.Options.from_json(spec["refine_options"])
                      if spec.get("refine_options") else None)
    refine_passes = pseudo_labels.check_refine_passes(spec.get("refine_passes", 1))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise PredictError(f"{spec_path}: cannot read the inference spec ({e}); it is written by "
                       "the demo / predict.write_spec with the records' preprocessing options")
  models = ensemble_models(FoldEnsemble.load(run_dir / "stage1", "stage1"),
                           FoldEnsemble.load(run_dir / "stage2", "stage2"), stage1_options,
                           stage2_options, rules=rules,
                           top_n=int(top_n if top_n is not None else
                                     spec.get("top_n", aggregate.DEFAULT_TOP_N)))
  if refine_options is not None:  # the spec says the pseudo-labels were refined: so is inference
    models.refiner = refine_scorer(FoldEnsemble.load(run_dir / "box_refine", "box_refine"))
    models.refine_options = refine_options
    models.refine_passes = refine_passes
  return models


def stage1_scorer(stage1: FoldEnsemble, fold: int | None = None) -> pseudo_labels.Stage1Fn:
  """The stage-1 ensemble (or, ``fold=k``, the model that held fold k out) as a scorer: uint8
  images -> (presence probabilities, normalised boxes)."""

  def fn(images):
    out = stage1({"image": images}, fold=fold)
    return out["presence_prob"], out["box_pred"]
  return fn


def refine_scorer(refiner: FoldEnsemble, fold: int | None = None) -> pseudo_labels.RefineFn:
  """The box-refiner ensemble (or, ``fold=k``, the model that held fold k out) as a refiner:
  uint8 crops -> boxes (N, 7, 4) in crop coordinates."""

  def fn(images):
    return refiner({"image": images}, fold=fold)["boxes_pred"]
  return fn


def ensemble_models(stage1: FoldEnsemble, stage2: FoldEnsemble, stage1_options: study_lib.Options,
                    stage2_options: study_lib.Options, *,
                    rules: pseudo_labels.Rules = pseudo_labels.Rules(),
                    top_n: int = aggregate.DEFAULT_TOP_N) -> Models:
  """:class:`Models` whose two stages are fold ensembles."""

  def stage2_fn(images, vertebra):
    return stage2({"images": images, "vertebra": vertebra.astype(np.int32)})["prob"]

  return Models(stage1=stage1_scorer(stage1), stage2=stage2_fn, options=stage2_options,
                stage1_options=stage1_options, rules=rules, top_n=top_n)


# ----------------------------------------------------------------------------- command line


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m cspine_jax.predict",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--studies", required=True, help="test_images/ folder, or one study folder")
  p.add_argument("--workdir", required=True, help="run folder: stage1/, stage2/, inference.json")
  p.add_argument("--out", required=True, help="submission CSV (row_id,fractured)")
  p.add_argument("--prior", help="train.csv or prior.json for fallbacks (default RUN/prior.json)")
  p.add_argument("--top_n", type=int, help="patient_overall over the top-N vertebrae (default: "
                 "the run's, 7)")
  p.add_argument("--json_dir", help="per-study JSON folder (default: <out>_studies/)")
  p.add_argument("--png_dir", help="write a per-study PNG here")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--decode_workers", type=int, default=None,
                 help="processes decoding studies ahead (default: half the CPU cores on machines "
                 "with 4 or more; 0: one reader thread)")
  p.add_argument("--studies_per_batch", type=int, default=4)
  p.add_argument("--series", default=dicom.AUTO_SERIES,
                 help="a folder with several series: 'auto' reads the one with the most axial "
                 "slices (noted in the study's JSON), 'strict' lets such a study fall back, or "
                 "a SeriesInstanceUID")
  p.add_argument("--no_progress", action="store_true")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(argv)
  out = pathlib.Path(args.out)
  try:
    folders = find_studies(args.studies)
    prior = load_prior(args.prior or pathlib.Path(args.workdir) / PRIOR)
    models = load_models(args.workdir, args.top_n)
  except (PredictError, labels_lib.TableError) as e:
    print(f"predict: error: {e}", file=sys.stderr)
    return 2
  json_dir = args.json_dir or out.with_name(out.stem + "_studies")
  result = run(folders, models, prior, batch_size=args.batch_size,
               studies_per_batch=args.studies_per_batch,
               decode_workers=(default_decode_workers() if args.decode_workers is None
                               else args.decode_workers),
               on_study=study_writer(json_dir, args.png_dir), progress=not args.no_progress,
               series_uid=None if args.series == "strict" else args.series)
  paths = write_outputs(result, out)
  unnamed = sum(r.uid is None for r in result.results)
  fallback = sum(r.uid is not None and r.error is not None for r in result.results)
  per = {k: v / max(len(folders), 1) for k, v in result.seconds.items()}
  print(f"predict: {len(folders)} studies ({fallback} fell back to the prior"
        + (f", {unnamed} without a StudyInstanceUID have no rows" if unnamed else "")
        + f") -> {paths['submission']}; errors -> {paths['errors']}; per-study JSON -> {json_dir}")
  print("seconds per study: " + ", ".join(f"{k} {v:.3f}" for k, v in per.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
