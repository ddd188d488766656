"""Tests for the evaluation: the score, the report blocks and input errors through
``cspine_jax.report.evaluation``; the score line, exit status and errors of evaluate.py in a
subprocess (a command line is never imported in tests: absl flags are process-global)."""
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cspine_jax import aggregate, metrics
from cspine_jax.labels import TARGETS
from cspine_jax.report import evaluation, tables

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def files(tmp_path):
  rng = np.random.default_rng(0)
  uids = [f"1.2.826.{i}" for i in range(30)]
  y = (rng.uniform(size=(30, 8)) < 0.3).astype(int)
  y[:, 0] = y[:, 1:].max(1)
  labels_frame = pd.DataFrame(y, columns=list(TARGETS))
  labels_frame.insert(0, "StudyInstanceUID", uids)
  p = np.clip(0.5 * y + 0.5 * rng.uniform(size=y.shape), 0, 1)
  wide = pd.DataFrame(p, columns=list(TARGETS))
  wide.insert(0, "StudyInstanceUID", uids)
  wide["fold"] = np.arange(30) % 3
  paths = {name: tmp_path / f"{name}.csv" for name in ("train", "wide", "long", "partial")}
  labels_frame.to_csv(paths["train"], index=False)
  wide.to_csv(paths["wide"], index=False)
  aggregate.to_long(wide[["StudyInstanceUID", *TARGETS]]).to_csv(paths["long"], index=False)
  wide.iloc[:20].to_csv(paths["partial"], index=False)
  return paths, labels_frame, wide


def _cli(*argv):
  """(exit status, stdout lines, stderr) of evaluate.py run as a command."""
  proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *map(str, argv)],
                        capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  return proc.returncode, proc.stdout.rstrip("\n").splitlines(), proc.stderr


def test_score_and_reports(files):
  paths, labels_frame, wide = files
  score, blocks = evaluation.evaluate(paths["train"], [str(paths["wide"])])
  assert score == metrics.competition_loss(labels_frame, wide)
  text = "\n".join(blocks)
  assert "studies: 30" in text
  assert "fold 2" in text  # per-fold rows from the predictions' own fold column
  assert "ROC AUC per target" in text and "top-N" in text
  assert len(blocks) == len(evaluation.REPORTS)


def test_long_format_gives_the_same_score(files):
  paths, _, _ = files
  wide_score, _ = evaluation.evaluate(paths["train"], str(paths["wide"]))
  long_score, blocks = evaluation.evaluate(paths["train"], str(paths["long"]))
  assert f"{long_score:.6f}" == f"{wide_score:.6f}"
  lines = "\n".join(blocks).splitlines()
  assert not any(line.startswith("fold ") for line in lines)  # no fold column there


def test_labels_in_the_kaggle_answer_format(files, tmp_path):
  """--labels (and --train_labels) may be Kaggle's long answer file (row_id,fractured, 0/1; extra
  columns such as Usage ignored): the same labels, score and reports as train.csv; a value other
  than 0/1 or a missing row is named."""
  paths, labels_frame, _ = files
  long = aggregate.to_long(labels_frame).sample(frac=1.0, random_state=0)  # any row order
  long["Usage"] = "Public"
  answers = tmp_path / "solution.csv"
  long.to_csv(answers, index=False)
  got = evaluation.read_labels(answers)
  want = labels_frame.sort_values("StudyInstanceUID").reset_index(drop=True)
  pd.testing.assert_frame_equal(got.sort_values("StudyInstanceUID").reset_index(drop=True), want,
                                check_dtype=True)
  wide_score, wide_blocks = evaluation.evaluate(paths["train"], str(paths["wide"]))
  long_score, long_blocks = evaluation.evaluate(answers, str(paths["wide"]), train_labels=answers)
  assert long_score == pytest.approx(wide_score, abs=1e-12)
  assert long_blocks[0] == wide_blocks[0]  # studies and positives counted alike
  soft = long.copy()
  soft.loc[soft["row_id"] == f"{labels_frame['StudyInstanceUID'][3]}_C2", "fractured"] = 0.5
  soft.to_csv(tmp_path / "soft.csv", index=False)
  with pytest.raises(evaluation.INPUT_ERRORS,
                     match=r"soft.csv: row_id 1.2.826.3_C2: fractured=0.5 is not 0 or 1"):
    evaluation.read_labels(tmp_path / "soft.csv")
  long[long["row_id"] != "1.2.826.7_C5"].to_csv(tmp_path / "hole.csv", index=False)
  with pytest.raises(evaluation.INPUT_ERRORS, match=r"hole.csv: no row for 1.2.826.7_C5"):
    evaluation.read_labels(tmp_path / "hole.csv")


def test_missing_studies_are_an_error_unless_subset(files):
  paths, labels_frame, wide = files
  with pytest.raises(metrics.PredictionError,
                     match="predictions: 10 labelled studies have no prediction, e.g. 1.2.826.20"):
    evaluation.evaluate(paths["train"], str(paths["partial"]))
  score, blocks = evaluation.evaluate(paths["train"], str(paths["partial"]), subset=True)
  assert "--subset: scoring 20 of 30 labelled studies (10 without predictions left out)" in blocks
  assert score == metrics.competition_loss(labels_frame.iloc[:20], wide.iloc[:20])


