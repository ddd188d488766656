"""The end-to-end demo at its tiny setting: every output exists and is well formed."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from configs import demo as demo_config
from cspine_jax import labels
from cspine_jax import metrics
from cspine_jax.infer import spec as spec_lib
from cspine_jax.io import vertebrae
from cspine_jax.pipeline import training
from cspine_jax.train import checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_run")  # one tiny run per test process serves every test that reads it
def test_tiny_demo_end_to_end(tiny_run, tmp_path):
  run, lines, figures = tiny_run.workdir, tiny_run.log, tiny_run.figures
  text = "\n".join(lines)
  # Progress was shown step by step; the run ends with the results table and the two metrics.
  assert "train stage 1 (all folds) done" in text and "stage-1 pseudo-labels done" in text
  assert "train the box refiner (all folds) done" in text and "then refined" in text
  assert lines[-3].startswith("Results (out-of-fold") and "Two-stage" in lines[-3]
  assert lines[-2] == ("two-stage competition metric (out-of-fold): "
                       f"{figures['oof']['two_stage']:.4f}")
  assert lines[-1] == f"prior baseline competition metric (out-of-fold): {figures['oof']['prior']:.4f}"
  # Stage 2 started from the box refiner's encoder of its fold (models.stage2.init_from).
  ck = checkpoints.Checkpointer(run / "run" / "stage2" / "checkpoints", async_save=False)
  meta = ck.read_meta(ck.latest_step())
  ck.close()
  assert meta["model"]["pretrained"] == str(run / "run" / "box_refine") and meta["fold"] == 0
  # The pseudo-label figures against the masks are printed.
  assert "vs masks (out_of_fold" in text and "box IoU" in text
  # Results table: the four models and the prior, finite scores.
  results = pd.read_csv(run / "eval" / "results.csv")
  assert results["model"].tolist() == ["3D CNN", "Two-stage", "Shortcut probe (crop statistics)",
                                       "Prior (training folds' means)"]
  assert np.isfinite(results["score"]).all() and (results["score"] > 0).all()
  top_n = pd.read_csv(run / "eval" / "top_n.csv")
  assert top_n["N"].tolist() == list(range(1, 8))
  # Pseudo-labels: a readable --vertebrae file covering every train study, IoUs against masks.
  located = vertebrae.read_vertebrae(run / "run" / "vertebrae.csv")
  train = labels.read_train_csv(run / "data" / "train.csv")
  assert set(located) == set(train["StudyInstanceUID"])
  for name in ("in_sample", "out_of_fold"):
    s = figures["pseudo_labels"][name]
    assert s["pairs"] > 0 and 0 <= s["range_iou"] <= 1 and 0 <= s["box_iou"] <= 1
  # The command line makes the same file (and inference spec) from the trained stage-1 run.
  rules = demo_config.get_config("tiny").pseudo_labels
  cli = tmp_path / "cli"
  done = subprocess.run([
      sys.executable, "-m", "cspine_jax.pseudo_labels", f"--data_dir={run / 'data'}",
      f"--records={run / 'records'}", f"--stage1={run / 'run' / 'stage1'}",
      f"--out={cli / 'vertebrae.csv'}", f"--decode={rules.decode}", "--require_all",
      "--calibrate_boxes", f"--box_smoothing={rules.box_smoothing}",
      f"--refine={run / 'run' / 'box_refine'}",
      f"--refine_passes={demo_config.get_config('tiny').refine_passes}", f"--workdir={cli}",
      "--noprogress"
  ],
                        cwd=REPO,
                        capture_output=True,
                        text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr
  assert (cli / "vertebrae.csv").read_text() == (run / "run" / "vertebrae.csv").read_text()
  spec = json.loads((cli / spec_lib.SPEC).read_text())
  assert spec == json.loads((run / "run" / spec_lib.SPEC).read_text())
  # Test-set submission from DICOM: 8 rows per test study, probabilities, the per-study JSON.
  truth = json.loads((run / "data" / "ground_truth.json").read_text())["studies"]
  test_uids = sorted(u for u, s in truth.items() if s["split"] == "test")
  sub = pd.read_csv(run / "test" / "submission.csv", dtype={"row_id": str})
  assert sub["row_id"].tolist() == [f"{u}_{t}" for u in test_uids for t in labels.TARGETS]
  assert sub["fractured"].between(0, 1).all()
  wide = metrics.read_predictions(run / "test" / "submission.csv")
  assert figures["test"]["studies"] == len(test_uids) == len(wide)
  info = json.loads((run / "test" / "studies" / f"{test_uids[0]}.json").read_text())
  assert info["status"] == "ok" and set(info["vertebrae"]) == set(labels.VERTEBRAE)
  assert np.isfinite(figures["test"]["score"]) and np.isfinite(figures["test"]["prior"])
  # Pictures and the summary page.
  assert (run / "eval" / "reliability.png").stat().st_size > 1000
  assert len(list((run / "test" / "png").glob("*.png"))) == 1
  html = (run / "summary.html").read_text()
  assert "Results (out-of-fold)" in html and "data:image/png;base64" in html
  assert json.loads((run / "results.json").read_text())["oof"]["prior"] > 0


def test_init_from_points_each_fold_at_the_same_folds_run(tmp_path):
  """init_from.stage2='box_refine': all folds -> RUN/box_refine/fold_{fold} (filled in per fold by
  train.warm_start); one fold with one model -> the run folder itself (where
  loop.train_and_evaluate trains it); refused without a refiner."""
  run = tmp_path / "run"

  def stage2(config, run_dir=run):
    return training.model_config(config, "stage2", run_dir)

  config = demo_config.get_config()
  assert stage2(config).model.pretrained == str(run / "box_refine" / "fold_{fold}")
  config.train_fold = 0
  assert stage2(config).model.pretrained == str(run / "box_refine")
  config.models.box_refine.train.members = 2
  assert stage2(config).model.pretrained == str(run / "box_refine" / "fold_{fold}")
  config.refine_boxes = False
  with pytest.raises(ValueError, match="needs refine_boxes=True"):
    stage2(config)
  assert training.model_config(config, "box_refine", run).model.pretrained is None
