"""TFDS dataset builder for the record sets: same per-study code, locally or on Apache Beam.

Features are plain ``tfds.features.Tensor`` (no Image/Text), the file format is ArrayRecord, so
building and reading need no TensorFlow:

    python -m data_prep.build_tfds --data_dir RSNA --out TFDS_DIR --task stage2 \\
        [--image_size 224] [...same options as data_prep.prepare...] \\
        --beam_pipeline_options="runner=DirectRunner,direct_num_workers=2,\\
direct_running_mode=multi_processing"

    ds = tfds.data_source("cspine_records/stage2", data_dir=TFDS_DIR)        # predefined configs
    ds = tfds.builder_from_directory(PATH_TO_VERSION_DIR).as_data_source()  # any config

Without direct_running_mode the DirectRunner runs in one process whatever direct_num_workers
says. The predefined configs (``stage1``, ``stage2``, ``slices2d`` at 224, ``cnn3d`` at 224^3)
follow the paper: its options build them; other options get a config named ``<task>_<hash>``.
With TensorFlow installed the stock CLI works too (it imports TensorFlow, which is why
``data_prep.build_tfds`` exists): ``tfds build cspine_jax/records/tfds_builder.py --manual_dir
RSNA --config stage2 --file_format array_record --beam_pipeline_options=...``.
Strings come back from TFDS as bytes (``study_uid``).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import apache_beam as beam
import tensorflow_datasets as tfds

from cspine_jax.pp import options as options_lib
from cspine_jax.records import beam as beam_lib
from cspine_jax.records import pipeline

VERSION = "1.0.0"


class CspineConfig(tfds.core.BuilderConfig):
  """One record set: the task, its preprocessing options and the optional --vertebrae file."""

  def __init__(self, *, task: str, options: options_lib.Options, vertebrae_file: str | None = None,
               name: str | None = None):
    if task not in pipeline.TASKS:
      raise ValueError(f"unknown task {task!r}; choose one of {sorted(pipeline.TASKS)}")
    super().__init__(name=name or config_name(task, options, vertebrae_file),
                     version=tfds.core.Version(VERSION),
                     description=f"{task} records, options {json.dumps(options.to_json())}")
    self.task = task
    self.options = options
    self.vertebrae_file = vertebrae_file


def config_name(task: str, options: options_lib.Options, vertebrae_file: str | None = None) -> str:
  """The paper configs keep the task's name; anything else gets a short hash of its options."""
  if vertebrae_file is None and options == _paper_options(task):
    return task
  text = json.dumps([options.to_json(), vertebrae_file], sort_keys=True).encode()
  return f"{task}_{hashlib.sha256(text).hexdigest()[:10]}"


def _paper_options(task: str) -> options_lib.Options:
  return options_lib.Options(cube_size=224) if task == "cnn3d" else options_lib.Options()


class CspineRecords(tfds.core.GeneratorBasedBuilder):
  """RSNA 2022 cervical spine CT -> stage1 / stage2 / cnn3d / slices2d records (split 'train')."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = [CspineConfig(task=t, options=_paper_options(t))
                     for t in sorted(pipeline.TASKS)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Point --manual_dir (download_config.manual_dir) at the RSNA 2022 folder holding train.csv, "
      "train_images/, segmentations/ and train_bounding_boxes.csv.")

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    feats = pipeline.TASKS[cfg.task].features(cfg.options)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            k: tfds.features.Tensor(shape=shape, dtype=dtype) for k, (shape, dtype) in feats.items()
        }),
        homepage="https://www.kaggle.com/competitions/rsna-2022-cervical-spine-fracture-detection",
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    plan = pipeline.make_plan(dl_manager.manual_dir, cfg.task, cfg.options, cfg.vertebrae_file)
    return {"train": self._generate_examples(plan.studies)}

  def _generate_examples(self, studies):
    cfg = self.builder_config
    return (beam.Create(studies)
            | "Reshuffle" >> beam.Reshuffle()
            | "PerStudy" >> beam.FlatMap(beam_lib.keyed_examples, cfg.task, cfg.options))


def build(data_dir: str | os.PathLike, tfds_dir: str | os.PathLike, task: str,
          options: options_lib.Options | None = None, *, vertebrae_file: str | None = None,
          beam_pipeline_options: str | Sequence[str] | None = "runner=DirectRunner"
          ) -> CspineRecords:
  """Builds one config with Beam (``download_and_prepare``) and returns the builder. The paper's
  options build the predefined config of their task (TFDS refuses a new config object under a
  predefined name); any others a config named by their hash."""
  options = options or _paper_options(task)
  config = CspineRecords.builder_configs.get(config_name(task, options, vertebrae_file))
  if config is None:
    config = CspineConfig(task=task, options=options, vertebrae_file=vertebrae_file)
  builder = CspineRecords(config=config, data_dir=os.fspath(tfds_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(data_dir),
      beam_options=beam_lib.pipeline_options(beam_pipeline_options)))
  return builder
