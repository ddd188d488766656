"""The pipeline's data steps: the RSNA-format folder (generated when none is given) and record sets."""
from __future__ import annotations

import pathlib
from typing import Any
from typing import Callable

import jax
import ml_collections
from jax.experimental import multihost_utils

from cspine_jax import synthetic
from cspine_jax.pp import options as options_lib
from cspine_jax.records import pipeline as records_pipeline
from cspine_jax.records import shards


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
  """``fn()`` on JAX process 0 only; every process waits for it at a barrier (what it writes,
  the others read)."""
  out = fn() if jax.process_index() == 0 else None
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"cspine_jax {name}")
  return out
