"""The whole method end to end on a generated synthetic set (``configs/demo.py``).

    python launch.py --config=configs/demo.py --workdir=runs/demo
    python -m cspine_jax.demo --workdir runs/demo [--variant tiny]

Steps (each prints its time): generate -> prepare records -> stage 1 (every fold) -> pseudo-labels
(the ``--vertebrae`` file, with range/box IoU against the masks) -> stage 2 (every fold) -> the
baselines (3D CNN, single-head, multi-head; every fold) -> out-of-fold evaluation (results table,
top-N table, prior baseline, reliability plot) -> inference on the held-out test studies from their
DICOM files (``infer.predict``) scored against the generator's truth -> summary.html.

Everything lands under WORKDIR: data/ (the RSNA-format set), records/, run/ (stage1/, stage2/,
<baseline>/ training runs, vertebrae.csv, inference.json, prior.json), eval/ (OOF CSVs, tables,
reliability.png), test/ (submission.csv, per-study JSON and PNG), summary.html and results.json.
A second run in the same WORKDIR reuses the data and records (training restarts from checkpoints).
"""
from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys
import time
from typing import Any, Callable

import ml_collections
import pandas as pd

from cspine_jax import labels as labels_lib
from cspine_jax import metrics
from cspine_jax.infer import predict
from cspine_jax.infer import pseudo_labels
from cspine_jax.records import study as study_lib
from cspine_jax.report import plots
from cspine_jax.report import summary as summary_lib
from cspine_jax.report import tables

# Display names of the trained models, in the seed's results-table order.
NAMES = {"cnn3d": "3D CNN", "single_head": "Single-head", "multi_head": "Multi-head",
         "stage2": "Two-stage"}


