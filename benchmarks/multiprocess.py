"""Training with 1, 2 and 4 JAX processes on this machine: step time, and the losses compared.

    python benchmarks/multiprocess.py [--processes 1,2,4] [--steps 12] [--devices_per_process 1]
        [--config configs/stage2.py:cpu] [--repeats 1] [--out /tmp/cspine_mp] [--keep]

Each run is ``launch.py --config=CONFIG`` started by ``train.processes`` (what ``python -m
cspine_jax.launch_local`` does) with that many processes x ``--devices_per_process`` CPU devices,
the same global batch and seed, ``--steps`` steps of fold 0, one workdir per run beside a shared
generated data set and its records (made by the first run's process 0 while the others wait).
Printed per process count: the median seconds per train step (from log.jsonl's steps_per_s,
log_every=1; the first two steps, which compile, and any step that includes the validation are
left out), its ratio to the first count's run of the same repeat, and the largest absolute and
relative difference of each step's loss from that run's. With ``--repeats`` the counts run in
turn that many times (the machine may be shared: compare within a repeat).

Then the checkpoint moves between process counts: a run of the second count stopped half way
(``train.stop_at_step``) is resumed by the first count and by the last, each from a copy of its
workdir; each must say where it resumed and end with the unbroken run's losses.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from absl import app, flags  # noqa: E402

from cspine_jax.train import processes  # noqa: E402

_PROCESSES = flags.DEFINE_list("processes", ["1", "2", "4"], "process counts, the first the base")
_STEPS = flags.DEFINE_integer("steps", 12, "train steps per run")
_DEVICES = flags.DEFINE_integer("devices_per_process", 1, "CPU devices of each process")
_CONFIG = flags.DEFINE_string("config", "configs/stage2.py:cpu", "launch.py's --config")
_REPEATS = flags.DEFINE_integer("repeats", 1, "times each process count runs, in turn")
_OUT = flags.DEFINE_string("out", "/tmp/cspine_multiprocess", "folder of the runs (emptied first)")
_KEEP = flags.DEFINE_bool("keep", False, "keep --out afterwards")


def _log(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "log.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in _log(workdir) if "loss" in r}


def _seconds_per_step(workdir: pathlib.Path) -> float:
  """Median over the logged steps after the first two (compilation), without the step that
  carried the validation (its row is written after it)."""
  rows = [r for r in _log(workdir) if "loss" in r and "steps_per_s" in r and r["step"] > 2]
  eval_steps = {r["step"] for r in _log(workdir) if "loss" not in r}
  rates = [r["steps_per_s"] for r in rows if r["step"] - 1 not in eval_steps]
  if not rates:
    raise RuntimeError(f"{workdir / 'log.jsonl'}: no timed steps")
  return statistics.median(1.0 / r for r in rates)


def _launch(count: int, workdir: pathlib.Path, out: pathlib.Path, *extra: str) -> str:
  """Runs launch.py on ``count`` processes into ``workdir``; returns process 0's output."""
  logs = out / "logs" / workdir.name
  command = [sys.executable, "launch.py", f"--config={_CONFIG.value}", f"--workdir={workdir}",
             f"--config.train.max_steps={_STEPS.value}", "--config.train.log_every=1",
             "--config.train.progress=False", "--config.train.checkpoint_every=0", *extra]
  t = time.perf_counter()
  outcome = processes.run(command, count, devices=_DEVICES.value, log_dir=logs, cwd=REPO)
  if outcome.status:
    raise RuntimeError(f"{count} processes into {workdir}: exit status {outcome.status}; "
                       f"see {logs}/process_<i>.log")
  print(f"  ran {count} process(es) into {workdir.name} in {time.perf_counter() - t:.0f} s",
        flush=True)
  return (logs / "process_0.log").read_text(errors="replace")


def _compare(base: dict[int, float], other: dict[int, float], what: str) -> tuple[float, float]:
  if sorted(base) != sorted(other):
    raise RuntimeError(f"{what}: logged steps {sorted(other)} differ from {sorted(base)}")
  diffs = [abs(other[s] - base[s]) for s in base]
  rel = [d / max(abs(base[s]), 1e-12) for d, s in zip(diffs, base)]
  return max(diffs), max(rel)


def main(argv) -> None:
  del argv
  counts = [int(c) for c in _PROCESSES.value]
  out = pathlib.Path(_OUT.value)
  if out.exists():
    shutil.rmtree(out)
  out.mkdir(parents=True)
  print(f"config {_CONFIG.value}, {_STEPS.value} steps, {_DEVICES.value} CPU device(s) per "
        f"process, process counts {counts} (base {counts[0]}), runs in {out}", flush=True)
  # The base count first would make the shared data set in one process: start with another, so
  # that the others wait for process 0 to make it.
  order = counts[1:] + counts[:1] if len(counts) > 1 else counts
  table = []
  for r in range(_REPEATS.value):
    runs = {c: out / f"p{c}_r{r}" for c in order}
    for c in order:
      _launch(c, runs[c], out)
    base = _losses(runs[counts[0]])
    base_s = _seconds_per_step(runs[counts[0]])
    for c in counts:
      abs_diff, rel_diff = _compare(base, _losses(runs[c]), f"{c} processes")
      s = _seconds_per_step(runs[c])
      table.append((r, c, s, s / base_s, abs_diff, rel_diff))

  print(f"\n{'repeat':>6} {'processes':>9} {'s/step':>8} {'x base':>7} {'max |dloss|':>12} "
        f"{'max rel':>9}")
  for r, c, s, ratio, d, rel in table:
    print(f"{r:>6} {c:>9} {s:8.3f} {ratio:7.2f} {d:12.2e} {rel:9.2e}")

  if len(counts) > 1:
    base = _losses(out / f"p{counts[0]}_r0")
    writer, half = counts[1], _STEPS.value // 2
    stopped = out / f"p{writer}_stopped"
    _launch(writer, stopped, out, f"--config.train.stop_at_step={half}")
    print(f"\ncheckpoint of step {half} written by {writer} processes, resumed by:")
    for c in dict.fromkeys([counts[0], counts[-1]]):
      run = out / f"p{writer}_to_p{c}"
      shutil.copytree(stopped, run)
      text = _launch(c, run, out)
      said = f"resumed from the checkpoint of step {half} of {_STEPS.value}"
      if said not in text:
        raise RuntimeError(f"{run}: process 0 did not say '{said}'")
      abs_diff, rel_diff = _compare(base, _losses(run), f"{writer} -> {c} processes")
      print(f"  {c} process(es): said '{said}'; losses vs the unbroken {counts[0]}-process run: "
            f"max |d| {abs_diff:.2e}, max rel {rel_diff:.2e}")
  if not _KEEP.value:
    shutil.rmtree(out)


if __name__ == "__main__":
  app.run(main)
