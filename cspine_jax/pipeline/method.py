"""The two-stage method as pipeline steps, from an RSNA-format folder (or a generated one) to a
submission (``configs/demo.py``).

data -> records -> stage 1 (every fold) -> box refiner -> pseudo-labels (the ``--vertebrae``
file, with range/box IoU against the masks; RUN/inference.json) -> stage 2 (every fold) -> the
baselines -> out-of-fold evaluation (results, top-N, AUC tables, reliability plot) -> the test
studies predicted from their DICOM files -> summary (results.json, summary.html).

Everything lands under WORKDIR: data/ (a generated set), records/, run/ (one folder per model,
vertebrae.csv, inference.json, prior.json), eval/ (OOF CSVs, tables, reliability.png), test/
(submission.csv, per-study JSON and PNG), summary.html, results.json and pipeline.json.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any
from typing import Callable

import ml_collections
import pandas as pd

from cspine_jax import labels as labels_lib
from cspine_jax.infer import pseudo_labels
from cspine_jax.infer import spec
from cspine_jax.localize import derive as derive_lib
from cspine_jax.io import files
from cspine_jax.pipeline import data
from cspine_jax.pipeline import evaluation
from cspine_jax.pipeline import steps as steps_lib
from cspine_jax.pipeline import training
from cspine_jax.report import summary as summary_lib
from cspine_jax.report import tables
from cspine_jax.train import loop
from cspine_jax.train import probe

RESULTS = "results.json"
# Record set each model trains on, and the step title of its training.
RECORDS = {
    "stage1": "stage1", "box_refine": "box_refine", "stage2": "stage2", "cnn3d": "cnn3d",
    "single_head": "slices2d", "multi_head": "slices2d"
}
TITLES = {
    "stage1": "train stage 1 (all folds)", "box_refine": "train the box refiner (all folds)",
    "stage2": "train stage 2 (all folds)"
}
RECORD_TITLES = {
    "stage1": "prepare stage-1 records", "box_refine": "prepare box-refiner records",
    "stage2": "prepare stage-2 records", "cnn3d": "prepare 3D CNN records",
    "slices2d": "prepare 2D slice records"
}


@dataclasses.dataclass(frozen=True)
class Paths:
  """Where each step reads and writes, under one workdir."""
  workdir: pathlib.Path
  data: pathlib.Path

  @property
  def records(self) -> pathlib.Path:
    return self.workdir / "records"

  @property
  def run(self) -> pathlib.Path:
    return self.workdir / "run"

  @property
  def eval(self) -> pathlib.Path:
    return self.workdir / "eval"

  @property
  def test(self) -> pathlib.Path:
    return self.workdir / "test"

  @property
  def vertebrae(self) -> pathlib.Path:
    return self.run / "vertebrae.csv"


def paths_of(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Paths:
  data_dir = config.get("data_dir")
  return Paths(workdir, pathlib.Path(data_dir) if data_dir else workdir / "data")


def rules_of(config: ml_collections.ConfigDict) -> derive_lib.Rules:
  """The pseudo-label derivation rules of the config (``config.pseudo_labels``)."""
  return derive_lib.Rules(**config.pseudo_labels.to_dict())


def build(config: ml_collections.ConfigDict, workdir: pathlib.Path,
          log: Callable[[str], None] = print) -> list[steps_lib.Step]:
  """The method's steps for ``config`` (see the module docstring)."""
  p = paths_of(config, workdir)
  options = data.options_of(config.prepare)
  refine = bool(config.get("refine_boxes", False))
  baselines = list(config.baselines)
  progress = bool(config.progress)
  out: list[steps_lib.Step] = []

  if config.get("data_dir"):
    out.append(
        steps_lib.Step("data", "check the data folder", lambda: data.check_data_dir(p.data),
                       outputs=(str(p.data / "train.csv"),), identity=str(p.data)))
  else:
    out.append(
        steps_lib.Step("data", "generate synthetic studies",
                       lambda: data.generate(config.synthetic, p.data, config.workers),
                       outputs=(str(p.data / "train.csv"),), identity=config.synthetic.to_dict()))

  def records(task: str, vertebrae: bool = False) -> steps_lib.Step:
    vf = p.vertebrae if vertebrae else None
    return steps_lib.Step(
        f"records_{task}", RECORD_TITLES[task], lambda: data.prepare(
            p.data, p.records, task, options, vertebrae_file=vf, workers=config.workers, log=log),
        inputs=(str(p.data),) + ((str(vf),) if vf else ()),
        outputs=(str(p.records / task / "manifest.json"),), identity={
            "task": task, "options": options.to_json(), "data": str(p.data), "vertebrae": str(vf)
        })

  def train(name: str) -> steps_lib.Step:
    task_records = RECORDS[name]
    cfg = training.model_config(config, name, p.run)
    title = TITLES.get(name) or f"train {evaluation.NAMES[name]} baseline (all folds)"
    return steps_lib.Step(
        name, title, lambda: training.train(cfg, p.run / name, p.records),
        inputs=(str(p.records / task_records),), outputs=(str(p.run / name),), identity={
            "config": cfg.to_dict(), "records": str(p.records / task_records)
        })

  out += [records("stage1"), train("stage1")]
  if refine:
    out += [records("box_refine"), train("box_refine")]

  def label() -> dict[str, Any]:
    located = pseudo_labels.label_from_run(
        p.data, p.run / "stage1", p.records, p.vertebrae, rules=rules_of(config), progress=progress,
        refine_dir=p.run / "box_refine" if refine else None, refine_passes=int(
            config.get("refine_passes", 1)), log=log)
    # What inference needs besides the checkpoints: the rules as fitted, and the fallback prior.
    spec.write_spec(p.run, top_n=config.top_n, rules=located["rules"], refine=refine,
                    refine_passes=located["refine_passes"])
    spec.write_prior(p.run / spec.PRIOR, labels_lib.read_train_csv(p.data / "train.csv"))
    return {
        k: located[k]
        for k in ("out_of_fold", "in_sample", "sources", "studies", "not_found", "failed")
    }

  out.append(
      steps_lib.Step(
          "pseudo_labels", "stage-1 pseudo-labels", label,
          inputs=(str(p.run / "stage1"),) + ((str(p.run / "box_refine"),) if refine else ()),
          outputs=(str(p.vertebrae), str(p.run / spec.SPEC)), identity={
              "rules": config.pseudo_labels.to_dict(), "refine": refine, "passes": config.get(
                  "refine_passes", 1), "top_n": config.top_n, "options": options.to_json()
          }))
  out += [records("stage2", vertebrae=True), train("stage2")]

  def run_probe() -> dict[str, Any]:
    table = probe.read_features(p.records)
    (p.run / "probe").mkdir(parents=True, exist_ok=True)
    files.write_csv(probe.fit_out_of_fold(table, config.top_n), p.run / "probe" / loop.OOF,
                    index=False)
    return {"records": len(table)}

  if config.get("probe", True):
    out.append(steps_lib.Step("probe", "fit the shortcut probe (out of fold)", run_probe,
                              inputs=(str(p.records / "stage2"),),
                              outputs=(str(p.run / "probe" / loop.OOF),),
                              identity={"top_n": config.top_n, "records": str(p.records)}))
  if "cnn3d" in baselines:
    out.append(records("cnn3d", vertebrae=True))
  if {"single_head", "multi_head"} & set(baselines):
    out.append(records("slices2d", vertebrae=True))
  out += [train(name) for name in baselines]

  models = ["stage2"] + baselines + (["probe"] if config.get("probe", True) else [])
  out.append(
      steps_lib.Step("evaluate", "evaluate out-of-fold predictions",
                     lambda: evaluation.evaluate_oof(p.data, p.run, p.eval, models), inputs=tuple(
                         str(p.run / m / "oof_predictions.csv") for m in models), outputs=(str(
                             p.eval / "results.csv"),), identity=models))
  out.append(
      steps_lib.Step(
          "predict", "predict the held-out test studies (from DICOM)",
          lambda: evaluation.predict_test(p.data, p.run, p.test, pngs=config.pngs, progress=progress
                                         ), inputs=(str(p.data / "test_images"), str(p.run)),
          outputs=(str(p.test / "submission.csv"),), identity={"pngs": config.pngs}))
  return out


