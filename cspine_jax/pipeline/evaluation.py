"""The pipeline's scoring steps: out-of-fold tables of the trained models, and the test prediction."""
from __future__ import annotations

import pathlib
from typing import Any
from typing import Sequence

import pandas as pd

from cspine_jax import labels as labels_lib
from cspine_jax import metrics
from cspine_jax import synthetic
from cspine_jax.infer import predict
from cspine_jax.infer import spec
from cspine_jax.io import files
from cspine_jax.report import plots
from cspine_jax.report import study_png
from cspine_jax.report import tables
from cspine_jax.train import loop
from cspine_jax.train import probe

# Display names of the trained models, in the seed's results-table order.
NAMES = {"cnn3d": "3D CNN", "single_head": "Single-head", "multi_head": "Multi-head",
         "stage2": "Two-stage", "probe": probe.NAME}
# The headline model's predictions at its best validation epoch of each fold: a figure selected
# on the data it is scored on, shown beside the headline (which follows a rule fixed in advance).
SELECTED_ON_FOLD = "{name}, best epoch (selected on the reported fold)"


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
  return df.to_dict(orient="records")


def evaluate_oof(data_dir: pathlib.Path, run_dir: pathlib.Path, eval_dir: pathlib.Path,
                 models: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
  """Results, per-fold, top-N and AUC tables of the models' out-of-fold predictions (the first
  is the headline model) beside the prior of each study's training folds, as CSVs in
  ``eval_dir`` with a reliability plot. Each model's predictions are those of the checkpoint its
  ``train.select`` names; where that is a fixed rule and a best-on-fold file exists too, it joins
  the table under its own, labelled name."""
  eval_dir.mkdir(parents=True, exist_ok=True)
  train_labels = labels_lib.read_train_csv(data_dir / "train.csv")
  preds = {}
  for name in models:
    oof = metrics.read_predictions(run_dir / name / loop.OOF)
    preds[NAMES[name]] = oof
    files.write_csv(oof, eval_dir / f"{name}_oof.csv", index=False)
  headline_name = NAMES[models[0]]
  headline = preds[headline_name]
  folds = tables.read_folds(run_dir / models[0] / loop.OOF)
  best = run_dir / models[0] / loop.OOF_FILES["best"]
  if best.exists() and not metrics.read_predictions(best).equals(headline):
    preds[SELECTED_ON_FOLD.format(name=headline_name)] = metrics.read_predictions(best)
  out = {"results": tables.results_table(train_labels, preds, train_labels, folds),
         "scores": tables.score_table(train_labels, headline, folds),
         "top_n": tables.top_n_table(train_labels, headline),
         "auc": tables.auc_table(train_labels, headline)}
  lab, pred = tables.aligned(train_labels, headline)
  plots.reliability_plot(lab, pred, eval_dir / "reliability.png",
                         title=f"{headline_name}, out-of-fold")
  for k, df in out.items():
    files.write_csv(df, eval_dir / f"{k}.csv", index=False)
  return {k: records(df) for k, df in out.items()}


def predict_test(data_dir: pathlib.Path, run_dir: pathlib.Path, test_dir: pathlib.Path, *,
                 pngs: int = 0, progress: bool = False, batch_size: int = 32) -> dict[str, Any]:
  """The held-out test studies predicted from their DICOM files with RUN's models: the
  submission, a JSON per study, pictures of the first ``pngs``; scored when the set is generated
  (its ground truth holds the test labels)."""
  models = spec.load_models(run_dir)
  folders = predict.find_studies(data_dir / "test_images")
  json_study = predict.json_writer(test_dir / "studies")
  png_study = study_png.png_writer(test_dir / "png", only={f.name for f in folders[:pngs]})

  def on_study(res, series):
    json_study(res, series)
    png_study(res, series)

  result = predict.run(folders, models, spec.load_prior(run_dir / spec.PRIOR),
                       batch_size=batch_size, on_study=on_study, progress=progress)
  paths = predict.write_outputs(result, test_dir / "submission.csv")
  out = {
      "studies": len(folders), "fallbacks": len(result.errors()), "seconds_per_study": {
          k: v / max(len(folders), 1) for k, v in result.seconds.items()
      }, "submission": str(paths["submission"])
  }
  if (data_dir / "ground_truth.json").exists():
    labels = synthetic.test_labels(data_dir)
    prior = tables.prior_predictions(labels_lib.read_train_csv(data_dir / "train.csv"),
                                     labels["StudyInstanceUID"].tolist())
    sub = metrics.read_predictions(paths["submission"])
    out = {
        "score": metrics.competition_loss(labels, sub), "prior": metrics.competition_loss(
            labels, prior), **out
    }
  return out


def oof_summary(results: list[dict[str, Any]]) -> dict[str, float]:
  """Two-stage and prior scores of :func:`evaluate_oof`'s results table, and their ratio."""
  score = {row["model"]: float(row["score"]) for row in results}
  two = score[NAMES["stage2"]]
  prior = next(v for k, v in score.items() if k.startswith("Prior"))
  return {"two_stage": two, "prior": prior, "ratio": two / prior}
