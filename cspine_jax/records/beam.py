"""Apache Beam pieces: the per-study step the TFDS builder maps over studies, and a plain Beam
pipeline that writes exactly the local ``data_prep.prepare`` layout.

Both call the same per-study code as the local command (``pipeline.records_of`` /
``pipeline.run_study``), so the three paths cannot drift apart. Only the Beam and TFDS paths import
this module (nothing else in the package needs Apache Beam).

- :func:`keyed_examples`: one study -> ``(key, record)`` pairs for TFDS (``tfds_builder.py``).
  A study that fails is logged and counted in the Beam counter ``cspine_records/bad_studies``;
  TFDS has no manifest, so use the local command (or :func:`build_records`) when you need the list.
- :func:`build_records`: ``Create(studies) -> Map(run_study) -> manifest``: one atomic shard per
  study written by the workers, then ``manifest.json``, resumable like the local command. Needs an
  output folder every worker can write (a local disk for DirectRunner, a shared mount otherwise).
"""
from __future__ import annotations

import logging
import os
import pathlib
import shlex
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from cspine_jax.pp import options as options_lib
from cspine_jax.pp import study as study_lib
from cspine_jax.records import pipeline, shards

_LOG = logging.getLogger(__name__)
COUNTER_NAMESPACE = "cspine_records"


def record_key(task: str, record: dict[str, Any]) -> str:
  """A key unique within a record set (TFDS wants one per example)."""
  return "/".join(str(record[f]) for f in pipeline.TASKS[task].KEY_FIELDS)


def keyed_examples(study: study_lib.StudyInput, task: str, options: options_lib.Options
                   ) -> Iterator[tuple[str, dict[str, Any]]]:
  """The records of one study, keyed; a failing study yields nothing (logged and counted)."""
  try:
    # Materialised first so that a study failing half-way contributes no record at all.
    records = list(pipeline.records_of(task, study, options))
  except Exception as e:  # noqa: BLE001 - one bad study must not stop the pipeline.
    beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "bad_studies").inc()
    _LOG.warning("bad study %s: %s: %s", study.uid, type(e).__name__, e)
    return
  beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "studies").inc()
  for record in records:
    yield record_key(task, record), record


def pipeline_options(text: str | Sequence[str] | None) -> PipelineOptions:
  """'runner=DirectRunner,direct_num_workers=2' (the tfds CLI's form) or argv-style -> options."""
  if text is None:
    return PipelineOptions([])
  if isinstance(text, str):
    parts = [p for p in text.split(",") if p] if "--" not in text else shlex.split(text)
    text = [p if p.startswith("--") else f"--{p}" for p in parts]
  return PipelineOptions(list(text))


def build_records(data_dir: str | os.PathLike, out_dir: str | os.PathLike, task: str,
                  options: options_lib.Options | None = None, *,
                  vertebrae_file: str | os.PathLike | None = None,
                  beam_options: Any = None) -> dict[str, Any]:
  """The local record set (shards + manifest.json under out_dir/task) built by a Beam pipeline."""
  options = options or options_lib.Options()
  plan = pipeline.make_plan(data_dir, task, options, vertebrae_file)
  task_dir = pathlib.Path(out_dir) / task
  task_dir.mkdir(parents=True, exist_ok=True)
  pipeline.check_identity(task_dir, plan.identity())
  shards.remove_temporaries(task_dir)
  todo = [s for s in plan.studies if not pipeline.is_done(task_dir, s.uid)]
  if not isinstance(beam_options, PipelineOptions):
    beam_options = pipeline_options(beam_options)
  if todo:
    with beam.Pipeline(options=beam_options) as p:
      _ = (p
           | "Studies" >> beam.Create(todo)
           | "Reshuffle" >> beam.Reshuffle()  # Spread studies over workers.
           | "Process" >> beam.Map(lambda s: pipeline.run_study(task, s, options, str(task_dir))))
  manifest = pipeline.build_manifest(plan, task_dir)
  shards.write_json(task_dir / shards.MANIFEST, manifest)
  return manifest
