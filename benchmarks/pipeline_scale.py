"""The whole pipeline on full-size generated studies: seconds per study per step, record bytes per
study, peak memory, and the projection to the 2019 RSNA training studies.

    python benchmarks/pipeline_scale.py [--num_studies 8] [--workers 2] [--workdir DIR]
        [--difficulty realistic] [--cores 16]

The studies are generated like the real ones are stored (mostly 512 x 512, 200-400 slices, the
RSNA transfer syntaxes; `--config.synthetic.size=full`), the models are the `:cpu` ones (tiny
encoders at 64 px, short schedules): what scales with the data, reading, preprocessing, records
and the pseudo-label pass, is measured at full size; the models' own cost at paper size is the
GPU benchmarks' (benchmarks/results/). The projection assumes the per-study work of the data
steps divides over the host's cores as it does over this run's workers (both bound by decoding
and resampling, which the workers split study by study), and says so beside each figure.
"""
from __future__ import annotations

import os
import pathlib
import resource
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from configs import demo  # noqa: E402
from cspine_jax import cli_setup  # noqa: E402
from cspine_jax.pipeline import runner  # noqa: E402

_NUM_STUDIES = flags.DEFINE_integer("num_studies", 8, "full-size training studies to generate")
_WORKERS = flags.DEFINE_integer("workers", 2, "worker processes of the data steps")
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder (default: a temporary one)")
_DIFFICULTY = flags.DEFINE_string("difficulty", None, "generator difficulty (default: the demo's)")
_CORES = flags.DEFINE_integer("cores", 16, "cores of the host the projection is for")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "the records' image size (paper: 224)")
_REAL_STUDIES = 2019
# The steps whose work grows with the data (per study), as the pipeline titles them.
DATA_STEPS = ("generate synthetic studies", "prepare stage-1 records",
              "prepare box-refiner records",
              "stage-1 pseudo-labels", "prepare stage-2 records", "prepare 3D CNN records",
              "prepare 2D slice records", "predict the held-out test studies (from DICOM)")


def folder_bytes(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def config(num_studies: int, workers: int, difficulty: str | None, image_size: int):
  """The demo's method at full study size with short schedules (the models' cost is not the
  subject here)."""
  c = demo.get_config()
  c.synthetic.size = "full"
  c.synthetic.num_studies = num_studies
  if difficulty:
    c.synthetic.difficulty = difficulty
  c.synthetic.segmented_fraction = 0.5
  c.prepare.image_size = (image_size, image_size)
  c.workers = workers
  c.progress = False
  c.pngs = 0
  c.train_fold = 0
  for name in c.models:
    c.models[name].train.max_steps = 20
    c.models[name].train.members = 1
    c.models[name].train.eval_every = 1
  c.models.cnn3d.input.batch_size = 2  # one volume a study: a fold of a few studies is a few records
  return c


def main(argv) -> int:
  cli_setup.begin(argv)
  tmp = None
  workdir = _WORKDIR.value
  if workdir is None:
    tmp = tempfile.TemporaryDirectory(prefix="pipeline_scale_")
    workdir = tmp.name
  workdir = pathlib.Path(workdir)
  n = _NUM_STUDIES.value
  t0 = time.perf_counter()
  figures = runner.run(config(n, _WORKERS.value, _DIFFICULTY.value, _IMAGE_SIZE.value), workdir,
                       log=lambda _: None)
  wall = time.perf_counter() - t0
  test = figures["test"]["studies"]
  peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
  data = workdir / "data"
  slices = sum(1 for _ in (data / "train_images").rglob("*.dcm"))
  print(f"{n} full-size training studies ({slices} slices, {slices / n:.0f} per study), {test} test "
        f"studies, records at {_IMAGE_SIZE.value} px, {_WORKERS.value} workers, "
        f"{os.cpu_count()} cores; {wall:.0f} s in all")
  print(f"DICOM {folder_bytes(data / 'train_images') / n / 2**20:.1f} MB per study")
  records = workdir / "records"
  for task in sorted(p.name for p in records.iterdir() if p.is_dir()):
    size = folder_bytes(records / task)
    print(f"records {task:10s} {size / n / 2**20:7.2f} MB per study "
          f"(x{_REAL_STUDIES}: {size / n * _REAL_STUDIES / 2**30:6.1f} GB)")
  print(f"peak resident memory: this process {peak_self:.2f} GB, largest child {peak_children:.2f} GB")
  speedup = _CORES.value / _WORKERS.value
  total = 0.0
  for title, seconds in figures["step_seconds"].items():
    per = seconds / (test if title.startswith("predict") else n)
    line = f"{title:48s} {per:7.2f} s/study"
    if title in DATA_STEPS and not title.startswith("generate"):
      count = 1500 if title.startswith("predict") else _REAL_STUDIES  # Kaggle's test set: assumed
      hours = per * count / speedup / 3600
      total += hours
      line += f"  -> {count} studies on {_CORES.value} cores: {hours:5.2f} h (projected)"
    print(line)
  print(f"data steps for the real set on {_CORES.value} cores: {total:.1f} h (projected: the "
        f"per-study work of {_WORKERS.value} workers here divided over {_CORES.value} cores)")
  if tmp is not None:
    tmp.cleanup()
  return 0


if __name__ == "__main__":
  app.run(main)