def test_bad_inputs(files, tmp_path):
  paths, _, _ = files
  bad = tmp_path / "bad_train.csv"
  bad.write_text("StudyInstanceUID,patient_overall\n1.2,1\n")
  with pytest.raises(evaluation.INPUT_ERRORS, match="bad_train.csv: missing columns"):
    evaluation.evaluate(bad, str(paths["wide"]))
  with pytest.raises(evaluation.INPUT_ERRORS,
                     match="train.csv: needs StudyInstanceUID and fold columns"):
    evaluation.evaluate(paths["train"], str(paths["wide"]), folds=paths["train"])


def test_models_prior_and_plot(files, tmp_path):
  """More named predictions join the results table beside the prior; --plot writes a picture."""
  paths, labels_frame, wide = files
  other = wide[["StudyInstanceUID", *TARGETS]].copy()
  other[list(TARGETS)] = 0.3
  aggregate.to_long(other).to_csv(tmp_path / "cnn.csv", index=False)
  score, blocks = evaluation.evaluate(
      paths["train"], [f"Two-stage={paths['wide']}", f"3D CNN={tmp_path / 'cnn.csv'}"],
      plot=tmp_path / "rel.png")
  assert score == metrics.competition_loss(labels_frame, wide)
  text = "\n".join(blocks)
  # The predictions carry their folds: each study's prior is its training folds' label means.
  folds = dict(zip(wide["StudyInstanceUID"], wide["fold"]))
  prior = metrics.competition_loss(
      labels_frame, tables.prior_predictions(labels_frame, labels_frame["StudyInstanceUID"], folds))
  in_sample = metrics.competition_loss(
      labels_frame, tables.prior_predictions(labels_frame, labels_frame["StudyInstanceUID"]))
  assert prior != in_sample
  assert f"{prior:.4f}" in text and "constant prior (each study's training folds'" in text
  row = next(l for l in text.splitlines() if l.strip().startswith("3D CNN"))
  assert f"{metrics.competition_loss(labels_frame, other):.4f}" in row
  assert "fold 1" in text
  assert blocks[-1].startswith("reliability diagram: ")
  assert (tmp_path / "rel.png").stat().st_size > 1000


def test_prior_without_folds_says_it_is_in_sample_and_takes_train_labels(files, tmp_path):
  paths, labels_frame, wide = files
  _, blocks = evaluation.evaluate(paths["train"], [str(paths["long"])])  # no fold column
  assert "the evaluated labels' own means: in sample" in "\n".join(blocks)
  other = labels_frame.copy()
  other[list(TARGETS)] = 1 - other[list(TARGETS)]
  other.to_csv(tmp_path / "other_train.csv", index=False)
  _, blocks = evaluation.evaluate(paths["train"], [str(paths["long"])],
                                  train_labels=tmp_path / "other_train.csv")
  prior = metrics.competition_loss(
      labels_frame, tables.prior_predictions(other, labels_frame["StudyInstanceUID"]))
  assert f"{prior:.4f}" in "\n".join(blocks)


def test_cli_prints_reports_then_the_score_line(files, tmp_path):
  paths, labels_frame, wide = files
  answers = tmp_path / "solution.csv"  # --labels in Kaggle's long answer format
  aggregate.to_long(labels_frame).to_csv(answers, index=False)
  rc, lines, err = _cli("--labels", answers, "--predictions", paths["long"])
  assert rc == 0, err
  assert lines[-1].startswith("competition_score: ")
  assert float(lines[-1].split()[-1]) == pytest.approx(
      metrics.competition_loss(labels_frame, wide), abs=1e-6)
  assert lines[0].startswith("studies: 30  ")  # reports first
  # --predictions repeats; --subset and --plot pass through; the score line stays last.
  rc, lines, err = _cli("--labels", paths["train"], "--predictions", paths["partial"],
                        "--predictions", f"3D CNN={paths['wide']}", "--subset",
                        "--plot", tmp_path / "rel.png")
  assert rc == 0, err
  expected = metrics.competition_loss(labels_frame.iloc[:20], wide.iloc[:20])
  assert lines[-1] == f"competition_score: {expected:.6f}"
  assert "--subset: scoring 20 of 30 labelled studies (10 without predictions left out)" in lines
  assert any(l.strip().startswith("3D CNN") for l in lines)
  assert (tmp_path / "rel.png").exists()


def test_cli_errors(files, tmp_path):
  paths, _, _ = files
  rc, lines, err = _cli("--labels", paths["train"], "--predictions", paths["partial"])
  assert rc == 2 and not lines
  assert "error: predictions: 10 labelled studies have no prediction, e.g. 1.2.826.20" in err
  bad = tmp_path / "bad_train.csv"
  bad.write_text("StudyInstanceUID,patient_overall\n1.2,1\n")
  rc, lines, err = _cli("--labels", bad, "--predictions", paths["wide"])
  assert rc == 2 and not lines and "bad_train.csv: missing columns" in err
  rc, lines, err = _cli("--labels", paths["train"])  # --predictions is required
  assert rc != 0 and not lines and "--predictions" in err
