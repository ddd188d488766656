"""launch.py and the configs: variants, command-line overrides, the paper defaults."""
import json
import pathlib
import subprocess
import sys

import pandas as pd
import pytest
from absl import flags
from ml_collections import config_flags

from flax import nnx

from configs import cnn3d, multi_head, single_head, stage1, stage2
from cspine_jax import metrics
from cspine_jax.pipeline import runner
from cspine_jax.train import loop
import launch
from test_train import TinySeq

REPO = pathlib.Path(__file__).resolve().parents[1]


def _parse(*args):
  argv = ["launch.py", *args]
  fv = flags.FlagValues()
  # config_flags reads the overrides from sys.argv (as in a real launch).
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_overrides_reach_every_field():
  c = _parse(f"--config={REPO}/configs/stage2.py:cpu", "--config.optimizer.lr=3e-4",
             "--config.data_dir=/data/rsna", "--config.fold=-1", "--config.train.epochs=3",
             "--config.model.dtype=bfloat16", "--config.input.augment.enabled=False",
             "--config.prepare.image_size=(96, 96)")
  assert c.optimizer.lr == 3e-4 and c.data_dir == "/data/rsna" and c.fold == -1
  assert c.train.epochs == 3 and c.model.dtype == "bfloat16" and not c.input.augment.enabled
  assert tuple(c.prepare.image_size) == (96, 96)
  assert c.model.encoder == "convnext_test"  # the :cpu variant was applied


def test_unknown_field_is_rejected():
  with pytest.raises((flags.Error, AttributeError, KeyError), match="learning_rate"):
    _parse(f"--config={REPO}/configs/stage2.py", "--config.optimizer.learning_rate=1")


def test_paper_defaults_and_cpu_variants():
  c = stage2.get_config()
  assert (c.model.encoder, tuple(c.prepare.image_size), c.optimizer.lr, c.optimizer.weight_decay,
          c.input.batch_size, c.train.epochs) == ("convnext_tiny", (224, 224), 1e-4, 1e-5, 8, 20)
  for module in (stage1, stage2, cnn3d, single_head, multi_head):
    cpu = module.get_config("cpu")
    assert max(cpu.prepare.image_size) <= 64 and cpu.train.epochs <= 2
    assert cpu.num_folds == cpu.prepare.num_folds
    with pytest.raises(ValueError, match="unknown variant"):
      module.get_config("huge")
  assert multi_head.get_config().model.encoder == "efficientnet_v2_s"
  assert single_head.get_config().eval.overall == "max"


def test_default_workdir():
  assert launch.default_workdir("configs/stage2.py:cpu") == "runs/stage2_cpu"
  assert launch.default_workdir("configs/stage1.py") == "runs/stage1"


def test_launch_without_config_explains_itself():
  out = subprocess.run([sys.executable, "launch.py"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode != 0 and "--config is required" in out.stderr


def _tiny_synthetic_config(tmp_path):
  c = stage2.get_config("cpu")
  c.synthetic.num_studies = 6
  c.prepare.image_size = (32, 32)
  c.num_folds = 2
  c.train.max_steps = 2
  c.train.progress = False
  c.input.workers = 0
  return c


def test_all_folds_on_a_generated_set(tmp_path, monkeypatch):
  """fold=-1 on a synthetic set generated + prepared by the pipeline (tiny local model)."""
  monkeypatch.setattr(loop, "build_model",
                      lambda config, seed, fold=None, devices=None: TinySeq(rngs=nnx.Rngs(seed, dropout=seed + 1)))
  c = _tiny_synthetic_config(tmp_path)
  c.fold = -1
  out = runner.run(c, tmp_path / "run")
  assert [r["fold"] for r in out["folds"]] == [0, 1] and all(r["finished"] for r in out["folds"])
  cache = tmp_path / "synthetic_6_0_small_1"
  assert (cache / "records" / "stage2" / "manifest.json").exists()
  oof = pd.read_csv(tmp_path / "run" / "oof_predictions.csv", dtype={"StudyInstanceUID": str})
  assert len(oof) == 6 and sorted(set(oof["fold"])) == [0, 1]
  labels = pd.read_csv(cache / "rsna" / "train.csv", dtype={"StudyInstanceUID": str})
  assert 0 < metrics.competition_loss(labels, oof) < 5
  assert (tmp_path / "run" / "learning_curves.png").stat().st_size > 1000
  # A second run reuses the generated set and skips the finished steps; their results stand.
  lines = []
  again = runner.run(c, tmp_path / "run", log=lines.append)
  assert again == json.loads(json.dumps(out))
  assert "(0 to run)" in lines[0]
  steps = json.loads((tmp_path / "run" / "pipeline.json").read_text())["steps"]
  assert [s["state"] for s in steps] == ["done"] * 3


@pytest.mark.slow
def test_launch_end_to_end(tmp_path):
  """python launch.py --config=configs/stage2.py:cpu on a tiny generated set (needs make_model)."""
  from cspine_jax import models
  if not hasattr(models, "make_model"):
    pytest.skip("models.make_model has not landed yet")
  args = [sys.executable, "launch.py", "--config=configs/stage2.py:cpu",
          f"--workdir={tmp_path / 'run'}", "--config.synthetic.num_studies=6",
          "--config.prepare.image_size=(32, 32)", "--config.num_folds=2", "--config.fold=0",
          "--config.train.max_steps=2", "--config.train.progress=False",
          "--config.model.lstm_hidden=8", "--config.input.workers=1"]
  out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  oof = pd.read_csv(tmp_path / "run" / "oof_predictions.csv", dtype={"StudyInstanceUID": str})
  assert len(oof) == 3 and set(oof["fold"]) == {0}  # 6 studies, 2 folds: fold 0 held out
  log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
  assert any("loss" in r and "lr" in r for r in log) and any("val_competition_loss" in r for r in log)
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["finished"] and summary["best_score"] > 0
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
