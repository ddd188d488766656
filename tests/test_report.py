"""Evaluation tables and pictures."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cspine_jax import labels, metrics
from cspine_jax import aggregate
from cspine_jax.report import plots, study_png, tables


def _frames(n=24, seed=0):
  rng = np.random.default_rng(seed)
  uids = [f"1.2.{i}" for i in range(n)]
  y = (rng.random((n, 7)) < 0.2).astype(float)
  y[0, 2] = 1  # at least one positive
  y[1] = 0
  lab = aggregate.wide_frame(uids, y, y.max(1))
  lab[list(labels.TARGETS)] = lab[list(labels.TARGETS)].astype(int)
  p = np.clip(0.6 * y + 0.4 * rng.random((n, 7)), 0, 1)
  pred = aggregate.wide_frame(uids, p, top_n=7)
  return lab, pred


def test_scores_equal_metric_module():
  lab, pred = _frames()
  folds = {u: i % 3 for i, u in enumerate(lab["StudyInstanceUID"])}
  table = tables.score_table(lab, pred, folds)
  assert table["split"].tolist() == ["all", "fold 0", "fold 1", "fold 2"]
  assert table["score"][0] == pytest.approx(metrics.competition_loss(lab, pred))
  ids = [u for u, f in folds.items() if f == 1]
  sub = lambda df: df[df["StudyInstanceUID"].isin(ids)]
  assert table["score"][2] == pytest.approx(metrics.competition_loss(sub(lab), sub(pred)))
  assert table["studies"].tolist() == [24, 8, 8, 8]


def test_top_n_table_recomputes_overall():
  lab, pred = _frames()
  table = tables.top_n_table(lab, pred)
  assert table["N"].tolist() == list(range(1, 8))
  p = pred.copy()
  vert = p[list(labels.VERTEBRAE)].to_numpy()
  p["patient_overall"] = vert.max(1)
  assert table["score"][0] == pytest.approx(metrics.competition_loss(lab, p))
  # N=7 equals the frame as built (wide_frame used top-7).
  assert table["score"][6] == pytest.approx(metrics.competition_loss(lab, pred))


def test_auc_and_results_table():
  lab, pred = _frames()
  auc = tables.auc_table(lab, pred)
  assert auc["target"].tolist() == list(labels.TARGETS) + ["vertebrae (pooled)"]
  from sklearn.metrics import roc_auc_score
  assert auc["auc"][0] == pytest.approx(
      roc_auc_score(lab["patient_overall"], pred["patient_overall"]))
  prior = tables.prior_predictions(lab, lab["StudyInstanceUID"])
  np.testing.assert_allclose(prior["C3"], lab["C3"].mean())
  res = tables.results_table(lab, {"Two-stage": pred, "3D CNN": prior, "mine": pred},
                             train_labels=lab)
  assert res["model"].tolist() == ["3D CNN", "Two-stage", "mine", "Prior (train means)"]
  assert res["score"][1] == pytest.approx(metrics.competition_loss(lab, pred))
  assert res["score"][3] == pytest.approx(metrics.competition_loss(lab, prior))
  # The seed's published score stands beside the model of the same name, whatever order the
  # models came in; a model the seed did not have, and the prior, get none ("-" in the text).
  seed = dict(zip(res["model"], res["seed_score"]))
  assert seed["3D CNN"] == tables.SEED_SCORES["3D CNN"] != seed["Two-stage"]
  assert seed["Two-stage"] == tables.SEED_SCORES["Two-stage"]
  assert np.isnan(seed["mine"]) and np.isnan(seed["Prior (train means)"])
  text = tables.format_table(res, "Results")
  lines = text.splitlines()
  assert lines[0] == "Results" and lines[1].split() == list(res.columns)
  rows = {line.split()[0]: line.split() for line in lines[2:]}
  assert rows["Two-stage"][2] == f"{metrics.competition_loss(lab, pred):.4f}"
  assert rows["Two-stage"][-1] == f"{tables.SEED_SCORES['Two-stage']:.4f}"
  assert rows["3D"][-1] == f"{tables.SEED_SCORES['3D CNN']:.4f}"
  assert rows["mine"][-1] == "-" and rows["Prior"][-1] == "-"


def test_results_table_on_a_subset_of_studies():
  lab, pred = _frames()
  res = tables.results_table(lab, {"half": pred.iloc[:12]})
  assert res["studies"][0] == 12
  with pytest.raises(metrics.PredictionError):
    tables.score_table(lab, pred.assign(StudyInstanceUID=[f"9.{i}" for i in range(24)]))


def test_reliability_and_curves(tmp_path):
  lab, pred = _frames()
  curve = plots.reliability_curve(np.array([0, 1, 1, 0]), np.array([0.05, 0.95, 0.9, 0.15]), bins=2)
  assert curve["observed"].tolist() == [0.0, 1.0] and curve["count"].tolist() == [2, 2]
  out = plots.reliability_plot(lab, pred, tmp_path / "rel.png")
  assert Image.open(out).size[0] > 300
  log = tmp_path / "train.jsonl"
  log.write_text("\n".join(json.dumps({"step": s, "loss": 1 / (s + 1), "val_score": 0.5 - s / 100})
                           for s in range(10)) + "\n\n")
  x, curves = plots.curve_columns(plots.read_jsonl(log))
  assert x == "step" and curves == ["loss"]
  log2 = tmp_path / "train2.jsonl"
  log2.write_text("\n".join(json.dumps({"step": s, "loss": 1 / (s + 2), "grad_norm": 3.0,
                                        **({"val_loss": 0.4, "val_competition_loss": 0.5,
                                            "score": 0.5} if s % 5 == 4 else {})})
                            for s in range(10)))
  x, curves = plots.curve_columns(plots.read_jsonl(log2))
  assert curves == ["loss", "val_loss", "val_competition_loss"]
  out = plots.learning_curves({"stage2/fold_0": log, "stage2/fold_1": log2, "stage1": log2},
                              tmp_path / "curves.png")
  assert Image.open(out).size[0] > 300
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"step": 1}\nnot json\n')
  with pytest.raises(ValueError, match="bad.jsonl: line 2"):
    plots.read_jsonl(bad)


def test_study_png(tmp_path):
  s, h, w = 70, 64, 64
  vol = np.full((s, h, w), -1000, np.float32)
  vol[:, 28:40, 26:38] = 700  # a bright column standing in for the spine
  ranges = [(i * 10, i * 10 + 9) for i in range(7)]
  boxes = [(26, 28, 38, 40)] * 6 + [None]
  probs = [0.05, 0.9, 0.1, 0.2, 0.3, 0.5, 0.7]
  assert study_png.spine_centre(vol.shape, boxes) == (34, 32)
  out = study_png.render_study(vol, tmp_path / "s.png", ranges=ranges, boxes=boxes, probs=probs,
                               overall=0.95, title="1.2.3", slice_spacing=1.0)
  img = np.asarray(Image.open(out).convert("RGB"))
  assert img.shape[0] > 200
  # Red-ish rectangles (high probabilities) are drawn.
  assert ((img[..., 0] > 180) & (img[..., 1] < 90) & (img[..., 2] < 90)).sum() > 50
  with pytest.raises(ValueError, match="7 ranges"):
    study_png.render_study(vol, tmp_path / "x.png", ranges=ranges[:3], boxes=boxes)


def test_the_prior_of_a_fold_is_its_training_folds_means():
  a, b, c, d = "1.1", "1.2", "1.3", "1.4"
  lab = pd.DataFrame({"StudyInstanceUID": [a, b, c, d], "patient_overall": [1, 1, 0, 0],
                      **{v: [1, 0, 0, 0] if v == "C1" else [0] * 4 for v in labels.VERTEBRAE}})
  folds = {a: 0, b: 0, c: 1, d: 1}
  prior = tables.prior_predictions(lab, [a, c], folds).set_index("StudyInstanceUID")
  assert prior.loc[a, "patient_overall"] == 0.0  # fold 1's studies: no fracture
  assert prior.loc[c, "patient_overall"] == 1.0 and prior.loc[c, "C1"] == 0.5
  res = tables.results_table(lab, {"Two-stage": tables.prior_predictions(lab, lab.StudyInstanceUID)},
                             lab, folds)
  assert res["model"].tolist() == ["Two-stage", tables.FOLD_PRIOR]
  with pytest.raises(ValueError, match="no labelled study outside its fold"):
    tables.prior_predictions(lab, [a], {u: 0 for u in (a, b, c, d)})


def _training_log(path, seed, steps=120, val_every=30):
  """A JSON-lines training log: a noisy falling loss, validation lines every ``val_every``."""
  rng = np.random.default_rng(seed)
  lines = []
  for s in range(steps):
    lines.append({"step": s, "loss": 1 / (1 + s / 20) + 0.2 * rng.normal(), "grad_norm": 1.0})
    if s % val_every == val_every - 1:
      lines.append({"step": s, "val_loss": 0.5 + 0.1 * rng.random(), "score": 0.6})
  path.write_text("\n".join(json.dumps(line) for line in lines))
  return path


def test_learning_curves_one_panel_per_model_smoothed_legend_outside(tmp_path, monkeypatch):
  """Several models per fold (stage 2: 2 folds x 3 members) stay readable: a panel per model run,
  each model name's panels together, the training loss raw (faint) under its moving average, one
  legend for the figure outside the panels; the pipeline draws a model's runs, members included."""
  import matplotlib.pyplot as plt

  from cspine_jax.pipeline import training
  names = ["stage1/fold_0", "stage1/fold_1"] + [
      f"stage2/fold_{f}{m}" for f in (0, 1) for m in ("", "_member_1", "_member_2")]
  logs = {n: _training_log(tmp_path / f"log{i}.jsonl", i) for i, n in enumerate(names)}
  fig = plots.learning_curves_figure(logs)
  panels = [ax for ax in fig.axes if ax.get_title()]
  twins = [ax for ax in fig.axes if not ax.get_title()]  # the validation metric's right axes
  assert [ax.get_title() for ax in panels] == names and len(twins) == len(names)
  # 4 to a row, stage 2 on rows of its own: stage1 | stage2 x4 | stage2 x2.
  rows = [ax.get_subplotspec().rowspan.start for ax in panels]
  assert rows == [0, 0, 1, 1, 1, 1, 2, 2]
  assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
  assert [t.get_text() for t in fig.legends[0].get_texts()] == [
      "train loss", "train loss (EMA)", "val loss", "val metric (right axis)"]
  raw, smoothed = panels[0].get_lines()[:2]
  assert raw.get_alpha() < 1 and smoothed.get_alpha() == 1
  y = pd.Series(raw.get_ydata())
  np.testing.assert_allclose(smoothed.get_ydata(), plots.smooth(y))
  assert np.abs(np.diff(smoothed.get_ydata())).sum() < 0.5 * np.abs(np.diff(y)).sum()
  plt.close(fig)
  out = plots.learning_curves(logs, tmp_path / "curves.png")
  assert Image.open(out).size[0] > 1000  # four panels wide
  # pipeline.training: a PNG beside each run, and one over all runs (members too).
  run = tmp_path / "stage2"
  for name in names[2:]:
    (run / name.split("/")[1]).mkdir(parents=True)
    _training_log(run / name.split("/")[1] / "log.jsonl", 0)
  drawn = {}
  real = plots.learning_curves

  def spy(runs, path, *args):
    drawn[path] = list(runs)
    return real(runs, path, *args)

  monkeypatch.setattr(plots, "learning_curves", spy)
  training.learning_curves(run, "stage2")
  assert drawn[run / "learning_curves.png"] == sorted(names[2:])
  assert all((run / n.split("/")[1] / "learning_curves.png").exists() for n in names[2:])
