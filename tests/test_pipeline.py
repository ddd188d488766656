"""The pipeline as a user runs it: steps listed and skipped on a rerun, one step alone, and a run
killed in the middle of stage 2 that resumes to the unbroken run's outputs."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from cspine_jax.pipeline import runner
from cspine_jax.pipeline import steps as steps_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
# The tiny demo without baselines, stage 2 long enough (60 steps, a checkpoint every 10) to be
# caught in the middle.
ARGS = ["--config=configs/demo.py:tiny", "--config.baselines=()", "--config.pngs=0",
        "--config.models.stage2.train.max_steps=60",
        "--config.models.stage2.train.checkpoint_every=10"]


def _launch(workdir: pathlib.Path, *extra: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "launch.py", *ARGS, f"--workdir={workdir}", *extra],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _state(workdir: pathlib.Path) -> dict[str, str]:
  return {name: row.get("state") for name, row in steps_lib.read_state(workdir).items()}


def _checkpoints(run: pathlib.Path) -> list[int]:
  folder = run / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


@pytest.mark.slow
def test_killed_in_stage_2_resumes_to_the_unbroken_runs_outputs(tmp_path):
  unbroken = _launch(tmp_path / "unbroken")
  out, _ = unbroken.communicate(timeout=900)
  assert unbroken.returncode == 0, out[-3000:]
  # Killed (SIGKILL, nothing flushed) once stage 2 has a checkpoint but has not finished.
  killed = tmp_path / "killed"
  proc = _launch(killed)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    steps = _checkpoints(killed / "run" / "stage2")
    if _state(killed).get("stage2") == "running" and steps and steps[-1] < 60:
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run finished before it could be killed in stage 2"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  at_kill = _checkpoints(killed / "run" / "stage2")
  assert at_kill and at_kill[-1] < 60
  state = _state(killed)
  assert state["stage2"] == "running" and state["stage1"] == "done" and state["predict"] == "todo"
  # The same command again: the finished steps are skipped, stage 2 resumes from its checkpoint.
  again = _launch(killed)
  out, _ = again.communicate(timeout=900)
  assert again.returncode == 0, out[-3000:]
  assert "run  stage2" in out and "done stage1" in out
  for name in ("run/stage2/oof_predictions.csv", "test/submission.csv", "run/vertebrae.csv"):
    assert (killed / name).read_bytes() == (tmp_path / "unbroken" / name).read_bytes(), name
  figures = [json.loads((d / "results.json").read_text()) for d in (killed, tmp_path / "unbroken")]
  for key in ("oof", "results", "top_n", "pseudo_labels"):
    assert figures[0][key] == figures[1][key], key
  assert set(_state(killed).values()) == {"done"}


def test_steps_are_listed_skipped_when_done_and_run_alone(tmp_path):
  calls = []

  def step(name, **kw):
    return steps_lib.Step(name, f"the {name} step", lambda: calls.append(name) or {"n": name},
                          outputs=(str(tmp_path / name),), identity=kw)

  (tmp_path / "a").touch()
  (tmp_path / "b").touch()
  lines = []
  out = steps_lib.run([step("a"), step("b")], tmp_path, log=lines.append)
  assert calls == ["a", "b"] and out.results == {"a": {"n": "a"}, "b": {"n": "b"}}
  assert "(2 to run)" in lines[0] and any("run  a" in l for l in lines)
  saved = json.loads((tmp_path / steps_lib.STATE_FILE).read_text())
  assert [(s["name"], s["state"], s["result"]) for s in saved["steps"]] == [
      ("a", "done", {"n": "a"}), ("b", "done", {"n": "b"})]
  # Done with the same settings: skipped, its recorded result stands in.
  calls.clear()
  out = steps_lib.run([step("a"), step("b")], tmp_path, log=lambda _: None)
  assert calls == [] and out.results["b"] == {"n": "b"}
  # Other settings, or a missing output: run again.
  (tmp_path / "a").unlink()
  steps_lib.run([step("a"), step("b", lr=1)], tmp_path, log=lambda _: None)
  assert calls == ["a", "b"]
  # A step named alone runs whatever its state; an unknown name is refused.
  calls.clear()
  steps_lib.run([step("a"), step("b", lr=1)], tmp_path, only=["b"], log=lambda _: None)
  assert calls == ["b"]
  with pytest.raises(ValueError, match="unknown steps"):
    steps_lib.run([step("a")], tmp_path, only=["c"])


def test_a_failing_step_is_recorded_and_stops_the_run(tmp_path):

  def boom():
    raise RuntimeError("no data")

  with pytest.raises(RuntimeError, match="no data"):
    steps_lib.run([steps_lib.Step("a", "a", boom), steps_lib.Step("b", "b", lambda: 1)], tmp_path,
                  log=lambda _: None)
  assert _state(tmp_path) == {"a": "failed", "b": "todo"}


def test_the_whole_method_refuses_several_processes():
  """Each process would run the data, pseudo-label and evaluation steps over the same workdir."""
  runner.check_one_process(1)
  with pytest.raises(ValueError, match="runs in one JAX process, not 2"):
    runner.check_one_process(2)
