"""Two JAX processes on this machine (``train.processes``, gloo collectives, one workdir): the
losses of one process, a process killed mid-run, the others stopped naming it, the run resumed; the
two-process checkpoint read back by one process; what process 0 makes, the others wait for; a
killed launcher takes its processes with it."""
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from flax import nnx

from cspine_jax.train import loop, processes
from test_train import TinySeq, _read_log, _records, _train_losses, tiny_config
import procs

REPO = pathlib.Path(__file__).resolve().parents[1]
HEARTBEAT_S = 10

# One process of the run: the tiny stage-2 model of test_train; with KILL_AT=k, process 1 kills
# itself (SIGKILL) once its checkpoint of step k is written.
_DRIVER = """
import json, os, pathlib, signal, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from absl import flags
flags.FLAGS.mark_as_parsed()
from cspine_jax.train import runtime
runtime.start()
import jax
from flax import nnx
from cspine_jax.train import checkpoints, loop
import test_train

loop.build_model = lambda config, seed, fold=None, devices=None: test_train.TinySeq(
    rngs=nnx.Rngs(seed, dropout=seed + 1))
kill_at = int(os.environ.get("KILL_AT", "0"))
if kill_at and jax.process_index() == 1:
  save = checkpoints.Checkpointer.save
  def save_then_die(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == kill_at:
      self.wait()
      os.kill(os.getpid(), signal.SIGKILL)
  checkpoints.Checkpointer.save = save_then_die
config = test_train.tiny_config(max_steps=6, checkpoint_every=1, checkpoint_keep=10)
summary = loop.train_fold(config, pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), 0,
                          log=lambda line: print("NOTE", line))
print("SUMMARY", json.dumps(summary))
"""


def _launch(tmp_path, workdir, records, count=2, **env):
  driver = tmp_path / "driver.py"
  driver.write_text(_DRIVER.format(repo=str(REPO), tests=str(REPO / "tests")))
  out = io.StringIO()
  outcome = processes.run([sys.executable, str(driver), str(workdir), str(records)], count,
                          grace_s=60, heartbeat_s=HEARTBEAT_S, out=out, cwd=REPO,
                          base_env=dict(os.environ, **env))
  return outcome, out.getvalue()


def test_two_processes_train_like_one_and_resume_after_a_kill(tmp_path, monkeypatch):
  monkeypatch.setattr(loop, "build_model", lambda config, seed, fold=None, devices=None: TinySeq(
      rngs=nnx.Rngs(seed, dropout=seed + 1)))
  records = _records(tmp_path)
  ref = loop.train_fold(tiny_config(max_steps=6, checkpoint_every=1, checkpoint_keep=10),
                        tmp_path / "ref", records, 0)
  assert ref["finished"]

  # Process 1 dies after its checkpoint of step 3: process 0 stops by itself, naming the cause.
  run = tmp_path / "run"
  killed, text = _launch(tmp_path, run, records, KILL_AT="3")
  assert killed.codes[1] == -9 and killed.codes[0] != 0 and killed.first_failure == 1, text
  assert "process 1 killed by SIGKILL" in text
  # Named within the heartbeat timeout: the one that did not come to the survivors' barrier.
  assert ("[p0] cspine_jax.train.loop.ProcessLostError: JAX process 0 of 2" in text and
          "JAX process 1 did not come to a barrier of the others within 5 s" in text and
          "The last checkpoint is step 3" in text), text
  assert 3 in {r["step"] for r in _read_log(run)}
  broken = tmp_path / "broken"
  shutil.copytree(run, broken)

  # The same command again resumes from step 3 and ends with the unbroken run's losses.
  resumed, text = _launch(tmp_path, run, records)
  assert resumed.status == 0, text
  assert "NOTE fold 0" in text and "resumed from the checkpoint of step 3 of 6" in text
  summary = json.loads(text.split("[p0] SUMMARY ", 1)[1].splitlines()[0])
  assert summary["finished"] and summary["resumed_from"] == 3
  a, b = _train_losses(tmp_path / "ref"), _train_losses(run)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]  # process 0 alone logs: each step once
  for s in a:
    assert b[s] == pytest.approx(a[s], rel=1e-5), s
  # Validation gathers both processes' predictions: every held-out study once.
  want = pd.read_csv(tmp_path / "ref" / loop.OOF, dtype={"StudyInstanceUID": str})
  got = pd.read_csv(run / loop.OOF, dtype={"StudyInstanceUID": str})
  assert sorted(got["StudyInstanceUID"]) == sorted(want["StudyInstanceUID"]) and len(got) == 2
  cols = ["patient_overall"] + [f"C{i}" for i in range(1, 8)]
  np.testing.assert_allclose(got.sort_values("StudyInstanceUID")[cols].to_numpy(),
                             want.sort_values("StudyInstanceUID")[cols].to_numpy(), rtol=1e-4)
  assert len(list((run / "tensorboard").iterdir())) == 2  # one per run, process 0's

  # The two-process checkpoint of step 3 resumes in one process (8 devices) as well.
  one = loop.train_fold(tiny_config(max_steps=6), broken, records, 0)
  assert one["finished"] and one["resumed_from"] == 3
  c = _train_losses(broken)
  for s in a:
    assert c[s] == pytest.approx(a[s], rel=1e-5), s


