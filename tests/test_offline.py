"""Kaggle-style offline use: the project installed from a wheel folder with no index to reach, and
a submission predicted from a copied run folder alone (what a scoring notebook has)."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pydicom
import pytest

from cspine_jax import labels

REPO = pathlib.Path(__file__).resolve().parents[1]
# A run folder's files that inference reads (the checkpoints carry their records' options).
STAGES = ("stage1", "stage2", "box_refine")
RUN_FILES = ("inference.json", "prior.json")


def _run(argv, **kwargs):
  proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False,
                        timeout=600, **kwargs)
  assert proc.returncode == 0, f"{argv}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
  return proc


def _env_without_repo() -> dict[str, str]:
  """The environment with nothing pointing at the checkout (the package must come from the
  wheel)."""
  return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_offline_install_from_a_wheel_folder(tmp_path):
  """`pip wheel . --no-deps` builds the project's wheel; `pip install --no-index --find-links
  wheels -r requirements.txt cspine-jax` installs it with no index (the dependencies: this
  environment's, seen through --system-site-packages, as they would come from the wheel folder);
  the installed `cspine_jax.predict` runs from outside the checkout."""
  src = tmp_path / "src"  # a clean copy: the build leaves build/ and *.egg-info beside its source
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, src / name)
  shutil.copytree(REPO / "cspine_jax", src / "cspine_jax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
  wheels = tmp_path / "wheels"
  _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation",
        "--no-index", "-w", wheels], cwd=tmp_path)
  assert [w.name for w in wheels.iterdir()] == ["cspine_jax-0.1.0-py3-none-any.whl"]
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])
  python = venv / "bin" / "python"
  _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index",
        "--find-links", wheels, "-r", REPO / "requirements.txt", "cspine-jax"], cwd=tmp_path)
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  env = _env_without_repo()
  where = _run([python, "-c", "import cspine_jax; print(cspine_jax.__file__)"], cwd=outside,
               env=env).stdout.strip()
  package = pathlib.Path(where).parent
  assert package.is_relative_to(venv), where
  # The native depthwise kernels are compiled from their source at run time: it is in the wheel.
  assert (package / "models" / "cpu" / "depthwise_cpu.cc").is_file()
  # absl's --help prints the flags and exits 1.
  proc = subprocess.run([python, "-m", "cspine_jax.predict", "--help"], cwd=outside, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert "--studies" in proc.stdout and "--prior" in proc.stdout, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr


def _copy_run_folder(run: pathlib.Path, dest: pathlib.Path) -> None:
  """The files of a run folder that prediction reads, and nothing else: each stage's
  checkpoints/ (per fold), inference.json and prior.json."""
  for stage in STAGES:
    for ckpt in (run / stage).rglob("checkpoints"):
      if ckpt.is_dir():
        shutil.copytree(ckpt, dest / ckpt.relative_to(run))
  for name in RUN_FILES:
    shutil.copy(run / name, dest / name)


def _unreadable_study(source: pathlib.Path, dest: pathlib.Path, uid: str) -> None:
  """A study folder of another StudyInstanceUID with one slice (too few to read): it falls back."""
  dest.mkdir(parents=True)
  for path in sorted(source.glob("*.dcm"))[:1]:
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = uid
    ds.save_as(dest / path.name)


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_run")  # shares test_demo's tiny run (conftest)
def test_predict_from_a_copied_run_folder_alone(tiny_run, tmp_path):
  """The tiny pipeline's run folder, cut down to the checkpoints, inference.json and prior.json
  and copied elsewhere, predicts the test studies (copied elsewhere too) with the original run
  and data out of reach: the pipeline's submission; a study that falls back gets prior.json, or
  the label means of ``--prior train.csv``."""
  work = tiny_run.workdir
  expected = pd.read_csv(work / "test" / "submission.csv", dtype={"row_id": str})
  run = tmp_path / "run"
  _copy_run_folder(work / "run", run)
  studies = tmp_path / "test_images"
  shutil.copytree(work / "data" / "test_images", studies)
  broken_uid = "1.2.826.0.1.99"
  _unreadable_study(next(p for p in sorted(studies.iterdir()) if p.is_dir()),
                    studies / broken_uid, broken_uid)
  train = tmp_path / "train.csv"  # label means 0.5 for every target: unlike prior.json's
  pd.DataFrame([["1.2.3", *[1] * 8], ["1.2.4", *[0] * 8]],
               columns=["StudyInstanceUID", *labels.TARGETS]).to_csv(train, index=False)
  prior_json = json.loads((run / "prior.json").read_text())
  hidden = work.with_name(work.name + "_hidden")  # nothing of the original run can be read
  work.rename(hidden)
  try:
    _run([sys.executable, "-m", "cspine_jax.predict", "--studies", studies, "--workdir", run,
          "--out", tmp_path / "sub.csv", "--noprogress"], cwd=REPO)
    (run / "prior.json").unlink()
    _run([sys.executable, "-m", "cspine_jax.predict", "--studies", studies, "--workdir", run,
          "--out", tmp_path / "sub_train_prior.csv", "--prior", train, "--noprogress"], cwd=REPO)
  finally:
    hidden.rename(work)
  for name, fallback in (("sub.csv", [prior_json[t] for t in labels.TARGETS]),
                         ("sub_train_prior.csv", [0.5] * 8)):
    got = pd.read_csv(tmp_path / name, dtype={"row_id": str})
    broken = got["row_id"].str.startswith(broken_uid + "_")
    assert broken.sum() == 8
    np.testing.assert_allclose(got.loc[broken, "fractured"], fallback, atol=1e-6)
    got = got[~broken].reset_index(drop=True)
    assert got["row_id"].tolist() == expected["row_id"].tolist(), name
    np.testing.assert_allclose(got["fractured"], expected["fractured"], rtol=0, atol=1e-6)
  errors = json.loads((tmp_path / "sub.csv.errors.json").read_text())
  assert broken_uid in json.dumps(errors)
