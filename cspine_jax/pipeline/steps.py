"""Named steps run in order, each skipped on a rerun when it finished with the same settings.

A :class:`Step` says what it reads and writes and what it was asked to do (``identity``: the part
of the config it depends on). :func:`run` prints the step list with each step's state, runs the
steps that are not done, and after every step rewrites WORKDIR/pipeline.json (atomically): per
step its state, seconds, inputs, outputs, identity fingerprint and JSON result. A step counts as
done when pipeline.json says it finished with the same fingerprint and its outputs exist; then
its recorded result stands in. A step killed midway is run again and continues from what its own
machinery kept (record shards, checkpoints, per-study outputs). With several JAX processes every
process runs the steps (a step that only process 0 should do says so itself) and JAX process 0
alone writes pipeline.json.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Any
from typing import Callable
from typing import Iterable
from typing import Sequence

import jax

from cspine_jax.io import files

STATE_FILE = "pipeline.json"


@dataclasses.dataclass
class Step:
  """One unit of the pipeline.

  ``run`` returns a JSON-able result (or None); ``identity`` is what must be the same for an
  earlier finished run of the step to count (its config, its inputs' names); ``always`` steps
  (cheap summaries) run every time.
  """
  name: str
  title: str
  run: Callable[[], Any]
  inputs: tuple[str, ...] = ()
  outputs: tuple[str, ...] = ()
  identity: Any = None
  always: bool = False

  @property
  def fingerprint(self) -> str:
    text = json.dumps(self.identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StepError(RuntimeError):
  """A step that failed; the message names it (the cause is chained)."""


def read_state(workdir: pathlib.Path) -> dict[str, Any]:
  """pipeline.json's steps by name ({} when there is none yet, or it is unreadable)."""
  try:
    data = json.loads((workdir / STATE_FILE).read_text())
    return {s["name"]: s for s in data.get("steps", [])}
  except (OSError, ValueError, KeyError, TypeError):
    return {}


def is_done(step: Step, recorded: dict[str, Any] | None) -> bool:
  return (not step.always and recorded is not None and recorded.get("state") == "done" and
          recorded.get("fingerprint") == step.fingerprint and
          all(pathlib.Path(p).exists() for p in step.outputs))


@dataclasses.dataclass
class Outcome:
  """Each step's result by name, and each step's seconds by title (recorded ones for skipped
  steps; none for steps that never ran)."""
  results: dict[str, Any]
  seconds: dict[str, float]


def run(steps: Sequence[Step], workdir: str | os.PathLike, *, log: Callable[[str], None] = print,
        only: Iterable[str] | None = None, prefix: str = "pipeline") -> Outcome:
  """Runs the steps that are not done (those in ``only``, when given, whatever their state)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  names = [s.name for s in steps]
  if len(set(names)) != len(names):
    raise ValueError(f"step names repeat: {names}")
  only = None if only is None else list(only)
  unknown = sorted(set(only or ()) - set(names))
  if unknown:
    raise ValueError(f"unknown steps {unknown}; this pipeline has {names}")
  old = read_state(workdir)
  rows = {
      s.name: {
          "name": s.name, "title": s.title, "inputs": list(s.inputs), "outputs": list(s.outputs),
          "fingerprint": s.fingerprint, "state": "todo", "seconds": None, "result": None
      } for s in steps
  }
  for s in steps:
    if is_done(s, old.get(s.name)):
      rows[s.name].update(state="done", seconds=old[s.name].get("seconds"),
                          result=old[s.name].get("result"))
  todo = [
      s for s in steps if (s.name in only if only is not None else rows[s.name]["state"] != "done")
  ]

  def save():
    if jax.process_index() != 0:  # one writer; the others' view of the steps is the same
      return
    files.write_json(workdir / STATE_FILE, {"workdir": str(workdir), "steps": list(rows.values())},
                     default=str)

  log(f"[{prefix}] {len(steps)} steps in {workdir} ({len(todo)} to run); state in "
      f"{workdir / STATE_FILE}")
  for s in steps:
    mark = "run" if s in todo else ("done" if rows[s.name]["state"] == "done" else "skip")
    arrow = f"{', '.join(_short(p, workdir) for p in s.inputs) or '-'} -> " \
            f"{', '.join(_short(p, workdir) for p in s.outputs) or '-'}"
    log(f"  {mark:4s} {s.name:18s} {arrow}")
  done = [s.name for s in steps if s not in todo and rows[s.name]["state"] == "done"]
  if done:
    log(f"  ({', '.join(done)}: finished earlier with the same settings; not run again, their "
        "recorded results stand)")
  if not todo:
    log(f"[{prefix}] nothing to run: every step finished earlier with these settings "
        f"({workdir / STATE_FILE})")
  save()
  start = time.perf_counter()
  for s in todo:
    t0 = time.perf_counter()
    log(f"[{prefix} {t0 - start:6.1f}s] {s.title} ...")
    rows[s.name]["state"] = "running"
    save()
    try:
      result = s.run()
    except BaseException:
      rows[s.name]["state"] = "failed"
      save()
      raise
    seconds = time.perf_counter() - t0
    rows[s.name].update(state="done", seconds=seconds, result=result)
    save()
    log(f"[{prefix} {time.perf_counter() - start:6.1f}s] {s.title} done in {seconds:.1f}s")
  return Outcome({name: row["result"] for name, row in rows.items()}, {
      row["title"]: row["seconds"] for row in rows.values() if row["seconds"] is not None
  })


def _short(path: str, workdir: pathlib.Path) -> str:
  try:
    return str(pathlib.Path(path).relative_to(workdir))
  except ValueError:
    return str(path)