class Progress:
  """Prints numbered steps with their own and the total elapsed time."""

  def __init__(self, log: Callable[[str], None] = print):
    self.start = time.perf_counter()
    self.log = log
    self.times: dict[str, float] = {}

  def step(self, name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    self.log(f"[demo {t0 - self.start:6.1f}s] {name} ...")
    out = fn()
    self.times[name] = time.perf_counter() - t0
    self.log(f"[demo {time.perf_counter() - self.start:6.1f}s] {name} done in "
             f"{self.times[name]:.1f}s")
    return out


def _compilation_cache(folder: pathlib.Path) -> None:
  """A persistent XLA cache: every fold after the first (and any rerun) reuses the compiled steps,
  which on 2 CPU cores cost more than the demo's training itself."""
  import jax
  folder.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def options_of(config: ml_collections.ConfigDict) -> study_lib.Options:
  p = config.prepare
  return study_lib.Options(image_size=tuple(p.image_size), stage2_slices=p.stage2_slices,
                           cube_size=p.cube_size, crop_margin=p.crop_margin,
                           num_folds=p.num_folds, fold_seed=p.fold_seed,
                           stage2_locate=p.stage2_locate)


def model_config(config: ml_collections.ConfigDict, name: str, data_dir: pathlib.Path,
                 records_dir: pathlib.Path, vertebrae_file: pathlib.Path | None,
                 run_dir: pathlib.Path | None = None) -> ml_collections.ConfigDict:
  """``configs/<name>.py:cpu`` with the demo's data, records, folds, sizes and schedule.
  ``models.<name>.init_from`` = another model of the demo: each fold starts from that model's
  encoder of the same fold (in ``run_dir``)."""
  c = importlib.import_module(f"configs.{name}").get_config("cpu")
  m = config.models[name]
  init_from = m.get("init_from", "")
  if init_from:
    if run_dir is None:
      raise ValueError(f"models.{name}.init_from={init_from!r} needs the run folder")
    if init_from == "box_refine" and not config.get("refine_boxes", False):
      raise ValueError(f"models.{name}.init_from='box_refine' needs refine_boxes=True (without it "
                       "no box refiner is trained)")
    # loop.train_and_evaluate trains a single fold (one model) in the run folder itself.
    one_folder = config.train_fold >= 0 and config.models[init_from].get("members", 1) == 1
    c.model.pretrained = str(run_dir / init_from / ("" if one_folder else "fold_{fold}"))
  c.seed = config.seed
  c.data_dir = str(data_dir)
  c.records_dir = str(records_dir)
  c.vertebrae_file = None if vertebrae_file is None else str(vertebrae_file)
  c.fold = config.train_fold
  c.num_folds = config.prepare.num_folds
  c.prepare.image_size = tuple(config.prepare.image_size)
  c.prepare.stage2_slices = config.prepare.stage2_slices
  c.prepare.cube_size = config.prepare.cube_size
  c.train.epochs = m.epochs
  c.train.max_steps = m.get("max_steps", 0)  # > 0: a step budget instead of whole epochs
  c.train.eval_every = m.get("eval_every", 1)  # validate + checkpoint every k epochs and at the end
  c.train.members = m.get("members", 1)  # models per fold (their probabilities averaged)
  c.train.progress = bool(config.progress)
  c.train.tensorboard = False
  c.train.async_checkpoints = False
  c.input.batch_size = m.batch_size
  c.input.workers = 0
  c.optimizer.lr = m.lr
  c.eval.top_n = config.top_n
  for k, v in m.model.items():
    c.model[k] = v
  for k, v in m.get("loss", {}).items():
    c.loss[k] = v
  for k, v in m.get("augment", {}).items():
    c.input.augment[k] = v
  return c


def rules_of(config: ml_collections.ConfigDict) -> pseudo_labels.Rules:
  """The pseudo-label derivation rules of the demo config (``config.pseudo_labels``)."""
  return pseudo_labels.Rules(**config.pseudo_labels.to_dict())


def test_labels(data_dir: pathlib.Path) -> pd.DataFrame:
  """Wide labels of the generator's held-out test studies (from ground_truth.json)."""
  truth = json.loads((data_dir / "ground_truth.json").read_text())["studies"]
  rows = []
  for uid, s in sorted(truth.items()):
    if s.get("split") != "test":
      continue
    y = [int(v in s.get("fractured", [])) for v in labels_lib.VERTEBRAE]
    rows.append([uid, max(y)] + y)
  return pd.DataFrame(rows, columns=["StudyInstanceUID", *labels_lib.TARGETS])


def run_demo(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
             log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs every step; returns (and writes to WORKDIR/results.json) the figures."""
  from cspine_jax import synthetic
  from cspine_jax.records import pipeline
  from cspine_jax.train import loop

  workdir = pathlib.Path(workdir).absolute()
  _compilation_cache(workdir / "jax_cache")
  data_dir, records_dir, run_dir = workdir / "data", workdir / "records", workdir / "run"
  eval_dir, test_dir = workdir / "eval", workdir / "test"
  for d in (run_dir, eval_dir, test_dir):
    d.mkdir(parents=True, exist_ok=True)
  options = options_of(config)
  progress = Progress(log)
  vertebrae_file = run_dir / "vertebrae.csv"

  def generate():
    if not (data_dir / "train.csv").exists():
      synthetic.generate(data_dir, config.synthetic.num_studies, config.synthetic.seed,
                         size=config.synthetic.size,
                         segmented_fraction=config.synthetic.get("segmented_fraction", 0.5),
                         workers=config.workers)

  def prepare(task: str, vertebrae: pathlib.Path | None = None):
    def go():
      m = pipeline.prepare(data_dir, records_dir, task, options, vertebrae_file=vertebrae,
                           workers=config.workers, progress=False)
      log(f"  {task}: {m['num_records']} records from {m['num_studies']} studies, "
          f"{len(m['bad_studies'])} bad, {len(m.get('skipped_studies', []))} skipped")
    return go

  def train(name: str):
    vf = vertebrae_file if name not in ("stage1", "box_refine") else None
    return lambda: loop.train_and_evaluate(
        model_config(config, name, data_dir, records_dir, vf, run_dir), run_dir / name)

  progress.step("generate synthetic studies", generate)
  progress.step("prepare stage-1 records", prepare("stage1"))
  progress.step("train stage 1 (all folds)", train("stage1"))
  refine = bool(config.get("refine_boxes", False))
  if refine:
    progress.step("prepare box-refiner records", prepare("box_refine"))
    progress.step("train the box refiner (all folds)", train("box_refine"))

  def label():
    return pseudo_labels.label_from_run(data_dir, run_dir / "stage1", records_dir, vertebrae_file,
                                        rules=rules_of(config), progress=bool(config.progress),
                                        refine_dir=run_dir / "box_refine" if refine else None,
                                        refine_passes=int(config.get("refine_passes", 1)),
                                        log=log)

  located = progress.step("stage-1 pseudo-labels", label)
  progress.step("prepare stage-2 records", prepare("stage2", vertebrae_file))
  progress.step("train stage 2 (all folds)", train("stage2"))
  baselines = list(config.baselines)
  if baselines:
    if "cnn3d" in baselines:
      progress.step("prepare 3D CNN records", prepare("cnn3d", vertebrae_file))
    if {"single_head", "multi_head"} & set(baselines):
      progress.step("prepare 2D slice records", prepare("slices2d", vertebrae_file))
    for name in baselines:
      progress.step(f"train {NAMES[name]} baseline (all folds)", train(name))

  # ---- out-of-fold evaluation
  def evaluate():
    train_labels = labels_lib.read_train_csv(data_dir / "train.csv")
    models = {}
    for name in ["stage2"] + baselines:
      oof = metrics.read_predictions(run_dir / name / "oof_predictions.csv")
      models[NAMES[name]] = oof
      oof.to_csv(eval_dir / f"{name}_oof.csv", index=False)
    folds = tables.read_folds(run_dir / "stage2" / "oof_predictions.csv")
    two = models["Two-stage"]
    out = {"results": tables.results_table(train_labels, models, train_labels),
           "scores": tables.score_table(train_labels, two, folds),
           "top_n": tables.top_n_table(train_labels, two),
           "auc": tables.auc_table(train_labels, two)}
    lab, pred = tables.aligned(train_labels, two)
    plots.reliability_plot(lab, pred, eval_dir / "reliability.png",
                           title="Two-stage, out-of-fold")
    for k, df in out.items():
      df.to_csv(eval_dir / f"{k}.csv", index=False)
    return out

  oof_tables = progress.step("evaluate out-of-fold predictions", evaluate)

  # ---- inference on the held-out test studies, from DICOM
  def infer():
    # The rules the pseudo-labels were made with (a template decode carries its fitted layout).
    predict.write_spec(run_dir, options, options, top_n=config.top_n, rules=located["rules"],
                       refine_options=located["refine_options"],
                       refine_passes=located["refine_passes"])
    predict.write_prior(run_dir / predict.PRIOR,
                        labels_lib.read_train_csv(data_dir / "train.csv"))
    models = predict.load_models(run_dir)
    folders = predict.find_studies(data_dir / "test_images")
    pngs = {f.name for f in folders[:config.pngs]}
    writer = predict.study_writer(test_dir / "studies", None)
    png_writer = predict.study_writer(None, test_dir / "png")

    def on_study(res, series):
      writer(res, series)
      if res.uid in pngs:
        png_writer(res, series)

    result = predict.run(folders, models, predict.load_prior(run_dir / predict.PRIOR),
                         batch_size=32, on_study=on_study, progress=bool(config.progress))
    paths = predict.write_outputs(result, test_dir / "submission.csv")
    labels = test_labels(data_dir)
    prior = tables.prior_predictions(labels_lib.read_train_csv(data_dir / "train.csv"),
                                     labels["StudyInstanceUID"].tolist())
    sub = metrics.read_predictions(paths["submission"])
    return {"score": metrics.competition_loss(labels, sub),
            "prior": metrics.competition_loss(labels, prior), "studies": len(folders),
            "fallbacks": len(result.errors()),
            "seconds_per_study": {k: v / max(len(folders), 1) for k, v in result.seconds.items()},
            "submission": str(paths["submission"])}

  test = progress.step("predict the held-out test studies (from DICOM)", infer)

  results = oof_tables["results"]
  prior_oof = float(results.loc[results["model"] == "Prior (train means)", "score"].iloc[0])
  two_oof = float(results.loc[results["model"] == "Two-stage", "score"].iloc[0])
  figures = {
      "oof": {"two_stage": two_oof, "prior": prior_oof, "ratio": two_oof / prior_oof},
      "test": test, "pseudo_labels": {k: located[k] for k in ("ensemble", "out_of_fold")},
      "results": results.to_dict(orient="records"),
      "top_n": oof_tables["top_n"].to_dict(orient="records"),
      "step_seconds": progress.times,
  }
  (workdir / "results.json").write_text(json.dumps(figures, indent=1, default=float))
  html = summary_lib.write_summary(
      workdir / "summary.html", title="cspine_jax demo (synthetic data)",
      notes=[f"Out-of-fold competition metric: two-stage {two_oof:.4f}, constant prior "
             f"{prior_oof:.4f} (ratio {two_oof / prior_oof:.2f}).",
             f"Held-out test studies ({test['studies']}): two-stage {test['score']:.4f}, prior "
             f"{test['prior']:.4f}."],
      tables={"Results (out-of-fold)": results, "Top-N (two-stage, out-of-fold)":
              oof_tables["top_n"], "Two-stage per fold": oof_tables["scores"],
              "Two-stage ROC AUC": oof_tables["auc"]},
      logs=summary_lib.find_logs(run_dir),
      images=[eval_dir / "reliability.png", *sorted((test_dir / "png").glob("*.png"))])

  # The output ends with the results table and the two metrics (the demo's figures of merit).
  log("")
  log(tables.format_table(oof_tables["top_n"], "Two-stage: patient_overall = top-N"))
  log("")
  log(f"held-out test ({test['studies']} studies, predicted from DICOM): two-stage "
      f"{test['score']:.4f}, prior {test['prior']:.4f}")
  log(f"summary: {html}; figures: {workdir / 'results.json'}")
  log("")
  log(tables.format_table(results, "Results (out-of-fold, competition metric: lower is better)"))
  log(f"two-stage competition metric (out-of-fold): {two_oof:.4f}")
  log(f"prior baseline competition metric (out-of-fold): {prior_oof:.4f}")
  return figures


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m cspine_jax.demo", description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--variant", default="", help="configs/demo.py variant ('' or 'tiny')")
  args = p.parse_args(argv)
  from configs import demo as demo_config
  run_demo(demo_config.get_config(args.variant), args.workdir)
  return 0


if __name__ == "__main__":
  sys.exit(main())
