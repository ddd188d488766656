"""The pipeline's data steps: the RSNA-format folder (generated when none is given) and record sets."""
from __future__ import annotations

import collections
import pathlib
from typing import Any
from typing import Callable

import jax
import ml_collections

from cspine_jax import synthetic
from cspine_jax.pp import options as options_lib
from cspine_jax.records import pipeline as records_pipeline
from cspine_jax.records import shards
from cspine_jax.train import runtime

# How long the other processes wait for process 0 to make something (record sets of the real data
# take hours); a dead process 0 ends them sooner, after the heartbeat timeout.
FIRST_PROCESS_WAIT_S = 7 * 24 * 3600
_uses: collections.Counter = collections.Counter()  # calls so far per name, in this process


def options_of(prepare: ml_collections.ConfigDict) -> options_lib.Options:
  """The config's ``prepare`` fields as the records' preprocessing options."""
  return options_lib.Options.from_json(prepare.to_dict())


def generate(syn: ml_collections.ConfigDict, data_dir: pathlib.Path, workers: int = 1) -> dict:
  """Writes the synthetic RSNA-format set ``syn`` describes into ``data_dir`` (once)."""
  if not (data_dir / "train.csv").exists():
    synthetic.generate(data_dir, syn.num_studies, syn.seed, size=syn.size,
                       segmented_fraction=syn.get("segmented_fraction", 0.5), workers=workers,
                       difficulty=syn.get("difficulty", "easy"))
  return {"data_dir": str(data_dir)}


def check_data_dir(data_dir: pathlib.Path) -> dict:
  """The RSNA layout's essentials, or a clear error naming what is missing."""
  if not (data_dir / "train.csv").is_file():
    raise FileNotFoundError(f"{data_dir}: no train.csv; --config.data_dir must be the RSNA 2022 "
                            "folder (train.csv, train_images/, segmentations/)")
  if not (data_dir / "train_images").is_dir():
    raise FileNotFoundError(f"{data_dir}: no train_images/ folder")
  return {"data_dir": str(data_dir)}


def prepare(data_dir: pathlib.Path, records_dir: pathlib.Path, task: str,
            options: options_lib.Options, *, vertebrae_file: pathlib.Path | None = None,
            workers: int = 1, progress: bool = False,
            log: Callable[[str], None] = print) -> dict[str, Any]:
  """Builds (or finishes) one record set; returns its counts."""
  m = records_pipeline.prepare(data_dir, records_dir, task, options, vertebrae_file=vertebrae_file,
                               workers=workers, progress=progress)
  log(f"  {task}: {m['num_records']} records from {m['num_studies']} studies, "
      f"{len(m['bad_studies'])} bad, {len(m.get('skipped_studies', []))} skipped")
  return {
      "num_records": m["num_records"], "num_studies": m["num_studies"],
      "bad_studies": len(m["bad_studies"]), "skipped_studies": len(m.get("skipped_studies", []))
  }


def has_records(records_dir: pathlib.Path, task: str) -> bool:
  return (records_dir / task / shards.MANIFEST).exists()


def on_first_process(fn: Callable[[], Any], name: str) -> Any:
  """``fn()`` on JAX process 0 only; the others wait until it has finished (what it writes, they
  read) and stop with an error naming ``name`` when it failed. Returns ``fn()``'s result on
  process 0, None on the others."""
  if jax.process_count() == 1:
    return fn()
  # Keyed by name: a process that found the step done (it read pipeline.json after process 0
  # finished it) skips it without waiting, and the next name still matches.
  key = f"cspine_jax/first_process/{name}/{_uses[name]}"
  _uses[name] += 1
  if jax.process_index() == 0:
    try:
      out = fn()
    except BaseException as e:
      runtime.share(key, f"failed: {type(e).__name__}: {e}")
      raise
    runtime.share(key, "ok")
    return out
  status = runtime.wait_for_shared(key, FIRST_PROCESS_WAIT_S)
  if status != "ok":
    raise RuntimeError(f"JAX process 0 could not make {name} ({status}); process "
                       f"{jax.process_index()} stops too")
  return None
