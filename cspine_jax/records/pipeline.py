"""Local record-set builder: plan the studies, process them in worker processes, write the manifest.

``prepare(data_dir, out_dir, task, options)`` writes
``out_dir/task/<StudyInstanceUID>.array_record`` (one shard per study, written atomically by the
worker that processed it) and, last, ``out_dir/task/manifest.json``. Restarting with the same
arguments skips the studies whose shard (or bad-study note) already exists, so a killed run
finishes without duplicating or losing a record; a restart with different options is refused
(``options.json`` holds the run's identity).

Each worker processes one study at a time (peak memory ~ one study) and sends back only a count or
an error message. A study that fails lands in the manifest's ``bad_studies`` with the reason; the
others are written. A worker ends when the process that started it dies (killed, say): left
running, it would finish its study and then wait forever, and a restarted run would race it
writing the same shard.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import sys
import threading
import time
from typing import Any
from typing import Sequence

import numpy as np
import tqdm

from cspine_jax import labels as labels_lib
from cspine_jax import workers as workers_lib
from cspine_jax.io import vertebrae as vertebrae_lib
from cspine_jax.pp import image as image_lib
from cspine_jax.pp import options as options_lib
from cspine_jax.pp import study as study_lib
from cspine_jax.records import box_refine
from cspine_jax.records import cnn3d
from cspine_jax.records import folds as folds_lib
from cspine_jax.records import schema
from cspine_jax.records import shards
from cspine_jax.records import slices2d
from cspine_jax.records import stage1
from cspine_jax.records import stage2

TASKS = {m.NAME: m for m in (stage1, stage2, cnn3d, slices2d, box_refine)}
IDENTITY = "options.json"
BAD_SUFFIX = ".bad.json"


class PrepareError(ValueError):
  """A record set that cannot be (re)built as asked; the message says why."""


@dataclasses.dataclass
class Plan:
  """Everything decided before any study is read: the studies, their folds, the run's identity.

  ``folds`` covers every train.csv study (all record sets of a folder agree on it); ``studies``
  only those the task uses.
  """
  task: str
  data_dir: pathlib.Path
  options: options_lib.Options
  studies: list[study_lib.StudyInput]
  folds: dict[str, int]
  skipped: dict[str, str]  # Studies of train.csv this task does not use, and why.
  vertebrae_file: str | None
  vertebrae_sha256: str | None

  def identity(self) -> dict[str, Any]:
    """What must match for a restart to continue an existing output folder."""
    listing = "\n".join(f"{s.uid} {s.fold}" for s in self.studies).encode()
    # The fields too: a record set written before a field was added must not be resumed.
    feats = TASKS[self.task].features(self.options)
    return {
        "features": {
            k: {
                "shape": list(shape),
                "dtype": np.dtype(dt).name
            } for k, (shape, dt) in feats.items()
        },
        "schema_version": schema.SCHEMA_VERSION,
        "pixels_version": image_lib.PIXELS_VERSION,
        "task": self.task,
        "data_dir": str(self.data_dir),
        "options": self.options.to_json(),
        "vertebrae_file_sha256": self.vertebrae_sha256,
        "studies_sha256": hashlib.sha256(listing).hexdigest()
    }


def _sha256(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def make_plan(data_dir: str | os.PathLike,
              task: str,
              options: options_lib.Options,
              vertebrae_file: str | os.PathLike | None = None) -> Plan:
  """Reads the CSVs (UIDs validated before they become paths), assigns folds, lists the studies."""
  if task not in TASKS:
    raise PrepareError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
  data_dir = pathlib.Path(data_dir).resolve()
  train_csv = data_dir / "train.csv"
  if not train_csv.is_file():
    raise PrepareError(f"{data_dir}: no train.csv (expected the RSNA layout)")
  train = labels_lib.read_train_csv(train_csv)
  uids = [labels_lib.check_uid(u) for u in train["StudyInstanceUID"]]
  targets = train[list(labels_lib.TARGETS)].to_numpy(np.int64)
  folds = folds_lib.assign_folds(dict(zip(uids, targets[:, 0].tolist())), options.num_folds,
                                 options.fold_seed)
  box_numbers: dict[str, list[int]] = {}
  boxes_csv = data_dir / "train_bounding_boxes.csv"
  if boxes_csv.is_file():
    boxes = labels_lib.read_bounding_boxes(boxes_csv)
    for uid, number in zip(boxes["StudyInstanceUID"], boxes["slice_number"]):
      box_numbers.setdefault(labels_lib.check_uid(uid), []).append(int(number))
  located = vertebrae_lib.read_vertebrae(vertebrae_file) if vertebrae_file else {}
  studies = []
  for uid, row in sorted(zip(uids, targets.tolist())):
    image_dir, mask = study_lib.study_paths(data_dir, uid)
    studies.append(study_lib.StudyInput(
        uid=uid, image_dir=image_dir, mask_path=mask, fold=folds[uid], labels=tuple(row),
        vertebrae=located.get(uid), fracture_numbers=tuple(sorted(set(box_numbers.get(uid, ()))))))
  skipped = {s.uid: r for s in studies if (r := TASKS[task].skip_reason(s)) is not None}
  studies = [s for s in studies if s.uid not in skipped]
  return Plan(task, data_dir, options, studies, folds, skipped,
              None if vertebrae_file is None else str(vertebrae_file),
              None if vertebrae_file is None else _sha256(vertebrae_file))


def records_of(task: str, study: study_lib.StudyInput, options: options_lib.Options):
  """The records of one study for ``task`` (a generator; raises when the study cannot be used)."""
  return TASKS[task].process(study, options)


def shard_name(uid: str) -> str:
  return f"{labels_lib.check_uid(uid)}{shards.SHARD_SUFFIX}"


def run_study(task: str, study: study_lib.StudyInput, options: options_lib.Options,
              task_dir: str) -> tuple[str, int, str | None]:
  """Worker body: one study -> its shard (atomic), or a bad-study note. Returns (uid, n, reason)."""
  task_dir = pathlib.Path(task_dir)
  try:
    n = shards.write_shard(task_dir / shard_name(study.uid), records_of(task, study, options))
  except Exception as e:  # noqa: BLE001 - any failure of one study must not stop the others.
    reason = f"{type(e).__name__}: {e}"
    shards.write_json(task_dir / f"{study.uid}{BAD_SUFFIX}", {"study_uid": study.uid,
                                                              "reason": reason})
    return study.uid, 0, reason
  return study.uid, n, None


def check_identity(task_dir: pathlib.Path, identity: dict[str, Any]) -> None:
  path = task_dir / IDENTITY
  if not path.exists():
    shards.write_json(path, identity)
    return
  old = shards.read_json(path)
  if old != identity:
    diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    details = "; ".join(f"{k}: was {json.dumps(old.get(k))}, now {json.dumps(identity.get(k))}"
                        for k in diff)
    raise PrepareError(f"{task_dir} holds a {old.get('task')} record set made with other "
                       f"arguments ({details}); use another --out or delete the folder")


def is_done(task_dir: pathlib.Path, uid: str) -> bool:
  return ((task_dir / shard_name(uid)).exists() or (task_dir / f"{uid}{BAD_SUFFIX}").exists())


def _run_all(plan: Plan, todo: Sequence[study_lib.StudyInput], task_dir: pathlib.Path, workers: int,
             progress: bool, start_method: str) -> None:
  tqdm.tqdm.monitor_interval = 0  # No monitor thread: the pool may fork.
  bar = tqdm.tqdm(total=len(todo),
                  unit="study",
                  desc=f"prepare {plan.task}",
                  disable=not progress,
                  smoothing=0.1)
  try:
    if workers <= 1:
      for s in todo:
        run_study(plan.task, s, plan.options, str(task_dir))
        bar.update()
      return
    if any(s.mask_path is not None for s in todo):
      from cspine_jax.io import nifti  # noqa: F401  # lazy: imported before the fork, so workers inherit nibabel
    method = resolve_start_method(start_method)
    ctx = multiprocessing.get_context(method)
    # Largest studies first: the last study to finish is then a small one (less idle tail).
    todo = sorted(todo, key=lambda s: -_num_files(s.image_dir))
    # A forkserver's workers are its children, not this process's.
    parent = os.getpid() if method in ("fork", "spawn") else None
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                                initializer=workers_lib.end_with_parent,
                                                initargs=(parent,)) as pool:
      futures = [pool.submit(run_study, plan.task, s, plan.options, str(task_dir)) for s in todo]
      try:
        for f in concurrent.futures.as_completed(futures):
          f.result()
          bar.update()
      except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
  finally:
    bar.close()


def _num_files(folder: str) -> int:
  """Entries in a study folder (its slice count, for scheduling); 0 when it cannot be listed."""
  try:
    with os.scandir(folder) as it:
      return sum(1 for _ in it)
  except OSError:
    return 0


def resolve_start_method(start_method: str) -> str:
  """'auto': fork (workers start at once, nothing re-imported) when this process runs no other
  thread and has not imported JAX (whose threads do not survive a fork), else spawn."""
  if start_method != "auto":
    return start_method
  safe = (threading.active_count() == 1 and "jax" not in sys.modules
          and "fork" in multiprocessing.get_all_start_methods())
  return "fork" if safe else "spawn"


def build_manifest(plan: Plan, task_dir: pathlib.Path, elapsed_s: float | None = None
                   ) -> dict[str, Any]:
  """Collects the finished shards and bad-study notes into the manifest dict."""
  num_folds = plan.options.num_folds
  shard_rows, bad = [], []
  records_per_fold = [0] * num_folds
  studies_per_fold = [0] * num_folds
  for s in plan.studies:
    path = task_dir / shard_name(s.uid)
    if path.exists():
      n = shards.num_records(path)
      shard_rows.append({"file": path.name, "study_uid": s.uid, "fold": s.fold, "num_records": n})
      records_per_fold[s.fold] += n
      studies_per_fold[s.fold] += 1
    else:
      note = task_dir / f"{s.uid}{BAD_SUFFIX}"
      if not note.exists():
        raise PrepareError(f"{task_dir}: study {s.uid} has neither a shard nor a bad-study note")
      bad.append({"study_uid": s.uid, "reason": shards.read_json(note)["reason"]})
  manifest = dict(plan.identity())
  manifest.update({
      "num_records": sum(r["num_records"] for r in shard_rows),
      "num_studies": len(shard_rows), "num_folds": num_folds,
      "records_per_fold": records_per_fold, "studies_per_fold": studies_per_fold,
      "folds": dict(sorted(plan.folds.items())),
      "skipped_studies": [{"study_uid": u, "reason": r} for u, r in sorted(plan.skipped.items())],
      "vertebrae_file": plan.vertebrae_file,
      "shards": shard_rows, "bad_studies": bad,
  })
  if elapsed_s is not None:
    manifest["elapsed_s_last_run"] = round(elapsed_s, 3)
  return manifest


def prepare(data_dir: str | os.PathLike,
            out_dir: str | os.PathLike,
            task: str,
            options: options_lib.Options | None = None,
            *,
            vertebrae_file: str | os.PathLike | None = None,
            workers: int = 1,
            progress: bool = True,
            start_method: str = "auto") -> dict[str, Any]:
  """Builds (or finishes) ``out_dir/task``; returns the manifest written there."""
  options = options or options_lib.Options()
  plan = make_plan(data_dir, task, options, vertebrae_file)
  task_dir = pathlib.Path(out_dir) / task
  task_dir.mkdir(parents=True, exist_ok=True)
  check_identity(task_dir, plan.identity())
  shards.remove_temporaries(task_dir)  # Left by a killed run; their studies are redone.
  todo = [s for s in plan.studies if not is_done(task_dir, s.uid)]
  start = time.perf_counter()
  _run_all(plan, todo, task_dir, workers, progress, start_method)
  manifest = build_manifest(plan, task_dir, time.perf_counter() - start)
  shards.write_json(task_dir / shards.MANIFEST, manifest)
  return manifest


def read_task(out_dir: str | os.PathLike, task: str) -> list[dict[str, Any]]:
  """All decoded records of a finished record set, in manifest order (tests, small sets)."""
  return list(shards.read_records(shards.shard_paths(pathlib.Path(out_dir) / task)))