_SLEEPER = """
import os, pathlib, sys, time
sys.path[:0] = [{repo!r}]
from cspine_jax.train import runtime
runtime.end_with_launcher()  # the first thing runtime.start() does
pathlib.Path(sys.argv[1], os.environ["JAX_PROCESS_ID"]).write_text(str(os.getpid()))
time.sleep(120)
"""


def test_a_killed_launcher_takes_its_processes_with_it(tmp_path):
  # Left running, they would race the processes of the same command started again.
  sleeper = tmp_path / "sleeper.py"
  sleeper.write_text(_SLEEPER.format(repo=str(REPO)))
  pids = tmp_path / "pids"
  pids.mkdir()
  launcher = subprocess.Popen([sys.executable, "-m", "cspine_jax.launch_local", "--processes=2",
                               "--", str(sleeper), str(pids)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 60
  while len(list(pids.iterdir())) < 2:
    assert launcher.poll() is None and time.monotonic() < deadline
    time.sleep(0.1)
  children = [int(p.read_text()) for p in pids.iterdir()]
  assert all(map(procs.alive, children))
  launcher.send_signal(signal.SIGKILL)
  launcher.wait()
  assert not procs.still_alive(children)


# Process 0 makes a file slowly, then fails to make another: process 1 must find the first made
# when on_first_process returns, and stop with process 0's error on the second.
_MAKER = """
import pathlib, sys, time
sys.path[:0] = [{repo!r}]
from cspine_jax.train import runtime
runtime.maybe_initialize_distributed()
from cspine_jax.pipeline import data
out = pathlib.Path(sys.argv[1])

def make():
  time.sleep(3)
  out.write_text("made")
  return "result"

def fail():
  raise OSError("disk full")

got = data.on_first_process(make, "the test file")
print("GOT", got, "FOUND", out.exists() and out.read_text())
try:
  data.on_first_process(fail, "the other file")
except Exception as e:
  print("ERROR", type(e).__name__, e)
  raise SystemExit(2)
"""


def test_the_others_wait_for_what_process_0_makes(tmp_path):
  maker = tmp_path / "maker.py"
  maker.write_text(_MAKER.format(repo=str(REPO)))
  out = io.StringIO()
  outcome = processes.run([sys.executable, str(maker), str(tmp_path / "made")], 2, out=out,
                          grace_s=30, heartbeat_s=HEARTBEAT_S)
  text = out.getvalue()
  assert "[p0] GOT result FOUND made" in text and "[p1] GOT None FOUND made" in text, text
  assert outcome.codes == [2, 2], text
  assert "[p0] ERROR OSError disk full" in text, text
  assert ("[p1] ERROR RuntimeError JAX process 0 could not make the other file (failed: OSError: "
          "disk full); process 1 stops too") in text, text