def summarize(outcome: steps_lib.Outcome, config: ml_collections.ConfigDict, workdir: pathlib.Path,
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """results.json and summary.html from the steps' results; the log ends with the results table
  and the two-stage and prior metrics."""
  p = paths_of(config, workdir)
  res = outcome.results
  missing = [k for k in ("pseudo_labels", "evaluate", "predict") if res.get(k) is None]
  if missing:  # a run of some steps alone, before the whole method has run once
    log(f"no summary yet: steps {', '.join(missing)} have not run in {workdir}")
    return {}
  oof = res["evaluate"]
  test = res["predict"]
  figures = {
      "oof": evaluation.oof_summary(oof["results"]),
      "test": test,
      "pseudo_labels": {k: res["pseudo_labels"][k]
                        for k in ("out_of_fold", "in_sample", "sources")},
      "results": oof["results"],
      "top_n": oof["top_n"],
      "step_seconds": outcome.seconds,
  }
  files.write_json(workdir / RESULTS, figures, default=str)
  results = tables_of(oof, "results")
  two, prior = figures["oof"]["two_stage"], figures["oof"]["prior"]
  src = res["pseudo_labels"]["sources"]
  notes = [
      f"Out-of-fold competition metric: two-stage {two:.4f}, constant prior of the training folds "
      f"{prior:.4f} (ratio {two / prior:.2f}); each model's checkpoint is its last (a rule fixed "
      "in advance), and a row marked 'selected on the reported fold' shows the best epoch "
      "chosen on the validation fold itself.",
      f"Stage 2's crops: {src['out_of_fold']} segmented studies located by the stage-1 and "
      f"refiner models that never trained on them (template and box offsets fitted without "
      f"their fold's masks), {src['ensemble']} studies without a mask by the whole ensemble"
      + (f", {len(src['in_sample'])} in sample" if src["in_sample"] else "") + "."]
  if "score" in test:
    notes.append(f"Held-out test studies ({test['studies']}): two-stage {test['score']:.4f}, "
                 f"prior {test['prior']:.4f}.")
  html = summary_lib.write_summary(
      workdir / "summary.html", title="cspine_jax demo (synthetic data)"
      if not config.get("data_dir") else "cspine_jax (RSNA data)", notes=notes, tables={
          "Results (out-of-fold)": results, "Top-N (two-stage, out-of-fold)": tables_of(
              oof, "top_n"), "Two-stage per fold": tables_of(oof, "scores"),
          "Two-stage ROC AUC": tables_of(oof, "auc")
      }, logs=summary_lib.find_logs(p.run),
      images=[p.eval / "reliability.png", *sorted((p.test / "png").glob("*.png"))])
  log("")
  log(tables.format_table(tables_of(oof, "top_n"), "Two-stage: patient_overall = top-N"))
  log("")
  if "score" in test:
    log(f"held-out test ({test['studies']} studies, predicted from DICOM): two-stage "
        f"{test['score']:.4f}, prior {test['prior']:.4f}")
  log(f"summary: {html}; figures: {workdir / RESULTS}")
  log("")
  log(tables.format_table(results, "Results (out-of-fold, competition metric: lower is better)"))
  log(f"two-stage competition metric (out-of-fold): {two:.4f}")
  log(f"prior baseline competition metric (out-of-fold): {prior:.4f}")
  return figures


def tables_of(oof: dict[str, list[dict[str, Any]]], name: str) -> pd.DataFrame:
  """One of :func:`evaluation.evaluate_oof`'s tables as a DataFrame."""
  return pd.DataFrame(oof[name])
