"""Builds one record set as a TFDS dataset (ArrayRecord files) with Apache Beam, no TensorFlow.

    python -m data_prep.build_tfds --data_dir RSNA --out TFDS_DIR
        --task {stage1,box_refine,stage2,cnn3d,slices2d} [--vertebrae FILE]
        [--image_size 224[,224]] [...the other preprocessing flags of data_prep.prepare...]
        [--beam_pipeline_options="runner=DirectRunner,direct_num_workers=2,\
direct_running_mode=multi_processing"]

The same per-study code as ``data_prep.prepare`` (``cspine_jax.records.tfds_builder``); Dataflow,
Flink or Spark through the runner options. Read it back with
``tfds.data_source("cspine_records/<config>", data_dir=TFDS_DIR)``. Exit status 2 on bad options
or input that stops the build.
"""
import sys

from absl import app
from absl import flags

from cspine_jax import cli_setup
from cspine_jax.records import pipeline
from cspine_jax.records import tfds_builder
from data_prep import pp_flags

_DATA_DIR = flags.DEFINE_string("data_dir", None, "RSNA-format folder (the manual_dir)",
                                required=True)
_OUT = flags.DEFINE_string("out", None, "TFDS data_dir to write into", required=True)
_TASK = flags.DEFINE_enum("task", None, sorted(pipeline.TASKS), "record set to build",
                          required=True)
_VERTEBRAE = flags.DEFINE_string("vertebrae", None, "stage-1 predictions CSV (io/vertebrae.py) "
                                 "for unsegmented studies")
_BEAM_PIPELINE_OPTIONS = flags.DEFINE_string(
    "beam_pipeline_options", "runner=DirectRunner",
    "e.g. runner=DataflowRunner,project=P,region=R,temp_location=gs://...")
flags.adopt_module_key_flags(pp_flags)  # listed by --help, not only --helpfull


def main(argv) -> int:
  cli_setup.begin(argv)
  try:
    builder = tfds_builder.build(_DATA_DIR.value, _OUT.value, _TASK.value, pp_flags.options(),
                                 vertebrae_file=_VERTEBRAE.value,
                                 beam_pipeline_options=_BEAM_PIPELINE_OPTIONS.value)
  except (ValueError, OSError) as e:  # bad options, an unreadable folder or --vertebrae file
    print(f"build_tfds: error: {e}", file=sys.stderr)
    return 2
  print(f"{builder.info.full_name}: {builder.info.splits['train'].num_examples} examples in "
        f"{builder.data_path}")
  return 0


if __name__ == "__main__":
  app.run(main)
