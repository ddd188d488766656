"""Tests for evaluate.py: the score line, the report blocks, input errors, and one real subprocess."""
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import evaluate
from cspine_jax import metrics
from cspine_jax import aggregate
from cspine_jax.labels import TARGETS

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def files(tmp_path):
  rng = np.random.default_rng(0)
  uids = [f"1.2.826.{i}" for i in range(30)]
  y = (rng.uniform(size=(30, 8)) < 0.3).astype(int)
  y[:, 0] = y[:, 1:].max(1)
  labels = pd.DataFrame(y, columns=list(TARGETS))
  labels.insert(0, "StudyInstanceUID", uids)
  p = np.clip(0.5 * y + 0.5 * rng.uniform(size=y.shape), 0, 1)
  wide = pd.DataFrame(p, columns=list(TARGETS))
  wide.insert(0, "StudyInstanceUID", uids)
  wide["fold"] = np.arange(30) % 3
  paths = {name: tmp_path / f"{name}.csv" for name in ("train", "wide", "long", "partial")}
  labels.to_csv(paths["train"], index=False)
  wide.to_csv(paths["wide"], index=False)
  aggregate.to_long(wide[["StudyInstanceUID", *TARGETS]]).to_csv(paths["long"], index=False)
  wide.iloc[:20].to_csv(paths["partial"], index=False)
  return paths, labels, wide


def _run(capsys, *argv):
  rc = evaluate.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out.rstrip("\n").splitlines(), err


def test_score_line_and_reports(files, capsys):
  paths, labels, wide = files
  rc, lines, _ = _run(capsys, "--labels", paths["train"], "--predictions", paths["wide"])
  assert rc == 0
  expected = metrics.competition_loss(labels, wide)
  assert lines[-1] == f"competition_score: {expected:.6f}"
  text = "\n".join(lines)
  assert "studies: 30" in text
  assert "fold 2" in text  # per-fold rows from the predictions' own fold column
  assert "ROC AUC per target" in text and "top-N" in text


def test_long_format_gives_the_same_score(files, capsys):
  paths, _, _ = files
  _, wide_lines, _ = _run(capsys, "--labels", paths["train"], "--predictions", paths["wide"])
  rc, long_lines, _ = _run(capsys, "--labels", paths["train"], "--predictions", paths["long"])
  assert rc == 0 and long_lines[-1] == wide_lines[-1]
  assert not any(line.startswith("fold ") for line in long_lines)  # no fold column there


def test_missing_studies_are_an_error_unless_subset(files, capsys):
  paths, labels, wide = files
  rc, lines, err = _run(capsys, "--labels", paths["train"], "--predictions", paths["partial"])
  assert rc == 2 and not lines
  assert "error: predictions: 10 labelled studies have no prediction, e.g. 1.2.826.20" in err
  rc, lines, _ = _run(capsys, "--labels", paths["train"], "--predictions", paths["partial"],
                      "--subset")
  assert rc == 0
  assert "--subset: scoring 20 of 30 labelled studies (10 without predictions left out)" in lines
  expected = metrics.competition_loss(labels.iloc[:20], wide.iloc[:20])
  assert lines[-1] == f"competition_score: {expected:.6f}"


def test_bad_inputs(files, capsys, tmp_path):
  paths, _, _ = files
  bad = tmp_path / "bad_train.csv"
  bad.write_text("StudyInstanceUID,patient_overall\n1.2,1\n")
  rc, _, err = _run(capsys, "--labels", bad, "--predictions", paths["wide"])
  assert rc == 2 and "bad_train.csv: missing columns" in err
  rc, _, err = _run(capsys, "--labels", paths["train"], "--predictions", paths["wide"],
                    "--folds", paths["train"])
  assert rc == 2 and "train.csv: needs StudyInstanceUID and fold columns" in err
  with pytest.raises(SystemExit):
    evaluate.main(["--labels", str(paths["train"])])  # --predictions is required


def test_subprocess(files):
  paths, labels, wide = files
  proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--labels", str(paths["train"]),
                         "--predictions", str(paths["long"])],
                        capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  last = proc.stdout.strip().splitlines()[-1]
  assert last.startswith("competition_score: ")
  assert float(last.split()[-1]) == pytest.approx(metrics.competition_loss(labels, wide), abs=1e-6)
