"""Stage-1 pseudo-labels for a data folder: the ``--vertebrae`` file stage 2's records are cut by.

The stage-1 fold models score every slice of every study of train.csv; their averaged outputs,
decoded by ``localize.derive`` under the run's rules (with the template and box offsets fitted
on the segmented studies), and optionally refined by the box refiner's fold models, give each
study's seven vertebra predictions. On the segmented studies the result is compared with the
masks, for the ensemble and out of fold (fold k's studies by model k alone).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Callable
from typing import Mapping

import numpy as np
from tqdm import tqdm

from cspine_jax import labels as labels_lib
from cspine_jax.infer import ensemble as ensemble_lib
from cspine_jax.infer import reader
from cspine_jax.io import dicom
from cspine_jax.io import nifti
from cspine_jax.io import vertebrae as vertebrae_lib
from cspine_jax.localize import boxes as boxes_lib
from cspine_jax.localize import compare as compare_lib
from cspine_jax.localize import derive as derive_lib
from cspine_jax.localize import ranges as ranges_lib
from cspine_jax.localize import refine as refine_lib
from cspine_jax.pp import image as image_lib
from cspine_jax.pp import options as options_lib
from cspine_jax.pp import study as study_lib
from cspine_jax.records import pipeline
from cspine_jax.records import shards

# label_dataset keeps the studies' windowed volumes for the box refiner up to this many bytes;
# beyond it, the refiner's pass reads the files again.
KEEP_VOLUME_BYTES = 2 << 30


def label_dataset(data_dir: str | os.PathLike,
                  stage1: derive_lib.Stage1Fn | Mapping[int, derive_lib.Stage1Fn],
                  options,
                  out_path: str | os.PathLike,
                  *,
                  rules: derive_lib.Rules = derive_lib.Rules(),
                  batch_size: int = 32,
                  folds: Mapping[str, int] | None = None,
                  progress: bool = False,
                  refiner: refine_lib.RefineFn | Mapping[int, refine_lib.RefineFn] | None = None,
                  refine_options=None,
                  refine_passes: int = 1,
                  log: Callable[[str], None] = print) -> dict:
  """Runs stage 1 on every study of ``data_dir``/train.csv and writes the ``--vertebrae`` file.

  ``stage1`` is one scorer, or the fold models ``{held-out fold: scorer}`` (``folds``: study uid
  -> fold). Leak-free: a segmented study of fold k gets what model k says (the one that did not
  train on it), decoded with the template and box offsets fitted on the other folds' masks and
  refined by refiner k; a study without a mask (no stage-1 model trained on it) gets the fold
  models' average decoded with what was fitted on every mask, as a test study does at inference.
  ``options`` are the stage-1 records' ``pp.options.Options`` (same windowing and resizing as in
  training). ``decode="template"`` without a template, and ``calibrate_boxes`` without offsets,
  fit them from the masks after the pass. ``refiner`` (one, or the fold models ``{held-out fold:
  refiner}`` of a ``box_refine`` run, whose records' options are ``refine_options``) then refines
  every box ``refine_passes`` times, from the windowed volumes kept in the first pass (up to
  ``KEEP_VOLUME_BYTES``), else read again.
  On the segmented studies the ranges and boxes are compared with the masks: out of fold (what
  the file holds) and, for reference, in sample (the fold ensemble, which trained on them).
  Unreadable studies are listed and left out of the file; studies in which no vertebra is found
  with confidence (:func:`check_found`) stay in it and are listed.
  Returns {"studies", "failed": [(uid, reason)], "not_found": [uid], "out_of_fold": IoUs,
  "in_sample": IoUs, "sources": how many entries came from where, "rules": the rules for new
  studies (template and box offsets fitted on every mask), "fold_rules": fold k's (fitted
  without fold k's masks)}, and with a refiner
  "out_of_fold_derived" / "in_sample_derived": the IoUs before refinement.
  """
  refine_passes = refine_lib.check_refine_passes(refine_passes)  # before the stage-1 pass
  data_dir = pathlib.Path(data_dir)
  uids = labels_lib.read_train_csv(data_dir / "train.csv")["StudyInstanceUID"].tolist()
  inputs = [(uid,) + study_lib.study_paths(data_dir, uid) for uid in uids]

  def load(item):
    uid, image_dir, mask_path = item
    series = dicom.read_series(image_dir, warn=False)
    mask = nifti.load_mask(mask_path, series) if mask_path else None
    return series, mask

  members = dict(stage1) if isinstance(stage1, Mapping) else {None: stage1}
  if not members:
    raise ValueError("label_dataset needs a stage-1 scorer or at least one fold model")
  folds = dict(folds or {})
  # Pass 1: the model outputs of every study (small: S x 11 floats per fold model) and, where
  # there is a mask, its truth; decoding waits until a template can be fitted.
  scored, truths, failed = {}, {}, []
  volumes, kept_bytes = {}, 0
  bar = tqdm(total=len(inputs), unit="study", desc="pseudo-labels", disable=not progress)
  for (uid, _, _), loaded, error, _ in reader.prefetched(inputs, load):
    bar.update()
    if error is not None:
      failed.append((uid, f"{type(error).__name__}: {error}"))
      continue
    series, mask = loaded
    images = study_lib.slice_images(study_lib.Loaded(None, series, None), options)
    scored[uid] = (series.numbers, {
        k: ensemble_lib.in_batches(fn, [images], batch_size) for k, fn in members.items()
    })
    if mask is not None:
      truths[uid] = (mask.shape, labels_lib.vertebra_extents(mask))  # not the mask: memory
    if refiner is not None and refine_options is not None and kept_bytes < KEEP_VOLUME_BYTES:
      # The refiner's windowed uint8 volume, while they fit: its pass then reads nothing again.
      volumes[uid] = image_lib.window(series.volume, refine_options.window_level,
                                      refine_options.window_width)
      kept_bytes += volumes[uid].nbytes
  bar.close()

  def outputs(by_fold, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Model k's outputs, or (k None) the fold models' average (the ensemble rule)."""
    if k is not None:
      return by_fold[k]
    return (np.mean([p for p, _ in by_fold.values()], axis=0),
            np.mean([b for _, b in by_fold.values()], axis=0))

  def fitted(exclude_fold: int | None) -> derive_lib.Rules:
    """The rules with what is fitted from the masks filled in: every mask for the file; for model
    k's out-of-fold check only the studies outside fold k (those model k trained on)."""
    used = [uid for uid in truths if exclude_fold is None or folds.get(uid) != exclude_fold]
    fit = rules
    if rules.decode == "template" and rules.template is None:
      spans = [[None if e is None else (e.first, e.last) for e in truths[uid][1]] for uid in used]
      fit = dataclasses.replace(fit, template=ranges_lib.vertebra_template(spans))
    if rules.calibrate_boxes and rules.box_offsets is None:
      uncalibrated = dataclasses.replace(fit, calibrate_boxes=False)
      pairs = []
      for uid in used:
        (_, h, w), extents = truths[uid]
        numbers, by_fold = scored[uid]
        preds = derive_lib.derive(*outputs(by_fold, exclude_fold), numbers, uncalibrated)
        pairs.append([(p.box, np.asarray(t.box, np.float64) / [w, h, w, h])
                      if p.present and t is not None else None for p, t in zip(preds, extents)])
      fit = dataclasses.replace(fit, box_offsets=boxes_lib.fit_box_offsets(pairs))
    return fit

  file_rules = fitted(None)
  fold_rules = {}
  for k in members:
    if k is None:
      continue
    try:
      fold_rules[k] = fitted(k)
    except ValueError as e:  # only fold k's studies have masks: no honest fit for model k
      log(f"  out-of-fold comparison of fold {k} skipped: {e}")
  located, held_out = {}, {}  # the file's predictions; (fold, model k's) on fold k's masks
  for uid, (numbers, by_fold) in scored.items():
    located[uid] = derive_lib.derive(*outputs(by_fold, None), numbers, file_rules)
    k = folds.get(uid)
    if uid in truths and k is not None and k in by_fold and k in fold_rules:
      held_out[uid] = (k, derive_lib.derive(*by_fold[k], numbers, fold_rules[k]))

  def compared(file_preds, fold_preds) -> tuple[dict, dict]:
    ens, oof = [], []
    for uid, (shape, extents) in truths.items():
      if uid in file_preds:
        ens += compare_lib.compare_extents(file_preds[uid], extents, shape, scored[uid][0])
      if uid in fold_preds:
        oof += compare_lib.compare_extents(fold_preds[uid][1], extents, shape, scored[uid][0])
    return compare_lib.summarise(ens), compare_lib.summarise(oof)

  result = {"failed": failed, "rules": file_rules, "fold_rules": fold_rules}
  if refiner is not None:
    result["in_sample_derived"], result["out_of_fold_derived"] = compared(located, held_out)
    _refine_all(inputs, located, held_out, refiner, refine_options, failed, progress, volumes,
                refine_passes)
  result["in_sample"], result["out_of_fold"] = compared(located, held_out)
  # Leak-free: a segmented study's entry is what the models that never trained on it say.
  in_sample = sorted(uid for uid in truths if uid in located and uid not in held_out)
  for uid, (_, preds) in held_out.items():
    if uid in located:
      located[uid] = preds
  result["sources"] = {"out_of_fold": sum(uid in located for uid in held_out),
                       "ensemble": sum(uid not in truths for uid in located),
                       "in_sample": in_sample}
  vertebrae_lib.write_vertebrae(out_path, located)
  result["studies"] = len(located)
  result["not_found"] = sorted(uid for uid, preds in located.items()
                               if derive_lib.found_confidence(preds) < file_rules.threshold)
  log(f"pseudo-labels: {len(located)} studies -> {out_path} ({len(failed)} unreadable)")
  if result["not_found"]:
    shown = ", ".join(result["not_found"][:10]) + (" ..." if len(result["not_found"]) > 10 else "")
    log(f"  stage 1 finds no vertebra with confidence >= {file_rules.threshold} in "
        f"{len(result['not_found'])} studies (their ranges and boxes are placements, not "
        f"findings): {shown}")
  src = result["sources"]
  log(f"  the file's entries: {src['out_of_fold']} segmented studies by the fold models that did "
      f"not train on them, {src['ensemble']} studies without a mask by the whole ensemble"
      + (f", {len(in_sample)} segmented studies in sample (no model held their fold out): "
         f"{', '.join(in_sample[:10])}" if in_sample else ""))
  for name in ("out_of_fold", "in_sample"):
    s = result[name]
    if s["pairs"]:
      before = (f" (derived {result[name + '_derived']['box_iou']:.3f}, then refined)"
                if refiner is not None else "")
      note = " (reference only: the fold ensemble on studies it trained on)" if (
          name == "in_sample") else ""
      log(f"  vs masks ({name}, {s['pairs']} study-vertebra pairs): slice-range IoU "
          f"{s['range_iou']:.3f}, box IoU {s['box_iou']:.3f}{before}{note}")
  for uid, reason in failed:
    log(f"  unreadable {uid}: {reason}")
  return result


def _refine_all(inputs, located: dict, held_out: dict, refiner, options, failed: list,
                progress: bool, volumes: dict, passes: int = 1) -> None:
  """:func:`label_dataset`'s second pass: refines ``located`` (by the refiners' average) and
  ``held_out`` (fold k's by refiner k) in place, from the kept ``volumes`` or the files read
  again; a study unreadable now joins ``failed``."""
  if options is None:
    raise ValueError("a box refiner needs refine_options (its records' preprocessing options)")
  members = dict(refiner) if isinstance(refiner, Mapping) else {None: refiner}
  missing = sorted({k for k, _ in held_out.values()} - set(members)) if None not in members else []
  if missing:
    raise ValueError(f"no box refiner held out fold(s) {missing}: out-of-fold boxes need one")

  def averaged(images):
    return np.mean([fn(images) for fn in members.values()], axis=0)

  def load(item):
    if item[0] in volumes:
      return volumes.pop(item[0])
    window = functools.partial(image_lib.window,
                               level=options.window_level,
                               width=options.window_width)
    return dicom.read_series(item[1], warn=False, map_hu=window).volume

  todo = [item for item in inputs if item[0] in located]
  bar = tqdm(total=len(todo), unit="study", desc="box refinement", disable=not progress)
  for (uid, _, _), volume, error, _ in reader.prefetched(todo, load):
    bar.update()
    if error is not None:
      failed.append((uid, f"{type(error).__name__}: {error}"))
      located.pop(uid)
      held_out.pop(uid, None)
      continue
    located[uid] = refine_lib.refine(located[uid],
                                     volume,
                                     averaged,
                                     options.image_size,
                                     passes=passes)
    if uid in held_out:
      k, preds = held_out[uid]
      held_out[uid] = (k,
                       refine_lib.refine(preds,
                                         volume,
                                         members.get(k, averaged),
                                         options.image_size,
                                         passes=passes))
  bar.close()


def label_from_run(data_dir: str | os.PathLike,
                   stage1_dir: str | os.PathLike,
                   records_dir: str | os.PathLike,
                   out_path: str | os.PathLike,
                   *,
                   rules: derive_lib.Rules = derive_lib.Rules(),
                   batch_size: int = 32,
                   progress: bool = False,
                   refine_dir: str | os.PathLike | None = None,
                   refine_passes: int = 1,
                   log: Callable[[str], None] = print) -> dict:
  """:func:`label_dataset` with the fold models of a stage-1 training run (``stage1_dir/fold_*``)
  and the preprocessing options and folds of the stage-1 records they trained on
  (``records_dir/stage1``); with ``refine_dir``, a box_refine run's fold models refine the boxes
  (options from ``records_dir/box_refine``), ``refine_passes`` times. Returns label_dataset's
  dict plus "options" (those options), "refine_options" (the refiner's, or None) and
  "refine_passes"."""

  def options_of(task: str) -> options_lib.Options:
    identity = shards.read_json(pathlib.Path(records_dir) / task / pipeline.IDENTITY)
    return options_lib.Options.from_json(identity["options"])

  manifest = shards.read_manifest(pathlib.Path(records_dir) / "stage1")
  options = options_of("stage1")
  stage1 = ensemble_lib.FoldEnsemble.load(stage1_dir, "stage1")
  # One pass per fold model: averaged for the file, each alone on its held-out studies.
  scorers = {k: ensemble_lib.stage1_scorer(stage1, fold=k) for k in stage1.folds}
  refiners, refine_options = None, None
  if refine_dir is not None:
    refine_options = options_of("box_refine")
    refiner = ensemble_lib.FoldEnsemble.load(refine_dir, "box_refine")
    refiners = {k: ensemble_lib.refine_scorer(refiner, fold=k) for k in refiner.folds}
  result = label_dataset(data_dir, scorers, options, out_path, rules=rules, batch_size=batch_size,
                         folds=manifest["folds"], progress=progress, refiner=refiners,
                         refine_options=refine_options, refine_passes=refine_passes, log=log)
  return dict(result, options=options, refine_options=refine_options, refine_passes=refine_passes)
