"""The TFDS builder (ArrayRecord, Tensor features, Apache Beam DirectRunner, no TensorFlow) and the
plain Beam pipeline give the same records as the local data_prep.prepare command."""
import collections
import pathlib
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from cspine_jax.pp import options as options_lib
from cspine_jax.records import beam as beam_lib
from cspine_jax.records import pipeline, shards, tfds_builder
from cspine_jax.synthetic import generate

REPO = pathlib.Path(__file__).resolve().parents[1]
OPTS = options_lib.Options(image_size=(24, 24), num_folds=2, stage2_slices=6, cube_size=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("rsna")
  generate(root, 3, seed=5, size="tiny")
  return root


def _multiset(records):
  return collections.Counter(map(shards.canonical, records))


# Runs data_prep.build_tfds as its own program, then lists the TensorFlow modules it imported.
_BUILD_THEN_LIST_TENSORFLOW = """
import runpy, sys

sys.argv = ["build_tfds", *sys.argv[1:]]
try:
  runpy.run_module("data_prep.build_tfds", run_name="__main__", alter_sys=True)
except SystemExit as e:
  if e.code:
    raise
print("tensorflow imported:", sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))
"""


def test_build_tfds_command_needs_no_tensorflow(data, tmp_path):
  """The TFDS command builds and describes a record set without importing TensorFlow (installed
  or not: where it is not, the build succeeding is the proof)."""
  local = pipeline.prepare(data, tmp_path / "local", "stage1", OPTS, progress=False)
  proc = subprocess.run(
      [sys.executable, "-c", _BUILD_THEN_LIST_TENSORFLOW, "--data_dir", str(data),
       "--out", str(tmp_path / "tfds"), "--task", "stage1", "--image_size", "24",
       "--num_folds", "2", "--stage2_slices", "6", "--cube_size", "8"],
      capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[-1] == "tensorflow imported: []"
  assert f"{local['num_records']} examples in " in lines[-2]
  assert lines[-2].startswith("cspine_records/stage1_")  # options other than the paper's: hashed


def test_build_tfds_command_refuses_bad_options(data, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "data_prep.build_tfds", "--data_dir", str(data),
       "--out", str(tmp_path / "tfds"), "--task", "stage1", "--stage2_slices", "7"],
      capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert proc.returncode == 2 and "build_tfds: error: stage2_slices must be a positive multiple" \
      in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("task", ["stage2", "stage1"])
def test_tfds_beam_build_equals_local(data, tmp_path, task):
  local = pipeline.prepare(data, tmp_path / "local", task, OPTS, progress=False)
  assert local["num_records"] > 0
  builder = tfds_builder.build(data, tmp_path / "tfds", task, OPTS,
                               beam_pipeline_options="runner=DirectRunner")
  assert builder.info.file_format.value == "array_record"
  assert builder.info.splits["train"].num_examples == local["num_records"]
  source = builder.as_data_source()["train"]
  from_tfds = [source[i] for i in range(len(source))]
  assert _multiset(from_tfds) == _multiset(pipeline.read_task(tmp_path / "local", task))
  # Users open a built set by its folder, whatever the config.
  reopened = tfds.builder_from_directory(builder.data_dir).as_data_source()["train"]
  assert len(reopened) == local["num_records"]
  assert isinstance(reopened[0][tfds_builder.pipeline.TASKS[task].KEY_FIELDS[0]], (bytes, str))


def test_the_paper_options_build_the_predefined_config_on_two_beam_workers(data, tmp_path):
  """The README's command with the default (paper) options: they name a predefined config, which
  TFDS refused to take as a new config object. Built by two Beam worker processes
  (multi_processing), the decoded records are the local command's."""
  paper = options_lib.Options()
  local = pipeline.prepare(data, tmp_path / "local", "stage2", paper, progress=False)
  assert local["num_records"] > 0
  want = _multiset(pipeline.read_task(tmp_path / "local", "stage2"))
  proc = subprocess.run(
      [sys.executable, "-m", "data_prep.build_tfds", "--data_dir", str(data), "--out",
       str(tmp_path / "tfds"), "--task", "stage2", "--beam_pipeline_options",
       "runner=DirectRunner,direct_running_mode=multi_processing,direct_num_workers=2"],
      capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  version_dir = tmp_path / "tfds" / "cspine_records" / "stage2" / tfds_builder.VERSION
  assert proc.stdout.strip().splitlines()[-1] == (
      f"cspine_records/stage2/{tfds_builder.VERSION}: {local['num_records']} examples in "
      f"{version_dir}")
  assert proc.stderr.count("Python sdk harness exiting") == 2  # two worker processes ran it
  source = tfds.builder_from_directory(version_dir).as_data_source()["train"]
  assert _multiset(source[i] for i in range(len(source))) == want
  # The library call with no options takes the same predefined config.
  builder = tfds_builder.build(data, tmp_path / "tfds_lib", "stage2")
  assert builder.builder_config is tfds_builder.CspineRecords.builder_configs["stage2"]
  source = builder.as_data_source()["train"]
  assert _multiset(source[i] for i in range(len(source))) == want


def test_plain_beam_pipeline_equals_local_and_resumes(data, tmp_path):
  local = pipeline.prepare(data, tmp_path / "local", "cnn3d", OPTS, progress=False)
  m = beam_lib.build_records(data, tmp_path / "beam", "cnn3d", OPTS,
                             beam_options="runner=DirectRunner")
  assert _multiset(pipeline.read_task(tmp_path / "beam", "cnn3d")) == \
      _multiset(pipeline.read_task(tmp_path / "local", "cnn3d"))
  for key in ("num_records", "records_per_fold", "folds", "bad_studies", "options"):
    assert m[key] == local[key]
  # Lose one shard (as if its worker died): a second run redoes only that study.
  first = tmp_path / "beam" / "cnn3d" / m["shards"][0]["file"]
  first.unlink()
  again = beam_lib.build_records(data, tmp_path / "beam", "cnn3d", OPTS,
                                 beam_options="runner=DirectRunner")
  assert again["num_records"] == m["num_records"] and first.exists()


def test_pipeline_options_parsing():
  opts = beam_lib.pipeline_options("runner=DirectRunner,direct_num_workers=2").get_all_options()
  assert opts["runner"] == "DirectRunner" and opts["direct_num_workers"] == 2
