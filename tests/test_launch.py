"""launch.py and the configs: variants, command-line overrides, the paper defaults."""
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from absl import flags
from ml_collections import config_flags

from flax import nnx

from configs import cnn3d, multi_head, single_head, stage1, stage2
from cspine_jax import metrics
from cspine_jax.pipeline import runner
from cspine_jax.pp import options as options_lib
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
             "--config.prepare.image_size=(96, 96)", "--config.prepare.stage2_locate=vertebrae",
             "--config.prepare.crop_margin=0.2", "--config.vertebrae_file=/runs/vertebrae.csv")
  # Every pp.options.Options field is a prepare field (stage2_locate once ended in AttributeError).
  assert (c.prepare.stage2_locate, c.prepare.crop_margin) == ("vertebrae", 0.2)
  assert c.vertebrae_file == "/runs/vertebrae.csv"
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
  fields = {f.name for f in dataclasses.fields(options_lib.Options)} - {"by_task"}  # method configs
  for module in (stage1, stage2, cnn3d, single_head, multi_head):
    missing = fields - set(module.get_config().prepare)
    assert not missing, f"{module.__name__}: no --config.prepare.{sorted(missing)}"
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
  assert any("nothing to run: every step finished earlier with these settings" in l for l in lines)
  assert any("data, records_stage2, train: finished earlier" in l for l in lines)
  steps = json.loads((tmp_path / "run" / "pipeline.json").read_text())["steps"]
  assert [s["state"] for s in steps] == ["done"] * 3
  # Without pipeline.json the training step runs, finds every fold's last checkpoint and says so.
  (tmp_path / "run" / "pipeline.json").unlink()
  lines = []
  runner.run(c, tmp_path / "run", log=lines.append)
  for fold in (0, 1):
    assert any(l.startswith(f"fold {fold} (") and "restored step 2 of 2 from its checkpoint; "
               "training had finished, nothing left to train" in l for l in lines), lines


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


# ---- launch_local: several JAX processes on this machine --------------------------------------
_CHILD = """
import os, signal, sys, time
i = int(os.environ["JAX_PROCESS_ID"])
print("process", i, "of", os.environ["JAX_NUM_PROCESSES"], os.environ["XLA_FLAGS"],
      os.environ["JAX_COORDINATOR_ADDRESS"], flush=True)
signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(7)))
sys.stdout.write("\\rbar 1\\rbar 2\\rbar 3\\n")
sys.stdout.flush()
if i == int(os.environ.get("FAIL", "-1")):
  sys.exit(3)
if os.environ.get("READY"):
  open(os.environ["READY"] + str(i), "w").close()
time.sleep(float(os.environ.get("SLEEP", "0")))
"""


def _child(tmp_path):
  path = tmp_path / "child.py"
  path.write_text(_CHILD)
  return [sys.executable, str(path)]


def test_processes_get_the_jax_environment_and_prefixed_output(tmp_path):
  import io
  from cspine_jax.train import processes
  out = io.StringIO()
  env = dict(os.environ, XLA_FLAGS="--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
  outcome = processes.run(_child(tmp_path), 3, devices=2, out=out, base_env=env)
  assert outcome.codes == [0, 0, 0] and outcome.status == 0 and outcome.first_failure is None
  text = out.getvalue()
  for i in range(3):
    line = next(l for l in text.splitlines() if l.startswith(f"[p{i}] process {i} of 3 "))
    assert "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2 127.0.0.1:" in line
  # A bar's redraws: the first, then one per PROGRESS_EVERY_S; its last line in full.
  assert "[p0] bar 1" in text and "[p0] bar 2" not in text and "[p0] bar 3" in text
  assert processes.command_of(["launch.py", "--x"]) == [sys.executable, "launch.py", "--x"]
  assert processes.command_of(["--config=c.py"]) == [sys.executable, "launch.py", "--config=c.py"]
  assert processes.command_of(["-m", "m"]) == [sys.executable, "-m", "m"]
  assert processes.command_of(["echo", "x"]) == ["echo", "x"]
  with pytest.raises(ValueError, match="after --"):
    processes.command_of([])


def test_one_failed_process_stops_the_others_after_the_grace_period(tmp_path):
  import io
  from cspine_jax.train import processes
  out = io.StringIO()
  env = dict(os.environ, FAIL="1", SLEEP="60")
  outcome = processes.run(_child(tmp_path), 3, out=out, base_env=env, grace_s=1)
  assert outcome.first_failure == 1 and outcome.codes == [7, 3, 7]
  assert outcome.status == 7
  text = out.getvalue()
  assert "process 1 exited 3; the others get 1 s to stop" in text
  assert "terminating them" in text and "[p0] got SIGTERM" in text


def test_launch_local_passes_sigterm_on_and_exits_with_the_worst_status(tmp_path):
  ready = tmp_path / "ready"
  env = dict(os.environ, SLEEP="60", READY=str(ready))
  proc = subprocess.Popen([sys.executable, "-m", "cspine_jax.launch_local", "--processes=2", "--",
                           str(_child(tmp_path)[1])], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 120
  while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
    assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  text, _ = proc.communicate(timeout=60)
  assert proc.returncode == 7, text
  assert "SIGTERM: passing SIGTERM on to every process" in text
  assert "[p0] got SIGTERM" in text and "[p1] got SIGTERM" in text
