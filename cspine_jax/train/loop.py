"""``train_and_evaluate(config, workdir)``: data, model, optimizer, resume, steps, validation, logs.

Per fold (``config.fold`` = k, or -1 for every fold in turn under ``workdir/fold_k``): the records
of folds != k train, fold k is validated at the end of every epoch with the competition metric
(stage 1: its BCE / box loss / presence accuracy), checkpoints keep the last K and the best
validation score, and the best epoch's out-of-fold predictions are written as a wide CSV
(StudyInstanceUID, patient_overall, C1..C7, fold). A NaN/Inf loss stops the run with its step
number; the last good checkpoint stays.

With several JAX processes every process runs this same code: each reads its rows of every global
batch (``inputs.loader``), all save and restore the checkpoints together, validation gathers every
process's predictions (the eval step's outputs are replicated), and process 0 alone writes the
logs, out-of-fold CSVs and summaries and says where a run resumed. A step that loses another
process raises :class:`ProcessLostError`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import pandas as pd
import tqdm
from flax import nnx

from cspine_jax import metrics as metrics_lib
from cspine_jax import models
from cspine_jax.inputs import augment as augment_lib
from cspine_jax.io import files
from cspine_jax.inputs import loader as loader_lib
from cspine_jax.train import checkpoints as ckpt_lib
from cspine_jax.train import logging as log_lib
from cspine_jax.train import runtime
from cspine_jax.train import sharding as sharding_lib
from cspine_jax.train import steps as steps_lib
from cspine_jax.train import tasks as tasks_lib
from cspine_jax.train import warm_start

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN/Inf; ``step`` is the step that produced it."""

  def __init__(self, step: int, loss: float, workdir: pathlib.Path, last_good: int | None):
    self.step = step
    super().__init__(
        f"training loss is {loss} at step {step} ({workdir}); stopped. The last good checkpoint is "
        f"{'step ' + str(last_good) if last_good is not None else 'none'} (kept); lower "
        "optimizer.lr or check the records")


class ProcessLostError(RuntimeError):
  """A step, evaluation or checkpoint could not reach the other JAX processes."""


# ---- data ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class FoldData:
  index: loader_lib.RecordIndex
  train: loader_lib.RecordSource
  val: loader_lib.RecordSource
  local_batch: int
  steps_per_epoch: int


def make_data(config: ml_collections.ConfigDict, records_dir: pathlib.Path, fold: int,
              mesh: jax.sharding.Mesh) -> FoldData:
  index = loader_lib.record_index(records_dir, config.task)
  source = index.source()
  train = source.subset(index.ids(fold, train=True))
  val = source.subset(index.ids(fold, train=False))
  if config.input.batch_size % jax.process_count():
    raise ValueError(f"input.batch_size {config.input.batch_size} does not split over "
                     f"{jax.process_count()} processes")
  local_batch = sharding_lib.check_batch_size(config.input.batch_size // jax.process_count(), mesh)
  per_epoch = loader_lib.batches_per_epoch(len(train), config.input.batch_size, drop_remainder=True)
  if per_epoch < 1:
    raise ValueError(f"{records_dir / config.task}: {len(train)} training records (fold {fold}) "
                     f"make no full batch of {config.input.batch_size}")
  return FoldData(index, train, val, local_batch, per_epoch)


# ---- model --------------------------------------------------------------------------------------
# Above this many values (parameters and buffers) a CPU model is built eagerly: the one program's
# unoptimised code then runs longer than the per-shape eager programs take to compile.
ONE_PROGRAM_MAX_VALUES = 5_000_000


def init_in_one_program(make: Callable[[], nnx.Module]) -> nnx.Module:
  """``make()``, with all parameter initialisers run as one jit-compiled program.

  Built eagerly, every initialiser call of a new shape compiles its own small XLA program; one
  program compiled at backend optimisation level 0 (it runs once) costs a fraction of that. Same
  values and structure: the graph comes from ``nnx.eval_shape``, the state from the jitted
  ``make``. A large model on CPU is built eagerly (``ONE_PROGRAM_MAX_VALUES``).
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu and sum(x.size for x in jax.tree.leaves(abstract)) > ONE_PROGRAM_MAX_VALUES:
    return make()
  opts = {"xla_backend_optimization_level": 0} if on_cpu else None
  state = jax.jit(lambda: nnx.split(make())[1], compiler_options=opts)()
  return nnx.merge(graphdef, state)


def build_model(config: ml_collections.ConfigDict, seed: int, fold: int | None = None,
                devices: list[jax.Device] | None = None) -> nnx.Module:
  """``models.make_model(config.model, rngs=models.make_rngs(seed), devices=devices)`` (compute
  dtype included; the layer form is chosen for ``devices``, the training mesh's);
  ``config.model.pretrained`` then replaces the image encoder's weights (``train.warm_start``)."""
  model = init_in_one_program(lambda: models.make_model(
      config.model, rngs=models.make_rngs(seed), devices=devices))
  path = config.model.get("pretrained")
  if path:
    warm_start.init_encoder(model, path, fold, config.model.get("name"))
  return model


def make_trainer(config: ml_collections.ConfigDict, total_steps: int, mesh, seed: int,
                 model: nnx.Module | None = None, fold: int | None = None,
                 steps_per_epoch: int | None = None) -> steps_lib.Trainer:
  """The model (built from ``seed`` unless given), AdamW + schedule, and the steps; the train step
  augments as ``config.input.augment`` says, its draws keyed by ``seed`` and the step.
  ``steps_per_epoch``: what an epoch of ``optimizer.restart_epochs`` is (cosine_restarts)."""
  opt = config.optimizer
  warmup = opt.warmup_steps if opt.warmup_steps >= 0 else int(opt.warmup_fraction * total_steps)
  schedule = steps_lib.make_schedule(
      opt.lr, total_steps, warmup, opt.end_factor, kind=opt.get("schedule", "warmup_cosine"),
      steps_per_epoch=steps_per_epoch, restart_epochs=opt.get("restart_epochs", 5),
      min_lr=opt.get("min_lr", 1e-6), per_epoch=opt.get("per_epoch", True))
  tx = steps_lib.make_tx(schedule, weight_decay=opt.weight_decay, clip_norm=opt.clip_norm,
                         b1=opt.b1, b2=opt.b2)
  loss = config.loss
  task = tasks_lib.get(config.task, box_loss=loss.box, box_weight=loss.box_weight,
                       presence_pos_weight=loss.get("presence_pos_weight", 1.0),
                       ratio_weight=loss.get("ratio_weight", 0.5),
                       positive_weight=loss.get("positive_weight", None))
  if model is None:
    model = build_model(config, seed, fold, devices=list(mesh.devices.flat))
  trainer = steps_lib.Trainer(model, tx, task, mesh, config.train.param_sharding,
                              augment=augment_lib.from_config(config.input.augment),
                              augment_seed=seed)
  trainer.schedule = schedule
  return trainer


# ---- evaluation ---------------------------------------------------------------------------------
def _pad(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  n = len(batch["record_id"])
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.dtype.kind in "OUS":
      continue
    pad = np.zeros((size - n,) + v.shape[1:], v.dtype)
    if k == "record_id":
      pad -= 1
    out[k] = np.concatenate([v, pad]) if n < size else v
  out["mask"] = (np.arange(size) < n).astype(np.float32)
  return out


def evaluate(trainer: steps_lib.Trainer, data: FoldData, config: ml_collections.ConfigDict,
             fold: int) -> tuple[dict[str, float], pd.DataFrame | None]:
  """Held-out scores and (for the fracture models) the per-study wide predictions of fold k."""
  batch = data.local_batch
  loader = loader_lib.make_loader(data.val, config.task, batch_size=batch, train=False,
                                 seed=config.seed, workers=config.input.workers)
  # Each process reads its rows of every global batch (the same number of batches everywhere,
  # its last ones maybe short or empty), padded to the local batch; the step's outputs are
  # replicated, so every process gets every process's predictions, once each.
  it = iter(loader)
  collected: dict[str, list[np.ndarray]] = {}
  sums: dict[str, float] = {}
  total = 0.0
  for local in it:
    local = _pad(local, batch)
    out, m = trainer.eval_step(trainer.state, sharding_lib.shard_batch(local, trainer.mesh))
    out = jax.device_get(out)
    keep = out["mask"] > 0
    n = float(keep.sum())
    for k, v in jax.device_get(m).items():
      sums[k] = sums.get(k, 0.0) + float(v) * n
    total += n
    for k, v in out.items():
      collected.setdefault(k, []).append(np.asarray(v)[keep])
  it.close()  # its worker processes, if any, end now rather than at garbage collection
  coll = {k: np.concatenate(v) for k, v in collected.items()}
  scores = {f"val_{k}": v / max(total, 1.0) for k, v in sums.items()}
  if config.task in ("stage1", "box_refine"):  # localisers: no fracture predictions
    figures = (tasks_lib.stage1_scores if config.task == "stage1" else
               tasks_lib.box_refine_scores)(coll)
    scores.update({f"val_{k}": v for k, v in figures.items()})
    scores["score"] = scores["val_loss"]
    return scores, None
  labels_df, preds = tasks_lib.study_frames(config.task, coll, data.index.study_uid,
                                            overall=config.eval.overall, top_n=config.eval.top_n)
  scores["score"] = scores["val_competition_loss"] = metrics_lib.competition_loss(labels_df, preds)
  preds = preds.copy()
  preds["fold"] = fold
  return scores, preds


# ---- training -----------------------------------------------------------------------------------
def _progress(total: int, initial: int, enabled: bool):
  if not enabled or jax.process_index() != 0:
    return None
  return tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


# Member m of a fold draws from seed config.seed + fold + MEMBER_SEED_STRIDE * m (member 0: the
# seed a single model per fold always had).
MEMBER_SEED_STRIDE = 1000


def member_dir(workdir: pathlib.Path, fold: int, member: int) -> pathlib.Path:
  """Run folder of one model of fold k: fold_k for the first, fold_k_member_m for the others
  (``predict.fold_dirs`` finds them all; the ensemble averages them)."""
  return workdir / (f"fold_{fold}" if member == 0 else f"fold_{fold}_member_{member}")


# The out-of-fold predictions of a model: OOF holds those of the checkpoint ``train.select``
# names (its headline); the other two files keep the last and the best-on-fold epoch side by side.
OOF = "oof_predictions.csv"
OOF_FILES = {"last": "oof_predictions_last.csv", "best": "oof_predictions_best.csv"}
SELECT = ("last", "best")


def selection(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(``train.select``, ``train.select_by``): which checkpoint stands for the model, "last" (a
  rule fixed before any validation figure is seen) or "best" (the lowest ``select_by`` on the
  validation fold: chosen on the very data it is then scored on)."""
  select = config.train.get("select", "last")
  if select not in SELECT:
    raise ValueError(f"train.select must be one of {SELECT}; got {select!r}")
  return select, config.train.get("select_by", "score")


def selection_score(scores: dict[str, float], select_by: str) -> float:
  """The validation figure that ranks checkpoints (lower is better)."""
  if select_by not in scores:
    raise ValueError(f"train.select_by={select_by!r} is not a validation figure; have "
                     f"{sorted(scores)}")
  return float(scores[select_by])


def _process_lost(error: BaseException, workdir: pathlib.Path, step: int,
                  last_good: int | None) -> ProcessLostError:
  first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  heartbeat = runtime.heartbeat_timeout()
  wait = max(1.0, heartbeat / 2)
  # Named by the error itself, or by who does not come to a barrier of the survivors (sooner
  # than the heartbeat timeout, after which the distributed service ends this process).
  named = runtime.lost_processes(error)
  lost = named or runtime.missing_processes(wait)
  s = "es" if len(lost) > 1 else ""
  if named:
    who = f"JAX process{s} {', '.join(map(str, lost))} sent no heartbeat for {heartbeat} s"
  elif lost:
    who = (f"JAX process{s} {', '.join(map(str, lost))} did not come to a barrier of the others "
           f"within {wait:g} s (gone, or held in the step by one that is gone)")
  else:
    who = "another process has most likely stopped"
  return ProcessLostError(
      f"JAX process {jax.process_index()} of {jax.process_count()} ({workdir}): step {step + 1} "
      f"could not reach the other processes ({first}): {who}; the JAX distributed service ends "
      f"every process once one has sent no heartbeat for {heartbeat} s ({runtime.HEARTBEAT_ENV})."
      f" The last checkpoint is {'step ' + str(last_good) if last_good is not None else 'none'}: "
      "run the same command on every process again to resume from it")


def resume_note(name: str, restored: int | None, total_steps: int, stop_at: int) -> str | None:
  """What a run that found a checkpoint says (None when it starts from scratch)."""
  if restored is None:
    return None
  if restored >= total_steps:
    return (f"{name}: restored step {restored} of {total_steps} from its checkpoint; training had "
            "finished, nothing left to train")
  if restored >= stop_at:
    return (f"{name}: restored step {restored} of {total_steps} from its checkpoint; nothing to "
            f"train before train.stop_at_step={stop_at}")
  return f"{name}: resumed from the checkpoint of step {restored} of {total_steps}"


def train_fold(config: ml_collections.ConfigDict, workdir: pathlib.Path, records_dir: pathlib.Path,
               fold: int, member: int = 0,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Trains (or resumes) one fold in ``workdir``; returns its summary (also in summary.json).
  ``member`` m > 0 is another model of the same fold, from its own seed (``train.members``).
  ``log`` (process 0; default: this module's logger at INFO) hears where a resumed run starts."""
  log = log or logger.info
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding_lib.make_mesh()
  data = make_data(config, records_dir, fold, mesh)
  tc = config.train
  total_steps = tc.max_steps if tc.max_steps > 0 else tc.epochs * data.steps_per_epoch
  seed = config.seed + fold + MEMBER_SEED_STRIDE * member
  trainer = make_trainer(config, total_steps, mesh, seed, fold=fold,
                         steps_per_epoch=data.steps_per_epoch)
  loader = loader_lib.make_loader(data.train, config.task, batch_size=data.local_batch, train=True,
                                 seed=seed, workers=config.input.workers)
  it = iter(loader)
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=tc.checkpoint_keep,
                               keep_best=tc.keep_best, async_save=tc.async_checkpoints)
  writer = log_lib.MetricWriter(workdir, tensorboard=tc.tensorboard)
  select, select_by = selection(config)
  # record_options: how the training records were made, so inference preprocesses the same way.
  meta = {"task": config.task, "fold": fold, "member": member, "model": config.model.to_dict(),
          "record_options": data.index.options,
          "select": select, "select_by": select_by, "best_score": None, "best_step": None,
          "last_score": None}
  step = 0
  latest = ckpt.latest_step()
  if latest is not None:
    trainer.state, saved = ckpt.restore(latest, trainer.state, it)
    step = int(saved["step"])
    meta.update(best_score=saved.get("best_score"), best_step=saved.get("best_step"),
                last_score=saved.get("last_score"))
    writer.truncate_after(step)
  last_good = latest
  stop_at = tc.stop_at_step if tc.stop_at_step > 0 else total_steps
  name = f"fold {fold}{f' member {member}' if member else ''} ({workdir})"
  note = resume_note(name, None if latest is None else step, total_steps, stop_at)
  if note and jax.process_index() == 0:
    log(note)
  bar = _progress(total_steps, step, tc.progress)
  pending = None  # (step, metrics) of the previous step, checked after the next is dispatched
  window: dict[str, list[float]] = {}
  clock = {"t0": time.perf_counter(), "steps": 0}

  def check(pending_item):
    s, m = pending_item
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    if not math.isfinite(m["loss"]):
      ckpt.close()
      writer.close()
      if bar is not None:
        bar.close()
      raise NonFiniteLossError(s, m["loss"], workdir, last_good)
    return s, m

  def record(pending_item, force: bool = False) -> None:
    """Checks one step's metrics, advances the bar, logs the window every log_every (or now)."""
    s, mp = check(pending_item)
    for k, v in mp.items():
      window.setdefault(k, []).append(v)
    clock["steps"] += 1
    if bar is not None:  # redrawn by update() at most every 0.1 s, not on every step
      bar.set_postfix(loss=f"{mp['loss']:.4f}", refresh=False)
      bar.update(1)
    if window and (force or s % tc.log_every == 0):
      rate = clock["steps"] / max(time.perf_counter() - clock["t0"], 1e-9)
      writer.write(s, {k: float(np.mean(v)) for k, v in window.items()},
                   lr=float(trainer.schedule(s - 1)), steps_per_s=rate,
                   epoch=s / data.steps_per_epoch)
      window.clear()
      clock.update(t0=time.perf_counter(), steps=0)

  eval_every = max(int(tc.get("eval_every", 1)), 1)
  try:
    while step < min(total_steps, stop_at):
      batch = sharding_lib.shard_batch(next(it), mesh)
      trainer.state, m = trainer.train_step(trainer.state, batch)
      step += 1
      if pending is not None:
        record(pending)  # the previous step's loss, read while this step runs
      pending = (step, m)
      # train.eval_every = k: validate (and checkpoint) every k-th epoch and at the end only.
      end_of_epoch = step == total_steps or step % (data.steps_per_epoch * eval_every) == 0
      timed = tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0
      if end_of_epoch or timed or step == stop_at:
        record(pending, force=end_of_epoch)  # never checkpoint a non-finite state
        pending = None
        score = None
        if end_of_epoch and len(data.val):
          scores, preds = evaluate(trainer, data, config, fold)
          score = selection_score(scores, select_by)
          writer.write(step, scores, epoch=step / data.steps_per_epoch)
          improved = meta["best_score"] is None or score < meta["best_score"]
          if improved:
            meta.update(best_score=score, best_step=step)
          meta["last_score"] = score
          if preds is not None and jax.process_index() == 0:
            if improved:
              files.write_csv(preds, workdir / OOF_FILES["best"], index=False)
            if step == total_steps:
              files.write_csv(preds, workdir / OOF_FILES["last"], index=False)
            if improved if select == "best" else step == total_steps:
              files.write_csv(preds, workdir / OOF, index=False)
        ckpt.save(step, trainer.state, it, meta, score=score)
        last_good = step
    if pending is not None:
      record(pending, force=True)
  except Exception as e:  # pylint: disable=broad-except  # re-raised, named when a peer has gone
    if runtime.is_peer_failure(e):
      raise _process_lost(e, workdir, step, last_good) from e
    raise
  finally:
    it.close()
    if bar is not None:
      bar.close()
  ckpt.close()
  writer.close()
  summary = {"fold": fold, "member": member, "step": step, "total_steps": total_steps,
             "steps_per_epoch": data.steps_per_epoch, "select": select, "select_by": select_by,
             "best_score": meta["best_score"], "best_step": meta["best_step"],
             "last_score": meta["last_score"], "finished": step >= total_steps,
             "resumed_from": latest}
  if jax.process_index() == 0:
    files.write_json(workdir / "summary.json", summary)
  return summary


def average_members(frames: list[pd.DataFrame], config: ml_collections.ConfigDict
                    ) -> pd.DataFrame:
  """One fold's out-of-fold predictions from its members' (rows matched by study): the mean
  probability of each target; patient_overall then as the task derives it from the mean
  vertebrae (``tasks.patient_overall``; stage 2 as ``predict`` does with its ensemble), or the
  mean where the model predicts it itself."""
  if len(frames) == 1:
    return frames[0]
  cols = list(metrics_lib.TARGETS)
  index = [f.set_index("StudyInstanceUID").sort_index() for f in frames]
  if any(not f.index.equals(index[0].index) for f in index):
    raise ValueError("the members of a fold predicted different studies")
  out = index[0].copy()
  out[cols] = np.mean([f[cols].to_numpy(np.float64) for f in index], axis=0)
  derived = tasks_lib.patient_overall(config.task, out[cols[1:]].to_numpy(),
                                      overall=config.eval.overall, top_n=config.eval.top_n)
  if derived is not None:
    out["patient_overall"] = derived
  return out.reset_index()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       records_dir: str | os.PathLike,
                       log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Trains the configured task on the record sets under ``records_dir``; ``config.fold = -1``
  runs every fold and merges their OOF CSVs. ``log``: see :func:`train_fold`."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  records_dir = pathlib.Path(records_dir)
  members = int(config.train.get("members", 1))
  if members < 1:
    raise ValueError(f"train.members must be >= 1; got {members}")
  if config.fold >= 0 and members == 1:
    return train_fold(config, workdir, records_dir, config.fold, log=log)
  num_folds = loader_lib.record_index(records_dir, config.task).num_folds
  folds = [config.fold] if config.fold >= 0 else list(range(num_folds))
  results = [train_fold(config, member_dir(workdir, k, m), records_dir, k, member=m, log=log)
             for k in folds for m in range(members)]
  out: dict[str, Any] = {"folds": results}
  if jax.process_index() == 0:
    for name in (OOF, *OOF_FILES.values()):
      parts = {k: [member_dir(workdir, k, m) / name for m in range(members)] for k in folds}
      if all(p.exists() for ps in parts.values() for p in ps):
        oof = pd.concat([average_members([pd.read_csv(p, dtype={"StudyInstanceUID": str})
                                          for p in ps], config) for ps in parts.values()],
                        ignore_index=True)
        files.write_csv(oof, workdir / name, index=False)
        if name == OOF:
          out["oof_predictions"] = str(workdir / OOF)
    files.write_json(workdir / "summary.json", out)
  return out
